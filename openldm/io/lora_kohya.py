"""Writing UNet LoRA adapters in the kohya layout (sd-scripts; read by AUTOMATIC1111 and diffusers'
``load_lora_weights``).

A kohya key is ``lora_unet_`` + the adapted layer's diffusers module path with ``.`` spelled ``_``
(``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``), then ``.lora_down.weight``,
``.lora_up.weight`` or ``.alpha`` (a scalar; readers scale the branch by alpha / rank). The diffusers paths come
from the UNet key map (:func:`openldm.io.keymaps.unet.diffusers_keymap`); this module holds no table of its own.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from openldm.io.files import atomic_path
from openldm.io.keymaps.unet import diffusers_keymap
from openldm.models.unet import UNetConfig

KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


def kohya_unet_names(config: UNetConfig, modules: list[str]) -> dict[str, str]:
    """openldm UNet module name -> kohya module name, for each of ``modules`` (layers of ``UNet(config)``)."""
    keymap = diffusers_keymap(config)
    names = {}
    for module in modules:
        key = keymap.get(f"{module}.weight")
        if key is None:
            raise ValueError(f"{module!r} is not a layer with weights of this UNet; the kohya layout names layers of "
                             "UNet(config) only")
        names[module] = KOHYA_UNET_PREFIX + key.removesuffix(".weight").replace(".", "_")
    return names


def to_kohya(state: Mapping[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed ``<openldm module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` -> kohya keys."""
    modules, bad = {}, []
    for key in state:
        module, suffix = next(((key[: -len(s) - 1], s) for s in KOHYA_SUFFIXES if key.endswith("." + s)), (None, None))
        if module is None:
            bad.append(key)
        else:
            modules.setdefault(module, set()).add(suffix)
    incomplete = sorted(m for m, s in modules.items() if s != set(KOHYA_SUFFIXES))
    if bad or incomplete:
        raise ValueError(f"LoRA state: keys {bad[:5]} are not adapter tensors ({', '.join(KOHYA_SUFFIXES)}) and "
                         f"modules {incomplete[:5]} lack one of them")
    names = kohya_unet_names(config, sorted(modules))
    return {f"{names[m]}.{s}": state[f"{m}.{s}"].detach().contiguous() for m in sorted(modules) for s in KOHYA_SUFFIXES}


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
