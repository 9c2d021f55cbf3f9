"""LoRA files for Stable Diffusion v1 models: read the published layouts onto openldm's module names.

A LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") adds to a layer's weight ``W`` (out, in,
*kernel) the low-rank product ``delta = scale * up @ down``: ``down`` (rank, in, *kernel), ``up`` (out, rank[, 1, 1]),
reshaped to ``W``'s shape. Two layouts are read, from ``.safetensors`` files only:

- kohya / AUTOMATIC1111 (sd-scripts, LyCORIS' LoCon): ``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``,
  ``.alpha`` and ``lora_te_<module>...`` (or ``lora_te1_``), where ``<module>`` is the module's diffusers path (UNet)
  or transformers path (text encoder) with ``.`` spelled ``_``; UNet paths of the original CompVis layout
  (``input_blocks_1_1_proj_in``) are read too. ``scale = alpha / rank`` (1 without an alpha), as sd-scripts and
  A1111 apply it. Attention and feed-forward linears, ``proj_in``/``proj_out`` as 1x1 conv or linear, and the
  ResBlocks' 3x3 convs (LoCon: ``down`` a 3x3 conv, ``up`` a 1x1 conv).
- diffusers / PEFT (``save_lora_weights``): ``unet.<module>.lora_A.weight`` (down), ``.lora_B.weight`` (up) and
  ``text_encoder.<module>...``; ``scale = lora_alpha / r`` from the file's ``lora_adapter_metadata`` (PEFT's
  ``LoraConfig``: ``alpha_pattern``/``rank_pattern`` per module, ``use_rslora``: ``alpha / sqrt(r)``), 1 without
  metadata (diffusers' convention).

Module names are translated through the UNet and CLIP key maps (openldm/io/keymaps), never a table of their own.
:func:`save_kohya_lora` writes UNet adapters trained here in the kohya layout (with sd-scripts' network metadata).
Every key must land on a layer of the model with matching shapes: anything else (another network type such as
LoHa, DoRA scales, an SDXL second text encoder, a layer the model lacks) is refused, naming the keys.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from openldm.io.files import atomic_path
from openldm.io.keymaps import clip as clip_keys
from openldm.io.keymaps import unet as unet_keys
from openldm.models.unet import UNetConfig

PARTS = ("unet", "text_encoder")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
_KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_PEFT_SUFFIXES = {"lora_A.weight": "down", "lora_B.weight": "up"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry: PEFT LoraConfig fields per part


@dataclass(frozen=True)
class LoraModule:
    """One layer's low-rank update: ``delta = scale * up @ down`` (before the user's weight)."""

    down: torch.Tensor  # (rank, in, *kernel)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    scale: float

    def delta(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The float32 update for a weight of ``shape`` on ``device``."""
        down = self.down.to(device, torch.float32).flatten(1)  # (rank, in * kernel)
        up = self.up.to(device, torch.float32).flatten(1)  # (out, rank)
        return (self.scale * (up @ down)).reshape(shape)


@dataclass(frozen=True)
class Lora:
    """A LoRA file read onto a model: ``modules[part][our module path]`` for part in :data:`PARTS`."""

    path: str
    layout: str  # "kohya" | "diffusers"
    modules: dict[str, dict[str, LoraModule]]

    @property
    def num_modules(self) -> int:
        return sum(len(m) for m in self.modules.values())

    def summary(self) -> str:
        """One line: the file, its layout and how many modules of each part it touches."""
        counts = ", ".join(f"{len(self.modules[p])} {p.replace('_', '-')} modules" for p in PARTS)
        return f"{Path(self.path).name}: {self.layout} layout, {counts}"


