"""Adapt a network trained on a discrete variance-preserving schedule to the denoiser interface
``D(x, sigma, cond) -> x0`` of Karras et al. 2022 that every sampler uses.

In sigma space ``x = x_0 + sigma eps``; the network sees ``c_in x`` with ``c_in = 1 / sqrt(sigma^2 + 1)``
(= the VP sample ``x_t``) at the fractional training timestep whose sigma is ``sigma``, and its output is turned
into an x0 estimate according to what it predicts (eps, v or x0). This is k-diffusion's ``DiscreteEpsDDPMDenoiser``
/ ``DiscreteVDDPMDenoiser`` idea, with conditioning passed through as named slots.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from openldm.diffusion.objectives import PREDICTION_TYPES
from openldm.diffusion.schedules import sigma_to_t, sigmas_from_alphas_cumprod
from openldm.nn.slots import Slots


class Denoiser(Protocol):
    """What a sampler needs: the clean-data estimate at noise level ``sigma`` (shape (B,)) in sigma space."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Slots | None = None) -> torch.Tensor: ...


class DiscreteDenoiser(nn.Module):
    """``D(x, sigma, cond)`` for a network ``net(x_t, t, **slots)`` trained on ``alphas_cumprod``.

    ``quantize``: give the network the nearest integer timestep, as diffusers' DPM-Solver does with Karras sigmas
    (its plan's timesteps are integers); input scaling and output conversion still use the exact sigma."""

    def __init__(self, net: nn.Module, alphas_cumprod: torch.Tensor, prediction: str = "eps", quantize: bool = False):
        super().__init__()
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"prediction type {prediction!r} is not one of {PREDICTION_TYPES}")
        self.net = net
        self.prediction = prediction
        self.quantize = quantize
        sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.float())
        self.register_buffer("sigmas", sigmas, persistent=False)  # (T,) increasing
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        t = sigma_to_t(sigma, self.log_sigmas)
        return t.round() if self.quantize else t

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Slots | None = None) -> torch.Tensor:
        sigma = sigma.to(x.device, torch.float32).expand(x.shape[0]) if sigma.dim() == 0 else sigma.to(x.device, torch.float32)
        s = sigma.view(-1, *([1] * (x.dim() - 1)))  # (B, 1, 1, 1)
        c_in = 1.0 / (s**2 + 1).sqrt()
        t = self.sigma_to_t(sigma)
        out = self.net((x * c_in).to(x.dtype), t, **(cond.as_kwargs() if cond is not None else {}))
        out = out.to(x.dtype)
        if self.prediction == "eps":
            return x - s * out
        if self.prediction == "v":  # x0 = c_skip x + c_out v with c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1)
            return x * c_in**2 - s * c_in * out
        return out
