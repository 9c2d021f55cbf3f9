"""UNet parameter names: ours <-> the original CompVis single-file layout <-> diffusers' UNet2DConditionModel.

The only place that knows the other layouts. Every map is built from a ``UNetConfig`` and covers exactly the
parameters of ``UNet(config)``; converting a state dict is strict (missing and unexpected keys are listed in the
error), and shapes are checked. The one tensor transform: proj_in/proj_out of the spatial transformers are
1x1 convs (out, in, 1, 1) in SD 1.x files and Linear (out, in) in SD 2.x files; loading accepts either and
reshapes to the module's layout.

Original-layout keys are handled **without** their ``model.diffusion_model.`` prefix (``ORIGINAL_PREFIX``):
the single-file loader strips and adds it, as it also separates the VAE and text-encoder keys.

Original layout (``ldm.modules.diffusionmodules.openaimodel.UNetModel``): ``time_embed.{0,2}``,
``label_emb.0.{0,2}``, ``input_blocks.{i}.{j}``, ``middle_block.{j}``, ``output_blocks.{i}.{j}``, ``out.{0,2}``;
ResBlock ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection``; Downsample ``op``.
Diffusers: ``time_embedding``, ``class_embedding``, ``conv_in``, ``down_blocks.{level}.{resnets,attentions,
downsamplers}``, ``mid_block``, ``up_blocks``, ``conv_norm_out``, ``conv_out``.
"""
from __future__ import annotations

from typing import Mapping

import torch

from openldm.io.tensor_files import build_within
from openldm.models.meta import build_on_meta
from openldm.models.unet import UNet, UNetConfig

ORIGINAL_PREFIX = "model.diffusion_model."

# Submodule names inside one block: ours -> (original, diffusers).
_RESBLOCK = {
    "norm1": ("in_layers.0", "norm1"),
    "conv1": ("in_layers.2", "conv1"),
    "emb_proj": ("emb_layers.1", "time_emb_proj"),
    "norm2": ("out_layers.0", "norm2"),
    "conv2": ("out_layers.3", "conv2"),
    "skip": ("skip_connection", "conv_shortcut"),
}
_DOWNSAMPLE = {"conv": ("op", "conv")}
_UPSAMPLE = {"conv": ("conv", "conv")}
_TRANSFORMER_BLOCK = {  # the original and diffusers agree inside a transformer block
    "norm_self": "norm1",
    "self_attn.to_q": "attn1.to_q",
    "self_attn.to_k": "attn1.to_k",
    "self_attn.to_v": "attn1.to_v",
    "self_attn.to_out": "attn1.to_out.0",
    "norm_cross": "norm2",
    "cross_attn.to_q": "attn2.to_q",
    "cross_attn.to_k": "attn2.to_k",
    "cross_attn.to_v": "attn2.to_v",
    "cross_attn.to_out": "attn2.to_out.0",
    "norm_ff": "norm3",
    "ff.proj": "ff.net.0.proj",
    "ff.out": "ff.net.2",
}
_PROJECTIONS = ("proj_in.weight", "proj_out.weight")


def _transformer(depth: int) -> dict[str, tuple[str, str]]:
    sub = {name: (name, name) for name in ("norm", "proj_in", "proj_out")}
    for j in range(depth):
        for ours, theirs in _TRANSFORMER_BLOCK.items():
            sub[f"blocks.{j}.{ours}"] = (f"transformer_blocks.{j}.{theirs}",) * 2
    return sub


