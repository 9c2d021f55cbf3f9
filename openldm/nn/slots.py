"""The three named slots through which every condition reaches the UNet.

- ``vector``:  (B, D) added to the time embedding (class labels, noise level of a low-res input, ...)
- ``context``: (B, S, D) a sequence attended to by cross-attention (text), with an optional (B, S) boolean
  ``context_mask`` (True = attend)
- ``concat``:  (B, C, H, W) extra input channels concatenated with the noisy latent (masks, low-res image,
  masked image + mask)

Samplers treat a ``Slots`` as opaque and hand it to the denoiser; the classifier-free guidance wrapper uses
``cat`` to batch the conditional and unconditional passes into one network call.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

SLOT_NAMES = ("vector", "context", "context_mask", "concat")


@dataclass(frozen=True)
class Slots:
    vector: torch.Tensor | None = None
    context: torch.Tensor | None = None
    context_mask: torch.Tensor | None = None
    concat: torch.Tensor | None = None

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        """The filled slots as keyword arguments for a network's forward."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def map(self, fn) -> "Slots":
        """Apply ``fn`` to every filled slot."""
        return replace(self, **{k: fn(v) for k, v in self.as_kwargs().items()})

    def to(self, *args, **kwargs) -> "Slots":
        """Move/cast every filled slot (boolean masks keep their dtype)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if t.dtype == torch.bool or not t.is_floating_point():
                return t.to(device=kwargs.get("device", args[0] if args and not isinstance(args[0], torch.dtype) else None))
            return t.to(*args, **kwargs)
        return self.map(move)

    def repeat(self, n: int) -> "Slots":
        """Repeat every slot ``n`` times along the batch (one condition -> ``n`` images)."""
        return self.map(lambda t: t.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(parts: "list[Slots]") -> "Slots":
        """Concatenate along the batch. Every part must fill the same slots."""
        filled = [tuple(sorted(p.as_kwargs())) for p in parts]
        if len(set(filled)) != 1:
            raise ValueError(f"cannot batch conditions that fill different slots: {filled}")
        return Slots(**{k: torch.cat([getattr(p, k) for p in parts]) for k in filled[0]})
