"""Stable Diffusion's spatial transformer: the attention layers of the UNet.

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models"), ``SpatialTransformer``
in the CompVis code: GroupNorm, a projection to tokens, ``depth`` pre-norm transformer blocks (self-attention,
cross-attention over a context sequence, GEGLU feed-forward), a projection back, and a residual connection.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from openldm.nn.attention import Attention
from openldm.nn.norm import group_norm
from openldm.nn.tome import TokenMerge, active_merging


class GEGLUFeedForward(nn.Module):
    """Linear to ``2 * mult * dim``, ``value * GELU(gate)``, Linear back to ``dim``.

    The gated-GELU feed-forward of Shazeer 2020 ("GLU Variants Improve Transformer"), as SD's
    ``FeedForward(glu=True)``: the first half of the projection is the value, the second half the gate.
    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        hidden = dim * mult
        self.proj = nn.Linear(dim, 2 * hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and not self.proj._forward_hooks:  # no adapter (openldm.training.lora)
            # Compiled, the halves are two matmuls over the halves of the weight: inductor's oneDNN matmul into the
            # whole (T, 2 * hidden) output, later split, ran 5-8x slower than alone (SD v1.5 at 512 px, bf16, frozen
            # weights, 2 AMX threads: 74 ms a call at the top level, against 2 x 9.9 ms split; the step 1.47 ->
            # 1.32 s). Eager keeps the one matmul, the same speed there and the reference's exact values.
            hidden = self.out.in_features
            w, b = self.proj.weight, self.proj.bias
            value, gate = F.linear(x, w[:hidden], b[:hidden]), F.linear(x, w[hidden:], b[hidden:])
        else:
            value, gate = self.proj(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.out(self.dropout(value * F.gelu(gate)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x += SelfAttn(LN(x)); x += CrossAttn(LN(x), context); x += FF(LN(x)).

    ``context_dim=None`` leaves out the cross-attention (a model with no context sequence), so the block is
    self-attention and feed-forward only.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads=heads, head_dim=head_dim)
        self.norm_cross = nn.LayerNorm(dim) if context_dim is not None else None
        self.cross_attn = Attention(dim, context_dim, heads=heads, head_dim=head_dim) if context_dim is not None else None
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim, dropout=dropout)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
        merge: TokenMerge | None = None,
    ) -> torch.Tensor:
        """``merge``: self-attention on merged tokens, unmerged after (ToMe, see openldm.nn.tome)."""
        h = self.norm_self(x)
        x = x + (self.self_attn(h) if merge is None else merge.unmerge(self.self_attn(merge.merge(h))))  # (B, T, dim)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        return x + self.ff(self.norm_ff(x))


class SpatialTransformer(nn.Module):
    """GroupNorm -> proj_in -> ``depth`` TransformerBlocks over the H*W tokens -> proj_out (zero-initialised) -> + x.

    ``linear_projection`` makes proj_in/proj_out ``nn.Linear`` (SD 2.x) instead of 1x1 convolutions (SD 1.x).
    A 1x1 conv is a per-pixel linear map, so both run as the same matmul on tokens; the choice only fixes the
    parameter shapes that checkpoints expect. GroupNorm eps is 1e-6 as in SD.
    """

    consumes = ("context", "context_mask")  # read by openldm.nn.sequential.EmbedSequential

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        depth: int = 1,
        context_dim: int | None = None,
        linear_projection: bool = False,
        norm_groups: int = 32,
        dropout: float = 0.0,
        index: int = 0,
    ):
        super().__init__()
        self.index = index  # its place among the network's transformers: token merging draws per block
        inner = heads * head_dim
        self.norm = group_norm(channels, eps=1e-6, groups=norm_groups)
        if linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, inner), nn.Linear(inner, channels)
        else:
            self.proj_in, self.proj_out = nn.Conv2d(channels, inner, 1), nn.Conv2d(inner, channels, 1)
        self.blocks = nn.ModuleList(TransformerBlock(inner, heads, head_dim, context_dim, dropout) for _ in range(depth))
        nn.init.zeros_(self.proj_out.weight)  # the block starts as the identity (CompVis: zero_module)
        nn.init.zeros_(self.proj_out.bias)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, H*W, C)
        h = F.linear(h, self.proj_in.weight.flatten(1), self.proj_in.bias)  # (B, H*W, inner)
        merging = active_merging()  # token merging of the network call in progress, if any
        for i, block in enumerate(self.blocks):
            plan = merging.plan(h, H, W, salt=self.index * len(self.blocks) + i) if merging is not None else None
            h = block(h, context, context_mask, plan)
        h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)  # (B, H*W, C)
        return x + h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
