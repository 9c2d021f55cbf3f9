"""Building a model on the meta device (no memory, no initialisation), optionally within a budget.

A config read from a file is not trusted: ``num_res_blocks: 100000`` or ``channels: 10**9`` would build for hours
(meta tensors cost nothing, the Python modules do). :func:`build_on_meta` with ``max_tensors`` / ``max_elements``
counts every parameter, buffer and submodule as the constructor registers it and stops the build the moment the
config has asked for more than the weights at hand could fill, whatever the model class.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks


class BudgetExceeded(ValueError):
    """The config describes a bigger model than the weights that are meant to fill it."""


def build_on_meta(cls: Callable[[Any], nn.Module], config: Any, *, max_tensors: int | None = None,
                  max_elements: int | None = None) -> nn.Module:
    """``cls(config)`` on the meta device. With a budget, raise :class:`BudgetExceeded` as soon as the module
    registers more than ``max_tensors`` parameters + buffers (submodules: twice that, parameterless layers
    included), or more than ``max_elements`` elements in them."""
    if max_tensors is None and max_elements is None:
        with torch.device("meta"):
            return cls(config)
    thread = threading.get_ident()
    seen = {"tensors": 0, "elements": 0, "modules": 0}
    limits = {"tensors": max_tensors, "elements": max_elements,
              "modules": None if max_tensors is None else 2 * max_tensors}

    def count(what: str, n: int) -> None:
        if threading.get_ident() != thread:  # the hooks are global: other threads' modules are not ours
            return
        seen[what] += n
        if limits[what] is not None and seen[what] > limits[what]:
            raise BudgetExceeded(f"the config asks for more than {limits[what]:,} {what} before the model is even "
                                 "complete")

    def tensor(_module: nn.Module, _name: str, value: torch.Tensor | None) -> None:
        if value is not None:
            count("tensors", 1)
            count("elements", value.numel())

    def submodule(_module: nn.Module, _name: str, value: nn.Module | None) -> None:
        if value is not None:
            count("modules", 1)

    handles = [module_hooks.register_module_parameter_registration_hook(tensor),
               module_hooks.register_module_buffer_registration_hook(tensor),
               module_hooks.register_module_module_registration_hook(submodule)]
    try:
        with torch.device("meta"):
            return cls(config)
    finally:
        for h in handles:
            h.remove()
