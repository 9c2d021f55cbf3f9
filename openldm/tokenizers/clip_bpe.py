"""CLIP's byte-level BPE tokenizer: prompt text -> (B, 77) token ids for the CLIP text encoder.

Byte-pair encoding (Sennrich, Haddow & Birch 2016, "Neural Machine Translation of Rare Words with Subword Units")
over UTF-8 bytes, each byte shown as a printable character (Radford et al. 2019, GPT-2, sec. 2.2), as CLIP uses it
(Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision", sec. 2.4): lower-cased
text is split into letter runs, single digits and punctuation runs; each piece is merged by the ranked merge list,
its last symbol marked with ``</w>``; ids are framed by ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407)
and padded to 77 positions.

The vocabulary is ``bpe_simple_vocab_16e6.txt.gz`` from OpenAI's CLIP (MIT licence, see LICENSE-CLIP-BPE beside
this file); like CLIP we keep its first 48,894 merges, so the vocabulary is 256 byte symbols, the same 256 with
``</w>``, one token per merge and the two special tokens: 49,408 ids.

Text cleaning (``text_cleaning``):

- ``"nfc"`` (default): Unicode NFC, every whitespace run to one space, lower case. This is what transformers'
  ``CLIPTokenizer`` does, and so what diffusers' Stable Diffusion pipelines feed the text encoder; literal
  special-token strings in the prompt become the special ids, as there.
- ``"clip"``: the original CLIP cleaning: ``ftfy.fix_text`` (mojibake, curly quotes, ligatures, full-width forms),
  HTML entities unescaped twice, whitespace collapsed, lower case. Needs the optional ``ftfy`` package.

Prompts over 77 tokens are truncated with a warning (the reference behaviour), or with :meth:`CLIPTokenizer.chunk`
split into 75-token chunks, each framed by start/end and padded to 77 (the AUTOMATIC1111 convention).
"""
from __future__ import annotations

import functools
import gzip
import html
import json
import unicodedata
import warnings
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

import regex
import torch

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context length: start + 75 tokens + end
NUM_MERGES = 49_152 - 256 - 2  # 48,894: CLIP keeps this many merges of the 16e6 file (vocabulary 49,408)
TEXT_CLEANINGS = ("nfc", "clip")
DEFAULT_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"

# CLIP's pre-tokenizer: English contractions, letter runs, single digits, punctuation runs (special tokens are
# matched by _SPECIALS). Whitespace matches nothing and is dropped. Needs the `regex` package for \p{L} / \p{N}
# (the stdlib `re` has no Unicode property classes).
_PIECES = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_SPECIALS = r"<\|startoftext\|>|<\|endoftext\|>"
_WHITESPACE = regex.compile(r"\s+")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of GPT-2/CLIP byte-level BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, 0x7F-0xA0, 0xAD) map to
    ``chr(256 + n)`` in byte order, so no symbol is whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    # Insertion order is CLIP's id order: the printable bytes, then the others.
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _clean_nfc(text: str) -> str:
    """transformers' CLIPTokenizer normaliser: NFC, whitespace runs -> " ", lower case character by character."""
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    # str.lower() turns a word-final capital sigma into "ς"; a per-character lower-casing (the Rust tokenizers
    # library's) gives "σ". Sigma is the only context-dependent mapping str.lower() applies.
    return text.replace("Σ", "σ").lower()


