"""A dataset over a folder of images (recursive), with optional captions and segmentation masks.

Captions, looked up per image in this order:
1. ``captions.jsonl`` at the root: one JSON object a line, the file under "file", "file_name", "path" or "image"
   (relative to the root) and the caption under "caption" or "text";
2. ``captions.csv`` at the root, with a header naming the same columns;
3. a sidecar text file beside the image with the same stem (``cat.png`` -> ``cat.txt``);
otherwise the caption is "". Caption files are UTF-8 (a leading byte-order mark is allowed); an image whose
caption is not valid UTF-8 is left out like an unreadable image.

Masks: ``masks`` names a folder (absolute, or relative to the root) that mirrors the image tree; the mask of
``a/b/cat.jpg`` is ``a/b/cat.png`` there (any image extension, .png first). They are label maps (see
:func:`openldm.data.image_io.load_label_map`).

Unreadable files never stop an epoch: at index time every file is checked (PIL ``verify()``, cheap; ``verify="full"``
decodes everything; an image above ``max_image_pixels`` that a reduced JPEG decode cannot bring within it is
refused from its header) and bad ones are left out, listed in ``skipped`` and reported in one warning; a file that
still fails in ``__getitem__`` (a truncated JPEG passes ``verify()``) is recorded in ``failed``, reported, and replaced
by the next readable item. With DataLoader workers, ``failed`` fills in each worker's copy; the warnings show all.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset
from tqdm.auto import tqdm

from openldm.data.image_io import IMAGE_EXTENSIONS, is_image_file, load_image_tensor, load_label_map, verify_image
from openldm.data.transforms import CROPS, Sample, image_transform, item_generator
from openldm.registry import DATASETS

CAPTION_FILES = ("captions.jsonl", "captions.csv")
FILE_KEYS = ("file", "file_name", "path", "image")
CAPTION_KEYS = ("caption", "text")
VERIFY = ("quick", "full", "none")
MASK_KINDS = ("labels", "binary")
MAX_SUBSTITUTES = 16
REPORT_FIRST = 5
CAPTION_ENCODING = "utf-8-sig"  # UTF-8, a leading byte-order mark (Windows editors) dropped


class UnreadableImageWarning(UserWarning):
    """Some image files could not be read and were skipped."""


@dataclass
class ImageFolderConfig:
    """Images under ``root`` -> shorter side ``size``, ``crop`` ("center" or "random") to size x size, optional random
    horizontal ``flip`` (do not flip when captions say left/right), [-1, 1]. ``channels``: 3 (RGB) or 1 (grey).
    ``captions``: "auto" (see the module doc), or "none". ``masks``: folder of label maps or null; ``mask_kind``:
    "labels" (long ids) or "binary" (float 1.0 where the id is not 0). ``labels_from_folders``: "label" = index of
    the image's top-level folder name in sorted order. ``verify``: "quick", "full" or "none". ``max_image_pixels``:
    the most pixels decoded of one image (JPEGs above it decode at 1/2..1/8 scale, other images above it are
    skipped; null: no limit)."""

    root: str
    size: int = 256
    crop: str = "center"
    flip: bool = False
    channels: int = 3
    captions: str = "auto"
    masks: str | None = None
    mask_kind: str = "labels"
    labels_from_folders: bool = False
    verify: str = "quick"
    max_image_pixels: int | None = 4096 * 4096
    seed: int = 0

    def __post_init__(self) -> None:
        choices = {"crop": CROPS, "captions": ("auto", "none"), "mask_kind": MASK_KINDS, "verify": VERIFY}
        for name, accepted in choices.items():
            if getattr(self, name) not in accepted:
                raise ValueError(f"ImageFolderConfig.{name}={getattr(self, name)!r}; choose one of: {', '.join(accepted)}")
        if self.channels not in (1, 3):
            raise ValueError(f"ImageFolderConfig.channels={self.channels}; choose 1 or 3")
        if self.size < 1:
            raise ValueError(f"ImageFolderConfig.size={self.size}; must be >= 1")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ValueError(f"ImageFolderConfig.max_image_pixels={self.max_image_pixels}; must be >= 1, or null "
                             "for no limit")


def utf8_problem(text: str) -> str | None:
    """Why ``text`` (decoded with errors="surrogateescape") was not valid UTF-8, or None when it was."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return f"not valid UTF-8 (byte 0x{ord(text[e.start]) - 0xDC00:02x} at character {e.start})"


