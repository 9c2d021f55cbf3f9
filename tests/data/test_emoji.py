"""The emoji data set, built from tarballs made here in the npm packages' published layout (no download)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from emoji_testing import RED, make_packages

from openldm.cli import main
from openldm.data import build_dataset
from openldm.data.emoji import ART, build_emoji, can_flip
from openldm.models.contrastive import prompt_vocabulary
from openldm.tokenizers.clip_bpe import CLIPTokenizer


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("packages")
    return folder, make_packages(folder)


@pytest.fixture(scope="module")
def built(packages, tmp_path_factory) -> Path:
    return build_emoji(tmp_path_factory.mktemp("emoji"), packages=packages[0], npm="no-such-npm", progress=False)


def _records(root: Path) -> list[dict]:
    return json.loads((root / "records.json").read_text())["records"]


def test_build_composites_on_white_at_both_sizes_and_skips_what_is_missing(built, packages):
    records = _records(built)
    # 37 subjects (the Component swatch dropped) + 2 tone variants each for two of them: google has all 41 images,
    # twitter lacks one emoji (has_img_twitter false), fluent has the first 20 files
    assert {r["name"] for r in records}.isdisjoint({"light skin tone"})
    counts = {s: sum(r["style"] == s for r in records) for s in ART}
    assert counts == {"google": 41, "twitter": 40, "fluent": 20}
    for size in (64, 32):
        images = np.load(built / f"emoji-{size}.npy")
        assert images.shape == (len(records), size, size, 3) and images.dtype == np.uint8
        assert np.abs(images[:, :, : size // 4].astype(int) - RED).max() <= 2  # opaque: kept
        assert (images[:, :, -size // 4:] == 255).all()  # transparent: white
    assert "CC-BY-4.0" in (built / "ATTRIBUTION.md").read_text() and "Twemoji" in (built / "ATTRIBUTION.md").read_text()


def test_heldout_split_is_by_emoji_every_style_and_tone(built):
    records = _records(built)
    by_emoji: dict[str, set[str]] = {}
    for r in records:
        by_emoji.setdefault(r["emoji"], set()).add("heldout_emoji" if r["split"] == "heldout_emoji" else "seen")
    assert all(len(s) == 1 for s in by_emoji.values())
    held = {e for e, s in by_emoji.items() if s == {"heldout_emoji"}}
    # 3 held-out emoji, one with 2 skin tones: 5 images in google and in twitter (fluent has none of them)
    assert len(held) == 3 and sum(r["emoji"] in held for r in records) == 10
    train = build_dataset("emoji", {"root": str(built), "skin_tone_fraction": 1.0})
    heldout = build_dataset("emoji", {"root": str(built), "split": "heldout_emoji", "skin_tone_fraction": 1.0})
    assert {r["emoji"] for r in train.records}.isdisjoint({r["emoji"] for r in heldout.records})
    assert len(train) + len(heldout) + len(build_dataset("emoji", {"root": str(built), "split": "heldout_images",
                                                                    "skin_tone_fraction": 1.0})) == len(records)


def test_items_captions_and_skin_tone_weighting(built):
    d = build_dataset("emoji", {"root": str(built), "skin_tone_fraction": 1.0, "empty_caption": 0.0,
                                "drop_style": 0.0, "keywords": 0.0, "flip": False})
    item = d[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].min() >= -1 and item["image"].max() <= 1
    assert d.class_names[item["label"]] == d.records[0]["category"]
    captions = [d[i]["caption"] for i in range(len(d))]
    assert all(c.endswith(ART[r["style"]].tag) for c, r in zip(captions, d.records))
    toned = [c for c, r in zip(captions, d.records) if r["tone"] == "dark skin tone"]
    assert toned and all("with dark skin tone" in c for c in toned)
    assert any(c.startswith("the flag of japan") for c in captions)
    assert len(build_dataset("emoji", {"root": str(built), "skin_tone_fraction": 0.0})) == \
        len(d) - sum(r["tone"] is not None for r in d.records)
    small = build_dataset("emoji", {"root": str(built), "size": 32})
    assert small[0]["image"].shape == (3, 32, 32)
    # over many draws: about 10% empty, the style tag dropped about 20% of the rest, a fixed draw per epoch
    d = build_dataset("emoji", {"root": str(built), "skin_tone_fraction": 1.0})
    draws = []
    for epoch in range(40):
        d.set_epoch(epoch)
        draws += [d[i]["caption"] for i in range(len(d))]
    empty = sum(c == "" for c in draws) / len(draws)
    tagged = sum(c.endswith("emoji style") for c in draws if c) / sum(1 for c in draws if c)
    assert 0.06 < empty < 0.14 and 0.74 < tagged < 0.86
    d.set_epoch(5)
    again = [d[i]["caption"] for i in range(len(d))]
    assert again == draws[5 * len(d): 6 * len(d)]  # a fixed draw per (seed, epoch, index)


def test_flips_only_what_a_mirror_leaves_the_same_and_swaps_sides(built):
    assert can_flip("red apple", "food-fruit", "Food & Drink")
    assert not can_flip("flag japan", "country-flag", "Flags") and not can_flip("keycap 1", "keycap", "Symbols")
    assert not can_flip("left arrow", "arrow", "Symbols") and not can_flip("two o’clock", "time", "Travel & Places")
    d = build_dataset("emoji", {"root": str(built), "empty_caption": 0.0, "keywords": 0.0})
    plain = build_dataset("emoji", {"root": str(built), "empty_caption": 0.0, "keywords": 0.0, "flip": False})
    flipped = {"yes": 0, "no": 0}
    for epoch in range(8):
        d.set_epoch(epoch), plain.set_epoch(epoch)
        for i, r in enumerate(d.records):
            a, b = d[i], plain[i]
            if torch.equal(a["image"], b["image"]):
                assert a["caption"] == b["caption"]
                flipped["no"] += 1
                continue
            assert r["flip"] and torch.equal(a["image"], b["image"].flip(-1))
            flipped["yes"] += 1
            if "left" in r["name"]:
                assert "pointing right" in a["caption"] and "pointing left" in b["caption"]
    assert flipped["yes"] > 0 and flipped["no"] > 0
    never = [i for i, r in enumerate(d.records) if not r["flip"]]
    assert never and {d.records[i]["category"] for i in never} >= {"Flags", "Symbols"}


def test_unbuilt_data_and_missing_npm_are_one_line_errors(tmp_path, capsys, packages, monkeypatch):
    with pytest.raises(FileNotFoundError, match="openldm data emoji"):
        build_dataset("emoji", {"root": str(tmp_path / "none")})
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on it
    assert main(["data", "emoji", "--root", str(tmp_path / "x"), "--packages", str(tmp_path / "empty"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "npm" in err[0]
    # the CLI builds from given tarballs without npm
    assert main(["data", "emoji", "--root", str(tmp_path / "y"), "--packages", str(packages[0]), "--quiet"]) == 0
    assert (tmp_path / "y" / "records.json").is_file()


def test_caption_texts_hold_every_token_a_caption_can_use(built):
    """A small CLIP's "captions" vocabulary is built from caption_texts(): every token of every drawn caption (all
    names, tones, keywords, styles, flips) is in it, and it is a few dozen tokens, not CLIP's 49,408."""
    d = build_dataset("emoji", {"root": str(built), "skin_tone_fraction": 1.0, "keywords": 1.0})
    vocabulary = set(prompt_vocabulary(d.caption_texts()))
    tokenizer = CLIPTokenizer.from_bpe_file()
    used = set()
    for epoch in range(30):
        d.set_epoch(epoch)
        used.update(i for k in range(len(d)) for i in tokenizer.encode(d[k]["caption"]))
    assert used <= vocabulary and len(vocabulary) < 200
    assert set().union(*(tokenizer.encode(w) for w in ("tasty", "dark", "japan", "twitter"))) <= used
