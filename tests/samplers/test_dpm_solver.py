"""DPM-Solver++(2M) and DPM-Solver++(2M) SDE against diffusers' DPMSolverMultistepScheduler (solver_order 2,
lower_order_final, algorithm_type dpmsolver++ / sde-dpmsolver++), image-to-image included, and the SDE's statistics
against the closed form."""
import itertools

import pytest
import torch
from sampler_oracles import (
    SD,
    assert_parity,
    closed_form_dpmpp_2m_sde,
    diffusers_scheduler,
    max_state_diff,
    mixture,
    parity_tolerance,
    run_diffusers,
    run_ours,
    schedule,
)

from openldm.diffusion.analytic import GaussianDenoiser
from openldm.diffusion.spacing import make_plan
from openldm.samplers import sample_dpmpp_2m, sample_dpmpp_2m_sde

STEPS = (1, 2, 4, 10, 25, 50)  # 25 and 50 with final sigma_min exercise the second-order last step


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde"])
@pytest.mark.parametrize("kind", ["scaled_linear", "linear", "cosine"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_trajectory_matches_diffusers(sampler, kind, spacing):
    for n, karras, final in itertools.product(STEPS, (False, True), ("zero", "sigma_min")):
        assert_parity(sampler, schedule(kind), n, spacing=spacing, karras=karras, final_sigma=final)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde"])
def test_zero_terminal_snr(sampler):
    config = schedule("scaled_linear", zero_terminal_snr=True)
    for spacing, n, karras in itertools.product(("leading", "trailing", "linspace"), (4, 25), (False, True)):
        assert_parity(sampler, config, n, spacing=spacing, karras=karras, prediction="v_prediction")


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde"])
@pytest.mark.parametrize("strength", [0.4, 0.75])
def test_image_to_image_matches_diffusers(sampler, strength):
    """Start from an input noised to the first remaining level (add_noise), walk the tail of the schedule: diffusers
    restarts the multistep solver at first order (begin_index), and so does a sampler run on the cut plan."""
    n, den = 20, mixture((2, 3, 3))
    full = make_plan(sampler, SD, n)
    plan = full.from_strength(strength)
    start = n - plan.num_steps
    x0 = den.sample(4, torch.Generator().manual_seed(2)).reshape(4, 2, 3, 3)
    noise = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(3))
    ref = diffusers_scheduler(sampler, SD)
    ref.set_timesteps(n)
    ref.set_begin_index(start)
    x_start = ref.add_noise(x0, noise, ref.timesteps[start:start + 1])
    theirs = run_diffusers(sampler, ref, den, noise, generator=torch.Generator().manual_seed(7), start=start,
                           x_start=x_start)
    ours = run_ours(sampler, plan, den, noise, generator=torch.Generator().manual_seed(7),
                    x_start=plan.noised_input(x0, noise))
    assert max_state_diff(theirs, ours) <= parity_tolerance(plan)


def test_second_order_differs_from_first_order():
    """Sanity: the multistep correction is used (DPM-Solver++(2M) is not DDIM), and lower_order_final matters only
    when the schedule ends above zero."""
    den = mixture((2,))
    plan = make_plan("dpmpp_2m", SD, 20, final_sigma="sigma_min")
    x = plan.initial_sample(torch.randn(8, 2, generator=torch.Generator().manual_seed(0)))
    a = sample_dpmpp_2m(den, x, plan.sigmas, lower_order_final=True)
    b = sample_dpmpp_2m(den, x, plan.sigmas, lower_order_final=False)
    assert not torch.allclose(a, b)
    plan0 = make_plan("dpmpp_2m", SD, 20)
    torch.testing.assert_close(sample_dpmpp_2m(den, x, plan0.sigmas, lower_order_final=True),
                               sample_dpmpp_2m(den, x, plan0.sigmas, lower_order_final=False), rtol=0, atol=0)


def test_sde_with_eta_zero_is_the_ode_solver():
    den = mixture((2,))
    plan = make_plan("dpmpp_2m", SD, 15, karras=True)
    x = plan.initial_sample(torch.randn(8, 2, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(sample_dpmpp_2m_sde(den, x, plan.sigmas, eta=0.0), sample_dpmpp_2m(den, x, plan.sigmas),
                               rtol=0, atol=1e-5)


def test_sde_statistics_match_the_closed_form():
    mean, std, n = 0.3, 0.5, 20000
    target = GaussianDenoiser(torch.tensor([mean, mean]), std)
    errors = []
    for steps in (5, 10, 25, 50):
        plan = make_plan("dpmpp_2m_sde", SD, steps, karras=True)
        var = closed_form_dpmpp_2m_sde(plan.sigmas, std, lower_order_final=plan.options["lower_order_final"])
        errors.append(abs(var / std**2 - 1))
        if steps in (5, 25):
            g = torch.Generator().manual_seed(steps)
            x = target.sample(n, g, sigma=float(plan.sigmas[0]))
            out = sample_dpmpp_2m_sde(target, x, plan.sigmas, generator=g, **plan.options)
            assert abs(float(out.var(0).mean()) - var) < 4 * var * (1 / n) ** 0.5
            assert abs(float(out.mean()) - mean) < 4 * (var / (2 * n)) ** 0.5
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.02, errors