def _module_table(cfg: UNetConfig) -> dict[str, tuple[str, str]]:
    """Every module path of ``UNet(cfg)`` that may hold parameters -> (original path, diffusers path)."""
    table: dict[str, tuple[str, str]] = {}

    def add(ours: str, original: str, diffusers: str, sub: dict[str, tuple[str, str]]) -> None:
        for name, (o, d) in sub.items():
            table[f"{ours}.{name}"] = (f"{original}.{o}", f"{diffusers}.{d}")

    mlp = {"linear_1": ("0", "linear_1"), "linear_2": ("2", "linear_2")}
    add("time_embed", "time_embed", "time_embedding", mlp)
    add("vector_embed", "label_emb.0", "class_embedding", mlp)
    table["conv_in"] = ("input_blocks.0.0", "conv_in")
    table["norm_out"] = ("out.0", "conv_norm_out")
    table["conv_out"] = ("out.2", "conv_out")
    transformer = _transformer(cfg.transformer_depth)

    levels, R = len(cfg.channel_mult), cfg.num_res_blocks
    for i in range(levels * (R + 1) - 1):  # down: R x (res, attn?) then a downsample, per level
        level, k = divmod(i, R + 1)
        original, diffusers = f"input_blocks.{i + 1}", f"down_blocks.{level}"
        if k == R:
            add(f"down.{i}.0", f"{original}.0", f"{diffusers}.downsamplers.0", _DOWNSAMPLE)
            continue
        add(f"down.{i}.0", f"{original}.0", f"{diffusers}.resnets.{k}", _RESBLOCK)
        if level in cfg.attention_levels:
            add(f"down.{i}.1", f"{original}.1", f"{diffusers}.attentions.{k}", transformer)

    add("mid.0", "middle_block.0", "mid_block.resnets.0", _RESBLOCK)
    if cfg.mid_attention:
        add("mid.1", "middle_block.1", "mid_block.attentions.0", transformer)
    j = 2 if cfg.mid_attention else 1
    add(f"mid.{j}", f"middle_block.{j}", "mid_block.resnets.1", _RESBLOCK)

    for i in range(levels * (R + 1)):  # up: R + 1 x (res, attn?), an upsample after the last, per level
        up_level, k = divmod(i, R + 1)  # diffusers counts up levels from the bottom
        level = levels - 1 - up_level
        original, diffusers = f"output_blocks.{i}", f"up_blocks.{up_level}"
        add(f"up.{i}.0", f"{original}.0", f"{diffusers}.resnets.{k}", _RESBLOCK)
        position = 1
        if level in cfg.attention_levels:
            add(f"up.{i}.1", f"{original}.1", f"{diffusers}.attentions.{k}", transformer)
            position = 2
        if k == R and level != 0:
            add(f"up.{i}.{position}", f"{original}.{position}", f"{diffusers}.upsamplers.0", _UPSAMPLE)
    return table


def _our_shapes(cfg: UNetConfig, fill: Mapping[str, torch.Tensor] | None = None,
                what: str = "UNet weights") -> dict[str, torch.Size]:
    """Key -> shape of ``UNet(cfg)``, built on the meta device (no memory, no initialisation cost). With ``fill``,
    the weights meant for it, a config asking for more than they hold fails at once (a file's config is untrusted)."""
    if fill is None:
        module = build_on_meta(UNet, cfg)
    else:
        module = build_within(UNet, cfg, [tuple(t.shape) for t in fill.values()], what)
    return {k: v.shape for k, v in module.state_dict().items()}


def _keymap(cfg: UNetConfig, layout: int, shapes: dict[str, torch.Size] | None = None) -> dict[str, str]:
    shapes = _our_shapes(cfg) if shapes is None else shapes
    table = _module_table(cfg)
    keymap, unmapped = {}, []
    for key in shapes:
        module, _, param = key.rpartition(".")
        if module in table:
            keymap[key] = f"{table[module][layout]}.{param}"
        else:
            unmapped.append(key)
    if unmapped:  # a bug here, not in the caller's file
        raise RuntimeError(f"UNet parameters with no counterpart in the key map: {unmapped}")
    return keymap


def original_keymap(cfg: UNetConfig) -> dict[str, str]:
    """Our key -> original CompVis key (without ``ORIGINAL_PREFIX``), for every parameter of ``UNet(cfg)``."""
    return _keymap(cfg, 0)


def diffusers_keymap(cfg: UNetConfig) -> dict[str, str]:
    """Our key -> diffusers UNet2DConditionModel key, for every parameter of ``UNet(cfg)``."""
    return _keymap(cfg, 1)


def _convert(state_dict: Mapping[str, torch.Tensor], keymap: dict[str, str], shapes: dict[str, torch.Size], what: str) -> dict[str, torch.Tensor]:
    """Rename ``state_dict`` through ``keymap`` (source key -> target key); strict; reshapes projections to ``shapes``."""
    missing = sorted(set(keymap) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(keymap))
    if missing or unexpected:
        raise KeyError(
            f"{what}: {len(missing)} missing keys {_listing(missing)}; {len(unexpected)} unexpected keys {_listing(unexpected)}"
        )
    out = {}
    for src, dst in keymap.items():
        tensor, shape = state_dict[src], shapes[dst]
        if tensor.shape != shape and dst.endswith(_PROJECTIONS) and tensor.numel() == shape.numel():
            tensor = tensor.reshape(shape)  # 1x1 conv (out, in, 1, 1) <-> Linear (out, in)
        if tensor.shape != shape:
            raise ValueError(f"{what}: {src} has shape {tuple(tensor.shape)}; expected {tuple(shape)} for {dst}")
        out[dst] = tensor
    return out


def _listing(keys: list[str], limit: int = 20) -> str:
    return str(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def from_original(state_dict: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Original-layout UNet weights (keys without ``ORIGINAL_PREFIX``) -> our state dict for ``UNet(cfg)``."""
    shapes = _our_shapes(cfg, state_dict, "original UNet checkpoint")
    keymap = {theirs: ours for ours, theirs in _keymap(cfg, 0, shapes).items()}
    return _convert(state_dict, keymap, shapes, "original UNet checkpoint")


def to_original(state_dict: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Our UNet state dict -> original-layout keys (without ``ORIGINAL_PREFIX``); tensors are shared, not copied."""
    keymap = original_keymap(cfg)
    return _convert(state_dict, keymap, {keymap[k]: s for k, s in _our_shapes(cfg).items()}, "openldm UNet state dict")


def from_diffusers(state_dict: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel weights -> our state dict for ``UNet(cfg)``."""
    shapes = _our_shapes(cfg, state_dict, "diffusers UNet state dict")
    keymap = {theirs: ours for ours, theirs in _keymap(cfg, 1, shapes).items()}
    return _convert(state_dict, keymap, shapes, "diffusers UNet state dict")


def to_diffusers(state_dict: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Our UNet state dict -> diffusers UNet2DConditionModel keys (for ``unet_config_to_diffusers(cfg)``)."""
    keymap = diffusers_keymap(cfg)
    return _convert(state_dict, keymap, {keymap[k]: s for k, s in _our_shapes(cfg).items()}, "openldm UNet state dict")


# ---- configs ------------------------------------------------------------------------------------------------

# diffusers settings we cannot express, with the only value we accept (a missing key means that value).
_DIFFUSERS_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "only_cross_attention": False, "dual_cross_attention": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "addition_embed_type": None, "num_class_embeds": None,
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
}
# Keys with no effect on the weights or the maths in float32: the default sample size, fp16 attention upcasting
# (SD 2.1 sets it; our attention runs in the model's dtype through SDPA), addition-embedding widths when unused.
_DIFFUSERS_IGNORED = {"sample_size", "upcast_attention", "addition_time_embed_dim", "addition_embed_type_num_heads"}


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """``UNet2DConditionModel(**unet_config_to_diffusers(cfg))`` has the same topology and maths as ``UNet(cfg)``.

    Two of our configurations have no counterpart there and raise: transformers without cross-attention
    (``context_dim=None``) and a middle block without attention (``mid_attention=False``).
    """
    levels = range(len(cfg.channel_mult))
    if cfg.context_dim is None:
        raise ValueError("diffusers' UNet2DConditionModel has no self-attention-only transformer; "
                         f"this config has attention at levels {cfg.transformer_levels()} but context_dim=None")
    if not cfg.mid_attention:  # its attention-free UNetMidBlock2D holds a single ResBlock, ours two
        raise ValueError("mid_attention=False has no diffusers UNet2DConditionModel counterpart; accepted: True")
    heads = tuple(cfg.heads(level)[0] if level in cfg.transformer_levels() else 1 for level in levels)
    return {
        "sample_size": 64,
        "in_channels": cfg.in_channels + cfg.concat_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": tuple(cfg.channels(level) for level in levels),
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": tuple("CrossAttnDownBlock2D" if l in cfg.attention_levels else "DownBlock2D" for l in levels),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": tuple("CrossAttnUpBlock2D" if l in cfg.attention_levels else "UpBlock2D" for l in reversed(levels)),
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,  # diffusers' name for the number of heads
        "transformer_layers_per_block": cfg.transformer_depth,
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": cfg.use_linear_projection,
        "class_embed_type": "projection" if cfg.vector_dim is not None else None,
        "projection_class_embeddings_input_dim": cfg.vector_dim,
        "resnet_time_scale_shift": "scale_shift" if cfg.scale_shift else "default",
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": cfg.norm_eps,
        "dropout": cfg.dropout,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "act_fn": "silu",
    }


def unet_config_from_diffusers(config: Mapping, concat_channels: int | None = None) -> UNetConfig:
    """A diffusers UNet2DConditionModel config (its ``config.json`` as a dict) -> ``UNetConfig``.

    diffusers counts concatenated channels in ``in_channels``; unless ``concat_channels`` is given, input channels
    beyond ``out_channels`` are taken as the concat slot (SD inpainting: 9 = 4 + 5; depth: 5 = 4 + 1).
    Settings we cannot express raise, naming the key and the accepted value.
    """
    known = set(_DIFFUSERS_FIXED) | _DIFFUSERS_IGNORED | set(unet_config_to_diffusers(UNetConfig())) | {"num_attention_heads"}
    unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
    if unknown:
        raise ValueError(f"unsupported diffusers UNet config keys: {unknown}")
    for key, accepted in _DIFFUSERS_FIXED.items():
        value = config.get(key, accepted)
        if value != accepted and not (key == "mid_block_only_cross_attention" and value is False):
            raise ValueError(f"diffusers config {key}={value!r} is not supported; accepted: {accepted!r}")

    block_out = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = range(len(block_out))
    if any(b % block_out[0] for b in block_out):
        raise ValueError(f"block_out_channels={block_out}: every width must be a multiple of the first")
    down = list(config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if any(t not in kinds for t in down):
        raise ValueError(f"down_block_types={down}: accepted block types are {sorted(kinds)}")
    attention_levels = tuple(l for l in levels if kinds[down[l]])
    expected_up = ["CrossAttnUpBlock2D" if l in attention_levels else "UpBlock2D" for l in reversed(levels)]
    up = list(config.get("up_block_types", expected_up))
    if up != expected_up:
        raise ValueError(f"up_block_types={up}: must mirror down_block_types, i.e. {expected_up}")
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"mid_block_type={mid_type!r} is not supported; accepted: 'UNetMidBlock2DCrossAttn'")

    def uniform(key: str, default):
        value = config.get(key, default)
        values = set(value) if isinstance(value, (list, tuple)) else {value}
        if len(values) != 1:
            raise ValueError(f"{key}={value}: per-level values differ, which UNetConfig cannot express")
        return values.pop()

    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)  # diffusers' naming quirk
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(block_out)
    used = sorted(set(attention_levels) | {len(block_out) - 1})  # the middle block's transformer is the last level's
    num_heads, head_dim = None, None
    if len({heads[l] for l in used}) <= 1:
        num_heads = heads[used[0]]
    elif len({block_out[l] // heads[l] for l in used}) == 1:
        head_dim = block_out[used[0]] // heads[used[0]]
    else:
        raise ValueError(f"attention heads {heads} for widths {block_out}: neither the head count nor the head width is constant")

    class_embed = config.get("class_embed_type")
    if class_embed not in (None, "projection"):
        raise ValueError(f"class_embed_type={class_embed!r} is not supported; accepted: None, 'projection'")
    total_in, out = config.get("in_channels", 4), config.get("out_channels", 4)
    concat = max(0, total_in - out) if concat_channels is None else concat_channels
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise ValueError(f"resnet_time_scale_shift={shift!r}: accepted 'default', 'scale_shift'")
    return UNetConfig(
        in_channels=total_in - concat,
        out_channels=out,
        model_channels=block_out[0],
        channel_mult=tuple(b // block_out[0] for b in block_out),
        num_res_blocks=uniform("layers_per_block", 2),
        attention_levels=attention_levels,
        mid_attention=True,
        num_heads=num_heads,
        head_dim=head_dim,
        transformer_depth=uniform("transformer_layers_per_block", 1),
        context_dim=uniform("cross_attention_dim", 1280),
        use_linear_projection=config.get("use_linear_projection", False),
        vector_dim=config.get("projection_class_embeddings_input_dim") if class_embed else None,
        concat_channels=concat,
        dropout=config.get("dropout", 0.0),
        scale_shift=shift == "scale_shift",
        norm_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
    )


def unet_config_from_original(
    state_dict: Mapping[str, torch.Tensor],
    *,
    in_channels: int | None = None,
    num_heads: int | None = None,
    head_dim: int | None = None,
    norm_groups: int = 32,
) -> UNetConfig:
    """Derive a ``UNetConfig`` from the shapes of an original-layout UNet state dict (keys without the prefix).

    Shapes fix everything but three things, which take SD's conventions unless given: the split of
    ``conv_in``'s inputs into latent and concat channels (latent = ``out_channels``, so a 9-channel inpainting
    file gives 4 + 5), the attention heads (8 heads, or heads of width 64 when the context is 1024 wide as in
    SD 2.x) and the GroupNorm groups (32).
    """
    def shape(key: str) -> torch.Size:
        if key not in state_dict:
            raise KeyError(f"not an original-layout UNet state dict: {key!r} is missing")
        return state_dict[key].shape

    if "label_emb.weight" in state_dict:
        raise ValueError("label_emb.weight: class-embedding tables (SD 2 x4 upscaler) are not supported; "
                         "accepted: no label_emb, or the label_emb.0.{0,2} vector MLP")
    model_channels, total_in = shape("input_blocks.0.0.weight")[:2]
    out_channels = shape("out.2.weight")[0]
    in_channels = min(total_in, out_channels) if in_channels is None else in_channels
    blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith("input_blocks.")}
    downsamples = sum(f"input_blocks.{i}.0.op.weight" in state_dict for i in blocks)
    levels = downsamples + 1
    res_blocks = (len(blocks) - 1 - downsamples) // levels
    first_res = [1 + level * (res_blocks + 1) for level in range(levels)]  # input block of each level's first ResBlock
    widths = [shape(f"input_blocks.{i}.0.out_layers.3.weight")[0] for i in first_res]
    attention_levels = tuple(l for l, i in enumerate(first_res) if f"input_blocks.{i}.1.proj_in.weight" in state_dict)
    proj = sorted(k for k in state_dict if k.endswith(".proj_in.weight"))
    blocks_prefix = proj[0].removesuffix("proj_in.weight") + "transformer_blocks." if proj else None
    depth = len({k[len(blocks_prefix):].split(".")[0] for k in state_dict if k.startswith(blocks_prefix)}) if proj else 1
    cross = [k for k in state_dict if k.endswith("attn2.to_k.weight")]
    context_dim = state_dict[cross[0]].shape[1] if cross else None
    if num_heads is None and head_dim is None:
        num_heads, head_dim = (None, 64) if context_dim == 1024 else (8, None)
    vector_dim = shape("label_emb.0.0.weight")[1] if "label_emb.0.0.weight" in state_dict else None
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(w // model_channels for w in widths),
        num_res_blocks=res_blocks,
        attention_levels=attention_levels,
        mid_attention="middle_block.1.proj_in.weight" in state_dict,
        num_heads=num_heads,
        head_dim=head_dim,
        transformer_depth=depth,
        context_dim=context_dim,
        use_linear_projection=bool(proj) and state_dict[proj[0]].dim() == 2,
        vector_dim=vector_dim,
        concat_channels=total_in - in_channels,
        scale_shift=shape("input_blocks.1.0.emb_layers.1.weight")[0] == 2 * widths[0],
        norm_groups=norm_groups,
    )
