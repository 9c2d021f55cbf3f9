"""The denoising UNet of latent diffusion.

Ronneberger et al. 2015 (U-Net) as refined by Ho et al. 2020 and Dhariwal & Nichol 2021 (guided-diffusion:
residual blocks with a time embedding, attention at chosen resolutions), with the spatial transformers of
Rombach et al. 2022 (latent diffusion / Stable Diffusion). One configurable module expresses the exact SD v1
and SD 2.x topologies and small models for 28-64 px data.

Conditioning enters through three named slots only (see openldm.nn.slots):
``vector`` (B, vector_dim) is lifted by an MLP and added to the time embedding; ``context`` (B, S, context_dim)
is attended to by cross-attention, optionally masked by ``context_mask`` (B, S); ``concat`` (B, concat_channels,
H, W) is concatenated with the noisy input before the first convolution.

Layout (guided-diffusion's): ``conv_in``, a flat list of ``down`` blocks (per level ``num_res_blocks`` x
[ResBlock, SpatialTransformer?] then a Downsample except at the last level), a ``mid`` block (ResBlock,
SpatialTransformer?, ResBlock), a flat list of ``up`` blocks (per level ``num_res_blocks + 1`` x [ResBlock on
the concatenated skip, SpatialTransformer?] and an Upsample except at the first level), ``norm_out`` and
``conv_out``. Every block is an EmbedSequential, so the forward is three plain loops.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from openldm.nn.embedding import TimestepMLP, timestep_embedding
from openldm.nn.norm import group_norm
from openldm.nn.resblock import ResBlock
from openldm.nn.sampling import Downsample, Upsample
from openldm.nn.sequential import EmbedSequential
from openldm.nn.transformer import SpatialTransformer
from openldm.registry import MODELS


@dataclass
class UNetConfig:
    """Topology of a UNet. The defaults are Stable Diffusion v1's (859,520,964 parameters)."""

    in_channels: int = 4  # channels of the noisy input (the latent)
    out_channels: int = 4  # channels of the prediction (eps, v or x0)
    model_channels: int = 320  # width of the first level; also the sinusoidal embedding width
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width of level i = model_channels * channel_mult[i]
    num_res_blocks: int = 2  # ResBlocks per level on the way down (one more on the way up)
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels (0 = full resolution) with a spatial transformer
    mid_attention: bool = True  # a spatial transformer between the two middle ResBlocks
    num_heads: int | None = 8  # fixed number of heads per transformer (SD 1.x) ...
    head_dim: int | None = None  # ... or fixed head width, heads = channels // head_dim (SD 2.x: 64)
    transformer_depth: int = 1  # transformer blocks per spatial transformer
    context_dim: int | None = 768  # width of the context sequence; None = no cross-attention
    use_linear_projection: bool = False  # proj_in/proj_out as Linear (SD 2.x) instead of 1x1 conv (SD 1.x)
    vector_dim: int | None = None  # width of the vector slot; None = no vector slot
    concat_channels: int = 0  # extra input channels from the concat slot
    dropout: float = 0.0  # inside every ResBlock
    scale_shift: bool = False  # ResBlocks inject the embedding as scale and shift (AdaGN) instead of a sum
    norm_groups: int = 32
    norm_eps: float = 1e-5  # GroupNorm eps of ResBlocks and the output norm (transformers use SD's 1e-6)
    gradient_checkpointing: bool = False  # recompute each block in the backward pass to save memory

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)  # YAML and JSON give lists
        self.attention_levels = tuple(self.attention_levels)
        levels = range(len(self.channel_mult))
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult={self.channel_mult}: need one positive multiplier per level")
        bad = [level for level in self.attention_levels if level not in levels]
        if bad:
            raise ValueError(f"attention_levels={self.attention_levels}: levels {bad} do not exist; accepted 0..{len(levels) - 1}")
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(f"set exactly one of num_heads={self.num_heads} and head_dim={self.head_dim}")
        for level in self.transformer_levels():
            self.heads(level)  # raises if the width does not split into heads
        if self.num_res_blocks < 1 or self.transformer_depth < 1:
            raise ValueError(f"num_res_blocks={self.num_res_blocks} and transformer_depth={self.transformer_depth} must be >= 1")
        if self.concat_channels < 0:
            raise ValueError(f"concat_channels={self.concat_channels} must be >= 0")

    def channels(self, level: int) -> int:
        """Width of ``level``."""
        return self.model_channels * self.channel_mult[level]

    def transformer_levels(self) -> list[int]:
        """Levels whose width hosts a spatial transformer (the middle block's is the last level's)."""
        last = len(self.channel_mult) - 1
        return sorted(set(self.attention_levels) | ({last} if self.mid_attention else set()))

    def heads(self, level: int) -> tuple[int, int]:
        """(number of heads, head width) of the transformers at ``level``."""
        channels = self.channels(level)
        heads = self.num_heads if self.num_heads is not None else channels // self.head_dim
        if heads < 1 or channels % heads or (self.head_dim is not None and channels % self.head_dim):
            raise ValueError(
                f"level {level} has {channels} channels, which do not split into "
                f"{f'{self.num_heads} heads' if self.num_heads else f'heads of width {self.head_dim}'}"
            )
        return heads, channels // heads


