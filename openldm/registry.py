"""Name -> builder tables. YAML configs and CLI flags name parts by these names, never by import path.

Modules register themselves with a decorator (``@SAMPLERS.register("euler")``). A lookup first imports the
packages that hold registered parts, so a table is complete whichever module was imported first.
"""
from __future__ import annotations

import importlib
from typing import Any

# Packages whose import fills the tables (each package's __init__ imports its registering modules), and
# registering modules their package's __init__ does not import.
_PROVIDERS = ("openldm.models", "openldm.models.contrastive", "openldm.samplers", "openldm.conditioning", "openldm.data",
              "openldm.evaluation.classifier")


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._table: dict[str, Any] = {}

    def register(self, name: str, obj: Any = None):
        """Register ``obj`` under ``name``; usable as ``@TABLE.register("name")``."""
        def add(o: Any) -> Any:
            if name in self._table and self._table[name] is not o:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._table[name] = o
            return o
        return add(obj) if obj is not None else add

    def get(self, name: str) -> Any:
        _populate()
        if name not in self._table:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._table))}")
        return self._table[name]

    def names(self) -> list[str]:
        _populate()
        return sorted(self._table)

    def items(self) -> list[tuple[str, Any]]:
        _populate()
        return sorted(self._table.items())


_populated = False


def _populate() -> None:
    global _populated
    if _populated:
        return
    _populated = True
    for pkg in _PROVIDERS:
        importlib.import_module(pkg)


MODELS: Registry = Registry("model")  # name -> callable(config) -> nn.Module
PRESETS: Registry = Registry("preset")  # name -> callable() -> (model name, config)
SAMPLERS: Registry = Registry("sampler")  # name -> SamplerSpec, callable like its sampler function
CONDITIONERS: Registry = Registry("conditioner")  # name -> Conditioner subclass (config_class, build)
DATASETS: Registry = Registry("dataset")  # name -> Dataset class taking its config

