"""Shared helpers for the conditioning tests: a small deterministic frozen prompt encoder that counts its calls."""
from __future__ import annotations

from typing import Sequence

import pytest
import torch
from torch import nn


class CountingEncoder(nn.Module):
    """A frozen PromptEncoder: byte ids -> rows of a fixed random table (+ a position term); records every call.

    Prompts are ``[BOS] bytes [EOS]`` right-padded to ``max_length``, so the empty prompt has two real tokens.
    """

    trainable = False

    def __init__(self, hidden_dim: int = 16, max_length: int = 12):
        super().__init__()
        self.hidden_dim, self.max_length = hidden_dim, max_length
        self.table = nn.Parameter(torch.randn(260, hidden_dim, generator=torch.Generator().manual_seed(1)))
        self.calls: list[list[str]] = []

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(list(prompts))
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        for i, p in enumerate(prompts):
            toks = [1, *[4 + b for b in p.encode()][: self.max_length - 2], 2]
            ids[i, : len(toks)] = torch.tensor(toks)
            mask[i, : len(toks)] = True
        pos = torch.arange(self.max_length, dtype=torch.float32)[None, :, None] * 0.01
        hidden = self.table[ids] + pos  # (B, S, D); padding rows are non-zero on purpose
        return hidden, mask


@pytest.fixture
def counting_encoder() -> CountingEncoder:
    return CountingEncoder()


@pytest.fixture
def make_counting_encoder():
    return CountingEncoder
