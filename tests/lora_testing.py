"""LoRA files in the published layouts for tiny diffusers SD pipelines, built from diffusers' and transformers' own
module names (independently of openldm's key maps), and diffusers' images and weights with them loaded. Shared by
tests/io/test_lora.py and tests/pipelines/test_loras.py (tests/ is on sys.path, see conftest.py)."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

# The layers kohya's sd-scripts targets: attention and feed-forward linears and proj_in/proj_out of the transformers
# ("LoRA"), plus the ResBlocks' convs, time projections, shortcuts and the resamplers ("LoCon", conv_dim).
KOHYA_ATTENTION = re.compile(r".*(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)$")
KOHYA_CONV = re.compile(r".*(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv)$")
KOHYA_TEXT = re.compile(r".*(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])$")


def _low_rank(module: torch.nn.Module, rank: int, g: torch.Generator, size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Random non-zero (down, up) for ``module``: down (rank, in, *kernel), up (out, rank[, 1, 1]); the update has
    entries of about ``size`` times the layer's fan-in-scaled weights."""
    if isinstance(module, torch.nn.Conv2d):
        fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=g) / fan_in**0.5
        up = torch.randn(module.out_channels, rank, 1, 1, generator=g) * size / rank**0.5
    else:
        down = torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5
        up = torch.randn(module.out_features, rank, generator=g) * size / rank**0.5
    return down, up


def kohya_lora(pipe, *, rank: int = 4, alpha: float | None = 2.0, unet: bool = True, conv: bool = False,
               text: bool = True, te_prefix: str = "lora_te_", seed: int = 0, size: float = 0.5) -> dict:
    """A kohya/A1111 LoRA state dict for ``pipe``: ``lora_unet_<diffusers path with _>`` and
    ``<te_prefix>text_model_<path>``, each with ``lora_down``, ``lora_up`` and (unless None) ``alpha``."""
    g = torch.Generator().manual_seed(seed)
    out = {}

    def add(name: str, module: torch.nn.Module) -> None:
        down, up = _low_rank(module, rank, g, size)
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(float(alpha))

    for name, module in pipe.unet.named_modules() if unet else ():
        if KOHYA_ATTENTION.match(name) or (conv and KOHYA_CONV.match(name)):
            add("lora_unet_" + name.replace(".", "_"), module)
    for name, module in pipe.text_encoder.named_modules() if text else ():
        if KOHYA_TEXT.match(name):
            path = name if name.startswith("text_model.") else "text_model." + name  # transformers 5 drops the level
            add(te_prefix + path.replace(".", "_"), module)
    return out


def save_kohya(state: dict, path: Path) -> Path:
    save_file(state, str(path))
    return path


def peft_lora(pipe, path: Path, *, unet: dict | None = None, text: dict | None = None, seed: int = 0,
              size: float = 0.5) -> Path:
    """A diffusers/PEFT LoRA file written by diffusers' ``save_lora_weights``: PEFT adapters with LoraConfig
    ``unet`` / ``text`` (r, lora_alpha, target_modules, ...) put on copies of ``pipe``'s parts, random non-zero
    A and B, the configs stored as diffusers' adapter metadata."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    g = torch.Generator().manual_seed(seed)
    layers, metadata = {}, {}
    for part, settings in (("unet", unet), ("text_encoder", text)):
        if settings is None:
            continue
        config = LoraConfig(init_lora_weights=False, **settings)
        module = inject_adapter_in_model(config, copy.deepcopy(getattr(pipe, part)))
        with torch.no_grad():
            for name, m in module.named_modules():
                if hasattr(m, "lora_A") and "default" in m.lora_A:
                    down, up = _low_rank(m.base_layer, m.lora_A["default"].weight.shape[0], g, size)
                    m.lora_A["default"].weight.copy_(down.reshape(m.lora_A["default"].weight.shape))
                    m.lora_B["default"].weight.copy_(up.reshape(m.lora_B["default"].weight.shape))
        layers[f"{part}_lora_layers"] = get_peft_model_state_dict(module)
        meta = config.to_dict()
        metadata[f"{part}_lora_adapter_metadata"] = json.loads(json.dumps(meta, default=list))
    diffusers.StableDiffusionPipeline.save_lora_weights(str(path.parent), weight_name=path.name, **layers, **metadata)
    return path


def with_loras(pipe, loras: list[tuple[Path, float]]):
    """A copy of ``pipe`` with ``loras`` loaded by diffusers' ``load_lora_weights`` and fused at their weights
    (``set_adapters`` + ``fuse_lora``, UNet and text encoder)."""
    p = copy.deepcopy(pipe)
    names = []
    for i, (path, _) in enumerate(loras):
        p.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"lora{i}")
        names.append(f"lora{i}")
    if names:
        p.set_adapters(names, adapter_weights=[w for _, w in loras])
        p.fuse_lora(components=["unet", "text_encoder"], adapter_names=names)
    return p


CALL = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 4, "width": 32, "height": 32, "seed": 4,
        "guidance_scale": 7.5}


def diffusers_image(pipe, loras: list[tuple[Path, float]] = ()) -> np.ndarray:
    """diffusers' Euler image for :data:`CALL` with ``loras`` fused, as int16 pixels."""
    p = with_loras(pipe, list(loras))
    p.scheduler = diffusers.EulerDiscreteScheduler.from_config(p.scheduler.config)
    p.set_progress_bar_config(disable=True)
    image = p(CALL["prompt"], negative_prompt=CALL["negative_prompt"], num_inference_steps=CALL["steps"],
              height=CALL["height"], width=CALL["width"], guidance_scale=CALL["guidance_scale"],
              generator=torch.Generator("cpu").manual_seed(CALL["seed"])).images[0]
    return np.asarray(image, dtype=np.int16)
