"""Multi-head attention through ``F.scaled_dot_product_attention`` (:func:`attention`), and the autoencoder's
spatial self-attention."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from openldm.nn.norm import group_norm

# PyTorch's CPU flash-attention backward in bfloat16 / float16 costs about as much for a short key sequence as for
# one of 512 keys (measured on torch 2.13, 2 threads: fwd + bwd of (32, 4, 64, 32) 15.1 ms against 3.3 ms in
# float32; (32, 4, 256, 32) over 16 keys 30.0 against 3.8 ms; float16 alike: 14.8 and 30.0 ms), while from 512
# keys on bf16 is faster than float32 (float16 there: 100 against 75 ms cast to float32, left to its own kernel).
# Training below that length therefore runs the attention in float32, which is also the more precise result.
SHORT_KEYS = 512


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              is_causal: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)``; (B, heads, T, head_dim).

    When a gradient will flow through half-precision CPU attention over fewer than ``SHORT_KEYS`` keys, it is
    computed in float32 and cast back (inference, long key sequences and other devices are unchanged)."""
    if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and k.shape[-2] < SHORT_KEYS
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
        with torch.autocast("cpu", enabled=False):  # CPU autocast would cast the float32 inputs back down
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                 is_causal=is_causal)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


class Attention(nn.Module):
    """Multi-head attention of a query sequence over itself (``context=None``) or over a context sequence.

    Projections are named ``to_q``, ``to_k``, ``to_v``, ``to_out`` as in SD's CrossAttention. ``mask`` is a
    boolean (B, T_kv) or broadcastable (B, heads, T_q, T_kv) tensor, True where attention is allowed, or an
    additive float mask of the same shapes.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        head_dim: int = 64,
        qkv_bias: bool = False,
    ):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, query_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, T, _ = x.shape
        q = self.to_q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)
        k = self.to_k(context).view(B, -1, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, S, head_dim)
        v = self.to_v(context).view(B, -1, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, S, head_dim)
        if mask is not None and mask.dim() == 2:
            mask = mask[:, None, None, :]  # (B, 1, 1, S)
        out = attention(q, k, v, mask)  # (B, heads, T, head_dim)
        out = out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim)  # (B, T, inner)
        return self.to_out(out)


class SpatialSelfAttention(nn.Module):
    """GroupNorm, single-head self-attention over all H*W positions, residual (the SD autoencoder's mid block)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = group_norm(channels, eps)
        self.attn = Attention(channels, heads=1, head_dim=channels, qkv_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        h = self.attn(h).transpose(1, 2).reshape(B, C, H, W)
        return x + h
