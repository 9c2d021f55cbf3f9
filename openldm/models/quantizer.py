"""Vector quantisation for the VQ autoencoder (van den Oord et al. 2017, "Neural Discrete Representation Learning").

Each latent vector is replaced by its nearest codebook entry; gradients pass straight through the rounding
to the encoder. The codebook is learnt either by its own loss term ``||sg[z] - e||^2`` or, with ``ema=True``,
by exponential moving averages of the vectors assigned to each code (van den Oord et al. 2017, appendix A.1;
Razavi et al. 2019, VQ-VAE-2). Codes that fall out of use can be restarted on encoder outputs from the
current batch (Dhariwal et al. 2020, Jukebox; Zeghidour et al. 2021, SoundStream).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class Quantized:
    """What the quantiser returns. The loss terms are unweighted so a training loop can weight them itself;
    ``loss`` is the usual combination ``codebook_loss + beta * commitment_loss``."""

    z_q: torch.Tensor  # (B, D, h, w) quantised latents, straight-through gradient to the input
    indices: torch.Tensor  # (B, h, w) code index at each position
    codebook_loss: torch.Tensor  # ||sg[z] - e||^2 (zero, without gradient, for an EMA codebook)
    commitment_loss: torch.Tensor  # ||z - sg[e]||^2
    perplexity: torch.Tensor  # exp(entropy of the batch's code histogram): 1 (one code) .. num_embeddings
    beta: float

    @property
    def loss(self) -> torch.Tensor:
        return self.codebook_loss + self.beta * self.commitment_loss


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over data-parallel processes (a no-op outside ``torch.distributed``), so every replica keeps the
    same EMA statistics and codebook."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(t, src=0)
    return t


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation of (B, D, h, w) latents against a (num_embeddings, D) codebook.

    Buffers: ``cluster_size`` (K,) is an exponential moving average of how many vectors each code receives
    per batch; it drives dead-code restarts and, with ``ema``, the codebook itself, which is then
    ``embed_sum / cluster_size`` and gets no gradient. Both start as if every code had been assigned once,
    to itself, so unused codes stay where they are (and no smoothing against division by zero is needed).

    ``dead_code_threshold`` (0 disables): in training, a code whose ``cluster_size`` drops below it is
    moved onto a random encoder output of the current batch.
    """

    def __init__(
        self,
        num_embeddings: int,
        embed_dim: int,
        beta: float = 0.25,
        ema: bool = False,
        decay: float = 0.99,
        dead_code_threshold: float = 0.0,
    ):
        super().__init__()
        if num_embeddings < 1 or embed_dim < 1:
            raise ValueError(f"num_embeddings and embed_dim must be >= 1, got {num_embeddings} and {embed_dim}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0 (0 disables restarts), got {dead_code_threshold}")
        self.num_embeddings, self.embed_dim = num_embeddings, embed_dim
        self.beta, self.ema, self.decay = beta, ema, decay
        self.dead_code_threshold = dead_code_threshold
        # The taming-transformers initialisation, U(-1/K, 1/K).
        self.codebook = nn.Parameter(torch.empty(num_embeddings, embed_dim).uniform_(-1.0 / num_embeddings, 1.0 / num_embeddings))
        self.codebook.requires_grad_(not ema)
        for name, value in self.initial_statistics(self.codebook.detach(), ema).items():
            self.register_buffer(name, value)

    @staticmethod
    def initial_statistics(codebook: torch.Tensor, ema: bool) -> dict[str, torch.Tensor]:
        """Fresh buffers for a codebook (K, D): each code counted once, at its own position. Used at
        construction and when importing a codebook from a checkpoint format that has no statistics."""
        stats = {"cluster_size": torch.ones(codebook.shape[0], dtype=torch.float32, device=codebook.device)}
        if ema:
            stats["embed_sum"] = codebook.detach().float().clone()
        return stats

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for (B, h, w) indices, as (B, D, h, w)."""
        return self.codebook[indices].permute(0, 3, 1, 2)

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean distance) for each position of (B, D, h, w) latents: (B, h, w).
        Touches no statistics, so it is what decoding uses."""
        B, D, h, w = z.shape
        if D != self.embed_dim:
            raise ValueError(f"expected latents with {self.embed_dim} channels, got shape {tuple(z.shape)}")
        f, e = z.permute(0, 2, 3, 1).reshape(-1, D).float(), self.codebook.float()  # (N, D), (K, D)
        e_sq = e.pow(2).sum(1)  # (K,); ||f||^2 is the same for every code and drops out of the argmin
        rows = max(1, 2**25 // self.num_embeddings)  # bound the (rows, K) distance block to 32M entries
        indices = torch.cat([(e_sq[None] - 2 * chunk @ e.t()).argmin(dim=1) for chunk in f.split(rows)])  # (N,)
        return indices.view(B, h, w)

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None) -> Quantized:
        B, D, h, w = z.shape
        indices = self.nearest(z).flatten()  # (N,), N = B*h*w
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (N, D)
        with torch.no_grad():
            counts = flat.new_zeros(self.num_embeddings, dtype=torch.float32)
            counts.index_add_(0, indices, torch.ones_like(indices, dtype=torch.float32))  # (K,) assignments per code
            counts = _all_reduce_sum(counts)  # over all processes
            probs = counts / counts.sum()
            perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        e_q = self.codebook[indices].to(z.dtype)  # (N, D), the codes as they were when chosen
        if self.training:
            self._update(flat.detach(), indices, counts, generator)
        commitment_loss = F.mse_loss(flat, e_q.detach())
        if self.ema:
            codebook_loss = torch.zeros((), device=z.device, dtype=commitment_loss.dtype)
        else:
            codebook_loss = F.mse_loss(e_q, flat.detach())
        e_q = flat + (e_q - flat).detach()  # straight-through estimator: forward e, backward identity
        z_q = e_q.view(B, h, w, D).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)
        return Quantized(z_q, indices.view(B, h, w), codebook_loss, commitment_loss, perplexity, self.beta)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, generator: torch.Generator | None) -> None:
        """EMA statistics, the EMA codebook, and dead-code restarts (training only)."""
        d = self.decay
        self.cluster_size.mul_(d).add_(counts, alpha=1 - d)
        if self.ema:
            embed_sum = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat.float())  # (K, D) per-code sums
            embed_sum = _all_reduce_sum(embed_sum)
            self.embed_sum.mul_(d).add_(embed_sum, alpha=1 - d)
            # Counts start at one, so no Laplace smoothing is needed; a code unused for so long that its count
            # underflows keeps its last position (sum and count decay together, so it would anyway).
            live = self.cluster_size > 1e-12
            self.codebook[live] = (self.embed_sum[live] / self.cluster_size[live, None]).to(self.codebook.dtype)
        if self.dead_code_threshold > 0:
            dead = self.cluster_size < self.dead_code_threshold  # (K,)
            num_dead = int(dead.sum())
            if num_dead:
                pick = torch.randint(flat.shape[0], (num_dead,), generator=generator,
                                     device=generator.device if generator is not None else "cpu").to(flat.device)
                new = _broadcast(flat[pick].float().contiguous())  # (num_dead, D), rank 0's choice everywhere
                self.codebook[dead] = new.to(self.codebook.dtype)
                self.cluster_size[dead] = self.dead_code_threshold
                if self.ema:
                    self.embed_sum[dead] = new * self.dead_code_threshold

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embed_dim={self.embed_dim}, beta={self.beta}, ema={self.ema}, "
                f"dead_code_threshold={self.dead_code_threshold}")
