"""Euler, Euler ancestral and Heun samplers of the probability-flow ODE in sigma space
(Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Algorithms 1-2)."""
from __future__ import annotations

import torch

from openldm.nn.slots import Slots
from openldm.samplers.base import OnStep, after_step, ancestral_sigmas, check_sigmas, churn, denoise, randn_like, steps


@torch.no_grad()
def sample_euler(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Slots | None = None,
                 generator: torch.Generator | None = None, on_step: OnStep | None = None, progress: bool = False,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                 s_noise: float = 1.0) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without its corrector).

    Integrates dx/dsigma = (x - D(x, sigma)) / sigma (eq. 1 with the score of eq. 3). ``s_churn > 0`` adds EDM's
    stochastic churn (Algorithm 2 lines 4-6) before each step, with the denoiser evaluated at the raised level
    (diffusers' EulerDiscreteScheduler instead reuses the model output taken before the churn; with the default
    s_churn = 0 the two agree)."""
    s = check_sigmas(sigmas)
    n = len(s) - 1
    for i in steps(n, progress):
        sigma, sigma_next = s[i], s[i + 1]
        x, sigma_hat = churn(x, sigma, n, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(denoiser, x, sigma_hat, cond)
        d = (x - denoised) / sigma_hat
        x = x + d * (sigma_next - sigma_hat)
        x = after_step(on_step, i, sigma, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Slots | None = None,
                           generator: torch.Generator | None = None, on_step: OnStep | None = None,
                           progress: bool = False, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """Ancestral Euler: an Euler step plus fresh noise, the DDPM posterior step (Ho et al. 2020, eq. 7) at eta = 1.

    As k-diffusion's ``sample_euler_ancestral`` and diffusers' EulerAncestralDiscreteScheduler: an Euler step down to
    sigma_down followed by fresh noise of size sigma_up (``ancestral_sigmas``)."""
    s = check_sigmas(sigmas)
    for i in steps(len(s) - 1, progress):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + randn_like(x, generator) * s_noise * sigma_up
        x = after_step(on_step, i, sigma, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_heun(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Slots | None = None,
                generator: torch.Generator | None = None, on_step: OnStep | None = None, progress: bool = False,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                s_noise: float = 1.0) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1; Algorithm 2 with ``s_churn > 0``).

    An Euler predictor and a trapezoidal corrector, two denoiser evaluations per step, except the step to sigma 0, a
    plain Euler step (Algorithm 1 line 7). Takes the plain sigma list; diffusers' HeunDiscreteScheduler interleaves
    repeated sigmas/timesteps to express the same trajectory, which matches this one at every step boundary."""
    s = check_sigmas(sigmas)
    n = len(s) - 1
    for i in steps(n, progress):
        sigma, sigma_next = s[i], s[i + 1]
        x, sigma_hat = churn(x, sigma, n, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(denoiser, x, sigma_hat, cond)
        d = (x - denoised) / sigma_hat
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_pred = x + d * dt
            d_pred = (x_pred - denoise(denoiser, x_pred, sigma_next, cond)) / sigma_next
            x = x + (d + d_pred) / 2 * dt
        x = after_step(on_step, i, sigma, sigma_next, x, denoised)
    return x
