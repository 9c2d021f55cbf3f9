"""DDIM against diffusers' DDIMScheduler (trajectories, eta = 0 and, with the same seeded generator, eta = 1) and
against the closed form for Gaussian data."""
import itertools

import pytest
import torch
from sampler_oracles import (
    SD,
    assert_parity,
    closed_form_ancestral,
    diffusers_scheduler,
    max_state_diff,
    mixture,
    run_diffusers,
    run_ours,
    schedule,
)

from openldm.diffusion.analytic import GaussianDenoiser
from openldm.diffusion.spacing import make_plan
from openldm.samplers import sample_ddim

STEPS = (1, 4, 10, 25, 50)


@pytest.mark.parametrize("kind", ["scaled_linear", "linear", "cosine"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_trajectory_matches_diffusers(kind, spacing):
    """Includes "linspace" and "trailing" with N not dividing T, where diffusers' DDIM lands on t - T // N rather than
    its next listed timestep: the plan's prev_sigmas reproduce that."""
    for n, final in itertools.product(STEPS + (3, 7), ("zero", "sigma_min")):
        assert_parity("ddim", schedule(kind), n, spacing=spacing, final_sigma=final, eta=0.0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_eta_one_matches_diffusers_with_the_same_generator(spacing):
    for n in STEPS:
        assert_parity("ddim", SD, n, spacing=spacing, eta=1.0)
    assert_parity("ddim", SD, 10, spacing=spacing, eta=0.5)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_zero_terminal_snr(spacing):
    """diffusers' DDIM keeps alpha_bar_T = 0 exactly (sigma infinite); sigma space needs a finite stand-in, and we use
    the one diffusers' Euler and DPM-Solver use (alpha_bar_T = 2^-24, sigma 4096). Identical to DDIMScheduler with
    that stand-in; against the exact-zero one the first step differs by O(1/4096)."""
    config = schedule("scaled_linear", zero_terminal_snr=True)
    for n in STEPS:
        for eta in (0.0, 1.0):
            assert_parity("ddim", config, n, spacing=spacing, eta=eta, prediction="v_prediction", patch_zero_snr=True)
    # Against the exact-zero reference: within a bound set by the stand-in (leading never visits t = 999).
    ref = diffusers_scheduler("ddim", config, spacing, prediction="v_prediction")
    ref.set_timesteps(10)
    plan = make_plan("ddim", config, 10, spacing=spacing)
    noise = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    den = mixture((2, 3, 3))
    assert max_state_diff(run_diffusers("ddim", ref, den, noise, prediction="v_prediction"),
                          run_ours("ddim", plan, den, noise)) < 1e-3


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_statistics_match_the_closed_form(eta):
    """Gaussian data, exact start: sample mean/variance within 4 standard errors of the closed form, which itself
    tends to the data variance as steps grow."""
    mean, std, n = 0.4, 0.6, 20000
    target = GaussianDenoiser(torch.tensor([mean, mean]), std)
    errors = []
    for steps in (5, 10, 25, 50, 200):
        plan = make_plan("ddim", SD, steps)
        m, var = closed_form_ancestral(plan.sigmas, mean, std, eta)
        errors.append(abs(var / std**2 - 1))
        if steps in (5, 25):
            g = torch.Generator().manual_seed(steps)
            x = target.sample(n, g, sigma=float(plan.sigmas[0]))
            out = sample_ddim(target, x, plan.sigmas, eta=eta, generator=g)
            se_var = var * (2 / (2 * n)) ** 0.5
            assert abs(float(out.var(0).mean()) - var) < 4 * se_var
            assert abs(float(out.mean()) - m) < 4 * (var / (2 * n)) ** 0.5
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < (0.03, 0.05, 0.07)[int(2 * eta)], errors  # at 200 steps: 0.025, 0.031, 0.055
