"""Every registered preset with its model kind and parameter count, counted without allocating weights."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from openldm.registry import MODELS, PRESETS


@dataclass(frozen=True)
class PresetRow:
    name: str
    kind: str
    parameters: int


def kind_of_config(config: object) -> str:
    """The registered model kind whose ``config_class`` is ``type(config)``."""
    for name, cls in MODELS.items():
        if getattr(cls, "config_class", None) is type(config):
            return name
    raise ValueError(f"no registered model takes a {type(config).__name__}")


def count_parameters(kind: str, config: object) -> int:
    """Parameter count of model ``kind`` built from ``config`` on the meta device (no memory, no init time)."""
    with torch.device("meta"):
        module = MODELS.get(kind)(config)
    return sum(p.numel() for p in module.parameters())


def preset_rows() -> list[PresetRow]:
    rows = []
    for name, factory in PRESETS.items():
        config = factory()
        kind = kind_of_config(config)
        rows.append(PresetRow(name, kind, count_parameters(kind, config)))
    return rows
