"""CLIP BPE tokenizer: vocabulary construction, parity with transformers' CLIPTokenizer over hundreds of prompts
(and a sweep of Unicode code points), padding, truncation, A1111 chunking, the two text cleanings."""
from __future__ import annotations

import json
import random
import sys
import unicodedata
import warnings

import pytest
import torch

from openldm.tokenizers.clip_bpe import (
    END_TOKEN,
    NUM_MERGES,
    CLIPTokenizer,
    bytes_to_unicode,
    read_bpe_file,
)

transformers = pytest.importorskip("transformers")

from sd_testing import clip_vocab_files  # noqa: E402

# ---- the CLIP vocabulary, built here independently of openldm's reader ---------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip_tokenizer")
    clip_vocab_files(path)
    return path


@pytest.fixture(scope="module")
def hf(folder):
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.from_bpe_file()


# ---- prompts ---------------------------------------------------------------------------------------------------

HANDPICKED = [
    "", " ", "a", "A", "a photo of a cat", "A PHOTO OF A CAT", "a Photo Of A cAt",
    "an astronaut riding a horse on mars, highly detailed, 8k, trending on artstation",
    "masterpiece, best quality, (detailed face:1.2), [blurry], {soft light}, <lora:foo:0.7>",
    "it's a dog's life; they're, we've, I'm, you'll, he'd", "IT'S THEY'RE WE'VE I'M YOU'LL HE'D",
    "it’s “quoted” ‘single’ — en–dash … ellipsis", "don't 's 't 're 've 'm 'll 'd '", "'ſ ſ 'S 'K",
    "café naïve résumé façade jalapeño Ångström Œuvre straße", "e\u0301 cafe\u0301 n\u0303",  # combining marks
    "ΟΔΟΣ ΣΑΣ σίσυφος Σ", "İstanbul ıi IJ ǅ ǈ ß ẞ ﬁ ﬂ ﬀ", "Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ １２３ ！？",
    "日本語のテキスト、東京タワー。漢字かなカナ", "中文提示词：一只猫在月亮上", "한국어 프롬프트 고양이",
    "Привет, мир! ЁЖИК в тумане", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "ภาษาไทย",
    "🐱 🐶🐭 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 ❤️ 🇫🇷 1️⃣ 🫠", "cat🐱dog🐶", "emoji‍zwj\u200bzero\u200cwidth\ufeffbom",
    "!!!", "???!!!...,,,;;;:::", "...---___***+++===", "a--b__c..d!!e??", "(((((a)))))", "[[[b]]] {{{c}}}",
    "~`@#$%^&*()_+-=[]{}|\\:;\"'<>,.?/", "$100 €50 £30 ¥1000 ₹20 100% 3.14159 -42 1e10 0x1F 1,000,000",
    "2024-01-31 12:34:56 v1.5 sd_xl_base_1.0 4k 1080p 16:9 f/1.8 85mm", "١٢٣ ۴۵۶ ०१२ ½ ¼ ² ³ Ⅻ ⅷ ①②",
    "&amp; &lt;b&gt; &quot;hi&quot; &#39;x&#39; &#x27;y&#x27; &nbsp; &copy; &amp;amp; & amp ;",
    "a\tb\nc\r\nd  e   f\u00a0g\u2003h\u3000i\u2028j\x0bk\x0cl\x85m\x1cn\x1fo",
    "   leading and trailing spaces   ", "\n\n\tnewlines\n\n", "a" * 300, "abc" * 100, "1" * 120,
    "word " * 100, "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "<|startoftext|> a <|endoftext|> b", "x!<|endoftext|>y", "<|endoftext|><|endoftext|>", "<|ENDOFTEXT|>",
    "<|startoftext", "|endoftext|>", "\x00\x01\x02 control \x7f\x80\x9f chars", "\ud7ff\ue000\uffff\U0001f600",
    "mojibake cafÃ© Ã¼ber â€™", "👍" * 40, "!" * 200, "a, " * 60, "ok.ok.ok.ok",
    "e-mail me@example.com https://x.y/z?q=1&r=2",
]

WORDS = ("a photo portrait of the cat dog woman man castle forest city night sunset oil painting by greg rutkowski "
         "artstation octane render unreal engine cinematic lighting ultra detailed sharp focus bokeh volumetric fog "
         "cyberpunk steampunk baroque anime watercolor sketch concept art highly intricate elegant hyperrealistic"
         ).split()
EXTRAS = ["Café", "NAÏVE", "über", "ÆØÅ", "Ωmega", "Straße", "日本", "кот", "🐱", "🔥🔥", "👩‍🚀", "&amp;", "&gt;",
          "&#8217;", "’", "“", "”", "—", "…", "!!", "??", "...", "!?!", ",", ";", ":", "(", ")", "[", "]", "{", "}",
          "1", "42", "3.5", "1024x768", "2k", "V2", "it's", "they're", "I'M", "\t", "\n", "  ", "\u00a0", "\u3000",
          "ﬁ", "Ｆ", "ǅ", "Σ", "İ", "e\u0301", "\u200d", "<", ">", "|", "_", "*", "#", "@", "$", "%", "^", "~"]


