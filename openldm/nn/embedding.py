"""Timestep embeddings: the sinusoidal features and the MLP that follows them."""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, Stable Diffusion's convention.

    Frequencies are ``max_period ** (-i / half)`` for ``i < half``; the cosine half comes first
    (diffusers calls this ``flip_sin_to_cos=True, downscale_freq_shift=0``). Returns (B, dim) in float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class TimestepMLP(nn.Module):
    """Linear -> SiLU -> Linear, lifting sinusoidal features (or any vector) to the embedding width."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(nn.functional.silu(self.linear_1(x)))
