"""Normalisation layers."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (as the original SD code does), cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16) or self.weight.dtype != x.dtype:
            w = None if self.weight is None else self.weight.float()
            b = None if self.bias is None else self.bias.float()
            return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)
        return super().forward(x)


def group_norm(channels: int, eps: float = 1e-5, groups: int = 32) -> GroupNorm32:
    """GroupNorm with ``groups`` groups (fewer when ``channels`` is small, so tiny presets still work)."""
    groups = min(groups, channels)
    while channels % groups:
        groups -= 1
    return GroupNorm32(groups, channels, eps=eps, affine=True)