def _random_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.choice([3, 8, 15, 30, 60, 120])  # words; the longer ones are far over 77 tokens
        parts = []
        for _ in range(length):
            word = rng.choice(WORDS) if rng.random() < 0.7 else rng.choice(EXTRAS)
            word = {0: word, 1: word.upper(), 2: word.title()}[rng.randrange(3)] if rng.random() < 0.3 else word
            parts.append(word)
            parts.append(rng.choice([" ", " ", " ", ", ", "  ", "", "\t", " ... ", "!"]))
        out.append("".join(parts))
    return out


PROMPTS = HANDPICKED + _random_prompts(400)


# ---- vocabulary ------------------------------------------------------------------------------------------------

def test_vocabulary_matches_clip_construction(folder, tok):
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == tok.vocab_size == 49408
    assert tok.encoder == vocab
    assert (tok.start_id, tok.end_id, tok.pad_id) == (49406, 49407, 49407)
    ours_vocab, ours_merges = read_bpe_file()
    assert len(ours_merges) == NUM_MERGES == 48894
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")[1:-1]
    assert [" ".join(m) for m in ours_merges] == lines
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256 and list(table.values())[:3] == ["!", '"', "#"]
    assert not any(c.isspace() or unicodedata.category(c).startswith("C") for c in table.values())


def test_known_ids(tok):
    ids = tok("a photo of a cat")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()


# ---- parity with transformers ----------------------------------------------------------------------------------

def test_parity_with_transformers_padded_and_truncated(tok, hf):
    assert len(PROMPTS) >= 450
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # our truncation warnings
        ours = tok(PROMPTS)
    ref = hf(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    mismatched = [(p, o.tolist(), r.tolist()) for p, o, r in zip(PROMPTS, ours, ref) if not torch.equal(o, r)]
    assert not mismatched, mismatched[:3]
    assert sum(len(tok.encode(p)) > 75 for p in PROMPTS) >= 100  # plenty of prompts far over 77 tokens


def test_parity_with_transformers_untruncated(tok, hf):
    ref = hf(PROMPTS, add_special_tokens=False).input_ids
    mismatched = [(p, tok.encode(p), r) for p, r in zip(PROMPTS, ref) if tok.encode(p) != r]
    assert not mismatched, mismatched[:3]
    assert max(len(r) for r in ref) > 200


def _code_point_texts(step: int) -> list[str]:
    """One text per code point assigned in this Python's Unicode database (every ``step``-th one), in contexts
    that exercise letter runs, digits, punctuation runs, contractions, case and whitespace."""
    chars = [chr(c) for c in range(1, 0x110000, step)
             if not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) != "Cn"]
    return [f"a{c}b1{c}{c.upper()}'{c} {c}" for c in chars]


def _assert_same(tok, hf, texts):
    ref = hf(texts, add_special_tokens=False).input_ids
    mismatched = [(t, tok.encode(t), r) for t, r in zip(texts, ref) if tok.encode(t) != r]
    assert not mismatched, (len(mismatched), mismatched[:5])


def test_parity_over_sampled_code_points(tok, hf):
    texts = _code_point_texts(step=97)
    assert len(texts) > 2000
    _assert_same(tok, hf, texts)


@pytest.mark.slow
def test_parity_over_all_code_points(tok, hf):
    """Every code point assigned in Python's Unicode database (14.0 on 3.11). Code points assigned later may
    differ: the regex package, Oniguruma (transformers' pre-tokenizer) and Rust's lower-casing each carry their
    own Unicode version."""
    _assert_same(tok, hf, _code_point_texts(step=1))


def test_folder_round_trip_and_sd2_padding(tmp_path, tok, hf):
    tok.save_folder(tmp_path / "ours")
    again = CLIPTokenizer.from_folder(tmp_path / "ours")
    assert again.encoder == tok.encoder and again.ranks == tok.ranks and again.pad_id == tok.pad_id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # our truncation warnings
        assert torch.equal(again(PROMPTS[:50]), tok(PROMPTS[:50]))
    # transformers reads what we write
    theirs = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "ours"))
    assert theirs("a cat", padding="max_length", max_length=77).input_ids == tok("a cat")[0].tolist()
    # SD 2 folders pad with "!" (id 0) after the end token
    clip_vocab_files(tmp_path / "sd2", pad_token="!")
    sd2 = CLIPTokenizer.from_folder(tmp_path / "sd2")
    assert sd2.pad_id == 0 and CLIPTokenizer.from_bpe_file(pad_id=0).pad_id == 0
    hf2 = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "sd2"))
    prompts = ["a cat", "", "wow??? " * 5, "word " * 90]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = sd2(prompts)
    ref = hf2(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, ref)
    assert ids[0, 4:].eq(0).all() and ids[0, 3] == 49407
    # Known difference: transformers makes the pad token "!" a special token and cuts every "!" out of the text
    # as id 0; we merge "!" by BPE, as the OpenCLIP tokenizer that SD 2 was trained with does.
    assert sd2.encode("wow!!!") == [2781, 995] and hf2("wow!!!", add_special_tokens=False).input_ids == [2781, 0, 0, 0]