class UNet(nn.Module):
    """Denoising UNet: ``forward(x, timesteps, *, vector, context, context_mask, concat)`` -> prediction shaped like x.

    Height and width need not be divisible by the total downsampling: every Upsample is sized to its skip.
    """

    config_class = UNetConfig

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        c = config
        emb_dim = 4 * c.model_channels

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, ch_out, emb_dim, c.dropout, c.norm_eps, c.scale_shift, c.norm_groups)

        transformers = itertools.count()  # numbered in build order (token merging's per-block draws)

        def attn(level: int) -> SpatialTransformer:
            heads, head_dim = c.heads(level)
            return SpatialTransformer(c.channels(level), heads, head_dim, c.transformer_depth, c.context_dim,
                                      c.use_linear_projection, c.norm_groups, index=next(transformers))

        self.time_embed = TimestepMLP(c.model_channels, emb_dim)
        self.vector_embed = TimestepMLP(c.vector_dim, emb_dim) if c.vector_dim is not None else None
        self.conv_in = nn.Conv2d(c.in_channels + c.concat_channels, c.model_channels, 3, padding=1)

        last = len(c.channel_mult) - 1
        ch = c.model_channels
        skip_channels = [ch]  # width of every feature map the up path will concatenate, in push order
        self.down = nn.ModuleList()
        for level in range(last + 1):
            for _ in range(c.num_res_blocks):
                layers = [res(ch, c.channels(level))]
                ch = c.channels(level)
                if level in c.attention_levels:
                    layers.append(attn(level))
                self.down.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != last:
                self.down.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.mid = EmbedSequential(res(ch, ch), *([attn(last)] if c.mid_attention else []), res(ch, ch))

        self.up = nn.ModuleList()
        for level in reversed(range(last + 1)):
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), c.channels(level))]
                ch = c.channels(level)
                if level in c.attention_levels:
                    layers.append(attn(level))
                if level != 0 and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.up.append(EmbedSequential(*layers))

        self.norm_out = group_norm(ch, c.norm_eps, c.norm_groups)
        self.conv_out = nn.Conv2d(ch, c.out_channels, 3, padding=1)

        # guided-diffusion / CompVis convention: the last conv of every residual branch and the output conv start
        # at zero, so an untrained block is the identity and an untrained UNet predicts 0.
        for m in [m.conv2 for m in self.modules() if isinstance(m, ResBlock)] + [self.conv_out]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        *,
        vector: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from the noisy ``x`` (B, in_channels, H, W) at ``timesteps`` (B,) or scalar, may be fractional.

        Slots (see the module docstring) must be given exactly when the config declares them.
        """
        h, inputs = self.stem(x, timesteps, vector=vector, context=context, context_mask=context_mask, concat=concat)
        h, skips = self.run_down(h, inputs, self.down)
        h = self.run_mid(h, inputs)
        return self.head(self.run_up(h, skips, inputs, self.up))

    # DeepCache's two passes (openldm.models.deepcache keeps the feature and decides which runs): methods of the
    # UNet, so that --compile compiles them as it compiles the forward (``compiled_methods``).

    compiled_methods = ("forward_keep", "forward_shallow")  # compiled beside the forward (pipelines.common)

    def forward_keep(self, x: torch.Tensor, timesteps: torch.Tensor | float, *, branch: int,
                     **slots: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward, and the feature entering the shallow up branch: the output of ``up[-(branch + 2)]`` (the
        middle block's output when ``branch`` is every down block), which the shallow branch
        (``down[:branch]``, ``up[-(branch + 1):]``) is joined to."""
        h, inputs = self.stem(x, timesteps, **slots)
        h, skips = self.run_down(h, inputs, self.down)
        cut = len(self.up) - branch - 1  # up[cut:] is the shallow up branch
        deep = self.run_up(self.run_mid(h, inputs), skips, inputs, self.up[:cut])
        return self.head(self.run_up(deep, skips, inputs, self.up[cut:])), deep

    def forward_shallow(self, x: torch.Tensor, timesteps: torch.Tensor | float, deep: torch.Tensor, *, branch: int,
                        **slots: torch.Tensor | None) -> torch.Tensor:
        """The shallow branch alone on a kept ``deep`` feature (of :meth:`forward_keep` with the same ``branch``):
        the stem, ``down[:branch]`` for their skips, and ``up[-(branch + 1):]`` from ``deep``."""
        h, inputs = self.stem(x, timesteps, **slots)
        _, skips = self.run_down(h, inputs, self.down[:branch])
        return self.head(self.run_up(deep, skips, inputs, self.up[len(self.up) - branch - 1:]))

    # The forward's pieces.

    def stem(self, x: torch.Tensor, timesteps: torch.Tensor | float, *, vector: torch.Tensor | None = None,
             context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
             concat: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """``conv_in`` of the checked input (B, C, H, W), and the extra inputs the blocks consume."""
        self._check_slots(x, vector, context, context_mask, concat)
        t = _batch_timesteps(timesteps, x.shape[0], x.device)  # (B,)
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))  # (B, 4*C)
        if vector is not None:
            emb = emb + self.vector_embed(vector.to(x.dtype))
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)  # (B, in + concat, H, W)
        if context is not None:
            context = context.to(x.dtype)
        return self.conv_in(x), {"emb": emb, "context": context, "context_mask": context_mask}

    def run_down(self, h: torch.Tensor, inputs: dict, blocks) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``blocks`` (the first of ``self.down``) from the stem's output: the last feature map and the skips
        (the stem's output, then every block's), in push order."""
        skips = [h]
        for block in blocks:
            h = self._run(block, h, inputs)
            skips.append(h)
        return h, skips

    def run_mid(self, h: torch.Tensor, inputs: dict) -> torch.Tensor:
        return self._run(self.mid, h, inputs)

    def run_up(self, h: torch.Tensor, skips: list[torch.Tensor], inputs: dict, blocks) -> torch.Tensor:
        """``blocks`` (consecutive ``self.up`` blocks), each on ``h`` joined with the skip it pops off ``skips``."""
        for block in blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C_h + C_skip, H_l, W_l)
            size = skips[-1].shape[-2:] if skips else None  # an Upsample ends the level: match the next skip
            h = self._run(block, h, {**inputs, "size": size})
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, H, W)

    def _run(self, block: EmbedSequential, h: torch.Tensor, inputs: dict) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, use_reentrant=False, **inputs)
        return block(h, **inputs)

    def _check_slots(self, x, vector, context, context_mask, concat) -> None:
        c = self.config
        B = x.shape[0]
        if x.dim() != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, {c.in_channels}, H, W)")
        _check_slot("vector", vector, c.vector_dim, (B, c.vector_dim))
        _check_slot("context", context, c.context_dim, (B, None, c.context_dim))
        _check_slot("concat", concat, c.concat_channels or None, (B, c.concat_channels, *x.shape[2:]))
        if context_mask is not None and (context is None or context_mask.shape != context.shape[:2]):
            got = None if context is None else tuple(context.shape[:2])
            raise ValueError(f"context_mask has shape {tuple(context_mask.shape)}; expected (B, S) of the context, {got}")


def _check_slot(name: str, value: torch.Tensor | None, declared: int | None, shape: tuple) -> None:
    """A slot must be filled exactly when the config declares it, with ``shape`` (None = any size)."""
    if declared is None and value is not None:
        raise ValueError(f"{name} was given but this UNet has no {name} slot (its config sets no {name} width)")
    if declared is not None and value is None:
        raise ValueError(f"this UNet expects {name} of shape {tuple('*' if s is None else s for s in shape)}; got none")
    if value is not None and (value.dim() != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape))):
        raise ValueError(f"{name} has shape {tuple(value.shape)}; expected {tuple('*' if s is None else s for s in shape)}")


def _batch_timesteps(timesteps: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar, (1,) or (B,) timestep as a (B,) tensor."""
    t = torch.as_tensor(timesteps, device=device)
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"timesteps has shape {tuple(t.shape)}; expected a scalar, (1,) or ({batch},)")
    return t.reshape(-1).expand(batch)


MODELS.register("unet", UNet)
