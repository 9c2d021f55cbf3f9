"""AUTOMATIC1111's prompt syntax: the parse results A1111 documents (modules/prompt_parser.py), hand-derived cases
for nesting, unbalanced brackets, numbers, escapes and BREAK, and the chunks with weights and embedding slots."""
from __future__ import annotations

import pytest
import torch

from openldm.tokenizers.clip_bpe import CLIPTokenizer
from openldm.tokenizers.prompt_syntax import BREAK, parse_prompt_attention, tokenize_prompt

# A1111's docstring examples of parse_prompt_attention, with the results it documents.
A1111_DOCUMENTED = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]

# Worked out by hand from the rules (the module docstring).
HAND_DERIVED = [
    ("", [("", 1.0)]),
    ("((a))", [("a", 1.1 * 1.1)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("((a) b", [("a", 1.1 * 1.1), (" b", 1.1)]),  # the outer bracket never closes: it reaches the end
    ("([a)", [("a", 1.1 / 1.1)]),  # ")" closes the round bracket, the square one reaches the end
    ("a) b] c", [("a) b] c", 1.0)]),  # nothing to close: literal
    ("(a:1.3)", [("a", 1.3)]),
    ("(a: 0.25 ) b", [("a", 0.25), (" b", 1.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:+.5)", [("a", 0.5)]),
    ("((a:2) b)", [("a", 2 * 1.1), (" b", 1.1)]),
    ("a:1.5) b", [("a:1.5) b", 1.0)]),  # a weight with no open "(" is text
    ("a:b (c:d)", [("a:b ", 1.0), ("c:d", 1.1)]),
    ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),  # not a number: text (A1111 raises), the "(" stays open
    (r"\(a\) \[b\]", [("(a) [b]", 1.0)]),
    (r"\\(a)", [("\\", 1.0), ("a", 1.1)]),  # an escaped backslash, then a real bracket
    ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]),
    ("aBREAK break", [("aBREAK break", 1.0)]),  # only the capitalised whole word
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # a BREAK in brackets still breaks
]


@pytest.mark.parametrize("text,expected", A1111_DOCUMENTED + HAND_DERIVED)
def test_parse_prompt_attention(text, expected):
    got = parse_prompt_attention(text)
    assert [p[0] for p in got] == [p[0] for p in expected]
    assert [p[1] for p in got] == pytest.approx([p[1] for p in expected], rel=1e-12)
    assert [p is BREAK for p in got] == [p is BREAK for p in expected]


def test_a1111_documented_weights_are_reproduced_exactly():
    """A1111 multiplies the innermost bracket first; the same order gives the same floats to the last bit."""
    got = dict(parse_prompt_attention(A1111_DOCUMENTED[-1][0]))
    assert got["house"] == 1.5730000000000004 and got["sky"] == 1.4641000000000006


# ---- chunks -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.from_bpe_file()


def _row(tok, tokens):
    return [tok.start_id, *tokens, tok.end_id] + [tok.pad_id] * (75 - len(tokens))


def test_plain_prompt_is_the_tokenizers_window(tok):
    prompt = "a (photo) of a cat, [sitting] on a mat"
    chunks = tokenize_prompt(tok, prompt)  # weighting "none": brackets are text
    assert torch.equal(chunks.ids, tok(prompt)) and torch.all(chunks.weights == 1) and chunks.vectors == []
    long = ", ".join(f"word{i}" for i in range(60))  # > 150 tokens: three chunks, as CLIPTokenizer.chunk makes
    assert torch.equal(tokenize_prompt(tok, long).ids, tok.chunk(long))
    assert tokenize_prompt(tok, "").ids.tolist() == [_row(tok, [])]


def test_weights_follow_the_tokens_of_each_piece(tok):
    chunks = tokenize_prompt(tok, "a (red:1.5) [big] house", weighting="a1111")
    a, red, big, house = (tok.encode(w) for w in ("a", "red", "big", "house"))
    tokens = a + red + big + house
    assert chunks.ids.tolist() == [_row(tok, tokens)]
    expected = [1.0] * len(a) + [1.5] * len(red) + [1 / 1.1] * len(big) + [1.0] * len(house)
    assert chunks.weights[0, 1 : 1 + len(tokens)].tolist() == pytest.approx(expected)
    assert torch.all(chunks.weights[0, 1 + len(tokens):] == 1) and chunks.weights[0, 0] == 1


def test_break_starts_a_new_chunk(tok):
    chunks = tokenize_prompt(tok, "a red house BREAK (a blue sky)", weighting="a1111")
    first, second = tok.encode("a red house"), tok.encode("a blue sky")
    assert chunks.ids.tolist() == [_row(tok, first), _row(tok, second)]
    assert chunks.weights[1, 1 : 1 + len(second)].tolist() == pytest.approx([1.1] * len(second))
    assert len(tokenize_prompt(tok, "a BREAK BREAK b", weighting="a1111")) == 3  # an empty chunk between
    assert tokenize_prompt(tok, "a BREAK b").ids.shape[0] == 1  # without the syntax BREAK is a word


def test_comma_backtrack_moves_the_words_after_the_last_comma(tok):
    words = ["cat"] * 70 + [","] + ["dog"] * 10  # "cat" and "dog" are one token each, so is ","
    prompt = " ".join(words)
    cat, dog, comma = tok.encode("cat")[0], tok.encode("dog")[0], tok.encode(",")[0]
    kept = tokenize_prompt(tok, prompt, weighting="a1111", comma_backtrack=20)
    assert kept.ids[0, 1:73].tolist() == [cat] * 70 + [comma] + [tok.end_id]  # the chunk ends after the comma
    assert kept.ids[1, 1:12].tolist() == [dog] * 10 + [tok.end_id]
    cut = tokenize_prompt(tok, prompt, weighting="a1111", comma_backtrack=0)  # every 75 tokens
    assert cut.ids[0, 1:76].tolist() == [cat] * 70 + [comma] + [dog] * 4
    far = tokenize_prompt(tok, prompt, weighting="a1111", comma_backtrack=3)  # the comma is 5 back: no move
    assert torch.equal(far.ids, cut.ids)


def test_embedding_names_become_vector_slots(tok):
    vectors = {"my-style": torch.randn(3, 8), "cat": torch.randn(1, 8)}
    chunks = tokenize_prompt(tok, "a cat in (my-style:1.2)", weighting="a1111", embeddings=vectors)
    a, _in = tok.encode("a"), tok.encode("in")
    assert chunks.ids[0, : 1 + len(a) + 1 + len(_in) + 3 + 1].tolist() == [tok.start_id, *a, 0, *_in, 0, 0, 0,
                                                                           tok.end_id]
    slots = [(c, p, v.shape[0]) for c, p, v in chunks.vectors]
    assert slots == [(0, 1 + len(a), 1), (0, 2 + len(a) + len(_in), 3)]
    assert chunks.vectors[1][2] is vectors["my-style"]
    assert chunks.weights[0, 2 + len(a) + len(_in):][:3].tolist() == pytest.approx([1.2] * 3)


def test_an_embedding_never_straddles_two_chunks(tok):
    vectors = {"emb": torch.randn(4, 8)}
    prompt = " ".join(["cat"] * 73) + " emb"
    chunks = tokenize_prompt(tok, prompt, embeddings=vectors)
    assert len(chunks) == 2 and [(c, p) for c, p, _ in chunks.vectors] == [(1, 1)]
    assert chunks.ids[0, 74].item() == tok.end_id  # the first chunk holds the 73 words only
    with pytest.raises(ValueError, match="76 vectors; a chunk holds 75"):
        tokenize_prompt(tok, "emb", embeddings={"emb": torch.randn(76, 8)})


def test_bad_weighting_is_refused(tok):
    with pytest.raises(ValueError, match="'compel' is not one of none, a1111"):
        tokenize_prompt(tok, "a", weighting="compel")