# ---- padding, truncation, chunking ---------------------------------------------------------------------------

def test_truncation_warns_only_when_tokens_are_dropped(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(["word " * 75])  # exactly 75 tokens fit
    with pytest.warns(UserWarning, match=r"76 tokens; CLIP reads 75, so 1 were dropped: 'last'"):
        ids = tok("word " * 75 + "last")
    assert ids[0, -1] == tok.end_id and ids[0, -2] == tok.encode("word")[0]


def test_chunking_a1111(tok):
    prompt = " ".join(f"w{i}" for i in range(100))  # "w" and a digit or more per word
    tokens = tok.encode(prompt)
    chunks = tok.chunk(prompt)
    assert chunks.shape == (-(-len(tokens) // 75), 77) and chunks.dtype == torch.long
    assert (chunks[:, 0] == tok.start_id).all()
    body = [t for row in chunks.tolist() for t in row[1:-1]]
    assert body[: len(tokens)] == tokens  # every token kept, in order
    full, last = chunks[:-1], chunks[-1].tolist()
    assert (full[:, -1] == tok.end_id).all()
    n_last = len(tokens) - 75 * len(full)
    assert last[n_last + 1] == tok.end_id and set(last[n_last + 2 :]) == {tok.pad_id}
    assert torch.equal(tok.chunk("a cat"), tok("a cat"))
    assert torch.equal(tok.chunk(""), tok(""))
    assert tok.chunk("word " * 75).shape == (1, 77) and tok.chunk("word " * 76).shape == (2, 77)
    padded = tok.chunk("a cat", min_chunks=3)
    assert padded.shape == (3, 77) and torch.equal(padded[1], tok("")[0]) and torch.equal(padded[2], tok("")[0])
    sd2 = CLIPTokenizer.from_bpe_file(pad_id=0).chunk("word " * 80)
    assert sd2[1, :7].tolist() == [49406] + tok.encode("word") * 5 + [49407] and sd2[1, 7:].eq(0).all()


def test_decode(tok):
    assert tok.decode(tok("A Photo of a CAT, 8k!!")[0]) == "a photo of a cat , 8 k !!"
    assert tok.decode(tok.encode("café 🐱")) == "café 🐱"
    assert tok.decode(tok("x")[0], skip_special_tokens=False).startswith("<|startoftext|>x <|endoftext|>")
    sd2 = CLIPTokenizer.from_bpe_file(pad_id=0)
    assert sd2.decode(sd2("wow !")[0]) == "wow !"  # "!" (id 0) is text before the end token, padding after it


# ---- text cleaning ---------------------------------------------------------------------------------------------

def test_nfc_cleaning_keeps_entities_and_quotes_like_transformers(tok):
    assert tok.encode("&amp;") != tok.encode("&")
    assert tok.encode("it’s") != tok.encode("it's")
    assert tok.encode("cafe\u0301") == tok.encode("café")  # NFC
    assert tok.encode("a \t\n b") == tok.encode("a b") == tok.encode("A B")


def test_clip_cleaning_is_openai_clips():
    pytest.importorskip("ftfy")
    clip = CLIPTokenizer.from_bpe_file(text_cleaning="clip")
    assert clip.encode("&amp;amp;") == clip.encode("&")  # HTML unescaped twice
    assert clip.encode("it’s “ok”") == clip.encode("it's \"ok\"")  # ftfy straightens quotes
    assert clip.encode("ﬁne Ｆｕｌｌ") == clip.encode("fine full")  # ligatures, full width
    # CLIP's pattern is case-insensitive: the long s joins the apostrophe as a contraction piece ("'ſ</w>").
    assert clip.encode("'ſ") == [6, 129, 379] and CLIPTokenizer.from_bpe_file().encode("'ſ") == [262, 129, 379]
    assert clip.encode("<|ENDOFTEXT|>") == [49407]  # matched after lower-casing
    assert clip.encode("ΟΔΟΣ") == clip.encode("οδος")  # str.lower's final sigma
    assert clip.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]


def test_clip_cleaning_without_ftfy_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "ftfy", None)
    with pytest.raises(ModuleNotFoundError, match="pip install ftfy"):
        CLIPTokenizer.from_bpe_file(text_cleaning="clip").encode("x")


# ---- errors ----------------------------------------------------------------------------------------------------

def test_errors_name_the_bad_value(tmp_path, tok):
    with pytest.raises(ValueError, match="text_cleaning='ftfy'; choose one of: nfc, clip"):
        CLIPTokenizer.from_bpe_file(text_cleaning="ftfy")
    with pytest.raises(ValueError, match=r"pad_id=49408; must be an id in \[0, 49408\)"):
        CLIPTokenizer.from_bpe_file(pad_id=49408)
    with pytest.raises(ValueError, match="no '<|startoftext|>' token"):
        CLIPTokenizer({"a": 0, END_TOKEN: 1}, [])
    with pytest.raises(TypeError, match="a prompt must be a str, got int"):
        tok([1])
    with pytest.raises(FileNotFoundError, match="missing vocab.json, merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)
