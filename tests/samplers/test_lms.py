"""LMS (linear multistep) against diffusers' LMSDiscreteScheduler: the same schedule (timesteps, sigmas, initial
noise), the same trajectory at every step in float32 and, with both sides in float64, to rounding; the exact
coefficients against the classical Adams-Bashforth ones and scipy's quadrature; and on Gaussian data, where the
exact probability-flow ODE solution is known, order 4 converging much faster than Euler."""
import functools
import itertools

import numpy as np
import pytest
import torch
from sampler_oracles import (
    KINDS,
    SD,
    max_state_diff,
    mixture,
    parity_tolerance,
    run_diffusers,
    run_ours,
    schedule,
)

from openldm.diffusion.analytic import GaussianDenoiser
from openldm.diffusion.spacing import SPACINGS, SamplingPlan, make_plan
from openldm.registry import SAMPLERS
from openldm.samplers import from_a1111_name, sample_euler, sample_lms
from openldm.samplers.lms import lms_coefficients

diffusers = pytest.importorskip("diffusers")
integrate = pytest.importorskip("scipy.integrate")

STEPS = (1, 2, 4, 10, 25, 50)


def lms_scheduler(config, spacing: str = "leading", steps_offset: int = 1, karras: bool = False):
    """diffusers' LMSDiscreteScheduler configured like our ``make_plan`` arguments (it has no final-sigma or
    zero-terminal-SNR option)."""
    return diffusers.LMSDiscreteScheduler(
        num_train_timesteps=config.num_train_steps, beta_start=config.beta_start, beta_end=config.beta_end,
        beta_schedule=KINDS[config.kind], timestep_spacing=spacing, steps_offset=steps_offset,
        prediction_type="epsilon", use_karras_sigmas=karras)


def lms_parity(config, num_steps: int, *, spacing: str = "leading", karras: bool = False,
               dtype: torch.dtype = torch.float32, order: int = 4) -> tuple[float, SamplingPlan]:
    """Max difference of the VP states after every step, ours vs diffusers, from the same noise and the same
    analytic denoiser. In float64 both sides run in float64 from the same float32 sigmas (diffusers' sigmas cast,
    our initial noise scale taken from its init_noise_sigma)."""
    den = mixture((2, 3, 3))
    ref = lms_scheduler(config, spacing, karras=karras)
    ref.set_timesteps(num_steps)
    plan = make_plan("lms", config, num_steps, spacing=spacing, karras=karras)
    if dtype == torch.float64:
        ref.sigmas = ref.sigmas.double()
        plan = SamplingPlan(plan.sigmas.double(), plan.timesteps, float(ref.init_noise_sigma))
    if order != 4:
        ref.step = functools.partial(ref.step, order=order)
    noise = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)
    theirs = run_diffusers("lms", ref, den, noise)
    ours = run_ours("lms", plan, den, noise, order=order)
    assert all(o.dtype == dtype for o in ours)
    return max_state_diff(theirs, ours), plan


def test_registered_with_its_a1111_name():
    spec = SAMPLERS.get("lms")
    assert spec.fn is sample_lms and spec.reference == "LMSDiscreteScheduler"
    assert spec.supports_karras and not spec.stochastic and spec.a1111_name == "LMS"
    assert from_a1111_name("LMS") == ("lms", False)
    assert from_a1111_name("LMS Karras") == ("lms", True)


@pytest.mark.parametrize("kind", ["scaled_linear", "linear", "cosine"])
def test_schedule_matches_diffusers(kind):
    """Timesteps (values and float32 dtype), float32 sigmas and the initial noise scale of set_timesteps, for
    every spacing, steps offset and Karras option; the final level is always 0 (diffusers has no other)."""
    config = schedule(kind)
    for spacing, offset, karras in itertools.product(SPACINGS, (0, 1), (False, True)):
        ref = lms_scheduler(config, spacing, offset, karras)
        for n in STEPS:
            ref.set_timesteps(n)
            plan = make_plan("lms", config, n, spacing=spacing, steps_offset=offset, karras=karras)
            where = f"{spacing} offset={offset} karras={karras} N={n}"
            assert plan.timesteps.dtype == ref.timesteps.dtype == torch.float32, where
            assert torch.equal(plan.timesteps, ref.timesteps), f"{where}: {plan.timesteps} != {ref.timesteps}"
            assert torch.equal(plan.sigmas, ref.sigmas), f"{where}: {plan.sigmas} != {ref.sigmas}"
            assert plan.init_noise_scale == pytest.approx(float(ref.init_noise_sigma), rel=1e-6), where
    with pytest.raises(ValueError, match="final_sigma 'sigma_min'"):
        make_plan("lms", config, 10, final_sigma="sigma_min")


