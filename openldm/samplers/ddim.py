"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models")."""
from __future__ import annotations

import torch

from openldm.nn.slots import Slots
from openldm.samplers.base import OnStep, after_step, ancestral_sigmas, check_sigmas, denoise, randn_like, steps


@torch.no_grad()
def sample_ddim(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Slots | None = None,
                generator: torch.Generator | None = None, on_step: OnStep | None = None, progress: bool = False,
                eta: float = 0.0, prev_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12 with sigma_t(eta) of eq. 16): deterministic at eta = 0, DDPM at eta = 1.

    In sigma space, with eps = (x - x0) / sigma, a step to level s is
    ``x_prev = x0 + sqrt(s^2 - sigma_up^2) eps + sigma_up z`` where sigma_up = eta * s sqrt(sigma^2 - s^2) / sigma
    (the VP update divided by sqrt(alpha_bar_prev)); with eta = 0 it coincides with an Euler step.

    ``prev_sigmas`` (N,): the level each step lands on, when it is not the next evaluation level ``sigmas[i+1]``.
    diffusers' DDIMScheduler always steps to ``t - T // N`` even when its timestep list (spacing "linspace", or
    "trailing" with N not dividing T) holds another next timestep; it then evaluates the network at the next listed
    timestep with the VP sample unchanged. Given ``prev_sigmas`` this sampler does the same: it lands on
    ``prev_sigmas[i]`` and re-reads the VP sample at ``sigmas[i+1]``. ``make_plan`` supplies it where needed."""
    s = check_sigmas(sigmas)
    n = len(s) - 1
    to = s[1:] if prev_sigmas is None else [float(v) for v in prev_sigmas.tolist()]
    if len(to) != n:
        raise ValueError(f"prev_sigmas has {len(to)} levels, expected one per step ({n})")
    for i in steps(n, progress):
        sigma, sigma_next, sigma_to = s[i], s[i + 1], to[i]
        denoised = denoise(denoiser, x, sigma, cond)
        eps = (x - denoised) / sigma
        _, sigma_up = ancestral_sigmas(sigma, sigma_to, eta)
        x = denoised + max(sigma_to**2 - sigma_up**2, 0.0) ** 0.5 * eps
        if sigma_up > 0:
            x = x + sigma_up * randn_like(x, generator)
        if sigma_to != sigma_next:  # the same VP sample x_t = x_sigma / sqrt(1 + sigma^2), read at the next level
            x = x * ((1 + sigma_next**2) / (1 + sigma_to**2)) ** 0.5
        x = after_step(on_step, i, sigma, sigma_next, x, denoised)
    return x
