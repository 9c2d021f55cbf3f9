"""Token merging for the self-attention of the spatial transformers.

Bolya & Hoffman 2023 ("Token Merging for Fast Stable Diffusion", §3-4), after Bolya et al. 2023 ("Token Merging:
Your ViT but Faster", bipartite soft matching): before a transformer block's self-attention the H*W tokens are
split into destinations (one per ``stride`` cell, picked at random) and sources; the ``r = ratio * H*W`` sources
most similar (cosine) to a destination are averaged into it; self-attention runs on the remaining tokens; the
result is copied back to every token that was merged ("unmerge"), so the residual stream keeps its full length.
As in the paper's default, only self-attention is merged, and only at the transformers whose resolution is at most
``max_downsample`` times below the network input's (1: the top level, where SD has 4,096 tokens at 512 px).

A sampling run turns merging on for its network calls with :class:`TokenMergingNet` (a wrapper made per run: the
shared model is never changed); the spatial transformer asks :func:`active_merging` for the setting of the call
it is in. The setting lives in a ``threading.local``, so concurrent runs in other threads never see each other's,
and ``torch.compile`` traces its lookup: a compiled UNet is one graph without merging and one with it. Each call
draws one seed, and every block hashes it with its own place into its destinations (:func:`cell_picks`), so the
plan has fixed shapes and no generator inside the graph, and eager and compiled calls draw alike.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TokenMerge:
    """One merge plan over (B, N, C) tokens: ``merge`` -> (B, N - r, C), ``unmerge`` -> (B, N, C).

    Token positions: ``dst`` (N_dst,) the destinations; per sample ``kept`` (B, N_src - r) the sources left alone
    (most similar first) and ``merged`` (B, r) the sources averaged into destinations, ``into`` (B, r) indexing
    ``dst``."""

    dst: torch.Tensor
    kept: torch.Tensor
    merged: torch.Tensor
    into: torch.Tensor

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """Unmerged sources, then destinations averaged with the sources merged into them: (B, N - r, C)."""
        C = x.shape[-1]
        kept = x.gather(1, self.kept[..., None].expand(-1, -1, C))  # (B, N_src - r, C)
        moved = x.gather(1, self.merged[..., None].expand(-1, -1, C))  # (B, r, C)
        dst = x[:, self.dst].scatter_reduce(1, self.into[..., None].expand(-1, -1, C), moved, reduce="mean")
        return torch.cat([kept, dst], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """Tokens back at their positions, each merged source a copy of its destination: (B, N, C)."""
        B, _, C = y.shape
        n_kept = self.kept.shape[1]
        kept, dst = y[:, :n_kept], y[:, n_kept:]  # (B, N_src - r, C), (B, N_dst, C)
        out = y.new_empty(B, n_kept + self.merged.shape[1] + self.dst.numel(), C)
        out[:, self.dst] = dst
        out.scatter_(1, self.kept[..., None].expand(-1, -1, C), kept)
        out.scatter_(1, self.merged[..., None].expand(-1, -1, C), dst.gather(1, self.into[..., None].expand(-1, -1, C)))
        return out


def bipartite_soft_matching(metric: torch.Tensor, height: int, width: int, r: int, stride: tuple[int, int] = (2, 2),
                            seed: torch.Tensor | None = None, salt: int = 0) -> TokenMerge | None:
    """The plan merging ``r`` of the (B, height*width, C) row-major tokens, by the cosine similarity of ``metric``.

    One destination per (sy, sx) = ``stride`` cell: drawn by :func:`cell_picks` from ``seed`` (an int64 scalar
    tensor) and ``salt`` (the same cells for the whole batch, so the conditional and unconditional halves of a guided
    batch are merged alike), or the cell's top-left token without a seed. Rows/columns past the last whole cell are
    sources. None when there is nothing to merge. Every shape is known from the arguments, so the plan traces into
    a compiled graph."""
    N = metric.shape[1]
    sy, sx = stride
    cells_h, cells_w = height // sy, width // sx
    if N != height * width:
        raise ValueError(f"{N} tokens are not a {height}x{width} grid")
    if r <= 0 or cells_h == 0 or cells_w == 0:
        return None
    if seed is None:
        pick = torch.zeros(cells_h, cells_w, 1, dtype=torch.long, device=metric.device)
    else:
        pick = cell_picks(seed.to(metric.device), salt, cells_h * cells_w, sy * sx).view(cells_h, cells_w, 1)
    in_cell = torch.zeros(cells_h, cells_w, sy * sx, dtype=torch.bool, device=metric.device).scatter_(2, pick, True)
    is_dst = torch.zeros(height, width, dtype=torch.bool, device=metric.device)
    is_dst[:cells_h * sy, :cells_w * sx] = in_cell.view(cells_h, cells_w, sy, sx).transpose(1, 2).reshape(
        cells_h * sy, cells_w * sx)
    n_dst = cells_h * cells_w
    by_role = is_dst.flatten().to(torch.uint8).argsort(stable=True)  # sources, then destinations, each ascending
    src, dst = by_role[:N - n_dst], by_role[N - n_dst:]  # (N_src,), (N_dst,)

    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        scores = m[:, src] @ m[:, dst].transpose(1, 2)  # (B, N_src, N_dst)
        best, best_dst = scores.max(dim=-1)  # (B, N_src): each source's most similar destination
        order = best.argsort(dim=-1, descending=True)  # (B, N_src)
        r = min(r, src.numel())
        merged, kept = order[:, :r], order[:, r:]  # indices into src
        into = best_dst.gather(1, merged)  # (B, r)
    return TokenMerge(dst=dst, kept=src[kept], merged=src[merged], into=into)


_MASK32 = 0xFFFFFFFF


def cell_picks(seed: torch.Tensor, salt: int, cells: int, choices: int) -> torch.Tensor:
    """(cells,) integers in [0, choices): a 32-bit hash of (``seed``, ``salt``, cell), scaled to the range.

    Murmur-style mixing in int64 tensor arithmetic (every product stays below 2^63): the same integers eagerly,
    compiled and on any device, where a ``torch.Generator`` cannot be traced into a graph."""
    x = (seed + salt * 0x9E3779B1 + torch.arange(cells, device=seed.device) * 0x632BE5AB) & _MASK32
    for multiplier in (0x7FEB352D, 0x5BD1E995):
        x = ((x ^ (x >> 16)) * multiplier) & _MASK32
    x = x ^ (x >> 15)
    return (x * choices) >> 32


@dataclass(frozen=True, eq=False)
class TokenMerging:
    """Token merging as one network call applies it: ``ratio`` of the tokens merged at transformers at most
    ``max_downsample`` times below the input size ``size`` (H, W), destinations drawn from ``seed`` (an int64
    scalar tensor; None: each cell's top-left token)."""

    ratio: float
    size: tuple[int, int]
    max_downsample: int = 1
    seed: torch.Tensor | None = None
    stride: tuple[int, int] = (2, 2)

    def plan(self, tokens: torch.Tensor, height: int, width: int, salt: int = 0) -> TokenMerge | None:
        """The merge plan for the (B, height*width, C) tokens entering a transformer block (None: leave them);
        ``salt`` tells the blocks of one call apart, so each draws its own destinations."""
        downsample = max(math.ceil(self.size[0] / height), math.ceil(self.size[1] / width))
        if self.ratio <= 0 or downsample > self.max_downsample:
            return None
        return bipartite_soft_matching(tokens, height, width, int(tokens.shape[1] * self.ratio), self.stride,
                                       self.seed, salt)


class _ThreadState(threading.local):
    def __init__(self):
        self.merging: TokenMerging | None = None  # the setting of this thread's network call in progress


_STATE = _ThreadState()  # set in every thread before its first read, so a compiled UNet sees one shape of it


def active_merging() -> TokenMerging | None:
    """The token merging of the network call in progress in this thread (None: none)."""
    return _STATE.merging


def check_merging(ratio: float, max_downsample: int = 1) -> None:
    """ValueError unless 0 <= ratio < 1 and max_downsample is an integer >= 1."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"token merging ratio {ratio!r} must be in [0, 1) (0 = off; ToMe for SD uses up to 0.6)")
    if isinstance(max_downsample, bool) or not isinstance(max_downsample, int) or max_downsample < 1:
        raise ValueError(f"token merging max_downsample {max_downsample!r} must be an integer >= 1 (1 = top level)")


class TokenMergingNet(nn.Module):
    """``net`` (e.g. the UNet) whose spatial transformers merge ``ratio`` of their tokens before self-attention
    during its calls (see the module docstring); each call draws its destinations' seed from a CPU generator seeded
    with ``seed`` at construction, so a run is reproducible. ``ratio=0`` calls ``net`` untouched."""

    def __init__(self, net: nn.Module, ratio: float, max_downsample: int = 1, seed: int = 0):
        super().__init__()
        check_merging(ratio, max_downsample)
        self.net = net
        self.ratio = float(ratio)
        self.max_downsample = max_downsample
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.ratio == 0:
            return self.net(x, *args, **kwargs)
        seed = torch.randint(2**31 - 1, (), generator=self.generator)
        outer = active_merging()
        _STATE.merging = TokenMerging(self.ratio, tuple(x.shape[-2:]), self.max_downsample, seed)
        try:
            return self.net(x, *args, **kwargs)
        finally:
            _STATE.merging = outer
