"""Key and config maps between openldm's CLIP text encoder and the layouts checkpoints store it in.

Our :class:`~openldm.models.text_encoder.CLIPTextEncoder` uses transformers' ``CLIPTextModel`` parameter names as
transformers 5 spells them (``embeddings.token_embedding.weight``, ``encoder.layers.N.self_attn.q_proj.weight``,
``final_layer_norm.weight``). The other layouts differ only by a prefix, except OpenCLIP's:

- SD v1 single files (CompVis): ``cond_stage_model.transformer.text_model.<ours>``; some early fine-tunes lack the
  ``text_model.`` level. The ``...embeddings.position_ids`` buffer they carry is dropped.
- diffusers folders, ``text_encoder/model.safetensors``: ``text_model.<ours>`` when written by transformers 4 (every
  published SD folder), ``<ours>`` when written by transformers 5. We write the ``text_model.`` form: both
  transformers versions load it.
- SD 2 single files: OpenCLIP's ``cond_stage_model.model.transformer.resblocks.N.attn.in_proj_weight`` (q, k, v
  stacked), ``ln_1``, ``mlp.c_fc``, ... (:func:`from_open_clip`, read-only).

The maps rename keys and never copy tensors (q/k/v of OpenCLIP are views of its stacked projection); they do not
check completeness: load the result with ``model.load_state_dict(..., strict=True, assign=True)``, which names any
missing or unexpected key. ``from_original`` also takes a dict already cut out of a single file (``prefix=""``).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import torch

from openldm.models.text_encoder import CLIPTextConfig

ORIGINAL_PREFIX = "cond_stage_model.transformer."  # SD v1 single files
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2 single files
_WRAPPER = "text_model."
_DROPPED = ("embeddings.position_ids",)  # a buffer, not a parameter; recomputed from the length

Tensors = Mapping[str, torch.Tensor]


def _unwrap(key: str) -> str:
    return key[len(_WRAPPER):] if key.startswith(_WRAPPER) else key


def from_original(state_dict: Tensors, prefix: str = ORIGINAL_PREFIX) -> dict[str, torch.Tensor]:
    """The text encoder's tensors of an SD v1 single-file state dict, under our names (other keys ignored)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            name = _unwrap(key[len(prefix):])
            if name not in _DROPPED:
                out[name] = value
    return out


def to_original(state_dict: Tensors, prefix: str = ORIGINAL_PREFIX) -> dict[str, torch.Tensor]:
    """Our tensors under SD v1 single-file names (``cond_stage_model.transformer.text_model.*``)."""
    return {prefix + _WRAPPER + key: value for key, value in state_dict.items()}


def from_diffusers(state_dict: Tensors) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` state dict (diffusers ``text_encoder/``; v4 or v5 names) under our names."""
    return {_unwrap(k): v for k, v in state_dict.items() if _unwrap(k) not in _DROPPED}


def to_diffusers(state_dict: Tensors) -> dict[str, torch.Tensor]:
    """Our tensors under transformers 4's ``CLIPTextModel`` names (``text_model.*``), which transformers 5 reads too."""
    return {_WRAPPER + key: value for key, value in state_dict.items()}


# OpenCLIP block names -> ours (after "transformer.resblocks.N." -> "encoder.layers.N.").
_OPEN_CLIP_BLOCK = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.",
                    "mlp.c_proj.": "mlp.fc2.", "attn.out_proj.": "self_attn.out_proj."}
_OPEN_CLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                  "positional_embedding": "embeddings.position_embedding.weight",
                  "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def open_clip_blocks(state_dict: Tensors, prefix: str = OPEN_CLIP_PREFIX) -> int:
    """How many transformer blocks (``transformer.resblocks.N``) the OpenCLIP text tower under ``prefix`` holds."""
    found = {_RESBLOCK.fullmatch(k[len(prefix):]) for k in state_dict if k.startswith(prefix)}
    return len({int(m[1]) for m in found if m is not None})


def from_open_clip(
    state_dict: Tensors, num_layers: int | None = None, prefix: str = OPEN_CLIP_PREFIX
) -> dict[str, torch.Tensor]:
    """The text tower of an SD 2 single file (OpenCLIP ViT-H/14 names) under our names.

    Keeps the first ``num_layers`` blocks; ``None``: all but the last, because SD 2 reads the penultimate layer
    (CompVis' ``FrozenOpenCLIPEmbedder(layer="penultimate")``; 23 of ViT-H's 24, as diffusers stores it).
    ``text_projection``, ``logit_scale`` and later blocks are dropped.
    """
    if num_layers is None:
        num_layers = open_clip_blocks(state_dict, prefix) - 1
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[name]] = value
            continue
        match = _RESBLOCK.fullmatch(name)
        if match is None or int(match[1]) >= num_layers:
            continue
        layer, rest = f"encoder.layers.{match[1]}.", match[2]
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]  # "weight" / "bias"
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{layer}self_attn.{proj}.{kind}"] = part
            continue
        for old, new in _OPEN_CLIP_BLOCK.items():
            if rest.startswith(old):
                out[layer + new + rest[len(old):]] = value
                break
        else:
            raise ValueError(f"unexpected OpenCLIP text key {key!r}; known block parts: in_proj_*, "
                           f"{', '.join(_OPEN_CLIP_BLOCK)}")
    return out


def clip_config_from_diffusers(data: Mapping[str, Any]) -> CLIPTextConfig:
    """Our config from a transformers ``config.json`` of a ``CLIPTextModel`` (diffusers ``text_encoder/``).

    Fields we do not model (dropout, initialiser ranges, token ids, ``projection_dim``) are ignored; a full
    ``CLIPModel`` config contributes its ``text_config``.
    """
    if data.get("model_type") == "clip":  # a full CLIPModel config
        data = data.get("text_config") or {}
    architectures = data.get("architectures") or ["CLIPTextModel"]
    if list(architectures) != ["CLIPTextModel"]:
        raise ValueError(f"text encoder architectures={architectures}; openldm reads CLIPTextModel only")
    names = {f.name for f in dataclasses.fields(CLIPTextConfig)}
    return CLIPTextConfig(**{k: v for k, v in data.items() if k in names})


def clip_config_to_diffusers(config: CLIPTextConfig) -> dict[str, Any]:
    """A transformers ``config.json`` for ``CLIPTextModel`` (what a diffusers ``text_encoder/`` folder holds)."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        **dataclasses.asdict(config),
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "projection_dim": config.hidden_size,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }
