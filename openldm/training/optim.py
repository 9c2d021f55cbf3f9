"""AdamW with a linear warm-up followed by a cosine or constant learning rate."""
from __future__ import annotations

import math

import torch
from torch import nn

from openldm.config import LR_SCHEDULES, OptimConfig  # noqa: F401  (the config lives with the run configs)


def lr_factor(step: int, config: OptimConfig, total_steps: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params: list[nn.Parameter] | list[dict], config: OptimConfig, total_steps: int
                   ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` (tensors or param groups) and its per-step LambdaLR schedule."""
    params = list(params)
    tensors = [t for group in params for t in (group["params"] if isinstance(group, dict) else [group])]
    fused = config.fused and all(t.device.type in ("cpu", "cuda") and t.is_floating_point() for t in tensors)
    # not fused: None, PyTorch's own default (foreach on CUDA); fused=False would force its one-tensor-at-a-time loop
    opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
                            fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, config, total_steps))
    return opt, sched
