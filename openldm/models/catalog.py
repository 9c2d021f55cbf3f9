"""Every registered preset with its model kind and parameter count, counted without allocating weights."""
from __future__ import annotations

from dataclasses import dataclass

from openldm.models.meta import build_on_meta
from openldm.registry import MODELS, PRESETS


@dataclass(frozen=True)
class PresetRow:
    name: str
    kind: str
    parameters: int


def count_parameters(kind: str, config: object) -> int:
    """Parameter count of model ``kind`` built from ``config`` on the meta device (no memory, no init time)."""
    module = build_on_meta(MODELS.get(kind), config)
    return sum(p.numel() for p in module.parameters())


def preset_rows() -> list[PresetRow]:
    rows = []
    for name, factory in PRESETS.items():
        kind, config = factory()  # a preset names its model kind and returns that model's config
        rows.append(PresetRow(name, kind, count_parameters(kind, config)))
    return rows
