"""Exponential moving average of model weights, with warm-up, used for sampling by default."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps ``shadow``, a frozen copy of ``model`` whose floating-point weights track
    ``shadow = decay_t * shadow + (1 - decay_t) * weights`` after every ``update``.

    Warm-up: ``decay_t = min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early, poorly trained weights fade
    quickly (the schedule of the original latent-diffusion ``LitEma``). Buffers (e.g. norm statistics) are copied.
    ``share_frozen``: parameters that do not require gradients (a frozen base under LoRA adapters) are the model's
    own tensors in the shadow, not copies; they never change, so their average is themselves.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True, share_frozen: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        memo = {id(p): p for p in model.parameters() if not p.requires_grad} if share_frozen else {}
        self.shadow = copy.deepcopy(model, memo).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.num_updates += 1
        model_params = dict(model.named_parameters())
        for name, p in self.shadow.named_parameters():
            if p is model_params[name]:  # shared (share_frozen)
                continue
            src = model_params[name].detach()
            if p.is_floating_point():
                p.lerp_(src.to(p.dtype), 1.0 - decay)
            else:
                p.copy_(src)
        model_buffers = dict(model.named_buffers())
        for name, b in self.shadow.named_buffers():
            b.copy_(model_buffers[name])

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "decay": self.decay, "weights": self.shadow.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])
        self.shadow.load_state_dict(state["weights"])
