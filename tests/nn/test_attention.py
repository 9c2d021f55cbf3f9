"""Attention through F.scaled_dot_product_attention equals the textbook softmax(Q K^T / sqrt(d)) V."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from openldm.nn.attention import SHORT_KEYS, Attention, SpatialSelfAttention, attention

pytestmark = pytest.mark.usefixtures("one_thread")

B, T, S, HEADS, HEAD_DIM = 2, 7, 5, 3, 8


def explicit_attention(attn: Attention, x: torch.Tensor, context: torch.Tensor | None = None, mask=None) -> torch.Tensor:
    """Vaswani et al. 2017, eq. 1, per head, with a boolean (True = attend) or additive mask."""
    context = x if context is None else context
    heads, d = attn.heads, attn.head_dim
    q = attn.to_q(x).unflatten(-1, (heads, d))  # (B, T, heads, d)
    k = attn.to_k(context).unflatten(-1, (heads, d))  # (B, S, heads, d)
    v = attn.to_v(context).unflatten(-1, (heads, d))  # (B, S, heads, d)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)  # (B, heads, T, S)
    if mask is not None:
        mask = mask[:, None, None, :] if mask.dim() == 2 else mask
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    out = torch.einsum("bhts,bshd->bthd", scores.softmax(dim=-1), v)  # (B, T, heads, d)
    return attn.to_out(out.flatten(2))


def make(context_dim: int | None = None, qkv_bias: bool = False) -> Attention:
    torch.manual_seed(0)
    attn = Attention(16, context_dim, heads=HEADS, head_dim=HEAD_DIM, qkv_bias=qkv_bias).double()
    return attn


def random_bool_mask(shape: tuple[int, ...]) -> torch.Tensor:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[..., 0] = True  # every query keeps at least one key (an all-masked row is NaN in both)
    return mask


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_self_attention_matches_explicit(qkv_bias: bool):
    attn = make(qkv_bias=qkv_bias)
    x = torch.randn(B, T, 16, dtype=torch.float64)
    torch.testing.assert_close(attn(x), explicit_attention(attn, x), rtol=1e-10, atol=1e-10)


def test_cross_attention_matches_explicit():
    attn = make(context_dim=12)
    x, ctx = torch.randn(B, T, 16, dtype=torch.float64), torch.randn(B, S, 12, dtype=torch.float64)
    torch.testing.assert_close(attn(x, ctx), explicit_attention(attn, x, ctx), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(B, S), (B, HEADS, T, S), (B, 1, T, S)], ids=["key-padding", "per-head", "broadcast"])
def test_boolean_masks_match_explicit(shape):
    attn = make(context_dim=12)
    x, ctx = torch.randn(B, T, 16, dtype=torch.float64), torch.randn(B, S, 12, dtype=torch.float64)
    mask = random_bool_mask(shape)
    torch.testing.assert_close(attn(x, ctx, mask), explicit_attention(attn, x, ctx, mask), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(B, S), (B, HEADS, T, S)], ids=["key-padding", "per-head"])
def test_additive_masks_match_explicit(shape):
    attn = make(context_dim=12)
    x, ctx = torch.randn(B, T, 16, dtype=torch.float64), torch.randn(B, S, 12, dtype=torch.float64)
    bias = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(attn(x, ctx, bias), explicit_attention(attn, x, ctx, bias), rtol=1e-10, atol=1e-10)


def test_masked_keys_are_ignored():
    attn = make(context_dim=12)
    x, ctx = torch.randn(B, T, 16, dtype=torch.float64), torch.randn(B, S, 12, dtype=torch.float64)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[:, -2:] = False
    changed = ctx.clone()
    changed[:, -2:] = 100.0
    torch.testing.assert_close(attn(x, ctx, mask), attn(x, changed, mask), rtol=0, atol=1e-12)
    # the same mask as an additive -inf bias
    bias = torch.zeros(B, S, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(attn(x, ctx, bias), attn(x, ctx, mask), rtol=1e-12, atol=1e-12)


def test_spatial_self_attention_matches_explicit():
    torch.manual_seed(0)
    block = SpatialSelfAttention(32).double()
    x = torch.randn(2, 32, 5, 6, dtype=torch.float64)
    h = block.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
    expected = x + explicit_attention(block.attn, h).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def _qkv(dtype: torch.dtype, keys: int, grad: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(2)
    q = torch.randn(4, 2, 32, 16, generator=g).to(dtype).requires_grad_(grad)
    k, v = (torch.randn(4, 2, keys, 16, generator=g).to(dtype).requires_grad_(grad) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("mask", [None, "bool", "additive", "autocast"])
def test_half_precision_training_attention_over_short_keys_runs_in_float32(mask):
    """Under autograd on a CPU, bf16 attention over fewer than SHORT_KEYS keys gives the float32 attention of the
    same values, cast back, and its gradients (PyTorch's bf16 backward is slow there): more precise, not less. Also
    inside bf16 autocast, as in training, which would otherwise cast the float32 inputs back down."""
    q, k, v = _qkv(torch.bfloat16, 24, grad=True)
    m = None if mask in (None, "autocast") else random_bool_mask((4, 1, 32, 24))
    if mask == "additive":
        m = torch.zeros(m.shape, dtype=torch.bfloat16).masked_fill(~m, -1e4)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mask == "autocast"):
        out = attention(q, k, v, m)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=None if m is None else
                                         (m if m.dtype == torch.bool else m.float()))
    assert torch.equal(out, ref.to(torch.bfloat16))
    ref.to(torch.bfloat16).float().square().sum().backward()
    for t, t32 in ((q, q32), (k, k32), (v, v32)):
        assert torch.equal(t.grad, t32.grad.to(torch.bfloat16))


@pytest.mark.parametrize("keys, grad", [(24, False), (SHORT_KEYS, True)])
def test_inference_and_long_keys_keep_the_half_precision_kernel(keys, grad):
    """Without a gradient, or over SHORT_KEYS keys or more, the attention is PyTorch's bf16 kernel itself."""
    q, k, v = _qkv(torch.bfloat16, keys, grad)
    bf16 = F.scaled_dot_product_attention(q, k, v)
    f32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(torch.bfloat16)
    out = attention(q, k, v)
    assert torch.equal(out, bf16) and not torch.equal(out, f32)  # the two kernels differ on these values
