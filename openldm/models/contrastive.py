"""A small CLIP: an image tower and a text tower trained to agree (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision", sec. 2.3, fig. 3).

Both towers end in a linear projection to ``embed_dim`` and an L2 normalisation; the logits of a batch are the
cosine similarities times a learned temperature ``exp(logit_scale)``, initialised to 1/0.07 and clipped at 100
(sec. 2.5). Here the image tower is a small CNN over any (C, H, W) input (Fashion-MNIST images (1, 32, 32), or
latents (4, 8, 8)), and the text tower is our :class:`~openldm.models.text_encoder.CLIPTextEncoder` (causal,
pre-LN) over the CLIP BPE tokenizer, pooled at the end token as CLIP does. Its per-token states can condition a
diffusion model (openldm.conditioning.text, backend ``"clip"``).

Vocabulary: CLIP's 49,408 BPE ids need a (49,408, width) token embedding whose rows a small caption set mostly
never uses (Fashion-MNIST's 450 captions use 40 tokens). ``vocabulary`` (sorted BPE ids) keeps only those: the
tokenizer's ids are mapped to rows 1..K in the same order and every other id to row 0 (unknown). The end token,
CLIP's largest id, stays the largest, so pooling at the argmax of the ids still finds it. An empty ``vocabulary``
keeps CLIP's whole table.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from openldm.models.text_encoder import CLIPTextConfig, CLIPTextEncoder
from openldm.registry import MODELS
from openldm.tokenizers.clip_bpe import CLIPTokenizer

CLIP_VOCAB_SIZE = 49_408


def prompt_vocabulary(prompts: Sequence[str]) -> list[int]:
    """The sorted BPE ids that ``prompts`` use, with the start and end tokens: a ``ContrastiveConfig.vocabulary``."""
    tokenizer = CLIPTokenizer.from_bpe_file()
    return sorted({i for p in prompts for i in tokenizer.encode(p)} | {tokenizer.start_id, tokenizer.end_id})


def small_text_config() -> CLIPTextConfig:
    """The default text tower: width 128, 3 layers, 4 heads, 32 positions (vocabulary: see ContrastiveConfig)."""
    return CLIPTextConfig(max_position_embeddings=32, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                          intermediate_size=512)


@dataclass
class ContrastiveConfig:
    """``image_shape``: (C, H, W) of the image tower's input. ``channels``: the CNN's width per stage (each stage
    after the first halves the resolution); ``stem_stride`` 2 halves it once more in the first convolution (cheap
    on 32x32 images; use 1 for small latents such as (4, 8, 8)). ``text``: the text tower; its
    ``max_position_embeddings`` is the tokenizer's length (start + tokens + end) and its ``vocab_size`` follows
    ``vocabulary`` (BPE ids kept, sorted, with the start and end tokens; empty = all 49,408; see
    :func:`prompt_vocabulary`). ``logit_scale_init`` / ``logit_scale_max``: the temperature's log, initial and
    maximum (CLIP: log(1/0.07) and log(100))."""

    image_shape: tuple[int, int, int] = (1, 32, 32)
    channels: tuple[int, ...] = (32, 64, 128)
    stem_stride: int = 2
    norm_groups: int = 8
    embed_dim: int = 128
    text: CLIPTextConfig = field(default_factory=small_text_config)
    vocabulary: list[int] = field(default_factory=list)
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)

    def __post_init__(self) -> None:
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"ContrastiveConfig.image_shape={self.image_shape}; expected (C, H, W), all >= 1")
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"ContrastiveConfig.channels={self.channels}; expected one or more widths >= 1")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"ContrastiveConfig.stem_stride={self.stem_stride}; choose 1 or 2")
        if self.norm_groups < 1 or any(c % self.norm_groups for c in self.channels):
            raise ValueError(f"ContrastiveConfig.channels={self.channels} must all be multiples of "
                             f"norm_groups={self.norm_groups}")
        if self.embed_dim < 1:
            raise ValueError(f"ContrastiveConfig.embed_dim={self.embed_dim}; must be >= 1")
        if self.text.max_position_embeddings < 3:
            raise ValueError(f"ContrastiveConfig.text.max_position_embeddings={self.text.max_position_embeddings}; "
                             "must be >= 3 (start, one token, end)")
        if self.vocabulary:
            if self.vocabulary != sorted(set(self.vocabulary)) or self.vocabulary[0] < 0 \
                    or self.vocabulary[-1] >= CLIP_VOCAB_SIZE:
                raise ValueError(f"ContrastiveConfig.vocabulary must be sorted, distinct BPE ids in [0, {CLIP_VOCAB_SIZE})"
                                 f"; got {self.vocabulary[:8]}{'...' if len(self.vocabulary) > 8 else ''}")
            if self.vocabulary[-2:] != [CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1]:
                raise ValueError(f"ContrastiveConfig.vocabulary must hold the start and end tokens "
                                 f"({CLIP_VOCAB_SIZE - 2}, {CLIP_VOCAB_SIZE - 1}); see prompt_vocabulary(prompts)")
            self.text = dataclasses.replace(self.text, vocab_size=len(self.vocabulary) + 1)  # + row 0: unknown
        elif self.text.vocab_size != CLIP_VOCAB_SIZE:
            raise ValueError(f"ContrastiveConfig.text.vocab_size={self.text.vocab_size}; with an empty vocabulary it "
                             f"must be CLIP's {CLIP_VOCAB_SIZE} (or give vocabulary=prompt_vocabulary(prompts))")
        if self.logit_scale_init > self.logit_scale_max:
            raise ValueError(f"logit_scale_init={self.logit_scale_init} is above logit_scale_max={self.logit_scale_max}")


class ImageTower(nn.Module):
    """Conv stem (stride 1 or 2), then per stage a residual 3x3 conv block and (between stages) a stride-2 conv; GroupNorm + SiLU;
    global average pool: (B, C, H, W) -> (B, channels[-1])."""

    def __init__(self, in_channels: int, channels: Sequence[int], groups: int, stem_stride: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, channels[0], 3, stride=stem_stride, padding=1)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        for i, ch in enumerate(channels):
            self.blocks.append(nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                             nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1)))
            if i + 1 < len(channels):
                self.downs.append(nn.Conv2d(ch, channels[i + 1], 3, stride=2, padding=1))
        self.norm_out = nn.GroupNorm(groups, channels[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)  # (B, c0, H / stem_stride, W / stem_stride)
        for i, block in enumerate(self.blocks):
            h = h + block(h)
            if i < len(self.downs):
                h = self.downs[i](h)  # (B, c_{i+1}, H', W') at half the resolution
        return F.silu(self.norm_out(h)).mean(dim=(2, 3))  # (B, c_last)


@MODELS.register("small_clip")
class SmallCLIP(nn.Module):
    """Image and text towers with projections into one ``embed_dim`` space and a learned temperature.

    ``encode_image(images (B, C, H, W))`` and ``encode_text(prompts)`` -> L2-normalised (B, embed_dim);
    ``text_states(prompts)`` -> the text tower's per-token hidden states (B, L, width) and mask (B, L), True up to
    and including the end token; ``forward(images, prompts)`` -> (logits_per_image (B, N), logits_per_text (N, B)).
    """

    config_class = ContrastiveConfig

    def __init__(self, config: ContrastiveConfig):
        super().__init__()
        self.config = config
        self.tokenizer = CLIPTokenizer.from_bpe_file(max_length=config.text.max_position_embeddings)
        self._rows: torch.Tensor | None = None  # BPE id -> embedding row (built on first use; not a weight)
        self.image_tower = ImageTower(config.image_shape[0], config.channels, config.norm_groups, config.stem_stride)
        self.image_projection = nn.Linear(config.channels[-1], config.embed_dim, bias=False)
        self.text_tower = CLIPTextEncoder(config.text)
        self.text_projection = nn.Linear(config.text.hidden_size, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))

    @property
    def max_length(self) -> int:
        return self.config.text.max_position_embeddings

    @property
    def width(self) -> int:
        return self.config.text.hidden_size

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """(B, max_length) int64 token-embedding rows on the model's device: BPE ids, mapped through
        ``vocabulary`` when one is set (unknown ids -> 0)."""
        ids = self.tokenizer(prompts)  # (B, L) BPE ids
        if self.config.vocabulary:
            if self._rows is None:
                rows = torch.zeros(CLIP_VOCAB_SIZE, dtype=torch.long, device="cpu")
                rows[torch.tensor(self.config.vocabulary)] = torch.arange(1, len(self.config.vocabulary) + 1)
                self._rows = rows
            ids = self._rows[ids]
        return ids.to(self.logit_scale.device)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != tuple(self.config.image_shape):
            raise ValueError(f"images of shape {tuple(images.shape)}; this model takes (B, "
                             f"{', '.join(map(str, self.config.image_shape))})")
        return F.normalize(self.image_projection(self.image_tower(images)), dim=-1)  # (B, E)

    def text_states(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token hidden states (B, L, width) and mask (B, L) bool, True at start, tokens and the end token."""
        ids = self.tokenize(prompts)  # (B, L)
        hidden = self.text_tower(ids)  # (B, L, width)
        return hidden, end_mask(ids)

    def encode_text(self, prompts: str | Sequence[str]) -> torch.Tensor:
        ids = self.tokenize(prompts)  # (B, L)
        pooled = CLIPTextEncoder.pool(self.text_tower(ids), ids)  # (B, width)
        return F.normalize(self.text_projection(pooled), dim=-1)  # (B, E)

    def temperature(self) -> torch.Tensor:
        """exp(logit_scale), with logit_scale clipped at ``logit_scale_max`` (CLIP's cap of 100)."""
        return self.logit_scale.clamp(max=self.config.logit_scale_max).exp()

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        image_embeds = self.encode_image(images)  # (B, E)
        text_embeds = self.encode_text(prompts)  # (N, E)
        logits_per_image = self.temperature() * image_embeds @ text_embeds.T  # (B, N)
        return logits_per_image, logits_per_image.T


def end_mask(ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: True up to and including each row's first end token (the largest id, as CLIP's pooling finds it)."""
    end = ids.argmax(dim=-1, keepdim=True)  # (B, 1)
    return torch.arange(ids.shape[1], device=ids.device)[None] <= end  # (B, L)


def tiny_contrastive_config(image_shape: tuple[int, int, int] = (1, 32, 32)) -> ContrastiveConfig:
    """A very small model for tests (the token embedding is most of it)."""
    text = CLIPTextConfig(max_position_embeddings=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64)
    return ContrastiveConfig(image_shape=image_shape, channels=(8, 16), stem_stride=1, norm_groups=4, embed_dim=32,
                             text=text)


__all__ = ["CLIP_VOCAB_SIZE", "ContrastiveConfig", "ImageTower", "SmallCLIP", "end_mask", "prompt_vocabulary",
           "small_text_config", "tiny_contrastive_config"]
