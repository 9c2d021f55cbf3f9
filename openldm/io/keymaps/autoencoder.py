"""Autoencoder state-dict key maps: ours <-> original CompVis single-file layout <-> diffusers.

The original layout is the one under ``first_stage_model.`` in an SD checkpoint (and at the top level of the
standalone kl-f8 / vq-f4 files); the functions here take and return keys *without* that prefix. The diffusers
layout is ``AutoencoderKL`` / ``VQModel``. Both directions are strict: a key that maps to nothing, or an
expected key that is absent, raises ``KeyError`` listing them all.

Differences the maps absorb:
- CompVis numbers decoder levels by resolution (``up.0`` is the highest), we and diffusers by order of
  computation (``up.0`` / ``up_blocks.0`` is the lowest).
- CompVis's mid-block attention uses 1x1 convolutions ``q, k, v, proj_out`` with (C, C, 1, 1) weights; ours and
  diffusers' are Linear layers with (C, C) weights.
- Our VQ quantiser carries training statistics (``cluster_size``, ``embed_sum``) that neither format stores:
  exports drop them, imports create fresh ones for the imported codebook.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from openldm.io.tensor_files import build_within
from openldm.models.autoencoder import (
    AutoencoderKL,
    AutoencoderKLConfig,
    VQAutoencoder,
    VQModelConfig,
)
from openldm.models.meta import build_on_meta
from openldm.models.quantizer import VectorQuantizer

ORIGINAL_PREFIX = "first_stage_model."  # where an SD single file keeps the autoencoder

Config = AutoencoderKLConfig | VQModelConfig
Transform = Callable[[torch.Tensor], torch.Tensor]
Transforms = tuple[Transform, Transform]  # (ours -> theirs, theirs -> ours)

_RES_ORIGINAL = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "skip": "nin_shortcut"}
_RES_DIFFUSERS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "skip": "conv_shortcut"}
_ATTN_ORIGINAL = {"norm": "norm", "attn.to_q": "q", "attn.to_k": "k", "attn.to_v": "v", "attn.to_out": "proj_out"}
_ATTN_DIFFUSERS = {"norm": "group_norm", "attn.to_q": "to_q", "attn.to_k": "to_k", "attn.to_v": "to_v", "attn.to_out": "to_out.0"}
_QUANTIZER_STATS = ("cluster_size", "embed_sum")  # ours only: training state


def _linear_to_conv1x1(w: torch.Tensor) -> torch.Tensor:
    return w[:, :, None, None] if w.dim() == 2 else w


def _conv1x1_to_linear(w: torch.Tensor) -> torch.Tensor:
    # Anything but a (C_out, C_in, 1, 1) weight passes through unchanged for the shape check to report.
    return w[:, :, 0, 0] if w.dim() == 4 and w.shape[2:] == (1, 1) else w


_CONV1X1: Transforms = (_linear_to_conv1x1, _conv1x1_to_linear)


def _rename(key: str, layout: str, num_levels: int) -> tuple[str, Transforms | None]:
    """Our key -> (key in ``layout``, tensor transforms between the layouts, or None when tensors are equal)."""
    original = layout == "original"
    res = _RES_ORIGINAL if original else _RES_DIFFUSERS
    if m := re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.blocks\.(\d+)\.(\w+)\.(weight|bias)", key):
        part, direction, level, block, layer, param = m.groups()
        level = int(level)
        if original:
            level = level if direction == "down" else num_levels - 1 - level
            return f"{part}.{direction}.{level}.block.{block}.{res[layer]}.{param}", None
        return f"{part}.{direction}_blocks.{level}.resnets.{block}.{res[layer]}.{param}", None
    if m := re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.resample\.conv\.(weight|bias)", key):
        part, direction, level, param = m.groups()
        level = int(level)
        name = "downsample" if direction == "down" else "upsample"
        if original:
            level = level if direction == "down" else num_levels - 1 - level
            return f"{part}.{direction}.{level}.{name}.conv.{param}", None
        return f"{part}.{direction}_blocks.{level}.{name}rs.0.conv.{param}", None
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.res_([12])\.(\w+)\.(weight|bias)", key):
        part, index, layer, param = m.groups()
        if original:
            return f"{part}.mid.block_{index}.{res[layer]}.{param}", None
        return f"{part}.mid_block.resnets.{int(index) - 1}.{res[layer]}.{param}", None
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn\.(norm|attn\.to_[qkv]|attn\.to_out)\.(weight|bias)", key):
        part, layer, param = m.groups()
        if original:
            conv = param == "weight" and layer != "norm"
            return f"{part}.mid.attn_1.{_ATTN_ORIGINAL[layer]}.{param}", _CONV1X1 if conv else None
        return f"{part}.mid_block.attentions.0.{_ATTN_DIFFUSERS[layer]}.{param}", None
    if m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(weight|bias)", key):
        return (key if original else f"{m.group(1)}.conv_norm_out.{m.group(2)}"), None
    if re.fullmatch(r"((encoder|decoder)\.(conv_in|conv_out)|quant_conv|post_quant_conv)\.(weight|bias)", key):
        return key, None
    if key == "quantizer.codebook":
        return "quantize.embedding.weight", None
    raise KeyError(f"no {layout} name for our autoencoder key {key!r}")


def _our_shapes(config: Config, fill: Mapping[str, torch.Tensor] | None = None,
                what: str = "autoencoder weights") -> dict[str, torch.Size]:
    """Key -> shape of our model for ``config``, read off a parameter-free (meta-device) instance. With ``fill``,
    the weights meant for it, a config asking for more than they hold fails at once (a file's config is untrusted)."""
    if not isinstance(config, (AutoencoderKLConfig, VQModelConfig)):
        raise TypeError(f"expected an AutoencoderKLConfig or VQModelConfig, got {type(config).__name__}")
    cls = AutoencoderKL if isinstance(config, AutoencoderKLConfig) else VQAutoencoder
    if fill is None:
        module = build_on_meta(cls, config)
    else:
        module = build_within(cls, config, [tuple(t.shape) for t in fill.values()], what)
    return {k: v.shape for k, v in module.state_dict().items()}


def _table(config: Config, layout: str,
           shapes: dict[str, torch.Size] | None = None) -> dict[str, tuple[str, Transforms | None]]:
    n = len(config.channel_mult)
    return {k: _rename(k, layout, n) for k in (_our_shapes(config) if shapes is None else shapes) if not _is_stat(k)}


def _is_stat(key: str) -> bool:
    return key.startswith("quantizer.") and key.split(".", 1)[1] in _QUANTIZER_STATS


def _check(given: Mapping[str, torch.Tensor], expected: set[str], what: str) -> None:
    unexpected = sorted(set(given) - expected)
    missing = sorted(expected - set(given))
    if unexpected or missing:
        raise KeyError(f"{what}: {len(unexpected)} unmapped key(s) {_listing(unexpected)}; "
                       f"{len(missing)} missing key(s) {_listing(missing)}")


def _listing(keys: list[str], limit: int = 20) -> str:
    return str(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _export(state_dict: Mapping[str, torch.Tensor], config: Config, layout: str) -> dict[str, torch.Tensor]:
    table = _table(config, layout)
    given = {k: v for k, v in state_dict.items() if not _is_stat(k)}
    _check(given, set(table), "openldm autoencoder state dict")
    out = {}
    for ours, (theirs, transforms) in table.items():
        t = state_dict[ours]
        out[theirs] = transforms[0](t) if transforms else t
    return out


def _import(state_dict: Mapping[str, torch.Tensor], config: Config, layout: str,
            ignore_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    given = {k: v for k, v in state_dict.items() if not k.startswith(ignore_prefixes)} if ignore_prefixes else dict(state_dict)
    shapes = _our_shapes(config, given, f"{layout} autoencoder state dict")
    table = _table(config, layout, shapes)
    inverse = {theirs: (ours, transforms) for ours, (theirs, transforms) in table.items()}
    _check(given, set(inverse), f"{layout} autoencoder state dict")
    out = {}
    for theirs, (ours, transforms) in inverse.items():
        t = given[theirs]
        t = transforms[1](t) if transforms else t
        if t.shape != shapes[ours]:
            raise ValueError(f"{layout} {theirs} has shape {tuple(given[theirs].shape)}; "
                             f"expected {tuple(shapes[ours])} for our {ours}")
        out[ours] = t
    if isinstance(config, VQModelConfig):
        stats = VectorQuantizer.initial_statistics(out["quantizer.codebook"], config.ema)
        out.update({f"quantizer.{k}": v for k, v in stats.items()})
    return out


def to_original(state_dict: Mapping[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Our KL or VQ autoencoder state dict -> CompVis keys (without ``ORIGINAL_PREFIX``); tensors are shared."""
    return _export(state_dict, config, "original")


def from_original(state_dict: Mapping[str, torch.Tensor], config: Config,
                              ignore_prefixes: tuple[str, ...] = ("loss.",)) -> dict[str, torch.Tensor]:
    """CompVis keys (without ``ORIGINAL_PREFIX``) -> our state dict for ``config``.

    Keys under ``ignore_prefixes`` are skipped: by default ``loss.``, the LPIPS and discriminator weights that
    the standalone first-stage checkpoints carry along.
    """
    return _import(state_dict, config, "original", ignore_prefixes)


def to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Our KL (VQ) autoencoder state dict -> diffusers ``AutoencoderKL`` (``VQModel``) keys."""
    return _export(state_dict, config, "diffusers")


def from_diffusers(state_dict: Mapping[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKL`` (``VQModel``) keys -> our state dict for ``config``."""
    return _import(state_dict, config, "diffusers")


# ----------------------------------------------------------------------------------------------- configs
# Diffusers config entries that do not change the network's weights or outputs (tiling size, dtype policy,
# pipeline-side latent statistics); accepted and dropped.
_DIFFUSERS_IGNORED = {"sample_size", "force_upcast", "latents_mean", "latents_std", "lookup_from_codebook"}
_GROUPS = 32  # our GroupNorms use 32 groups (fewer only for fewer than 32 channels)


def autoencoder_config_from_diffusers(d: Mapping) -> Config:
    """A diffusers ``AutoencoderKL`` or ``VQModel`` config dict (config.json) -> our config.

    Raises ``ValueError`` for settings our networks cannot express (attention blocks inside the levels, other
    activations or group counts, no quant convs, spatial norm) and for unknown keys.
    """
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    vq = "num_vq_embeddings" in d or d.get("vq_embed_dim") is not None
    known = {"in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
             "act_fn", "latent_channels", "norm_num_groups", "scaling_factor", "shift_factor", "use_quant_conv",
             "use_post_quant_conv", "mid_block_add_attention", "num_vq_embeddings", "vq_embed_dim", "norm_type"}
    unknown = sorted(set(d) - known - _DIFFUSERS_IGNORED)
    if unknown:
        raise ValueError(f"unknown diffusers autoencoder config key(s) {unknown}; known: {sorted(known | _DIFFUSERS_IGNORED)}")
    boc = list(d.get("block_out_channels", (64,)))
    n = len(boc)
    expect = {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
    for key, want in expect.items():
        got = list(d.get(key, want[:1]))
        if got != want:
            raise ValueError(f"{key}={got} is not supported; expected {want} (attention only in the mid block)")
    for key, want in {"act_fn": "silu", "norm_num_groups": _GROUPS, "use_quant_conv": True, "use_post_quant_conv": True,
                      "mid_block_add_attention": True, "norm_type": "group"}.items():
        if d.get(key, want) != want:
            raise ValueError(f"diffusers {key}={d[key]!r} is not supported; only {want!r}")
    base = boc[0]
    if any(c % base or c % _GROUPS for c in boc):
        raise ValueError(f"block_out_channels={boc} must be multiples of the first entry and of {_GROUPS}")
    common = dict(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3), channels=base,
                  channel_mult=tuple(c // base for c in boc), num_res_blocks=d.get("layers_per_block", 1),
                  scaling_factor=float(d.get("scaling_factor", 0.18215)), shift_factor=float(d.get("shift_factor") or 0.0))
    if vq:
        z = d.get("latent_channels", 3)
        return VQModelConfig(**common, z_channels=z, embed_dim=d.get("vq_embed_dim") or z,
                             num_embeddings=d.get("num_vq_embeddings", 256))
    return AutoencoderKLConfig(**common, z_channels=d.get("latent_channels", 4))


def autoencoder_config_to_diffusers(config: Config) -> dict:
    """Our config -> keyword arguments for diffusers ``AutoencoderKL`` (``VQModel`` for a VQ config).

    Raises ``ValueError`` when diffusers cannot express the config: ``channel_mult[0]`` must be 1 (diffusers'
    first level has ``conv_in``'s width) and every width a multiple of 32 (its fixed GroupNorm group count).
    """
    mult = config.channel_mult
    widths = [config.channels * m for m in mult]
    if mult[0] != 1:
        raise ValueError(f"channel_mult={mult} cannot be expressed in diffusers: the first multiplier must be 1")
    if any(w % _GROUPS for w in widths):
        raise ValueError(f"channel widths {widths} cannot be expressed in diffusers: each must be a multiple of {_GROUPS}")
    d = dict(in_channels=config.in_channels, out_channels=config.out_channels,
             down_block_types=["DownEncoderBlock2D"] * len(mult), up_block_types=["UpDecoderBlock2D"] * len(mult),
             block_out_channels=widths, layers_per_block=config.num_res_blocks, act_fn="silu",
             latent_channels=config.z_channels, norm_num_groups=_GROUPS, scaling_factor=config.scaling_factor)
    if isinstance(config, VQModelConfig):
        d.update(num_vq_embeddings=config.num_embeddings, vq_embed_dim=config.embed_dim)
    else:
        d.update(shift_factor=config.shift_factor or None)
    return d


def autoencoder_config_from_original(state_dict: Mapping[str, torch.Tensor], scaling_factor: float | None = None) -> Config:
    """Derive our config from the shapes of an original-layout autoencoder state dict (keys without
    ``ORIGINAL_PREFIX``): a ``VQModelConfig`` when it has ``quantize.embedding.weight``, else an
    ``AutoencoderKLConfig``. The latent scale is not in the weights: ``scaling_factor`` defaults to SD's
    0.18215 for KL and 1.0 for VQ.
    """
    def shape(key: str) -> torch.Size:
        if key not in state_dict:
            raise KeyError(f"not an original-layout autoencoder state dict: {key!r} is missing")
        return state_dict[key].shape

    level_attention = sorted(k for k in state_dict if re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", k))
    if level_attention:
        raise ValueError(f"attention inside the levels is not supported (found {_listing(level_attention)}); "
                         "accepted: attention only in the mid block")
    channels, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = len({k.split(".")[2] for k in state_dict if k.startswith("encoder.down.")})
    widths = [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)]
    num_res_blocks = len({k.split(".")[4] for k in state_dict if k.startswith("encoder.down.0.block.")})
    common = dict(in_channels=in_channels, out_channels=shape("decoder.conv_out.weight")[0], channels=channels,
                  channel_mult=tuple(w // channels for w in widths), num_res_blocks=num_res_blocks)
    z = shape("decoder.conv_in.weight")[1]
    if "quantize.embedding.weight" in state_dict:
        num_embeddings, embed_dim = shape("quantize.embedding.weight")
        return VQModelConfig(**common, z_channels=z, embed_dim=embed_dim, num_embeddings=num_embeddings,
                             scaling_factor=1.0 if scaling_factor is None else scaling_factor)
    if shape("quant_conv.weight")[0] != 2 * z:
        raise ValueError(f"quant_conv maps to {shape('quant_conv.weight')[0]} channels; only embed_dim == z_channels "
                         f"({2 * z}) is supported")
    return AutoencoderKLConfig(**common, z_channels=z, scaling_factor=0.18215 if scaling_factor is None else scaling_factor)


def diffusers_config_from_state(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The diffusers ``AutoencoderKL`` config dict that the shapes of a diffusers-layout state dict imply, for a
    weights file that arrives without its config.json (a lone ``diffusion_pytorch_model.safetensors``). What
    shapes cannot say (the activation, 32 groups, the scaling factor) is SD's; :func:`autoencoder_config_from_diffusers`
    then validates it."""
    def shape(key: str) -> torch.Size:
        if key not in state_dict:
            raise KeyError(f"not a diffusers-layout autoencoder state dict: {key!r} is missing")
        return state_dict[key].shape

    levels = len({k.split(".")[2] for k in state_dict if k.startswith("encoder.down_blocks.")})
    if not levels:
        raise KeyError("not a diffusers-layout autoencoder state dict: no encoder.down_blocks.* keys")
    widths = [shape(f"encoder.down_blocks.{i}.resnets.0.conv2.weight")[0] for i in range(levels)]
    layers = len({k.split(".")[4] for k in state_dict if k.startswith("encoder.down_blocks.0.resnets.")})
    return {"in_channels": shape("encoder.conv_in.weight")[1], "out_channels": shape("decoder.conv_out.weight")[0],
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": widths, "layers_per_block": layers,
            "latent_channels": shape("decoder.conv_in.weight")[1]}
