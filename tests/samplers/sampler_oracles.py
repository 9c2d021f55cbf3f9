"""Oracles shared by the sampler tests: diffusers schedulers built from our config, a diffusers-side model made from
an analytic denoiser, and loops that drive both sides and record the state after every step.

States are compared as the network sees them, x / sqrt(1 + sigma^2) (the VP sample x_t), so one absolute tolerance
means the same thing at sigma 14 and at sigma 0.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from openldm.diffusion.analytic import GaussianMixtureDenoiser
from openldm.diffusion.schedules import (
    MIN_ALPHA_BAR,
    ScheduleConfig,
    sigmas_from_alphas_cumprod,
)
from openldm.diffusion.spacing import make_plan
from openldm.registry import SAMPLERS
from openldm.samplers.base import ancestral_sigmas

warnings.filterwarnings("ignore", module="diffusers")
diffusers = pytest.importorskip("diffusers")

KINDS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
SD = ScheduleConfig()  # Stable Diffusion v1: scaled_linear 0.00085..0.012, T = 1000


def schedule(kind: str = "scaled_linear", zero_terminal_snr: bool = False) -> ScheduleConfig:
    if kind == "scaled_linear":
        return ScheduleConfig(kind=kind, zero_terminal_snr=zero_terminal_snr)
    return ScheduleConfig(kind=kind, beta_start=0.0001, beta_end=0.02, zero_terminal_snr=zero_terminal_snr)


def diffusers_scheduler(sampler: str, config: ScheduleConfig, spacing: str = "leading", steps_offset: int = 1,
                        karras: bool = False, final_sigma: str = "zero", prediction: str = "epsilon"):
    """The diffusers scheduler the sampler follows, configured like our ``make_plan`` arguments."""
    common = dict(num_train_timesteps=config.num_train_steps, beta_start=config.beta_start, beta_end=config.beta_end,
                  beta_schedule=KINDS[config.kind], timestep_spacing=spacing, steps_offset=steps_offset,
                  prediction_type=prediction)
    zsnr = dict(rescale_betas_zero_snr=config.zero_terminal_snr)
    if sampler == "ddpm":
        return diffusers.DDPMScheduler(**common, **zsnr, clip_sample=False, variance_type="fixed_small")
    if sampler == "ddim":
        return diffusers.DDIMScheduler(**common, **zsnr, clip_sample=False, set_alpha_to_one=final_sigma == "zero")
    if sampler == "euler":
        return diffusers.EulerDiscreteScheduler(**common, **zsnr, use_karras_sigmas=karras,
                                                final_sigmas_type=final_sigma)
    if sampler == "euler_ancestral":
        return diffusers.EulerAncestralDiscreteScheduler(**common, **zsnr)
    if sampler == "heun":
        if config.zero_terminal_snr:
            raise ValueError("HeunDiscreteScheduler has no zero-terminal-SNR option")
        return diffusers.HeunDiscreteScheduler(**common, use_karras_sigmas=karras)
    algorithm = {"dpmpp_2m": "dpmsolver++", "dpmpp_2m_sde": "sde-dpmsolver++"}[sampler]
    return diffusers.DPMSolverMultistepScheduler(**common, **zsnr, algorithm_type=algorithm, solver_order=2,
                                                 lower_order_final=True, use_karras_sigmas=karras,
                                                 final_sigmas_type=final_sigma)


def reference_schedule(sampler: str, scheduler) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(timesteps, sigmas, initial noise scale in sigma space) of a diffusers scheduler after set_timesteps, in our
    plain form: Heun de-interleaved; DDPM/DDIM sigmas read from alphas_cumprod at their timesteps."""
    ts = scheduler.timesteps
    if sampler == "heun":
        return torch.cat([ts[:1], ts[1::2]]), torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1::2]]), \
            float(scheduler.init_noise_sigma)
    if sampler in ("ddpm", "ddim"):
        table = sigmas_from_alphas_cumprod(scheduler.alphas_cumprod)
        final = 0.0 if float(getattr(scheduler, "final_alpha_cumprod", 1.0)) == 1.0 else float(table[0])
        sigmas = torch.cat([table[ts], torch.tensor([final])])
        return ts, sigmas, float((sigmas[0] ** 2 + 1) ** 0.5)
    if sampler in ("dpmpp_2m", "dpmpp_2m_sde"):
        return ts, scheduler.sigmas, float((scheduler.sigmas[0] ** 2 + 1) ** 0.5)
    return ts, scheduler.sigmas, float(scheduler.init_noise_sigma)


def network_output(denoiser, x_in: torch.Tensor, sigma: float, alpha_bar: float, prediction: str) -> torch.Tensor:
    """What an ideal network predicting ``prediction`` outputs at VP input ``x_in`` of level ``sigma``
    (``alpha_bar`` the scheduler's own, possibly exactly 0 under zero terminal SNR, when sigma is its 2^-24 stand-in)."""
    x_sigma = x_in * (1 + sigma**2) ** 0.5
    x0 = denoiser(x_sigma, torch.full((x_in.shape[0],), sigma))
    a, s = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    eps = (x_in - a * x0) / s
    if prediction == "epsilon":
        return eps
    return a * eps - s * x0  # v


def vp(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x / (1 + sigma**2) ** 0.5


def run_diffusers(sampler: str, scheduler, denoiser, noise: torch.Tensor, *, generator=None, eta: float = 0.0,
                  prediction: str = "epsilon", start: int = 0,
                  x_start: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Drive a diffusers scheduler (after set_timesteps) from unit ``noise`` (or from ``x_start`` at plain step
    ``start``, as img2img does); return the VP state after every plain step."""
    ts = scheduler.timesteps
    heun = sampler == "heun"
    vp_space = sampler in ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde")
    begin = 2 * start if heun else start
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    if x_start is not None:
        x = x_start
    else:
        x = noise * scheduler.init_noise_sigma
    table = sigmas_from_alphas_cumprod(scheduler.alphas_cumprod)
    states = []
    kwargs = {"generator": generator} if sampler in ("ddpm", "euler_ancestral", "dpmpp_2m_sde") else {}
    if sampler == "ddim":
        kwargs = {"eta": eta, "generator": generator}
    n = len(ts)
    for j in range(begin, n):
        t = ts[j]
        if sampler in ("ddpm", "ddim"):
            sigma, ab = float(table[t]), float(scheduler.alphas_cumprod[t])
        else:
            sigma = float(scheduler.sigmas[j])
            ab = 1 / (1 + sigma**2)
        x_in = scheduler.scale_model_input(x, t)
        out = network_output(denoiser, x_in, sigma, ab, prediction)
        x = scheduler.step(out, t, x, **kwargs).prev_sample
        boundary = (not heun) or j % 2 == 1 or j == n - 1
        if boundary:
            if vp_space:
                states.append(x.clone())
            else:
                states.append(vp(x, float(scheduler.sigmas[j + 1])))
    return states


def run_ours(sampler: str, plan, denoiser, noise: torch.Tensor, *, generator=None,
             x_start: torch.Tensor | None = None, **options) -> list[torch.Tensor]:
    """Run a registered sampler over ``plan`` from unit ``noise`` (or ``x_start``); VP state after every step."""
    states = []

    def record(i, sigma, sigma_next, x, denoised):
        states.append(vp(x, sigma_next))

    x = plan.initial_sample(noise) if x_start is None else x_start
    SAMPLERS.get(sampler)(denoiser, x, plan.sigmas, generator=generator, on_step=record, **{**plan.options, **options})
    return states


def max_state_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def mixture(shape: tuple[int, ...] = (2,)) -> GaussianMixtureDenoiser:
    """A 3-component mixture of isotropic Gaussians with unequal weights, on ``shape``-shaped points."""
    g = torch.Generator().manual_seed(1)
    means = torch.randn(3, *shape, generator=g)
    return GaussianMixtureDenoiser(means, torch.tensor([0.3, 0.5, 0.4]), torch.tensor([0.5, 0.3, 0.2]))



def parity_tolerance(plan) -> float:
    """1e-5 on the network's input scale, widened in proportion to the largest sigma beyond Stable Diffusion's
    (~14.6): recovering x0 = x - sigma eps in float32 (both sides do it) loses about sigma_max * 2^-24."""
    return 1e-5 * max(1.0, float(plan.sigmas.max()) / 15.0)


def assert_parity(sampler: str, config: ScheduleConfig, num_steps: int, *, spacing: str = "leading",
                  steps_offset: int = 1, karras: bool = False, final_sigma: str = "zero", eta: float | None = None,
                  prediction: str = "epsilon", denoiser=None, patch_zero_snr: bool = False,
                  relative: float | None = None, reference_may_fail: bool = False) -> float:
    """Run our sampler and its diffusers scheduler from the same noise (and the same seeded generator for the
    stochastic ones) with the same analytic denoiser; assert the states after every step agree to
    ``parity_tolerance`` (or, with ``relative``, to that fraction of the largest state). With ``reference_may_fail``
    a reference that produced NaN is not compared (ours must then be finite). Returns the max difference."""
    denoiser = denoiser or mixture((2, 3, 3))
    ref = diffusers_scheduler(sampler, config, spacing, steps_offset, karras, final_sigma, prediction)
    ref.set_timesteps(num_steps)
    if patch_zero_snr:  # DDPM/DDIM keep alpha_bar_T = 0; read it as Euler/DPM-Solver do (2^-24), as we do
        ref.alphas_cumprod[-1] = MIN_ALPHA_BAR
    plan = make_plan(sampler, config, num_steps, spacing=spacing, steps_offset=steps_offset, karras=karras,
                     final_sigma=final_sigma)
    noise = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    ours_opts = {} if eta is None else {"eta": eta}
    theirs = run_diffusers(sampler, ref, denoiser, noise, generator=torch.Generator().manual_seed(7),
                           eta=eta or 0.0, prediction=prediction)
    ours = run_ours(sampler, plan, denoiser, noise, generator=torch.Generator().manual_seed(7), **ours_opts)
    if reference_may_fail and any(t.isnan().any() for t in theirs):
        assert all(o.isfinite().all() for o in ours)
        return float("nan")
    diff = max_state_diff(theirs, ours)
    if relative:
        diff = diff / max(float(t.abs().max()) for t in theirs)
    tol = relative or parity_tolerance(plan)
    where = (f"{sampler} {config.kind} zsnr={config.zero_terminal_snr} {spacing} karras={karras} {final_sigma} "
             f"N={num_steps}")
    assert diff <= tol, f"{where}: states differ by {diff:.3g} > {tol:.3g}"
    return diff


def closed_form_ancestral(sigmas, mean: float, std: float, eta: float = 1.0, prev_sigmas=None) -> tuple[float, float]:
    """Mean and variance (per coordinate) after an ancestral sampler (DDPM = DDIM(eta) = Euler ancestral(eta) in
    sigma space) run with the exact denoiser of N(mean, std^2) from the exact marginal at sigmas[0]. With
    D - mean = a (x - mean), a = std^2 / (std^2 + sigma^2), one step is x' - mean = g (x - mean) + sigma_up z,
    g = a + (sigma_down / sigma)(1 - a)."""
    s = [float(v) for v in sigmas]
    to = s[1:] if prev_sigmas is None else [float(v) for v in prev_sigmas]
    m, var = mean, std**2 + s[0] ** 2
    for i in range(len(s) - 1):
        sigma, sigma_next, sigma_to = s[i], s[i + 1], to[i]
        a = std**2 / (std**2 + sigma**2)
        down, up = ancestral_sigmas(sigma, sigma_to, eta)
        g = a + down / sigma * (1 - a)
        k = ((1 + sigma_next**2) / (1 + sigma_to**2)) ** 0.5
        m, var = k * (mean + g * (m - mean)), k**2 * (g**2 * var + up**2)
    return m, var


def closed_form_dpmpp_2m_sde(sigmas, std: float, eta: float = 1.0, lower_order_final: bool | None = None) -> float:
    """Variance (per coordinate) after DPM-Solver++(2M) SDE with the exact denoiser of N(mean, std^2) from the exact
    marginal (the mean is kept exactly). Tracks Var(y_i), Var(y_{i-1}) and Cov(y_i, y_{i-1}) of y = x - mean, since
    the multistep update is y' = p y_i + q y_{i-1} + n z."""
    s = [float(v) for v in sigmas]
    n_steps = len(s) - 1
    low_final = n_steps < 15 if lower_order_final is None else lower_order_final
    var, var_old, cov = std**2 + s[0] ** 2, 0.0, 0.0
    a_old, h_prev = None, None
    for i in range(n_steps):
        sigma, sigma_next = s[i], s[i + 1]
        a = std**2 / (std**2 + sigma**2)
        if sigma_next == 0:
            p, q, noise = a, 0.0, 0.0
        else:
            h = math.log(sigma / sigma_next)
            e, A = (sigma_next / sigma) * math.exp(-eta * h), -math.expm1(-(1 + eta) * h)
            p, q = e + A * a, 0.0
            if a_old is not None and not (low_final and i == n_steps - 1):
                c = A * 0.5 / (h_prev / h)
                p, q = p + c * a, -c * a_old
            noise = sigma_next**2 * -math.expm1(-2 * eta * h)
            h_prev = h
        new_var = p**2 * var + q**2 * var_old + 2 * p * q * cov + noise
        var, var_old, cov = new_var, var, p * var + q * cov
        a_old = a
    return var
