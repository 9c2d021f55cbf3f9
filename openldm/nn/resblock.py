"""The residual block shared by the UNet (with a time embedding) and the autoencoders (without)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from openldm.nn.norm import group_norm


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, embedding injection, GroupNorm -> SiLU -> dropout -> conv3x3, plus a skip.

    ``emb_dim=None`` gives the autoencoder's block (no embedding). With ``scale_shift`` the embedding
    predicts a scale and shift applied after the second norm (Dhariwal & Nichol 2021, "AdaGN"); otherwise it
    is added to the features. The skip is a 1x1 conv when the channel count changes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        emb_dim: int | None = None,
        dropout: float = 0.0,
        eps: float = 1e-5,
        scale_shift: bool = False,
        norm_groups: int = 32,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.scale_shift = scale_shift
        self.norm1 = group_norm(in_channels, eps, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = None if emb_dim is None else nn.Linear(emb_dim, out_channels * (2 if scale_shift else 1))
        self.norm2 = group_norm(out_channels, eps, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        if self.emb_proj is not None and emb is not None:
            e = self.emb_proj(F.silu(emb))[:, :, None, None].to(h.dtype)  # (B, C_out or 2*C_out, 1, 1)
            if self.scale_shift:
                scale, shift = e.chunk(2, dim=1)
                h = self.norm2(h) * (1 + scale) + shift
            else:
                h = self.norm2(h + e)
        else:
            h = self.norm2(h)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h
