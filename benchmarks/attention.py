"""The attention kernels a CPU can run for SD v1.5's attention shapes, side by side in one run.

The UNet's attention runs through ``F.scaled_dot_product_attention`` (``openldm.nn.attention.attention``; diffusers'
default ``AttnProcessor2_0`` calls the same function), which on a CPU is PyTorch's flash kernel. This script
asks whether another exact kernel beats it at the shapes SD v1.5 gives at one image size (batch 2 for guidance):
the self-attentions over (size / 8)^2, / 4, / 16 and / 64 tokens and the cross-attention over 77 text tokens.
Candidates:

- ``sdpa``: ``F.scaled_dot_product_attention`` (the flash kernel);
- ``flex``: ``torch.nn.attention.flex_attention`` under ``torch.compile`` (inductor's CPU template);
- ``ops``: scores, softmax and the value product as three ops over query slices of ``--slice`` rows, the formula
  of diffusers' ``AttnProcessor`` / ``SlicedAttnProcessor`` (scores in the input dtype, as there).

Each row gives the median milliseconds, the ratio to ``sdpa``, giga-scores per second (query x key pairs, per
head), and the largest difference from float64 attention on the same inputs. No weights, nothing downloaded.

    python benchmarks/attention.py                          # 512 px, bfloat16 and float32
    python benchmarks/attention.py --size 256 --dtype bfloat16 --repeats 10
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from benchlib import markdown_header
from torch.nn import functional as F

from openldm.models.presets import sd15_unet


def shapes(size: int) -> list[tuple[str, int, int, int, int]]:
    """(name, heads, head_dim, queries, keys) of the attention layers of the SD v1.5 UNet preset at ``size`` px."""
    cfg = sd15_unet()
    latent = size // 8
    places = [*cfg.attention_levels, *([len(cfg.channel_mult) - 1] if cfg.mid_attention else [])]  # levels, mid
    rows = []
    for level in places:
        width, tokens = cfg.model_channels * cfg.channel_mult[level], (latent // 2 ** level) ** 2
        heads = cfg.num_heads or width // cfg.head_dim
        rows.append((f"self {tokens} tokens", heads, width // heads, tokens, tokens))
    _, heads, head_dim, tokens, _ = rows[0]  # the top level's cross-attention, over CLIP's 77 text tokens
    rows.append((f"cross {tokens} x 77", heads, head_dim, tokens, 77))
    return rows


def sliced_ops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over query slices of ``rows``: three ops a slice, scores in ``q``'s dtype."""
    out = torch.empty_like(q)
    kt = k.transpose(-1, -2) * k.shape[-1] ** -0.5
    for start in range(0, q.shape[-2], rows):
        scores = q[..., start:start + rows, :] @ kt  # (B, heads, rows, S)
        out[..., start:start + rows, :] = scores.softmax(-1) @ v
    return out


def median_ms(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()  # warm-up (and compilation for flex)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512, help="image size in px (latents size / 8)")
    ap.add_argument("--batch", type=int, default=2, help="2: one guided step's conditional and unconditional rows")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--slice", type=int, default=512, help="query rows per slice of the 'ops' variant")
    ap.add_argument("--skip-flex", action="store_true", help="leave out flex_attention (its compilation)")
    args = ap.parse_args()

    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    torch._dynamo.config.recompile_limit = 64  # one graph per shape and dtype (10 of them by default)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, SD v1.5 at {args.size} px, batch {args.batch}")
    print(markdown_header("| dtype | layer | kernel | ms | ratio to sdpa | G scores/s | max diff from float64 |"))
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for dtype_name in args.dtype:
            dtype = getattr(torch, dtype_name)
            for name, heads, d, T, S in shapes(args.size):
                q, k, v = (torch.randn(args.batch, heads, n, d, generator=gen) for n in (T, S, S))
                exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
                q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
                kernels = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                           "ops": lambda: sliced_ops(q, k, v, args.slice)}
                if not args.skip_flex:
                    kernels["flex"] = lambda: flex(q, k, v)
                base = None
                for kernel, fn in kernels.items():
                    ms = median_ms(fn, args.repeats)
                    base = base or ms
                    diff = (fn().double() - exact).abs().max().item()
                    scores = args.batch * heads * T * S / (ms * 1e-3) / 1e9
                    print(f"| {dtype_name} | {name} | {kernel} | {ms:,.2f} | {ms / base:.2f} | {scores:.2f} | "
                          f"{diff:.1e} |")


if __name__ == "__main__":
    main()
