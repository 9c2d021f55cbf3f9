"""A sequential container whose layers take extra inputs besides the feature map.

guided-diffusion's ``TimestepEmbedSequential`` (Dhariwal & Nichol 2021) checks every layer's type in its
forward to decide whether it gets the time embedding. Here each layer declares, once, the names of the extra
inputs it consumes, and the container hands it exactly those; the UNet's forward never asks what a layer is.
"""
from __future__ import annotations

import torch
from torch import nn

from openldm.nn.resblock import ResBlock
from openldm.nn.sampling import Upsample

# What the shared blocks that do not carry a ``consumes`` attribute take, by the names of their forward's
# keyword arguments. A layer with a ``consumes`` tuple of its own (e.g. SpatialTransformer) overrides this.
_CONSUMES: dict[type, tuple[str, ...]] = {
    ResBlock: ("emb",),  # (B, emb_dim) time (+ vector) embedding
    Upsample: ("size",),  # (H, W) of the skip connection it will be concatenated with
}


def consumes(layer: nn.Module) -> tuple[str, ...]:
    """Names of the extra inputs ``layer`` takes as keyword arguments (empty for a plain ``x -> y`` layer)."""
    declared = getattr(layer, "consumes", None)
    return tuple(declared) if declared is not None else _CONSUMES.get(type(layer), ())


class EmbedSequential(nn.Sequential):
    """``nn.Sequential`` that calls each layer as ``layer(x, **{name: inputs[name] for name in consumes(layer)})``."""

    def forward(self, x: torch.Tensor, **inputs) -> torch.Tensor:
        for layer in self:
            names = consumes(layer)
            missing = [n for n in names if n not in inputs]
            if missing:
                raise TypeError(f"{type(layer).__name__} consumes {missing}, not given; given: {sorted(inputs)}")
            x = layer(x, **{n: inputs[n] for n in names})
        return x
