"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around any denoiser, with guidance rescale
(Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", §3.4) and guidance limited to
an interval of noise levels (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample
and Distribution Quality in Diffusion Models")."""
from __future__ import annotations

import torch
from torch import nn

from openldm.nn.slots import Slots

RESCALE_SPACES = ("eps", "v")


def rescale_guidance(guided: torch.Tensor, conditional: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023, §3.4 (eq. 15-16): scale each sample of the guided prediction to the per-sample standard
    deviation of the conditional one, then mix ``phi * rescaled + (1 - phi) * guided``."""
    dims = list(range(1, guided.dim()))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


class CFGDenoiser(nn.Module):
    """``D_cfg(x, sigma, cond) = D(x, sigma, uncond) + w (D(x, sigma, cond) - D(x, sigma, uncond))``, itself a denoiser.

    Both passes go through the wrapped denoiser as ONE batched call (x and sigma doubled, the slots joined with
    ``Slots.cat``); ``guidance_scale == 1`` skips the unconditional pass. Guidance is linear, so combining x0
    estimates equals combining eps (or v) predictions. ``uncond`` with batch 1 is repeated to the batch.

    ``guidance_rescale`` (phi) applies Lin et al.'s rescale the way diffusers' ``rescale_noise_cfg`` does, on the noise
    prediction: x0 estimates are turned into eps = (x - D) / sigma, rescaled, and turned back with
    D = x - sigma eps. (diffusers applies it to whatever the network outputs, so for a v-predicting network pass
    ``rescale_space="v"`` to rescale v = (eps - sigma D) / sqrt(1 + sigma^2) instead, as Lin et al. do.)

    ``interval=(sigma_lo, sigma_hi)`` guides only where ``sigma_lo <= sigma <= sigma_hi`` (Kynkaanniemi et al.
    2024, eq. 3); elsewhere the result is the conditional denoiser's, from one network call of batch B."""

    def __init__(self, denoiser, uncond: Slots, guidance_scale: float, guidance_rescale: float = 0.0,
                 rescale_space: str = "eps", interval: tuple[float, float] | None = None):
        super().__init__()
        if rescale_space not in RESCALE_SPACES:
            raise ValueError(f"rescale_space {rescale_space!r} is not one of {RESCALE_SPACES}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        self.interval = check_interval(interval)
        self.denoiser = denoiser
        self.uncond = uncond
        self.guidance_scale = float(guidance_scale)
        self.guidance_rescale = float(guidance_rescale)
        self.rescale_space = rescale_space

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Slots | None = None) -> torch.Tensor:
        if self.guidance_scale == 1.0:
            return self.denoiser(x, sigma, cond)
        if cond is None:
            raise ValueError("classifier-free guidance needs a condition (cond is None)")
        B = x.shape[0]
        sigma = sigma.to(x.device).reshape(-1).expand(B) if sigma.numel() in (1, B) else sigma
        if self.interval is None:
            return self._guided(x, sigma, cond)[0]
        inside = (sigma >= self.interval[0]) & (sigma <= self.interval[1])  # (B,)
        if not inside.any():
            return self.denoiser(x, sigma, cond)
        guided, d_cond = self._guided(x, sigma, cond)
        # samples at different noise levels (not the samplers here): guided where inside, the conditional elsewhere
        return guided if inside.all() else torch.where(inside.view(-1, *([1] * (x.dim() - 1))), guided, d_cond)

    def _guided(self, x: torch.Tensor, sigma: torch.Tensor, cond: Slots) -> tuple[torch.Tensor, torch.Tensor]:
        """(guided, conditional) x0 estimates from one batched call."""
        B = x.shape[0]
        uncond = self.uncond
        filled = uncond.as_kwargs()
        if filled and next(iter(filled.values())).shape[0] == 1 and B > 1:
            uncond = uncond.repeat(B)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), Slots.cat([uncond, cond]))  # (2B, ...)
        d_uncond, d_cond = both.chunk(2)
        guided = d_uncond + self.guidance_scale * (d_cond - d_uncond)
        if self.guidance_rescale == 0.0:
            return guided, d_cond
        s = sigma.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))  # (B, 1, 1, 1)
        if self.rescale_space == "eps":
            eps = rescale_guidance((x - guided) / s, (x - d_cond) / s, self.guidance_rescale)
            return x - s * eps, d_cond
        c = (1 + s**2).sqrt()
        v = rescale_guidance(((x - guided) / s - s * guided) / c, ((x - d_cond) / s - s * d_cond) / c,
                             self.guidance_rescale)
        return x / c**2 - s / c * v, d_cond


def check_interval(interval: tuple[float, float] | None) -> tuple[float, float] | None:
    """``interval`` as a (sigma_lo, sigma_hi) pair of floats, or None; ValueError unless 0 <= lo <= hi."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance interval {interval!r} must be two noise levels (sigma_lo, sigma_hi)") from None
    if not 0.0 <= lo <= hi:
        raise ValueError(f"guidance interval ({lo:g}, {hi:g}) must satisfy 0 <= sigma_lo <= sigma_hi; "
                         "e.g. (0.28, 5.42)")
    return lo, hi


def with_guidance(denoiser: nn.Module, uncond, guidance_scale: float, guidance_rescale: float = 0.0,
                  prediction: str = "eps", interval: tuple[float, float] | None = None) -> nn.Module:
    """``denoiser`` wrapped in classifier-free guidance towards its condition and away from ``uncond``: the one
    place of the "guidance off" rule (diffusers'): at ``guidance_scale <= 1`` only the conditional pass runs and the
    denoiser comes back unwrapped. Guidance rescale works in v space for v-predicting networks, else in eps.
    ``interval``: guide only at noise levels ``sigma_lo <= sigma <= sigma_hi`` (see CFGDenoiser)."""
    interval = check_interval(interval)
    if guidance_scale <= 1.0:
        return denoiser
    return CFGDenoiser(denoiser, uncond, guidance_scale, guidance_rescale,
                       rescale_space="v" if prediction == "v" else "eps", interval=interval)
