"""AUTOMATIC1111's prompt language: attention weights, ``BREAK``, textual-inversion names, and 75-token chunks.

Attention syntax (A1111's ``prompt_parser.parse_prompt_attention``; same results for every prompt):

- ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1; brackets nest and multiply.
- ``(text:1.3)`` multiplies by the number instead (``(text: 1.3 )`` too); it closes the innermost open ``(``.
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters; a lone backslash is dropped.
- A ``)`` or ``]`` with nothing to close and a ``:number)`` with no open ``(`` are literal text; a bracket left
  open applies to the end of the prompt (round brackets first, then square ones).
- ``BREAK`` (the capitalised word) ends the current 75-token chunk: what follows starts a new one.
- Neighbouring pieces of equal weight are joined before tokenizing (``(a)(b)`` reads as ``ab``).

Two choices where A1111 has no rule worth copying: a ``BREAK`` inside brackets still breaks (A1111 multiplies its
marker and then reads it as the word "break" with a negative weight), and a ``:number)`` whose number does not parse
(``:1.2.3)``) is literal text (A1111 raises).

Tokens become chunks as A1111's ``FrozenCLIPEmbedderWithCustomWords`` makes them: each piece is tokenized on its
own, textual-inversion names are found in the token ids (longest name first) and stand for their vectors, chunks
hold 75 tokens framed by start/end, a name's vectors never straddle two chunks, and with ``comma_backtrack=N`` a
full chunk whose last comma is at most N tokens back moves the tokens after that comma to the next chunk.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

import torch

if TYPE_CHECKING:
    from openldm.tokenizers.clip_bpe import CLIPTokenizer

PROMPT_WEIGHTINGS = ("none", "a1111")
BREAK = ("BREAK", -1.0)  # the marker parse_prompt_attention puts where the prompt says BREAK (A1111's spelling)
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
A1111_COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack" setting

# The lexical pieces of the syntax, tried in this order at each position.
_LEXEME = re.compile(r"""
    (?P<escaped>\\[()\[\]\\]?)                  # an escaped bracket or backslash, or a lone backslash
  | (?P<open>[(\[])
  | (?P<weighted>:\s*(?P<number>[+-]?[.\d]+)\s*\))
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|:)
""", re.VERBOSE)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def check_weighting(name: str) -> str:
    """``name`` if it is a prompt-weighting mode, else a ValueError listing them."""
    if name not in PROMPT_WEIGHTINGS:
        raise ValueError(f"prompt weighting {name!r} is not one of {', '.join(PROMPT_WEIGHTINGS)}")
    return name


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``text`` as (piece, weight) pairs in order, with :data:`BREAK` where the prompt breaks its chunk.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    pieces: list[list] = []  # [text, weight]; BREAK entries are [None, None] until the end
    open_round: list[int] = []  # where each open bracket's range starts in `pieces`
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not None:
                piece[1] *= factor

    def add_text(literal: str) -> None:
        for i, part in enumerate(_BREAK_WORD.split(literal)):
            if i:
                pieces.append([None, None])
            pieces.append([part, 1.0])

    for m in _LEXEME.finditer(text):
        kind = m.lastgroup  # the outermost group of the alternative that matched
        lexeme = m.group(0)
        if kind == "escaped":
            pieces.append([lexeme[1:], 1.0])
        elif kind == "open":
            (open_round if lexeme == "(" else open_square).append(len(pieces))
        elif kind == "weighted" and open_round and _is_number(m.group("number")):
            scale(open_round.pop(), float(m.group("number")))
        elif kind == "close" and lexeme == ")" and open_round:
            scale(open_round.pop(), ROUND_MULTIPLIER)
        elif kind == "close" and lexeme == "]" and open_square:
            scale(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            add_text(lexeme)
    for start in open_round:  # unclosed brackets reach the end: round first, then square, each in opening order
        scale(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale(start, SQUARE_MULTIPLIER)

    merged: list[tuple[str, float]] = []
    for piece_text, weight in pieces or [["", 1.0]]:
        if piece_text is None:
            merged.append(BREAK)
        elif merged and merged[-1] is not BREAK and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
    return merged


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------- prompt -> chunks

@dataclass
class PromptChunks:
    """A prompt as chunks of ``max_length`` token ids: ``ids`` (C, T) int64, ``weights`` (C, T) float32 (1 at
    start, end and padding), and ``vectors``: (chunk, position, (N, D) tensor) for each textual-inversion name,
    whose N vectors replace the token embeddings at positions ``position .. position + N - 1`` of that chunk."""

    ids: torch.Tensor
    weights: torch.Tensor
    vectors: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def first(self) -> "PromptChunks":
        """The first chunk alone (what a single 77-token window reads)."""
        return PromptChunks(self.ids[:1], self.weights[:1], [v for v in self.vectors if v[0] == 0])

    def padded(self, num_chunks: int, empty_ids: list[int]) -> "PromptChunks":
        """These chunks followed by empty ones (``empty_ids``, weight 1) up to ``num_chunks``."""
        extra = num_chunks - len(self)
        if extra <= 0:
            return self
        ids = torch.cat([self.ids, torch.tensor([empty_ids] * extra, dtype=self.ids.dtype)])
        return PromptChunks(ids, torch.cat([self.weights, torch.ones(extra, self.ids.shape[1])]), self.vectors)


class _NameIndex:
    """Textual-inversion names by their token ids: the candidates starting with each id, longest first."""

    def __init__(self, tokenizer: "CLIPTokenizer", embeddings: Mapping[str, torch.Tensor]):
        self.by_first: dict[int, list[tuple[list[int], torch.Tensor]]] = {}
        for name, vectors in embeddings.items():
            ids = tokenizer.encode(name)
            if not ids:
                raise ValueError(f"embedding name {name!r} has no tokens; rename its file")
            self.by_first.setdefault(ids[0], []).append((ids, vectors))
        for candidates in self.by_first.values():
            candidates.sort(key=lambda c: -len(c[0]))

    def match(self, tokens: list[int], at: int) -> tuple[int, torch.Tensor] | None:
        """(token count, vectors) of the longest name whose ids start at ``tokens[at]``; None if none does."""
        for ids, vectors in self.by_first.get(tokens[at], ()):
            if tokens[at : at + len(ids)] == ids:
                return len(ids), vectors
        return None


def tokenize_prompt(tokenizer: "CLIPTokenizer", prompt: str, *, weighting: str = "none",
                    embeddings: Mapping[str, torch.Tensor] | None = None,
                    comma_backtrack: int = 0) -> PromptChunks:
    """``prompt`` as A1111's chunks (see the module docstring). ``weighting="a1111"`` reads the attention syntax
    and ``BREAK``; ``"none"`` takes the text as it is, every weight 1. ``embeddings`` maps names to (N, D)
    vectors. An empty prompt is one empty chunk."""
    pieces = parse_prompt_attention(prompt) if check_weighting(weighting) == "a1111" else [(prompt, 1.0)]
    names = _NameIndex(tokenizer, embeddings or {})
    length = tokenizer.max_length - 2  # tokens per chunk between start and end
    comma = tokenizer.encoder.get(",</w>")
    chunks: list[tuple[list[int], list[float]]] = []
    vectors: list[tuple[int, int, torch.Tensor]] = []
    tokens: list[int] = []
    weights: list[float] = []
    pending: list[tuple[int, torch.Tensor]] = []  # (position, vectors) in the chunk being filled
    last_comma = -1

    def close_chunk() -> None:
        nonlocal tokens, weights, pending, last_comma
        vectors.extend((len(chunks), 1 + pos, vec) for pos, vec in pending)  # 1 +: after the start token
        chunks.append((tokens, weights))
        tokens, weights, pending, last_comma = [], [], [], -1

    for piece in pieces:
        if piece is BREAK:
            close_chunk()
            continue
        text, weight = piece
        ids = tokenizer.encode(text)
        at = 0
        while at < len(ids):
            if ids[at] == comma:
                last_comma = len(tokens)
            elif (comma_backtrack and len(tokens) == length and last_comma != -1
                  and len(tokens) - last_comma <= comma_backtrack):
                cut = last_comma + 1  # what follows the comma moves to the next chunk
                moved = (tokens[cut:], weights[cut:], [(p - cut, v) for p, v in pending if p >= cut])
                tokens, weights, pending = tokens[:cut], weights[:cut], [(p, v) for p, v in pending if p < cut]
                close_chunk()
                tokens, weights, pending = moved
            if len(tokens) == length:
                close_chunk()
            found = names.match(ids, at)
            if found is None:
                tokens.append(ids[at])
                weights.append(weight)
                at += 1
                continue
            count, vec = found
            if vec.shape[0] > length:
                raise ValueError(f"an embedding in the prompt has {vec.shape[0]} vectors; a chunk holds {length}")
            if len(tokens) + vec.shape[0] > length:
                close_chunk()
            pending.append((len(tokens), vec))
            tokens += [0] * vec.shape[0]  # placeholder ids: the vectors replace their embeddings
            weights += [weight] * vec.shape[0]
            at += count
    if tokens or not chunks:
        close_chunk()
    ids_rows = [tokenizer.frame(t) for t, _ in chunks]
    weight_rows = [[1.0, *w, *[1.0] * (length - len(w) + 1)] for _, w in chunks]  # start, tokens, end and padding
    return PromptChunks(torch.tensor(ids_rows, dtype=torch.long), torch.tensor(weight_rows, dtype=torch.float32),
                        vectors)
