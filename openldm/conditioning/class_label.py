"""Class-label conditioning: a learned embedding per class in the ``vector`` slot.

As in class-conditional latent diffusion (Rombach et al. 2022, the ImageNet LDM's ``ClassEmbedder``) with one
extra row, index ``num_classes``, learned as the null class for condition dropout and classifier-free guidance
(Ho & Salimans 2022, sec. 3.2: "a null token").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from openldm.conditioning.compose import Batch, Conditioner, RequestContext, RequestField, batch_value
from openldm.conditioning.inputs import class_indices, repeat
from openldm.nn.slots import Slots
from openldm.registry import CONDITIONERS


@dataclass
class ClassLabelConfig:
    """``num_classes`` real classes 0..num_classes-1 read from ``batch[key]``; ``dim`` is the vector width."""

    num_classes: int = 10
    dim: int = 128
    key: str = "label"

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.dim < 1:
            raise ValueError(f"ClassLabelConfig num_classes={self.num_classes}, dim={self.dim}; both must be >= 1")


@CONDITIONERS.register("class_label")
class ClassLabelConditioner(Conditioner):
    """``batch[key]``: (B,) integer labels in [0, num_classes], where ``num_classes`` itself means "no class".
    Fills ``vector`` (B, dim)."""

    config_class = ClassLabelConfig
    eval_task = "class"

    def __init__(self, config: ClassLabelConfig):
        super().__init__()
        self.config = config
        self.null_label = config.num_classes
        self.embedding = nn.Embedding(config.num_classes + 1, config.dim)
        self.vector_dim = config.dim

    def labels(self, batch: Batch) -> torch.Tensor:
        labels = torch.as_tensor(batch_value(batch, self.config.key, "class_label"), device=self.device)
        if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(
                f"batch[{self.config.key!r}] must be (B,) integer class labels; got dtype {labels.dtype}, shape {tuple(labels.shape)}"
            )
        bad = labels[(labels < 0) | (labels > self.null_label)]
        if bad.numel():
            raise ValueError(
                f"class label {int(bad[0])} is out of range; accepted: 0..{self.null_label - 1}, or {self.null_label} for no class"
            )
        return labels.long()

    def request_fields(self) -> tuple[RequestField, ...]:
        return (RequestField("class_label", "class", "class index or name", self.config.num_classes),)

    def request_batch(self, values, ctx: RequestContext) -> dict[str, Any] | None:
        if values.get("class_label") is None:
            return None
        labels = class_indices(values["class_label"], ctx.class_names)
        bad = [v for v in labels if not 0 <= v < self.config.num_classes]
        if bad:
            raise ValueError(f"class label {bad[0]} is out of range; the model has classes 0..{self.config.num_classes - 1}"
                             + (f" ({', '.join(ctx.class_names)})" if ctx.class_names else ""))
        return {self.config.key: torch.tensor(repeat(labels, ctx.per))}

    def forward(self, batch: Batch, *, generator: torch.Generator | None = None,
                latent_size: tuple[int, int] | None = None) -> Slots:
        return Slots(vector=self.embedding(self.labels(batch)))  # (B, dim)

    def null(self, batch_size: int, *, latent_size: tuple[int, int] | None = None) -> Slots:
        labels = torch.full((batch_size,), self.null_label, dtype=torch.long, device=self.device)
        return Slots(vector=self.embedding(labels))  # (B, dim)