def _clean_clip(text: str) -> str:
    """OpenAI CLIP's cleaning: ftfy.fix_text, HTML unescaped twice, whitespace collapsed, lower case."""
    try:
        import ftfy
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "text_cleaning='clip' needs the ftfy package (pip install ftfy); text_cleaning='nfc' needs nothing"
        ) from None
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def read_bpe_file(path: str | Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from a CLIP ``bpe_simple_vocab_16e6.txt.gz``-style file (default: the shipped one).

    Builds the vocabulary as CLIP does: the 256 byte symbols, the same with ``</w>``, the first 48,894 merges
    joined, then ``<|startoftext|>`` and ``<|endoftext|>``; ids are list positions.
    """
    if path is None:
        with resources.files(__package__).joinpath(DEFAULT_BPE_FILE).open("rb") as f:
            raw = f.read()
    else:
        raw = Path(path).read_bytes()
    lines = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is the "#version" header
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path or DEFAULT_BPE_FILE}: expected a header line and >= {NUM_MERGES} 'a b' merge lines")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START_TOKEN, END_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


@functools.lru_cache(maxsize=2)
def _default_tables() -> tuple[dict[str, int], list[tuple[str, str]]]:
    return read_bpe_file(None)


def _special_token(value: object) -> str | None:
    """A token as a transformers config stores it: a string or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class CLIPTokenizer:
    """CLIP byte-level BPE: ``tokenizer(prompts)`` -> (B, 77) int64 ids ``[start, tokens..., end, pad...]``.

    ``pad_id``: the id after the end token (default the end token itself, as SD v1 pads; SD 2's OpenCLIP pads
    with 0). ``text_cleaning``: "nfc" (transformers / diffusers) or "clip" (OpenAI CLIP with ftfy); see the module
    docstring. Build one with :meth:`from_bpe_file` (the shipped vocabulary) or :meth:`from_folder` (a diffusers
    ``tokenizer/`` folder).
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        max_length: int = MAX_LENGTH,
        pad_id: int | None = None,
        text_cleaning: str = "nfc",
    ):
        for token in (START_TOKEN, END_TOKEN):
            if token not in vocab:
                raise ValueError(f"the vocabulary has no {token!r} token; a CLIP vocabulary needs both "
                                 f"{START_TOKEN!r} and {END_TOKEN!r}")
        if text_cleaning not in TEXT_CLEANINGS:
            raise ValueError(f"text_cleaning={text_cleaning!r}; choose one of: {', '.join(TEXT_CLEANINGS)}")
        if max_length < 3:
            raise ValueError(f"max_length={max_length}; must be >= 3 (start, one token, end)")
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.ranks = {tuple(m): r for r, m in enumerate(merges)}
        self.start_id = self.encoder[START_TOKEN]
        self.end_id = self.encoder[END_TOKEN]
        self.pad_id = self.end_id if pad_id is None else pad_id
        if not 0 <= self.pad_id < len(self.encoder):
            raise ValueError(f"pad_id={pad_id}; must be an id in [0, {len(self.encoder)})")
        self.max_length = max_length
        self.text_cleaning = text_cleaning
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        if text_cleaning == "clip":
            # OpenAI's pattern: specials first, case-insensitive (after lower-casing this matters only for a few
            # characters that case-fold onto a contraction's letters: "'ſ" is one piece here, two in "nfc").
            self._clean = _clean_clip
            self._specials = None
            self._pieces = regex.compile(_SPECIALS + "|" + _PIECES, regex.IGNORECASE)
        else:
            # transformers cuts literal special tokens out of the raw text first and splits the rest
            # case-sensitively.
            self._clean = _clean_nfc
            self._specials = regex.compile(f"({_SPECIALS})")
            self._pieces = regex.compile(_PIECES)
        self._cache: dict[str, list[int]] = {}

    # ---- constructors -------------------------------------------------------------------------------------

    @classmethod
    def from_bpe_file(cls, path: str | Path | None = None, **kwargs) -> "CLIPTokenizer":
        """From a CLIP ``.txt.gz`` merges file; ``path=None`` is the vocabulary shipped with openldm."""
        vocab, merges = _default_tables() if path is None else read_bpe_file(path)
        return cls(vocab, merges, **kwargs)

    @classmethod
    def from_folder(cls, path: str | Path, **kwargs) -> "CLIPTokenizer":
        """From a diffusers/transformers ``tokenizer/`` folder: ``vocab.json`` + ``merges.txt``.

        ``pad_token`` and ``model_max_length`` come from ``tokenizer_config.json`` / ``special_tokens_map.json``
        when present (SD 2's folders pad with "!", id 0); keyword arguments override them.
        """
        folder = Path(path)
        missing = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: a CLIP tokenizer folder needs vocab.json and merges.txt; "
                                    f"missing {', '.join(missing)}")
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = []
        for line in (folder / "merges.txt").read_text(encoding="utf-8").split("\n"):
            if line.startswith("#version") or not line.strip():
                continue
            pair = tuple(line.split())
            if len(pair) != 2:
                raise ValueError(f"{folder / 'merges.txt'}: merge line {line!r} is not two symbols")
            merges.append(pair)
        settings: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
            if (folder / name).is_file():
                settings.update(json.loads((folder / name).read_text(encoding="utf-8")))
        pad = _special_token(settings.get("pad_token"))
        if "pad_id" not in kwargs and pad is not None:
            if pad not in vocab:
                raise ValueError(f"{folder}: pad_token {pad!r} is not in vocab.json")
            kwargs["pad_id"] = vocab[pad]
        length = settings.get("model_max_length")
        if "max_length" not in kwargs and isinstance(length, int) and 3 <= length <= 4096:
            kwargs["max_length"] = length  # unset configs carry a huge sentinel; keep our 77 then
        return cls(vocab, merges, **kwargs)

    def save_folder(self, path: str | Path) -> None:
        """Write a diffusers/transformers ``tokenizer/`` folder (vocab.json, merges.txt and the two JSON configs)
        that :meth:`from_folder` and transformers' ``CLIPTokenizer.from_pretrained`` both read."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        merges = sorted(self.ranks, key=self.ranks.__getitem__)
        (folder / "vocab.json").write_text(json.dumps(self.encoder, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        special = {"bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN,
                   "pad_token": self.decoder[self.pad_id]}
        config = {**special, "model_max_length": self.max_length, "do_lower_case": True,
                  "tokenizer_class": "CLIPTokenizer"}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # ---- text -> ids --------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, piece: str) -> list[int]:
        """Merge one pre-tokenized piece (already byte-mapped) by rank; return its token ids."""
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.encoder[symbol] for symbol in word]
        if len(self._cache) > 100_000:  # bound the memory of a long-running server
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def _encode_clean(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._pieces.findall(self._clean(text)):
            if piece == START_TOKEN or piece == END_TOKEN:
                ids.append(self.encoder[piece])
            else:
                ids.extend(self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: cleaned, split and merged, without start/end tokens, not truncated."""
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a str, got {type(text).__name__}: {text!r}")
        if self._specials is None:
            return self._encode_clean(text)
        ids: list[int] = []
        for i, part in enumerate(self._specials.split(text)):  # odd parts are the special tokens themselves
            ids.extend([self.encoder[part]] if i % 2 else self._encode_clean(part))
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (lower-cased and cleaned as encoded); by default without start/end and trailing pad ids."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        skip: set[int] = set()
        if skip_special_tokens:
            skip = {self.start_id, self.end_id}
            while ids and ids[-1] == self.pad_id:  # trailing padding (a pad id like SD 2's "!" may also be text)
                ids.pop()
        text = "".join(self.decoder[i] for i in ids if i not in skip)
        # "</w>" is made of printable bytes, so it survives the byte mapping and becomes a space afterwards.
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def frame(self, tokens: Sequence[int]) -> list[int]:
        """``[start, *tokens, end, pad, ...]`` of length max_length (tokens already <= max_length - 2)."""
        row = [self.start_id, *tokens, self.end_id]
        return row + [self.pad_id] * (self.max_length - len(row))

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """(B, max_length) int64 ids, one row per prompt (a single string is a batch of one).

        A prompt longer than ``max_length - 2`` tokens is truncated, with a warning naming what was dropped.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        keep = self.max_length - 2
        rows = []
        for prompt in prompts:
            tokens = self.encode(prompt)
            if len(tokens) > keep:
                warnings.warn(
                    f"prompt is {len(tokens)} tokens; CLIP reads {keep}, so {len(tokens) - keep} were dropped: "
                    f"{self.decode(tokens[keep:])!r}. Use chunked encoding (CLIPTokenizer.chunk, "
                    f"encode_prompts(..., chunked=True)) to keep them.", stacklevel=2)
            rows.append(self.frame(tokens[:keep]))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)

    def chunk(self, prompt: str, min_chunks: int = 1) -> torch.Tensor:
        """(num_chunks, max_length) int64 ids: the prompt's tokens in runs of ``max_length - 2``, each framed by
        start/end and padded (the AUTOMATIC1111 convention for long prompts).

        An empty prompt is one chunk; ``min_chunks`` appends empty chunks (start, end, pad...) so the prompts of
        a batch can share one length, as AUTOMATIC1111 does.
        """
        keep = self.max_length - 2
        tokens = self.encode(prompt)
        runs = [tokens[i : i + keep] for i in range(0, len(tokens), keep)] or [[]]
        runs += [[]] * (min_chunks - len(runs))
        return torch.tensor([self.frame(run) for run in runs], dtype=torch.long)  # (num_chunks, max_length)

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, pad_id={self.pad_id}, "
                f"text_cleaning={self.text_cleaning!r})")
