"""Euler, Euler ancestral and Heun against diffusers' EulerDiscreteScheduler, EulerAncestralDiscreteScheduler and
HeunDiscreteScheduler (trajectories at every step boundary, the same seeded generator for the ancestral one), and
end to end through DiscreteDenoiser with an eps-predicting network."""
import itertools

import pytest
import torch
from sampler_oracles import (
    SD,
    assert_parity,
    closed_form_ancestral,
    diffusers_scheduler,
    mixture,
    schedule,
)

from openldm.diffusion.analytic import GaussianDenoiser
from openldm.diffusion.denoiser import DiscreteDenoiser
from openldm.diffusion.schedules import make_alphas_cumprod, t_to_sigma
from openldm.diffusion.spacing import make_plan
from openldm.samplers import sample_euler, sample_euler_ancestral, sample_heun

STEPS = (1, 4, 10, 25, 50)
KINDS = ["scaled_linear", "linear", "cosine"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_euler_trajectory_matches_diffusers(kind, spacing):
    for n, karras, final in itertools.product(STEPS, (False, True), ("zero", "sigma_min")):
        assert_parity("euler", schedule(kind), n, spacing=spacing, karras=karras, final_sigma=final)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
def test_zero_terminal_snr(sampler):
    config = schedule("scaled_linear", zero_terminal_snr=True)
    for spacing, n in itertools.product(("leading", "trailing", "linspace"), (4, 25)):
        assert_parity(sampler, config, n, spacing=spacing, prediction="v_prediction")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_euler_ancestral_matches_diffusers_with_the_same_generator(kind, spacing):
    """(With the cosine schedule's sigma_max of 20291 diffusers' float32 sigma_down = sqrt(sigma_to^2 - sigma_up^2)
    can go NaN; there only ours is checked, to be finite.)"""
    for n in STEPS:
        assert_parity("euler_ancestral", schedule(kind), n, spacing=spacing, reference_may_fail=kind == "cosine")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_heun_trajectory_matches_diffusers_at_step_boundaries(kind, spacing):
    """Our Heun takes the plain sigma list; diffusers' interleaves repeated entries. For the cosine schedule
    (sigma_max 20291) the corrector of the first step multiplies the float32 rounding of diffusers' input scaling
    1 / sqrt(sigma^2 + 1) by ~sigma_max (it stays ~5e-3 relative even with both sides run in float64), so there the
    check is relative: 2e-2 of the state's size (9e-3 measured)."""
    for n, karras in itertools.product(STEPS, (False, True)):
        assert_parity("heun", schedule(kind), n, spacing=spacing, karras=karras,
                      relative=2e-2 if kind == "cosine" else None)


def test_heun_evaluates_twice_per_step_except_the_last():
    calls = []
    den = mixture((2,))

    def counting(x, sigma, cond=None):
        calls.append(float(sigma[0]))
        return den(x, sigma)

    plan = make_plan("heun", SD, 10)
    sample_heun(counting, plan.initial_sample(torch.randn(3, 2)), plan.sigmas)
    assert len(calls) == 2 * 10 - 1  # as diffusers' interleaved schedule: 2N - 1 model calls
    assert calls[1] == pytest.approx(float(plan.sigmas[1]))  # the corrector evaluates at sigma_next


def test_euler_ancestral_statistics_match_the_closed_form():
    mean, std, n = 0.2, 0.7, 20000
    target = GaussianDenoiser(torch.tensor([mean, mean]), std)
    for steps in (5, 25):
        plan = make_plan("euler_ancestral", SD, steps, spacing="linspace")
        m, var = closed_form_ancestral(plan.sigmas, mean, std, 1.0)
        g = torch.Generator().manual_seed(steps)
        out = sample_euler_ancestral(target, target.sample(n, g, sigma=float(plan.sigmas[0])), plan.sigmas, generator=g)
        assert abs(float(out.var(0).mean()) - var) < 4 * var * (1 / n) ** 0.5
        assert abs(float(out.mean()) - m) < 4 * (var / (2 * n)) ** 0.5


def test_euler_churn_is_edm_algorithm_2():
    """With s_churn > 0 the level is raised to sigma_hat = sigma (1 + gamma) by fresh noise before the denoiser is
    evaluated there (Karras et al., Algorithm 2). For Gaussian data that is y_hat = y + sqrt(sigma_hat^2 - sigma^2) z,
    y' = (1 + (sigma' - sigma_hat)(1 - a_hat) / sigma_hat) y_hat: the statistics follow that closed form, and the
    draws come from the generator."""
    std, n, churn = 0.5, 20000, dict(s_churn=5.0, s_tmin=0.05, s_tmax=10.0)
    target = GaussianDenoiser(torch.tensor([0.0, 0.0]), std)
    errors = []
    for steps in (10, 40, 160):
        plan = make_plan("euler", SD, steps, spacing="linspace")
        gamma = min(churn["s_churn"] / steps, 2**0.5 - 1)
        s = plan.sigmas.tolist()
        var = std**2 + s[0] ** 2
        for sigma, sigma_next in zip(s, s[1:]):
            hat = sigma * (1 + gamma) if churn["s_tmin"] <= sigma <= churn["s_tmax"] else sigma
            a = std**2 / (std**2 + hat**2)
            var = (1 + (sigma_next - hat) * (1 - a) / hat) ** 2 * (var + hat**2 - sigma**2)
        errors.append(abs(var / std**2 - 1))
        if steps == 40:
            seen = []

            def recording(x, sigma, cond=None):
                seen.append(float(sigma[0]))
                return target(x, sigma)

            g = torch.Generator().manual_seed(0)
            x = target.sample(n, g, sigma=s[0])
            out = sample_euler(recording, x, plan.sigmas, generator=torch.Generator().manual_seed(1), **churn)
            hats = [p * (1 + gamma) if 0.05 <= p <= 10.0 else p for p in s[:-1]]
            assert seen == pytest.approx(hats, rel=1e-6)
            assert abs(float(out.var(0).mean()) - var) < 4 * var * (1 / n) ** 0.5
            again = sample_euler(target, x, plan.sigmas, generator=torch.Generator().manual_seed(1), **churn)
            assert torch.equal(out, again)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.06, errors  # 0.56, 0.19, 0.055


class EpsNet(torch.nn.Module):
    """An ideal eps-predicting network for the analytic data: gets (x_t, t) like a UNet, maps the (integer or
    fractional) timestep to sigma by diffusers' linear interpolation over the training table."""

    def __init__(self, data, alphas_cumprod):
        super().__init__()
        self.data = data
        self.table = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()

    def forward(self, x_t, t):
        sigma = t_to_sigma(t.reshape(-1).to(torch.float64), self.table).float()
        s = sigma.view(-1, *([1] * (x_t.dim() - 1)))
        x = x_t * (1 + s**2).sqrt()
        return (x - self.data(x, sigma)) / s


@pytest.mark.parametrize("sampler,spacing,karras", [
    ("euler", "leading", False), ("heun", "leading", False), ("dpmpp_2m", "leading", False), ("ddim", "leading", False),
    ("ddim", "trailing", False), ("euler", "trailing", True), ("heun", "leading", True), ("dpmpp_2m", "leading", True),
    ("dpmpp_2m_sde", "trailing", True)])
def test_discrete_denoiser_with_a_network_matches_diffusers_end_to_end(sampler, spacing, karras):
    """The pipeline path: our sampler over DiscreteDenoiser(net) vs the diffusers scheduler calling the same net
    with its own timesteps. DiscreteDenoiser's sigma -> t recovers integer timesteps and Karras sigmas' fractional
    ones; DPM-Solver's rounded Karras timesteps need ``quantize``, which the plan's integer timesteps call for."""
    ab = make_alphas_cumprod(SD)
    net = EpsNet(mixture((2, 3, 3)), ab)
    ref = diffusers_scheduler(sampler, SD, spacing, karras=karras)
    ref.set_timesteps(20)
    noise = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    x = noise * ref.init_noise_sigma
    g = torch.Generator().manual_seed(5)
    kwargs = {"generator": g} if sampler == "dpmpp_2m_sde" else {}
    for t in ref.timesteps:
        x = ref.step(net(ref.scale_model_input(x, t), t.reshape(1).expand(2)), t, x, **kwargs).prev_sample
    plan = make_plan(sampler, SD, 20, spacing=spacing, karras=karras)
    den = DiscreteDenoiser(net, ab, "eps", quantize=not plan.timesteps.is_floating_point())
    ours = SAMPLER(sampler)(den, plan.initial_sample(noise), plan.sigmas, generator=torch.Generator().manual_seed(5),
                            **plan.options)
    torch.testing.assert_close(ours, x, rtol=0, atol=2e-5)


def SAMPLER(name):
    from openldm.registry import SAMPLERS
    return SAMPLERS.get(name)
