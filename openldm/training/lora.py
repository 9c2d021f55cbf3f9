"""LoRA adapters on a frozen openldm UNet, for training (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models").

Each targeted layer ``W`` (a Linear, or a Conv2d as in LyCORIS' LoCon) keeps its weights and gains a side branch:
``y = W(x) + (alpha / rank) * up(down(dropout(x)))``, with ``down`` (rank, in[, kernel]) initialised as a layer of
its shape (Kaiming-uniform) and ``up`` (out, rank[, 1, 1]) at zero, so an untrained adapter changes nothing. The
branch runs beside the layer (a forward hook), never merged into ``W``: the base tensors stay bit-identical.

The adapters are submodules of the layers they adapt (``lora_down``, ``lora_up``, the ``alpha`` buffer), so the
UNet's own state dict names them by the layer's module name: ``down.1.1.blocks.0.self_attn.to_q.lora_down.weight``,
``...lora_up.weight``, ``....alpha``; :func:`lora_state_dict` returns exactly those. ``openldm.io.lora``
writes them in the kohya layout that diffusers and AUTOMATIC1111 read.

Targets are shell-style patterns (``fnmatch``) over the UNet's module names (:data:`openldm.config.LORA_TARGETS`:
the attention and feed-forward linears of the spatial transformers). The spatial transformers apply
``proj_in``/``proj_out`` through their weights, not as modules, so a side branch cannot attach there: they are
refused by name.
"""
from __future__ import annotations

import fnmatch

import torch
from torch import nn

from openldm.config import LORA_TARGETS, LoRAConfig  # (LoRAConfig lives with the run configs)
from openldm.nn.transformer import SpatialTransformer

LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


def _side_branch(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """The forward hook of an adapted layer: its output plus the scaled low-rank branch of its input."""
    x = args[0]
    down = module.lora_down
    branch = module.lora_up(down(module.lora_dropout(x.to(down.weight.dtype))))
    return output + (module.lora_scale * branch).to(output.dtype)


def _adapter_layers(layer: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
    """(down, up) for ``layer``, on its device, in float32; ``up`` starts at zero."""
    kw = {"device": layer.weight.device, "dtype": torch.float32}
    if isinstance(layer, nn.Linear):
        down, up = nn.Linear(layer.in_features, rank, bias=False, **kw), nn.Linear(rank, layer.out_features,
                                                                                  bias=False, **kw)
    else:
        down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                         bias=False, **kw)
        up = nn.Conv2d(rank, layer.out_channels, 1, bias=False, **kw)
    nn.init.zeros_(up.weight)
    return down, up


def find_targets(unet: nn.Module, patterns: list[str]) -> dict[str, nn.Module]:
    """The Linear / Conv2d layers of ``unet`` whose module name matches any of ``patterns``. A pattern that matches
    no such layer, a grouped convolution and the spatial transformers' ``proj_in``/``proj_out`` raise ValueError."""
    applied_by_weight = {id(m) for st in unet.modules() if isinstance(st, SpatialTransformer)
                         for m in (st.proj_in, st.proj_out)}
    layers = {name: m for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    found: dict[str, nn.Module] = {}
    for pattern in patterns:
        hits = {name: m for name, m in layers.items() if fnmatch.fnmatchcase(name, pattern)}
        if not hits:
            example = ", ".join(sorted(layers)[:4])
            raise ValueError(f"lora.targets pattern {pattern!r} matches no Linear or Conv2d layer of the UNet; "
                             f"patterns match module names such as {example} (default: {list(LORA_TARGETS)})")
        for name, m in hits.items():
            if id(m) in applied_by_weight:
                raise ValueError(f"lora.targets pattern {pattern!r} matches {name!r}: the spatial transformer applies "
                                 "proj_in/proj_out through their weights, so an adapter cannot attach there; target "
                                 "the attention and feed-forward layers (e.g. '*_attn.to_q', '*.ff.proj')")
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise ValueError(f"lora.targets: {name!r} is a grouped convolution (groups={m.groups}); accepted: "
                                 "Linear layers and ungrouped Conv2d layers")
        found.update(hits)
    return dict(sorted(found.items()))


def inject_lora(unet: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze ``unet`` and give every layer ``config.targets`` selects an adapter (only adapters train). Returns
    the adapted module names."""
    if lora_layers(unet):
        raise ValueError("this UNet already carries LoRA adapters; inject them once")
    targets = find_targets(unet, config.targets)
    unet.requires_grad_(False)
    for layer in targets.values():
        layer.lora_down, layer.lora_up = _adapter_layers(layer, config.rank)
        layer.lora_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        alpha = float(config.rank if config.alpha is None else config.alpha)
        layer.register_buffer("alpha", torch.tensor(alpha, device=layer.weight.device))
        layer.lora_scale = alpha / config.rank
        layer.register_forward_hook(_side_branch)
    return list(targets)


def lora_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``unet`` that carry an adapter, by module name."""
    return {name: m for name, m in unet.named_modules() if isinstance(getattr(m, "lora_down", None), nn.Module)}


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only: ``<module>.lora_down.weight``, ``<module>.lora_up.weight``, ``<module>.alpha``
    (detached, on the CPU, float32)."""
    state = {}
    for name, layer in lora_layers(unet).items():
        for key, t in (("lora_down.weight", layer.lora_down.weight), ("lora_up.weight", layer.lora_up.weight),
                       ("alpha", layer.alpha)):
            state[f"{name}.{key}"] = t.detach().to("cpu", torch.float32).contiguous()
    return state


@torch.no_grad()
def load_lora_state_dict(unet: nn.Module, state: dict[str, torch.Tensor], where: str = "LoRA weights") -> None:
    """Copy adapter tensors (keys as :func:`lora_state_dict` writes them) into ``unet``'s adapters, strictly:
    missing, unexpected and misshaped keys raise ValueError naming them."""
    layers = lora_layers(unet)
    expected = {f"{name}.{s}" for name in layers for s in LORA_SUFFIXES}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{where} do not fit this run's adapters: missing {missing[:5]}, unexpected {unexpected[:5]} "
                         "(another rank or target list?): resume with that run's lora section")
    for name, layer in layers.items():
        for key, t in (("lora_down.weight", layer.lora_down.weight), ("lora_up.weight", layer.lora_up.weight),
                       ("alpha", layer.alpha)):
            src = state[f"{name}.{key}"]
            if src.shape != t.shape:
                raise ValueError(f"{where}: {name}.{key} has shape {tuple(src.shape)}; this run's adapter has "
                                 f"{tuple(t.shape)}")
            t.copy_(src)
        layer.lora_scale = float(layer.alpha) / layer.lora_down.weight.shape[0]
