"""Tarballs in the emoji npm packages' published layout, made here (no download): 43 emoji (3 held out, 2 with
skin tones), a flag, a keycap, a pointing hand; each image's left half opaque red, the right half transparent."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from openldm.data.emoji import ART, INDEX, KEYWORDS, NAMES, NpmFile, _bucket

RED, BLUE = (220, 20, 30), (20, 40, 200)


def _png(size: int, fmt: str = "PNG") -> bytes:
    """Left half opaque red, right half transparent: composited on white, the right half is white."""
    a = np.zeros((size, size, 4), np.uint8)
    a[:, : size // 2] = (*RED, 255)
    a[:, size // 2:] = (*BLUE, 0)
    buf = io.BytesIO()
    Image.fromarray(a, "RGBA").save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def _tar(folder: Path, file: NpmFile, members: dict[str, bytes]) -> None:
    with tarfile.open(folder / file.tarball, "w:gz") as tar:
        for name, data in {**members, "package/package.json": b"{}"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _codes(n: int, heldout: bool) -> list[str]:
    """``n`` code points whose emoji fall in (or out of) the held-out 5%."""
    codes = (f"1F{c:03X}" for c in range(0x300, 0xFFF))
    return [c for c in codes if (_bucket(c) < 50) == heldout][:n]


def _entry(code: str, name: str, category: str = "Food & Drink", subcategory: str = "food-fruit",
           tones: bool = False) -> dict:
    e = {"name": name.upper(), "unified": code, "non_qualified": None, "image": f"{code.lower()}.png",
         "short_name": name.replace(" ", "_"), "short_names": [name.replace(" ", "_")], "category": category,
         "subcategory": subcategory, "has_img_google": True, "has_img_twitter": True}
    if tones:
        e["skin_variations"] = {k: {"unified": f"{code}-{k}", "image": f"{code.lower()}-{k.lower()}.png",
                                    "has_img_google": True, "has_img_twitter": True}
                                for k in ("1F3FB", "1F3FF")}
    return e


def make_packages(folder: Path) -> list[dict]:
    """Write the five tarballs into ``folder``; returns emoji.json's entries."""
    seen, held = _codes(40, False), _codes(3, True)
    index = [_entry(c, f"fruit {i}") for i, c in enumerate(seen[:30])]
    index += [_entry(seen[30], "waving hand", "People & Body", "hand-fingers-open", tones=True),
              _entry(seen[31], "backhand index pointing left", "People & Body", "hand-single-finger"),
              _entry(seen[32], "flag: Japan", "Flags", "country-flag"),
              _entry(seen[33], "keycap: 1", "Symbols", "keycap"),
              _entry(seen[34], "light skin tone", "Component", "skin-tone")]
    index += [_entry(c, f"held {i}", tones=i == 0) for i, c in enumerate(held)]
    index[1]["has_img_twitter"] = False  # a style without this emoji: skipped
    chars = lambda u: "".join(chr(int(h, 16)) for h in u.split("-"))  # noqa: E731
    names = {chars(e["unified"]): {"name": e["name"].lower().replace("fruit", "plain fruit")} for e in index}
    keywords = {chars(e["unified"]): [e["short_name"], "tasty", "sweet"] for e in index}
    images = [(e["image"], e) for e in index] + [(v["image"], v) for e in index
                                                  for v in (e.get("skin_variations") or {}).values()]
    _tar(folder, INDEX, {INDEX.path: json.dumps(index).encode(),
                         **{f"package/img/google/64/{img}": _png(64) for img, _ in images}})
    _tar(folder, ART["twitter"].file, {f"package/img/twitter/64/{img}": _png(64) for img, _ in images})
    _tar(folder, ART["fluent"].file, {f"package/assets/{img[:-4]}.webp": _png(256, "WEBP") for img, _ in images[:20]})
    _tar(folder, NAMES, {NAMES.path: json.dumps(names).encode()})
    _tar(folder, KEYWORDS, {KEYWORDS.path: json.dumps(keywords).encode()})
    return index
