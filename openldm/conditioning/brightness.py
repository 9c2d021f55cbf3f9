"""Brightness conditioning: the image's mean brightness, a number in [0, 1], in the ``vector`` slot.

The value goes through sinusoidal features (as a timestep does, Vaswani et al. 2017 / Ho et al. 2020) and a small
MLP; "no brightness" is a learned vector. Training derives the value from the image when the data has no column
for it (the mean of the pixels mapped to [0, 1]), so any image dataset can train it; sampling takes it from the
request's ``brightness`` input. This file is the whole conditioner: it registers itself and declares its request
field, its null condition and what it reads from the pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from openldm.conditioning.compose import Batch, Conditioner, RequestContext, RequestField, batch_value
from openldm.nn.slots import Slots
from openldm.registry import CONDITIONERS


@dataclass
class BrightnessConfig:
    """``batch[key]``: (B,) brightness in [0, 1]; ``dim`` the vector width, ``frequencies`` sinusoid pairs."""

    dim: int = 64
    frequencies: int = 8
    key: str = "brightness"

    def __post_init__(self) -> None:
        if self.dim < 1 or self.frequencies < 1:
            raise ValueError(f"BrightnessConfig dim={self.dim}, frequencies={self.frequencies}; both must be >= 1")


@CONDITIONERS.register("brightness")
class BrightnessConditioner(Conditioner):
    """Fills ``vector`` (B, dim) from ``batch[key]`` (B,) in [0, 1]."""

    config_class = BrightnessConfig
    reads_pixels = True

    def __init__(self, config: BrightnessConfig):
        super().__init__()
        self.config = config
        self.vector_dim = config.dim
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(config.frequencies), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * config.frequencies, config.dim), nn.SiLU(),
                                 nn.Linear(config.dim, config.dim))
        self.null_vector = nn.Parameter(torch.zeros(config.dim))

    def request_fields(self) -> tuple[RequestField, ...]:
        return (RequestField("brightness", "float", "mean brightness of the image, 0 (black) .. 1 (white)"),)

    def request_batch(self, values, ctx: RequestContext) -> dict[str, Any] | None:
        value = values.get("brightness")
        if value is None:
            return None
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"brightness={value} must be in [0, 1]")
        return {self.config.key: torch.full((ctx.batch_size,), value)}

    def derive_input(self, batch: dict[str, Any]) -> str | None:
        if self.config.key not in batch and "image" in batch:
            batch[self.config.key] = (batch["image"].float().mean(dim=(1, 2, 3)) + 1) / 2  # [-1, 1] -> [0, 1]
        return self.config.key

    def forward(self, batch: Batch, *, generator: torch.Generator | None = None,
                latent_size: tuple[int, int] | None = None) -> Slots:
        b = torch.as_tensor(batch_value(batch, self.config.key, "brightness"), device=self.device).float()
        if b.dim() != 1:
            raise ValueError(f"batch[{self.config.key!r}] must be (B,) brightness values; got shape {tuple(b.shape)}")
        angles = b[:, None] * self.freqs  # (B, F)
        return Slots(vector=self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1)))  # (B, dim)

    def null(self, batch_size: int, *, latent_size: tuple[int, int] | None = None) -> Slots:
        return Slots(vector=self.null_vector.expand(batch_size, -1))
