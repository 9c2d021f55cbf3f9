"""DDPM ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Algorithm 2)."""
from __future__ import annotations

import torch

from openldm.nn.slots import Slots
from openldm.samplers.base import OnStep, after_step, check_sigmas, denoise, randn_like, steps


@torch.no_grad()
def sample_ddpm(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Slots | None = None,
                generator: torch.Generator | None = None, on_step: OnStep | None = None,
                progress: bool = False) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) with the "fixed_small" posterior variance.

    Works over any subsequence of training steps: each step samples the posterior q(x_prev | x, x0) of eq. 6-7 with
    x0 replaced by the denoiser's estimate and variance
    beta~ = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev), as diffusers' DDPMScheduler.

    In sigma space (x_sigma = x_t / sqrt(alpha_bar)) the step is, with r = sigma_next^2 / sigma^2,
    ``x_prev = (1 - r) x0 + r x + sigma_next sqrt(1 - r) z``; it equals DDIM with eta = 1 and Euler ancestral.
    No noise is added on a step that ends at sigma 0."""
    s = check_sigmas(sigmas)
    for i in steps(len(s) - 1, progress):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        r = (sigma_next / sigma) ** 2
        x = (1 - r) * denoised + r * x  # posterior mean, Ho et al. eq. 7
        if sigma_next > 0:
            x = x + sigma_next * max(1 - r, 0.0) ** 0.5 * randn_like(x, generator)
        x = after_step(on_step, i, sigma, sigma_next, x, denoised)
    return x