def lora_targets(unet: nn.Module, text_encoder: nn.Module) -> dict[str, dict[str, nn.Module]]:
    """The layers a LoRA may change: every Linear and Conv2d of each part, by our module path."""
    return {part: {name: m for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
            for part, module in zip(PARTS, (unet, text_encoder))}


def _their_names(unet: nn.Module, targets: dict[str, dict[str, nn.Module]]) -> dict[str, dict[str, str]]:
    """part -> {module path in a published layout -> our module path}: the UNet's diffusers and CompVis paths (from
    the UNet key maps), the text encoder's transformers paths with and without ``text_model.`` (the CLIP key map)."""
    unet_names = {}
    for keymap in (unet_keys.original_keymap(unet.config), unet_keys.diffusers_keymap(unet.config)):
        unet_names.update({theirs.removesuffix(".weight"): ours.removesuffix(".weight")
                           for ours, theirs in keymap.items() if ours.removesuffix(".weight") in targets["unet"]})
    ours = list(targets["text_encoder"])
    wrapped = clip_keys.to_diffusers(dict.fromkeys(ours))  # the key map renames keys; the values are not used
    te_names = {**dict(zip(ours, ours)), **dict(zip(wrapped, ours))}
    return {"unet": unet_names, "text_encoder": te_names}


def detect_layout(keys: list[str]) -> str:
    """``kohya`` (every key ``lora_unet_`` / ``lora_te_`` / ``lora_te1_``) or ``diffusers`` (every key ``unet.`` /
    ``text_encoder.``); anything else raises, naming keys that fit neither."""
    kohya = [k for k in keys if k.startswith(tuple(KOHYA_PREFIXES))]
    peft = [k for k in keys if k.startswith(tuple(f"{p}." for p in PARTS))]
    if keys and len(kohya) == len(keys):
        return "kohya"
    if keys and len(peft) == len(keys):
        return "diffusers"
    if not keys:
        raise ValueError("the file holds no tensors")
    other = [k for k in keys if k not in kohya and k not in peft] or (kohya[:3] + peft[:3])
    raise ValueError(f"not a LoRA of a known layout: keys such as {_listing(other)}; accepted: kohya/A1111 "
                     f"({', '.join(KOHYA_PREFIXES)}...) or diffusers/PEFT (unet.*, text_encoder.*), not mixed")


def read_lora(path: str | Path, unet: nn.Module, text_encoder: nn.Module) -> Lora:
    """Read the LoRA file at ``path`` (``.safetensors``) onto ``unet`` and ``text_encoder`` (openldm modules: their
    layer names and shapes decide what is accepted). Raises naming every key that fits no layer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"LoRA file {str(path)!r}: only .safetensors LoRA files are read (no pickles); convert it")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a file handle, not a dict)
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ValueError(f"LoRA file {str(path)!r} is not a readable safetensors file ({e})") from None
    try:
        layout = detect_layout(list(tensors))
        targets = lora_targets(unet, text_encoder)
        names = _their_names(unet, targets)
        if layout == "kohya":
            known = {prefix + theirs.replace(".", "_"): (part, ours) for prefix, part in KOHYA_PREFIXES.items()
                     for theirs, ours in names[part].items()}
            groups = _group(tensors, known, _KOHYA_SUFFIXES, split=lambda key: key.split(".", 1))
            scales = {name: _kohya_scale(group) for name, group in groups.items()}
        else:
            known = {f"{part}.{theirs}": (part, ours) for part in PARTS for theirs, ours in names[part].items()}
            groups = _group(tensors, known, _PEFT_SUFFIXES, split=_split_peft)
            configs = _peft_configs(metadata)
            scales = {name: _peft_scale(configs.get(name.split(".", 1)[0]), name.split(".", 1)[1]) for name in groups}
        modules: dict[str, dict[str, LoraModule]] = {part: {} for part in PARTS}
        for name, group in groups.items():
            part, ours = known[name]
            modules[part][ours] = _module(name, group, scales[name], targets[part][ours].weight.shape)
    except ValueError as e:
        raise ValueError(f"LoRA file {str(path)!r}: {e}") from None
    return Lora(str(path), layout, modules)


def _split_peft(key: str) -> list[str]:
    for suffix in _PEFT_SUFFIXES:
        if key.endswith("." + suffix):
            return [key[: -len(suffix) - 1], suffix]
    return [key]


def _group(tensors: dict[str, torch.Tensor], known: dict[str, tuple[str, str]], suffixes: dict[str, str],
           split) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors by module name ({"down", "up"[, "alpha"]}); keys naming no known module or suffix raise."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        parts = split(key)
        if len(parts) != 2 or parts[0] not in known or parts[1] not in suffixes:
            unknown.append(key)
            continue
        groups.setdefault(parts[0], {})[suffixes[parts[1]]] = tensor
    if unknown:
        raise ValueError(f"{len(unknown)} keys name no layer of this model (or an unsupported network type): "
                         f"{_listing(sorted(unknown))}; accepted: <layer>.{{{', '.join(suffixes)}}} on the UNet's "
                         "and the text encoder's Linear/Conv2d layers")
    incomplete = sorted(name for name, group in groups.items() if not {"down", "up"} <= set(group))
    if incomplete:
        raise ValueError(f"modules without both their down and up weights: {_listing(incomplete)}")
    return groups


def _kohya_scale(group: dict[str, torch.Tensor]) -> float:
    rank = group["down"].shape[0]
    return float(group["alpha"]) / rank if "alpha" in group else 1.0


def _peft_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """part -> its PEFT LoraConfig fields, from diffusers' ``lora_adapter_metadata`` ("unet.r", "unet.lora_alpha",
    ...)."""
    if METADATA_KEY not in metadata:
        return {}
    try:
        flat = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"metadata {METADATA_KEY!r} is not JSON ({e})") from None
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        part, _, field = key.partition(".")
        configs.setdefault(part, {})[field] = value
    for part, config in configs.items():
        if config.get("use_dora"):
            raise ValueError(f"{part}: DoRA adapters (use_dora) are not supported; accepted: plain LoRA")
    return configs


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): a key matches a module name
    ending in it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _peft_scale(config: dict | None, name: str) -> float:
    if not config:
        return 1.0
    r = _pattern_value(config.get("rank_pattern"), name, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", r))
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _module(name: str, group: dict[str, torch.Tensor], scale: float, shape: torch.Size) -> LoraModule:
    """Check shapes against the target weight (out, in, *kernel) and build the module."""
    down, up = group["down"], group["up"]
    rank = down.shape[0] if down.dim() else 0
    ok = (down.dim() in (2, 4) and up.dim() in (2, 4) and up.shape[0] == shape[0] and up.shape[1] == rank
          and up.shape[2:].numel() == 1 and down.numel() // max(rank, 1) == shape[1:].numel())
    if not ok:
        raise ValueError(f"{name}: down {tuple(down.shape)} and up {tuple(up.shape)} do not make an update of the "
                         f"layer's weight {tuple(shape)}")
    return LoraModule(down, up, scale)


def _listing(keys: list[str], limit: int = 10) -> str:
    return str(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# ---- writing (UNet adapters trained here) --------------------------------------------------------------------

def kohya_unet_names(config: UNetConfig, modules: list[str]) -> dict[str, str]:
    """openldm UNet module name -> kohya module name, for each of ``modules`` (layers of ``UNet(config)``)."""
    keymap = unet_keys.diffusers_keymap(config)
    names = {}
    for module in modules:
        key = keymap.get(f"{module}.weight")
        if key is None:
            raise ValueError(f"{module!r} is not a layer with weights of this UNet; the kohya layout names layers of "
                             "UNet(config) only")
        names[module] = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
    return names


def to_kohya(state: Mapping[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed ``<openldm module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` -> kohya keys."""
    modules, bad = {}, []
    for key in state:
        module, suffix = next(((key[: -len(s) - 1], s) for s in _KOHYA_SUFFIXES if key.endswith("." + s)),
                              (None, None))
        if module is None:
            bad.append(key)
        else:
            modules.setdefault(module, set()).add(suffix)
    incomplete = sorted(m for m, s in modules.items() if s != set(_KOHYA_SUFFIXES))
    if bad or incomplete:
        raise ValueError(f"LoRA state: keys {bad[:5]} are not adapter tensors ({', '.join(_KOHYA_SUFFIXES)}) and "
                         f"modules {incomplete[:5]} lack one of them")
    names = kohya_unet_names(config, sorted(modules))
    return {f"{names[m]}.{s}": state[f"{m}.{s}"].detach().contiguous()
            for m in sorted(modules) for s in _KOHYA_SUFFIXES}


def save_kohya_lora(state: Mapping[str, torch.Tensor], path: str | Path, config: UNetConfig) -> Path:
    """Write UNet adapter tensors (openldm module names) as a kohya-layout ``.safetensors`` file, atomically, with
    sd-scripts' metadata of the network (``ss_network_module``, ``ss_network_dim``: the rank, ``ss_network_alpha``)."""
    tensors = to_kohya(state, config)
    ranks = {int(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_down.weight")}
    alphas = {float(t) for k, t in tensors.items() if k.endswith(".alpha")}
    metadata = {"ss_network_module": "networks.lora"}
    if len(ranks) == 1 and len(alphas) == 1:
        metadata.update(ss_network_dim=str(ranks.pop()), ss_network_alpha=repr(alphas.pop()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path
