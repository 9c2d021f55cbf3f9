"""Training targets (eps, v, x0), their conversions, timestep sampling, min-SNR-gamma weights and offset noise."""
import warnings

import pytest
import torch

from openldm.diffusion.objectives import (
    min_snr_weight,
    offset_noise,
    sample_timesteps,
    snr,
    target,
    to_eps,
    to_x0,
)
from openldm.diffusion.schedules import ScheduleConfig, make_alphas_cumprod

warnings.filterwarnings("ignore", module="diffusers")
diffusers = pytest.importorskip("diffusers")
PREDICTIONS = ("eps", "v", "x0")


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    ab = make_alphas_cumprod(ScheduleConfig()).double()
    t = torch.tensor([0, 100, 500, 900, 999])
    x0 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    a = ab[t].view(-1, 1, 1, 1)
    return x0, eps, ab[t], a.sqrt() * x0 + (1 - a).sqrt() * eps


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_conversions_round_trip(batch, prediction):
    x0, eps, ab, x_t = batch
    out = target(x0, eps, ab, prediction)
    torch.testing.assert_close(to_x0(out, x_t, ab, prediction), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(to_eps(out, x_t, ab, prediction), eps, rtol=1e-9, atol=1e-9)
    for other in PREDICTIONS:  # any target converts to any other through (x0, eps)
        converted = target(to_x0(out, x_t, ab, prediction), to_eps(out, x_t, ab, prediction), ab, other)
        torch.testing.assert_close(converted, target(x0, eps, ab, other), rtol=1e-9, atol=1e-9)


def test_v_is_diffusers_velocity_and_its_x0(batch):
    x0, eps, ab, x_t = batch
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 100, 500, 900, 999])
    v = target(x0.float(), eps.float(), ab.float(), "v")
    torch.testing.assert_close(v, ref.get_velocity(x0.float(), eps.float(), t), rtol=1e-5, atol=1e-6)
    a = ab.float().view(-1, 1, 1, 1)
    x0_ref = a.sqrt() * x_t.float() - (1 - a).sqrt() * v  # diffusers' DDIM/DDPM x0 from v
    torch.testing.assert_close(to_x0(v, x_t.float(), ab.float(), "v"), x0_ref)


def test_sample_timesteps_uniform_and_seeded():
    t = sample_timesteps(100000, 1000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999
    counts = torch.bincount(t // 100, minlength=10).float()
    assert ((counts - 10000).abs() < 4 * 10000**0.5).all()
    assert torch.equal(t[:10], sample_timesteps(100000, 1000, torch.Generator().manual_seed(0))[:10])


def test_min_snr_gamma_weights():
    """Hang et al. 2023: weight = min(SNR, gamma) / SNR for eps, / (SNR + 1) for v, min(SNR, gamma) for x0; SNR as
    diffusers' training scripts compute it, (sqrt(alpha_bar) / sqrt(1 - alpha_bar))^2 (training_utils.compute_snr,
    whose module is slow to import)."""
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 100, 400, 999])
    ab = ref.alphas_cumprod[t]
    r = (ab**0.5 / (1 - ab) ** 0.5) ** 2
    torch.testing.assert_close(snr(ab), r, rtol=1e-5, atol=0)
    clipped = torch.minimum(r, torch.tensor(5.0))
    torch.testing.assert_close(min_snr_weight(ab, 5.0, "eps"), clipped / r, rtol=1e-5, atol=0)
    torch.testing.assert_close(min_snr_weight(ab, 5.0, "v"), clipped / (r + 1), rtol=1e-5, atol=0)
    torch.testing.assert_close(min_snr_weight(ab, 5.0, "x0"), clipped, rtol=1e-5, atol=0)
    assert min_snr_weight(ab, 5.0, "eps")[-1] == pytest.approx(1.0)  # low SNR: unweighted


def test_offset_noise_statistics():
    g = torch.Generator().manual_seed(0)
    plain = offset_noise((2000, 4, 8, 8), 0.0, torch.Generator().manual_seed(0))
    noise = offset_noise((2000, 4, 8, 8), 0.1, g)
    assert noise.shape == (2000, 4, 8, 8)
    # the per-(sample, channel) mean carries the offset: variance 1/64 + 0.1^2
    assert noise.mean((2, 3)).var().item() == pytest.approx(1 / 64 + 0.01, rel=0.08)
    assert plain.mean((2, 3)).var().item() == pytest.approx(1 / 64, rel=0.08)
    assert torch.equal(noise, offset_noise((2000, 4, 8, 8), 0.1, torch.Generator().manual_seed(0)))


def test_unknown_prediction_is_an_error(batch):
    x0, eps, ab, x_t = batch
    for fn in (lambda: target(x0, eps, ab, "score"), lambda: to_x0(x0, x_t, ab, "score"),
               lambda: to_eps(x0, x_t, ab, "score"), lambda: min_snr_weight(ab, 5.0, "score")):
        with pytest.raises(ValueError, match="'score'"):
            fn()
