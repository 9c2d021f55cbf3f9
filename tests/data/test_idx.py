"""IDX reading (against bytes written by hand), the IDX dataset, and the real Fashion-MNIST when installed."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from openldm.config import ConfigError
from openldm.data import build_dataset
from openldm.data.idx import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    IDXConfig,
    IDXDataset,
    find_idx_file,
    read_idx,
    write_idx,
)
from openldm.registry import DATASETS


def handmade_idx(array: np.ndarray, code: int, be_dtype: str) -> bytes:
    """IDX bytes built independently of write_idx: magic, big-endian dims, big-endian data."""
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(be_dtype).tobytes()


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """A 5-image train split (gz) and a 3-image test split (raw, original MNIST '.' spelling) of 28x28 images."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    train[:, :2, :] = 0  # dark top rows
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(handmade_idx(train, 0x08, ">u1")))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(handmade_idx(np.arange(5), 0x08, ">u1")))
    test = np.full((3, 28, 28), 200, dtype=np.uint8)
    (tmp_path / "t10k-images.idx3-ubyte").write_bytes(handmade_idx(test, 0x08, ">u1"))
    (tmp_path / "t10k-labels.idx1-ubyte").write_bytes(handmade_idx(np.array([9, 0, 3]), 0x08, ">u1"))
    np.save(tmp_path / "train_images.npy", train)
    return tmp_path


def test_read_idx_handmade_bytes(tmp_path: Path):
    values = np.array([[1, -2, 300], [70000, 5, -6]], dtype=np.int32)
    (tmp_path / "a").write_bytes(handmade_idx(values, 0x0C, ">i4"))
    out = read_idx(tmp_path / "a")
    assert out.dtype == np.int32 and out.dtype.isnative and np.array_equal(out, values)
    floats = np.linspace(-1, 1, 6, dtype=np.float32)
    (tmp_path / "b.gz").write_bytes(gzip.compress(handmade_idx(floats, 0x0D, ">f4")))
    assert np.array_equal(read_idx(tmp_path / "b.gz"), floats)
    (tmp_path / "c").write_bytes(gzip.compress(handmade_idx(floats, 0x0D, ">f4")))  # gz without the suffix
    assert np.array_equal(read_idx(tmp_path / "c"), floats)


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_write_idx_round_trip(tmp_path: Path, dtype: str):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    write_idx(tmp_path / "x.gz", array)
    back = read_idx(tmp_path / "x.gz")
    assert back.dtype == array.dtype and np.array_equal(back, array)
    assert (tmp_path / "x.gz").read_bytes()[:2] == b"\x1f\x8b"


def test_read_idx_rejects_bad_files(tmp_path: Path):
    (tmp_path / "bad").write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(handmade_idx(np.zeros((4, 4), np.uint8), 0x08, ">u1")[:-3])
    with pytest.raises(ValueError, match="needs 28"):
        read_idx(tmp_path / "short")
    with pytest.raises(ValueError, match="complex"):
        write_idx(tmp_path / "z", np.zeros(2, np.complex64))


def test_dataset_items(tiny_root: Path):
    ds = IDXDataset(IDXConfig(root=str(tiny_root)))
    assert len(ds) == 5 and ds.class_names == FASHION_MNIST_CLASSES
    item = ds[3]
    assert set(item) == {"image", "label"} and item["label"] == 3
    expected = torch.from_numpy(np.load(tiny_root / "train_images.npy")[3]).float() / 255 * 2 - 1
    assert item["image"].shape == (1, 28, 28) and item["image"].dtype == torch.float32
    assert torch.allclose(item["image"][0], expected)
    test = IDXDataset(IDXConfig(root=str(tiny_root), split="test"))  # raw files, '.' spelling
    assert len(test) == 3 and [test[i]["label"] for i in range(3)] == [9, 0, 3]


def test_pad_to_32_with_zeros_and_crop_back(tiny_root: Path):
    ds = IDXDataset(IDXConfig(root=str(tiny_root), size=32, silhouette_threshold=0.5))
    item = ds[1]
    assert item["image"].shape == (1, 32, 32) and item["mask"].shape == (32, 32)
    image = item["image"][0]
    assert torch.all(image[:2] == -1) and torch.all(image[-2:] == -1)  # zero padding = black background = -1
    assert torch.all(image[:, :2] == -1) and torch.all(image[:, -2:] == -1)
    assert torch.allclose(ds.crop_padding(item["image"]), IDXDataset(IDXConfig(root=str(tiny_root)))[1]["image"])
    assert torch.equal(item["mask"], ((image + 1) / 2 > 0.5).long())  # silhouette aligned with the padded image
    resized = IDXDataset(IDXConfig(root=str(tiny_root), size=16, fit="resize"))[1]["image"]
    assert resized.shape == (1, 16, 16) and resized.min() >= -1 and resized.max() <= 1
    with pytest.raises(ValueError, match="fit='resize'"):
        IDXDataset(IDXConfig(root=str(tiny_root), size=16))


def test_flip_is_deterministic_per_seed_epoch_index(tiny_root: Path):
    ds = IDXDataset(IDXConfig(root=str(tiny_root), flip=True))
    plain = IDXDataset(IDXConfig(root=str(tiny_root)))
    flips = []
    for epoch in range(8):
        ds.set_epoch(epoch)
        a, b = ds[2]["image"], plain[2]["image"]
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
        flips.append(not torch.equal(a, b))
        assert torch.equal(a, ds[2]["image"])
    assert 0 < sum(flips) < 8


def test_missing_files_name_the_file_and_the_debian_package(tmp_path: Path):
    with pytest.raises(FileNotFoundError) as err:
        IDXDataset(IDXConfig(root=str(tmp_path)))
    message = str(err.value)
    assert "train-images-idx3-ubyte.gz" in message and "dataset-fashion-mnist" in message and str(tmp_path) in message


def test_config_is_strict_and_registered(tiny_root: Path):
    assert DATASETS.get("idx") is IDXDataset and DATASETS.get("fashion_mnist") is IDXDataset
    ds = build_dataset("fashion_mnist", {"root": str(tiny_root), "split": "test", "limit": 2})
    assert len(ds) == 2
    with pytest.raises(ConfigError, match="'val'"):
        build_dataset("idx", {"root": str(tiny_root), "split": "val"})
    with pytest.raises(ConfigError, match="unknown config key"):
        build_dataset("idx", {"roots": "x"})


_REAL = Path(FASHION_MNIST_ROOT) / "train-images-idx3-ubyte.gz"


@pytest.mark.skipif(not _REAL.is_file(), reason=f"Fashion-MNIST not installed ({_REAL} missing): "
                                                "apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_counts():
    assert find_idx_file(FASHION_MNIST_ROOT, "train", "images") == _REAL
    train = IDXDataset(IDXConfig(split="train"))
    test = IDXDataset(IDXConfig(split="test", size=32))
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert np.array_equal(np.bincount(train.labels), np.full(10, 6000))
    assert np.array_equal(np.bincount(test.labels), np.full(10, 1000))
    item = test[0]
    assert item["image"].shape == (1, 32, 32) and test.class_names[item["label"]] == "ankle boot"
