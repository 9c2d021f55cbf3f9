"""Shared test helper: random weights for openldm modules (imported by tests in several folders)."""
from __future__ import annotations

import torch


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, fan-in scaled; norm weights near 1 (zero-initialised output convs would make most
    checks trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g) + float("norm" in name and name.endswith("weight")))
    return model
