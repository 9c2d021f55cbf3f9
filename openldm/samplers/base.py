"""What every sampler shares: the registry entry, the step loop's bookkeeping, noise, and the inpainting hook.

Every sampler is a plain function with one signature (k-diffusion's convention)::

    sample_x(denoiser, x, sigmas, *, cond=None, generator=None, on_step=None, progress=False, **options) -> x0

- ``denoiser``: ``D(x, sigma, cond) -> x0`` in sigma space ``x = x0 + sigma eps`` (openldm.diffusion.denoiser);
- ``x``: the starting sample at noise level ``sigmas[0]``, already scaled (``SamplingPlan.initial_sample``);
- ``sigmas``: (N+1,) decreasing noise levels; N steps go from ``sigmas[i]`` to ``sigmas[i+1]``; the last is 0
  (or sigma_min where the reference ends there);
- ``on_step(i, sigma, sigma_next, x, denoised)``: called after step ``i`` with the new ``x`` (at ``sigma_next``) and
  the denoiser's estimate at ``sigma``; returning a tensor replaces ``x`` (inpainting, previews);
- randomness only from ``generator``; ``progress`` shows a tqdm bar.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from tqdm.auto import tqdm

from openldm.nn.slots import Slots

OnStep = Callable[[int, float, float, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]

# Which diffusers scheduler's set_timesteps a sampler's schedule follows (see openldm.diffusion.spacing).
CONVENTIONS = ("ddpm", "ddim", "euler", "euler_ancestral", "heun", "lms", "dpm")


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: the function plus what is needed to build its schedule.

    ``convention`` names the diffusers scheduler whose timestep/sigma construction the sampler's plan follows
    (``reference`` is that class, for the record); ``supports_karras`` says whether Karras sigmas may replace the
    spaced ones; ``stochastic`` whether it draws noise at every step (with default options); ``a1111_name`` is
    the name AUTOMATIC1111 gives it (its API's ``sampler_name``, the "Sampler" of a PNG's parameters)."""

    fn: Callable[..., torch.Tensor]
    convention: str
    reference: str
    supports_karras: bool
    stochastic: bool
    a1111_name: str

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ValueError(f"sampler convention {self.convention!r} is not one of {CONVENTIONS}")

    def __call__(self, denoiser, x: torch.Tensor, sigmas: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fn(denoiser, x, sigmas, **kwargs)


def check_sigmas(sigmas: torch.Tensor) -> list[float]:
    """The noise levels as Python floats, after checking there is at least one step, every level but the last is
    positive and the last is not negative. (They need not decrease strictly: with zero terminal SNR diffusers reads
    alpha_bar_T = 0 as 2^-24, whose sigma can be below the next step's.)"""
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    s = [float(v) for v in sigmas.tolist()]
    if any(not v > 0 for v in s[:-1]) or not s[-1] >= 0:
        raise ValueError(f"sigmas must be positive (the last may be 0), got {s}")
    return s


def steps(num_steps: int, progress: bool) -> Iterator[int]:
    """Step indices, with a tqdm bar when ``progress``."""
    return iter(tqdm(range(num_steps), disable=not progress, leave=False, desc="sampling"))


def denoise(denoiser, x: torch.Tensor, sigma: float, cond: Slots | None) -> torch.Tensor:
    """``D(x, sigma, cond)`` with sigma broadcast to the batch as float32, shape (B,)."""
    return denoiser(x, torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device), cond)


def randn_like(x: torch.Tensor, generator: torch.Generator | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device (as diffusers' ``randn_tensor``
    does) so a CPU generator gives the same numbers whatever device ``x`` lives on."""
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=dtype or x.dtype)
    return noise.to(x.device, x.dtype)


def after_step(on_step: OnStep | None, i: int, sigma: float, sigma_next: float, x: torch.Tensor,
               denoised: torch.Tensor) -> torch.Tensor:
    """Run the ``on_step`` hook; a returned tensor replaces ``x``."""
    if on_step is None:
        return x
    out = on_step(i, sigma, sigma_next, x, denoised)
    if out is None:
        return x
    if out.shape != x.shape:
        raise ValueError(f"on_step returned shape {tuple(out.shape)}, expected {tuple(x.shape)}")
    return out


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step ``sigma -> sigma_next`` into a deterministic part down to ``sigma_down`` and fresh noise of
    size ``sigma_up`` with ``sigma_down^2 + sigma_up^2 = sigma_next^2``. With ``eta = 1`` this is the DDPM posterior
    q(x_prev | x, x0) written in sigma space (Ho et al. 2020, eq. 7; DDIM's sigma_t(eta), Song et al. 2021, eq. 16)."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def churn(x: torch.Tensor, sigma: float, num_steps: int, generator: torch.Generator | None, s_churn: float,
          s_tmin: float, s_tmax: float, s_noise: float) -> tuple[torch.Tensor, float]:
    """Karras et al. 2022, Algorithm 2, lines 4-6: raise the noise level to ``sigma_hat = sigma (1 + gamma)`` by
    adding fresh noise, ``gamma = min(s_churn / N, sqrt(2) - 1)`` inside [s_tmin, s_tmax]. No-op when s_churn = 0."""
    gamma = min(s_churn / num_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (gamma + 1)
    return x + randn_like(x, generator) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5, sigma_hat


def blend_known(known: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> OnStep:
    """An ``on_step`` hook for inpainting by blending: after each step, outside the mask (``mask == 0``) put back the
    known clean latents noised to the new level, ``known + noise * sigma_next``; inside (``mask == 1``) keep the
    sample. This is what diffusers' StableDiffusionInpaintPipeline does with ``add_noise`` at the next timestep (for
    4-channel UNets), written in sigma space; ``noise`` is the same fixed noise used to start the sample."""
    def hook(i: int, sigma: float, sigma_next: float, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        return mask * x + (1 - mask) * (known + noise * sigma_next)
    return hook