@pytest.mark.parametrize("kind", ["scaled_linear", "linear", "cosine"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_trajectory_matches_diffusers(kind, spacing):
    """float32, as a pipeline runs. Spaced sigmas agree to ``parity_tolerance`` (SD's schedule: 4.8e-6 measured).
    With Karras sigmas the last step, to sigma 0, extrapolates four derivatives from sigma ~0.03-0.13 over the whole
    remaining interval, which multiplies the float32 rounding of x (both sides') by up to ~30: 1.8e-5 measured for
    SD's schedule at 50 steps (run in float64, diffusers' float32 result is 1.4e-5 from it, ours 6e-6), so there
    the bound is 3x. The float64 test below shows the two agree to rounding."""
    for n, karras in itertools.product(STEPS, (False, True)):
        diff, plan = lms_parity(schedule(kind), n, spacing=spacing, karras=karras)
        tol = parity_tolerance(plan) * (3 if karras else 1)
        assert diff <= tol, f"{kind} {spacing} karras={karras} N={n}: states differ by {diff:.3g} > {tol:.3g}"


@pytest.mark.parametrize("kind", ["scaled_linear", "linear", "cosine"])
def test_trajectory_matches_diffusers_in_float64(kind):
    """Both sides in float64: the same algorithm, to rounding (1.5e-11 measured at the cosine schedule's sigma_max
    of 20291, ~1e-15 for SD's), every spacing, Karras or not."""
    for spacing, n, karras in itertools.product(SPACINGS, (1, 4, 25), (False, True)):
        diff, _ = lms_parity(schedule(kind), n, spacing=spacing, karras=karras, dtype=torch.float64)
        assert diff <= 1e-9, f"{kind} {spacing} karras={karras} N={n}: {diff:.3g}"


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_other_orders_match_diffusers(order):
    """diffusers' ``step(..., order=k)``, in float64."""
    for karras in (False, True):
        diff, _ = lms_parity(SD, 20, karras=karras, dtype=torch.float64, order=order)
        assert diff <= 1e-12, (order, karras, diff)


def test_coefficients_are_the_exact_integrals():
    """Uniform steps give the classical Adams-Bashforth weights (Hairer et al. 1993, III.1); any steps give
    scipy's quadrature of the Lagrange basis polynomials; the weights always sum to the step (the basis sums to 1)."""
    h = -0.5
    history = [4.0, 3.5, 3.0, 2.5]  # oldest first, uniform step -0.5, next level 2.0
    assert lms_coefficients(history[-1:], 2.0) == [h]  # Euler
    np.testing.assert_allclose(lms_coefficients(history[-2:], 2.0), np.array([3, -1]) / 2 * h, rtol=1e-14)
    np.testing.assert_allclose(lms_coefficients(history[-3:], 2.0), np.array([23, -16, 5]) / 12 * h, rtol=1e-14)
    np.testing.assert_allclose(lms_coefficients(history, 2.0), np.array([55, -59, 37, -9]) / 24 * h, rtol=1e-14)

    def quad(levels, sigma_next, j):  # k-diffusion's / diffusers' linear_multistep_coeff, levels newest first
        def basis(tau):
            return np.prod([(tau - levels[k]) / (levels[j] - levels[k]) for k in range(len(levels)) if k != j])
        return integrate.quad(basis, levels[0], sigma_next, epsabs=0, epsrel=1e-13)[0]

    for history, sigma_next in [([14.6, 9.7, 6.1, 3.9], 2.3), ([20291.0, 80.5, 20.1, 7.7], 3.2),
                                ([0.31, 0.12, 0.05, 0.029], 0.0), ([1.0, 0.4], 0.0), ([3.0, 2.0, 1.5], 1.49)]:
        ours = lms_coefficients(history, sigma_next)
        theirs = [quad(history[::-1], sigma_next, j) for j in range(len(history))]
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12 * abs(sigma_next - history[-1]))
        assert sum(ours) == pytest.approx(sigma_next - history[-1], rel=1e-12)


def test_order_one_is_euler():
    den = mixture((2, 3, 3))
    plan = make_plan("lms", SD, 12, karras=True)
    x = plan.initial_sample(torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(sample_lms(den, x, plan.sigmas, order=1), sample_euler(den, x, plan.sigmas))


def test_converges_to_the_exact_flow_on_gaussian_data():
    """For N(mean, std^2) data the probability-flow ODE keeps x - mean proportional to sqrt(std^2 + sigma^2), so the
    exact solution from mean + sqrt(std^2 + sigma_0^2) lands on mean + std. The error shrinks with the steps, and
    order 4 beats order 2, which beats Euler (measured at 10 / 20 / 40 / 80 steps: LMS 1.1e-2 / 1.7e-3 / 6.1e-4 /
    1.1e-4, LMS order 2 5.1e-2 / 1.6e-2 / 4.8e-3 / 1.3e-3, Euler 1.2e-1 / 6.6e-2 / 3.7e-2 / 2.1e-2)."""
    mean, std = torch.tensor([0.7, -0.2], dtype=torch.float64), 0.5
    den = GaussianDenoiser(mean, std)
    errors = {}
    for steps in (10, 20, 40, 80):
        sigmas = make_plan("lms", SD, steps, spacing="trailing").sigmas.double()
        x = torch.stack([mean, mean + (std**2 + float(sigmas[0]) ** 2) ** 0.5])
        for name, out in [("lms", sample_lms(den, x, sigmas)), ("lms2", sample_lms(den, x, sigmas, order=2)),
                          ("euler", sample_euler(den, x, sigmas))]:
            torch.testing.assert_close(out[0], mean, rtol=0, atol=1e-12)  # the mean is a fixed point
            errors[name, steps] = float((out[1] - mean - std).abs().max())
    for steps in (10, 20, 40, 80):
        assert errors["lms", steps] < errors["lms2", steps] < errors["euler", steps], errors
    lms = [errors["lms", s] for s in (10, 20, 40, 80)]
    assert all(b < a for a, b in itertools.pairwise(lms)), lms
    assert errors["lms", 80] < 2e-4 and errors["lms", 80] < errors["euler", 80] / 50, errors


def test_image_to_image_restarts_at_first_order():
    """On a cut schedule the history starts empty, so the first step is an Euler step (k-diffusion's behaviour,
    which A1111 uses; diffusers' img2img instead takes a full-order step from its begin index)."""
    den = mixture((2,))
    plan = make_plan("lms", SD, 20).from_strength(0.5)
    x = plan.noised_input(den.sample(8, torch.Generator().manual_seed(0)),
                          torch.randn(8, 2, generator=torch.Generator().manual_seed(1)))
    first = []
    sample_lms(den, x, plan.sigmas, on_step=lambda i, s, sn, x_now, d: first.append(x_now) if i == 0 else None)
    assert torch.equal(first[0], sample_euler(den, x, plan.sigmas[:2]))


def test_repeated_level_and_bad_order():
    """A zero-length step leaves x as it is and its level is not counted twice in the interpolation (which would
    divide by zero); the order must be a positive integer."""
    den = mixture((2,))
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)) * 10
    plain = sample_lms(den, x, torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0]))
    repeated = sample_lms(den, x, torch.tensor([10.0, 5.0, 5.0, 2.0, 1.0, 0.0]))
    assert torch.equal(plain, repeated)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="order must be a positive integer"):
            sample_lms(den, x, torch.tensor([10.0, 0.0]), order=bad)
