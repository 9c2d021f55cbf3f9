"""IDX files (the MNIST / Fashion-MNIST format) and a dataset over them.

IDX (LeCun et al., http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code, the number of dimensions,
each dimension as a big-endian uint32, then the data, big-endian, row-major. Files may be gzipped (detected by
their magic bytes, not by their name).

The default root is where the Debian package ``dataset-fashion-mnist`` installs Fashion-MNIST (Xiao et al. 2017):
``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from openldm.data.captions import GarmentCaptioner, all_captions
from openldm.data.transforms import Normalize, Pad, RandomHorizontalFlip, Resize, Sample, crop_center, item_generator
from openldm.io.files import atomic_path
from openldm.registry import DATASETS

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
SPLITS = {"train": "train", "test": "t10k"}
FITS = ("pad", "resize")

# IDX type code -> big-endian NumPy dtype
_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
           0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_CODES = {np.dtype(d).newbyteorder("="): c for c, d in _DTYPES.items()}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or raw) into an array of its stored shape and type (native byte order)."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file: header {data[:4].hex()!r}; expected 00 00 <type> <ndim> "
                         f"with type one of {', '.join(f'{c:#04x}' for c in _DTYPES)}")
    dtype, ndim = _DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{str(path)!r} holds {len(data)} bytes; its header (shape {shape}, {dtype}) needs {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file, atomically; gzipped when ``compress`` (default: when the name ends in .gz)."""
    path = Path(path)
    array = np.asarray(array)
    code = _CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; accepted: uint8, int8, int16, int32, float32, float64")
    data = (bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
            + array.astype(_DTYPES[code]).tobytes())
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def find_idx_file(root: str | Path, split: str, kind: str) -> Path:
    """Locate ``{train|t10k}-{images-idx3|labels-idx1}-ubyte`` under ``root``, gzipped or raw, also in the
    ``train-images.idx3-ubyte`` spelling of the original MNIST archives; raise FileNotFoundError naming what
    was tried and the Debian package that provides Fashion-MNIST."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}; choose one of: {', '.join(SPLITS)}")
    prefix, (name, dims) = SPLITS[split], {"images": ("images", 3), "labels": ("labels", 1)}[kind]
    root = Path(root)
    candidates = [f"{prefix}-{name}-idx{dims}-ubyte", f"{prefix}-{name}.idx{dims}-ubyte"]
    for stem in candidates:
        for candidate in (root / f"{stem}.gz", root / stem):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"IDX {split} {kind} not found: no {root / candidates[0]}.gz (nor {candidates[0]}, {candidates[1]}[.gz]) "
        f"in {str(root)!r}. Fashion-MNIST is provided by the Debian package {FASHION_MNIST_PACKAGE!r} "
        f"(apt-get install {FASHION_MNIST_PACKAGE}, installs to {FASHION_MNIST_ROOT}); or set root to a folder "
        f"holding MNIST-layout IDX files")


@dataclass
class IDXConfig:
    """MNIST-layout dataset. ``size`` > 28 with ``fit="pad"`` centre-pads with zeros (the datasets' black background:
    28 -> 32 adds 2 px each side; ``transforms.center_crop_box`` / ``crop_padding`` undo it); ``fit="resize"``
    resizes bicubically instead. ``flip`` mirrors at random (per seed, epoch and index). ``silhouette_threshold``
    (in [0, 1)) adds a "mask" label map (int64, 1 = pixel > threshold, 0 = background). ``class_names`` default to Fashion-MNIST's (use
    ``MNIST_CLASSES`` for digits). ``limit`` keeps the first N items. ``captions`` adds a "caption" describing the
    garment (Fashion-MNIST labels; openldm.data.captions), drawn per seed, epoch and index."""

    root: str = FASHION_MNIST_ROOT
    split: str = "train"
    size: int = 28
    fit: str = "pad"
    flip: bool = False
    silhouette_threshold: float | None = None
    class_names: list[str] = field(default_factory=lambda: list(FASHION_MNIST_CLASSES))
    limit: int | None = None
    captions: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"IDXConfig.split={self.split!r}; choose one of: {', '.join(SPLITS)}")
        if self.fit not in FITS:
            raise ValueError(f"IDXConfig.fit={self.fit!r}; choose one of: {', '.join(FITS)}")
        if self.size < 1:
            raise ValueError(f"IDXConfig.size={self.size}; must be >= 1")
        if self.silhouette_threshold is not None and not 0.0 <= self.silhouette_threshold < 1.0:
            raise ValueError(f"IDXConfig.silhouette_threshold={self.silhouette_threshold}; must be in [0, 1)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"IDXConfig.limit={self.limit}; must be >= 1 or null")


@DATASETS.register("idx")
@DATASETS.register("fashion_mnist")
class IDXDataset(Dataset):
    """Greyscale digits / garments from IDX files. Item: {"image": float (1, size, size) in [-1, 1], "label": int,
    and "mask": int64 (size, size) silhouette (0 or 1) when ``silhouette_threshold`` is set}. The whole split is held in
    memory as ``images`` (N, H, W) uint8 and ``labels`` (N,) int64."""

    config_class = IDXConfig

    def __init__(self, config: IDXConfig | None = None):
        self.config = c = config or IDXConfig()
        self.image_path = find_idx_file(c.root, c.split, "images")
        self.label_path = find_idx_file(c.root, c.split, "labels")
        images, labels = read_idx(self.image_path), read_idx(self.label_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{self.image_path} {images.shape} and {self.label_path} {labels.shape} are not "
                             f"(N, H, W) images with N labels")
        if c.limit is not None:
            images, labels = images[:c.limit], labels[:c.limit]
        self.images = images.astype(np.uint8)
        self.labels = labels.astype(np.int64)
        self.class_names = list(c.class_names)
        if len(self.labels) and int(self.labels.max()) >= len(self.class_names):
            raise ValueError(f"label {int(self.labels.max())} in {self.label_path} has no name in class_names "
                             f"({len(self.class_names)} given)")
        h, w = self.images.shape[1:]
        if c.fit == "pad" and c.size < max(h, w):
            raise ValueError(f"IDXConfig.size={c.size} with fit='pad' is smaller than the images ({h}x{w}); "
                             f"use fit='resize' or size >= {max(h, w)}")
        self.original_size = (int(h), int(w))
        self.captioner = GarmentCaptioner(self.images, self.labels) if c.captions else None
        steps = [Pad(c.size, "zeros") if c.fit == "pad" else Resize(c.size)]
        if c.flip:
            steps.append(RandomHorizontalFlip())
        self._steps = steps
        self._normalize = Normalize()
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose random flips ``__getitem__`` draws."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> Sample:
        c = self.config
        image = torch.from_numpy(self.images[index].copy()).float().div_(255.0)[None]  # (1, h, w)
        sample: Sample = {"image": image, "label": int(self.labels[index])}
        if c.silhouette_threshold is not None:
            sample["mask"] = (image[0] > c.silhouette_threshold).long()  # label map: 0 background, 1 garment
        if self.captioner is not None:
            sample["caption"] = self.captioner.caption(index, item_generator(c.seed + 1, self.epoch, index))
        generator = item_generator(c.seed, self.epoch, index) if c.flip else None
        for step in self._steps:
            sample = step(sample, generator)
        return self._normalize(sample)

    def caption_texts(self) -> list[str]:
        """Every caption this set can draw (``captions: true``), for a small CLIP's vocabulary."""
        if self.captioner is None:
            raise ValueError("this IDX data set has no captions; set captions: true")
        return all_captions(len(self.class_names))

    @property
    def crop_size(self) -> tuple[int, int] | None:
        """(h, w) to crop generated images back to: the original size when ``fit="pad"`` padded it, else None."""
        padded = self.config.fit == "pad" and (self.config.size, self.config.size) != self.original_size
        return self.original_size if padded else None

    def crop_padding(self, images: torch.Tensor) -> torch.Tensor:
        """Undo ``fit="pad"``: centre-crop (..., size, size) back to the original (..., 28, 28)."""
        if self.config.fit != "pad":
            raise ValueError("crop_padding applies to fit='pad'; with fit='resize' resize back instead")
        return crop_center(images, self.original_size)

    def fingerprint(self) -> str:
        """Changes when the config or the files (name, size, modification time) change."""
        stats = [(str(p.resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in (self.image_path, self.label_path)]
        blob = json.dumps([type(self).__name__, dataclasses.asdict(self.config), stats], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()
