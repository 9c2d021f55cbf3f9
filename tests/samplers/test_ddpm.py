"""DDPM ancestral sampling against diffusers' DDPMScheduler (same seeded generator) and the closed form."""
import pytest
import torch
from sampler_oracles import SD, assert_parity, closed_form_ancestral, mixture, schedule

from openldm.diffusion.analytic import GaussianDenoiser
from openldm.diffusion.spacing import make_plan
from openldm.samplers import sample_ddim, sample_ddpm, sample_euler_ancestral


@pytest.mark.parametrize("kind", ["scaled_linear", "linear", "cosine"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddpm_trajectory_matches_diffusers_with_the_same_generator(kind, spacing):
    for n in (1, 4, 10, 25, 50):
        assert_parity("ddpm", schedule(kind), n, spacing=spacing)


def test_ddpm_zero_terminal_snr():
    config = schedule("scaled_linear", zero_terminal_snr=True)
    for spacing in ("leading", "trailing", "linspace"):
        for n in (4, 25):
            assert_parity("ddpm", config, n, spacing=spacing, prediction="v_prediction", patch_zero_snr=True)


def test_ddpm_is_ddim_eta_one_and_euler_ancestral():
    """In sigma space the DDPM posterior step is DDIM with eta = 1 and Euler ancestral (same noise, same result)."""
    den = mixture((2, 3, 3))
    plan = make_plan("ddpm", SD, 12)
    x = plan.initial_sample(torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0)))
    outs = [f(den, x, plan.sigmas, generator=torch.Generator().manual_seed(3), **kw)
            for f, kw in ((sample_ddpm, {}), (sample_ddim, {"eta": 1.0}), (sample_euler_ancestral, {}))]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=1e-5)


def test_ddpm_statistics_match_the_closed_form():
    mean, std, n = -0.3, 0.5, 20000
    target = GaussianDenoiser(torch.tensor([mean, mean]), std)
    errors = []
    for steps in (5, 10, 25, 50, 200):
        plan = make_plan("ddpm", SD, steps)
        m, var = closed_form_ancestral(plan.sigmas, mean, std, 1.0)
        assert m == pytest.approx(mean, abs=1e-12)
        errors.append(abs(var / std**2 - 1))
        if steps in (5, 50):
            g = torch.Generator().manual_seed(steps)
            out = sample_ddpm(target, target.sample(n, g, sigma=float(plan.sigmas[0])), plan.sigmas, generator=g)
            assert abs(float(out.var(0).mean()) - var) < 4 * var * (1 / n) ** 0.5
            assert abs(float(out.mean()) - mean) < 4 * (var / (2 * n)) ** 0.5
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.07, errors  # 200 steps (0.067 measured): DDPM's "fixed_small" variance converges slowly
