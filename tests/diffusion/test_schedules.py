"""Noise schedules against diffusers (betas, alphas_cumprod, sigmas, Karras sigmas, sigma <-> t) and the closed-form
forward process q(x_t | x_0)."""
import warnings

import numpy as np
import pytest
import torch

from openldm.diffusion.schedules import (
    MIN_ALPHA_BAR,
    ScheduleConfig,
    alphas_cumprod_from_sigmas,
    karras_sigmas,
    make_alphas_cumprod,
    make_betas,
    q_sample,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    t_to_sigma,
)

warnings.filterwarnings("ignore", module="diffusers")
diffusers = pytest.importorskip("diffusers")

KINDS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
CASES = [(k, z) for k in KINDS for z in (False, True)]


def config(kind, zero_snr=False):
    if kind == "scaled_linear":
        return ScheduleConfig(kind=kind, zero_terminal_snr=zero_snr)
    return ScheduleConfig(kind=kind, beta_start=0.0001, beta_end=0.02, zero_terminal_snr=zero_snr)


def reference(cfg, cls=None):
    cls = cls or diffusers.DDPMScheduler
    return cls(num_train_timesteps=cfg.num_train_steps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
               beta_schedule=KINDS[cfg.kind], rescale_betas_zero_snr=cfg.zero_terminal_snr)


@pytest.mark.parametrize("kind,zero_snr", CASES)
def test_betas_and_alphas_cumprod_are_diffusers(kind, zero_snr):
    cfg = config(kind, zero_snr)
    ref = reference(cfg)
    assert torch.equal(make_betas(cfg), ref.betas)
    assert torch.equal(make_alphas_cumprod(cfg), ref.alphas_cumprod)


@pytest.mark.parametrize("kind,zero_snr", CASES)
def test_sigmas_are_diffusers_euler_sigmas(kind, zero_snr):
    """Including zero terminal SNR (alpha_bar_T = 0 read as 2^-24) and the cosine schedule's tiny last alpha_bar."""
    cfg = config(kind, zero_snr)
    ref = reference(cfg, diffusers.EulerDiscreteScheduler)
    sigmas = sigmas_from_alphas_cumprod(make_alphas_cumprod(cfg))
    assert torch.equal(sigmas, ref.sigmas[:-1].flip(0))
    assert torch.isfinite(sigmas).all()


def test_zero_terminal_snr_rescale():
    """Lin et al. 2023, Algorithm 1: alpha_bar_T = 0, sqrt(alpha_bar_0) unchanged, still decreasing."""
    base, rescaled = make_alphas_cumprod(config("scaled_linear")), make_alphas_cumprod(config("scaled_linear", True))
    assert rescaled[-1] == 0
    assert rescaled[0].sqrt() == pytest.approx(base[0].sqrt().item(), rel=1e-6)
    assert (rescaled[1:] < rescaled[:-1]).all()
    assert sigmas_from_alphas_cumprod(rescaled)[-1] == pytest.approx(((1 - MIN_ALPHA_BAR) / MIN_ALPHA_BAR) ** 0.5)


def test_alphas_cumprod_from_sigmas_inverts():
    ab = make_alphas_cumprod(config("scaled_linear")).double()
    torch.testing.assert_close(alphas_cumprod_from_sigmas(sigmas_from_alphas_cumprod(ab)), ab, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [1, 2, 10, 50])
def test_karras_sigmas_are_diffusers(n):
    ref = diffusers.EulerDiscreteScheduler()
    ours = karras_sigmas(0.0292, 14.6146, n)
    theirs = ref._convert_to_karras(in_sigmas=np.array([14.6146, 0.0292]), num_inference_steps=n)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-12)
    assert ours[0] == pytest.approx(14.6146) and (n == 1 or ours[-1] == pytest.approx(0.0292))


def test_sigma_to_t_is_diffusers_and_inverts_t_to_sigma():
    ref = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    table = sigmas_from_alphas_cumprod(make_alphas_cumprod(config("scaled_linear")))
    log_np = np.log(table.numpy())
    probe = np.concatenate([np.geomspace(0.01, 20.0, 97), table.numpy()[::37]])  # includes outside the table
    ours = sigma_to_t(torch.from_numpy(probe), torch.from_numpy(log_np).double()).numpy()
    theirs = np.array([ref._sigma_to_t(s, log_np) for s in probe])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(sigma_to_t(t_to_sigma(t, table), table.log().double()), t, rtol=0, atol=1e-3)
    frac = torch.tensor([0.0, 0.5, 10.25, 998.9, 999.0], dtype=torch.float64)
    np.testing.assert_allclose(t_to_sigma(frac, table).numpy(), np.interp(frac.numpy(), np.arange(1000), table.numpy()),
                               rtol=1e-12)


def test_q_sample_mean_and_variance():
    """q(x_t | x_0) = N(sqrt(alpha_bar) x_0, (1 - alpha_bar) I), Ho et al. eq. 4: exact as a function of the noise
    (= diffusers' add_noise) and, over noise draws, with that mean and variance."""
    ab = make_alphas_cumprod(config("scaled_linear"))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=g)
    noise = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    torch.testing.assert_close(q_sample(x0, t, ab, noise), reference(config("scaled_linear")).add_noise(x0, noise, t))
    n = 40000
    x0 = torch.full((n, 1), 0.8)
    for step in (10, 500, 990):
        xt = q_sample(x0, torch.full((n,), step), ab, torch.randn(n, 1, generator=g))
        a = ab[step].item()
        assert xt.mean().item() == pytest.approx(a**0.5 * 0.8, abs=4 * ((1 - a) / n) ** 0.5)
        assert xt.var().item() == pytest.approx(1 - a, rel=4 * (2 / n) ** 0.5)
        # in sigma space the same sample is x0 + sigma * noise
        sigma = sigmas_from_alphas_cumprod(ab)[step].item()
        assert (xt / a**0.5).var().item() == pytest.approx(sigma**2, rel=4 * (2 / n) ** 0.5)


def test_bad_config_is_an_error():
    with pytest.raises(ValueError, match="'quadratic'"):
        ScheduleConfig(kind="quadratic")
    with pytest.raises(ValueError, match="num_train_steps"):
        ScheduleConfig(num_train_steps=1)