def _read_caption_table(path: Path) -> dict[str, str]:
    """captions.jsonl / captions.csv -> {relative posix path: caption}; bytes that are not UTF-8 are kept as
    surrogate escapes (see :func:`utf8_problem`), so only the entries holding them are lost."""
    rows: list[dict] = []
    if path.suffix == ".jsonl":
        text = path.read_text(encoding=CAPTION_ENCODING, errors="surrogateescape")
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    else:
        with open(path, newline="", encoding=CAPTION_ENCODING, errors="surrogateescape") as f:
            rows = list(csv.DictReader(f))
    table = {}
    for n, row in enumerate(rows, 1):
        file_key = next((k for k in FILE_KEYS if isinstance(row, dict) and k in row), None)
        caption_key = next((k for k in CAPTION_KEYS if isinstance(row, dict) and k in row), None)
        if file_key is None or caption_key is None:
            found = list(row) if isinstance(row, dict) else row
            raise ValueError(f"{path} entry {n} has keys {found}; it needs a file key ({', '.join(FILE_KEYS)}) "
                             f"and a caption key ({', '.join(CAPTION_KEYS)})")
        table[Path(str(row[file_key])).as_posix().removeprefix("./")] = str(row[caption_key])
    return table


def _walk_images(root: Path, exclude: Path | None) -> list[str]:
    """Sorted posix paths, relative to ``root``, of image files below it; hidden entries and ``exclude`` left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (exclude is None or (here / d).resolve() != exclude))
        found.extend((here / f).relative_to(root).as_posix() for f in filenames
                     if not f.startswith(".") and is_image_file(f))
    return sorted(found)


@DATASETS.register("image_folder")
class ImageFolderDataset(Dataset):
    """Item: {"image": float (channels, size, size) in [-1, 1], "caption": str (when captions="auto"), "mask": (size,
    size) long ids or float binary (when masks is set), "label": int (when labels_from_folders)}. ``files``: the
    readable images (relative paths); ``skipped``: (path, reason) left out at index time; ``failed``: {path:
    reason} that failed later and were replaced."""

    config_class = ImageFolderConfig

    def __init__(self, config: ImageFolderConfig):
        self.config = c = config
        self.root = Path(c.root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist or is not a folder")
        self.mask_root = None
        if c.masks is not None:
            self.mask_root = (self.root / Path(c.masks).expanduser()).resolve()
            if not self.mask_root.is_dir():
                raise FileNotFoundError(f"mask folder {str(self.mask_root)!r} does not exist or is not a folder")
        candidates = _walk_images(self.root, self.mask_root)
        if not candidates:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(self.root)!r}")

        self.skipped: list[tuple[str, str]] = []
        self.failed: dict[str, str] = {}
        self.files: list[str] = []
        self.mask_files: list[Path | None] = []
        for rel in tqdm(candidates, desc=f"checking {self.root.name}", disable=len(candidates) < 2000 or None):
            problem, mask = None, None
            if c.verify != "none":
                problem = verify_image(self.root / rel, full=c.verify == "full", max_pixels=c.max_image_pixels)
            if problem is None and self.mask_root is not None:
                mask = self._find_mask(rel)
                problem = None if mask is not None else f"no mask {Path(rel).with_suffix('.png')} in {self.mask_root}"
            if problem is not None:
                self.skipped.append((rel, problem))
                continue
            self.files.append(rel)
            self.mask_files.append(mask)
        self.captions = self._load_captions() if c.captions == "auto" and self.files else None
        if self.skipped:
            first = "; ".join(f"{p} ({why})" for p, why in self.skipped[:REPORT_FIRST])
            warnings.warn(f"{self.root}: skipped {len(self.skipped)} of {len(candidates)} image files that cannot be "
                          f"used (listed in .skipped); first: {first}", UnreadableImageWarning, stacklevel=2)
        if not self.files:
            raise ValueError(f"none of the {len(candidates)} image files under {str(self.root)!r} can be read; "
                             f"first problem: {self.skipped[0][0]} ({self.skipped[0][1]})")

        self.class_names: list[str] = []
        self.labels: list[int] | None = None
        if c.labels_from_folders:
            loose = [rel for rel in candidates if len(Path(rel).parts) == 1]
            if loose:
                raise ValueError(f"labels_from_folders: {loose[0]!r} is not inside a class folder of {str(self.root)!r}")
            # from every file found, readable or not, so a class whose files are all bad keeps its place
            self.class_names = sorted({Path(rel).parts[0] for rel in candidates})
            index = {name: i for i, name in enumerate(self.class_names)}
            self.labels = [index[Path(rel).parts[0]] for rel in self.files]
        self.transform = image_transform(c.size, c.crop, c.flip)
        self._bad: set[int] = set()
        self.epoch = 0

    def _find_mask(self, rel: str) -> Path | None:
        stem = self.mask_root / Path(rel).with_suffix("")
        for ext in (".png", Path(rel).suffix, *IMAGE_EXTENSIONS):
            if (candidate := stem.with_name(stem.name + ext)).is_file():
                return candidate
        return None

    def _load_captions(self) -> list[str]:
        """The caption of each image; an image whose caption is not UTF-8 moves from ``files`` to ``skipped``."""
        table: dict[str, tuple[str, str]] = {}  # relative path -> (caption, the table it came from)
        for name in CAPTION_FILES:
            if (self.root / name).is_file():
                for key, caption in _read_caption_table(self.root / name).items():
                    table.setdefault(key, (caption, name))
        unmatched = set(table) - set(self.files) - {rel for rel, _ in self.skipped}
        if unmatched:
            warnings.warn(f"{self.root}: {len(unmatched)} caption entries name no image file, e.g. "
                          f"{sorted(unmatched)[:REPORT_FIRST]}", stacklevel=3)
        captions, files, mask_files = [], [], []
        for rel, mask in zip(self.files, self.mask_files):
            sidecar = (self.root / rel).with_suffix(".txt")
            if rel in table:
                caption, source = table[rel][0], f"its caption in {table[rel][1]}"
            else:
                caption, source = "", f"its caption file {sidecar.name}"
                if sidecar.is_file():
                    caption = sidecar.read_text(encoding=CAPTION_ENCODING, errors="surrogateescape").strip()
            problem = utf8_problem(caption)
            if problem is not None:
                self.skipped.append((rel, f"{source} is {problem}"))
                continue
            captions.append(caption)
            files.append(rel)
            mask_files.append(mask)
        self.files, self.mask_files = files, mask_files
        return captions

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose random crops and flips ``__getitem__`` draws."""
        self.epoch = epoch

    def _load(self, index: int) -> Sample:
        c = self.config
        mask_file = self.mask_files[index]
        # JPEG draft decoding shrinks the image; with a mask we keep full size to check the two sizes agree
        image = load_image_tensor(self.root / self.files[index], c.channels, min_size=None if mask_file else c.size,
                                  max_pixels=c.max_image_pixels)
        sample: Sample = {"image": image}
        if mask_file is not None:
            mask = load_label_map(mask_file)
            if tuple(mask.shape) != tuple(image.shape[-2:]):
                raise ValueError(f"mask {mask_file} is {mask.shape[1]}x{mask.shape[0]} but the image is "
                                 f"{image.shape[2]}x{image.shape[1]} (width x height); they must match")
            if c.mask_kind == "binary":
                mask = (mask != 0).float()
            sample["mask"] = mask
        sample = self.transform(sample, item_generator(c.seed, self.epoch, index))
        if self.captions is not None:
            sample["caption"] = self.captions[index]
        if self.labels is not None:
            sample["label"] = self.labels[index]
        return sample

    def __getitem__(self, index: int) -> Sample:
        n, attempts = len(self.files), 0
        for k in range(n):
            i = (index + k) % n
            if i in self._bad:
                continue
            if attempts == MAX_SUBSTITUTES:
                break
            attempts += 1
            try:
                return self._load(i)
            except Exception as e:  # a file that passed the index-time check but cannot be decoded
                self._bad.add(i)
                rel = self.files[i]
                self.failed[rel] = f"{type(e).__name__}: {e}"
                warnings.warn(f"{self.root}: cannot read {rel} ({self.failed[rel]}); using the next image instead "
                              f"({len(self.failed)} such failure(s) so far, listed in .failed)",
                              UnreadableImageWarning, stacklevel=2)
        raise RuntimeError(f"{self.root}: item {index} and {attempts - 1} substitutes all failed to load "
                           f"({len(self._bad)} of {n} items bad); recent failures: "
                           f"{list(self.failed.items())[-REPORT_FIRST:]}")

    def fingerprint(self) -> str:
        """Changes when the config or any indexed image, mask or caption file (name, size, mtime) changes."""
        h = hashlib.sha256(json.dumps([type(self).__name__, dataclasses.asdict(self.config)], sort_keys=True).encode())
        paths = [self.root / rel for rel in self.files] + [m for m in self.mask_files if m is not None]
        paths += [self.root / name for name in CAPTION_FILES if (self.root / name).is_file()]
        paths += [p for p in ((self.root / rel).with_suffix(".txt") for rel in self.files) if p.is_file()]
        for p in paths:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
