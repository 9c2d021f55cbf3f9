"""Image-folder dataset: formats, nested folders, captions (sidecar, jsonl, csv), masks, and unreadable files."""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openldm.config import ConfigError
from openldm.data import build_dataset
from openldm.data.folder import (
    ImageFolderConfig,
    ImageFolderDataset,
    UnreadableImageWarning,
)
from openldm.registry import DATASETS

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def solid(color: str, size=(24, 16)) -> Image.Image:
    return Image.new("RGB", size, COLORS[color])


def save(img: Image.Image, path: Path, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt)
    return path


def noise_jpeg_bytes(seed: int = 0) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG")
    return buf.getvalue()


def item_color(item: dict) -> str:
    """Name of the solid colour of an item's image ([-1, 1])."""
    rgb = tuple(((item["image"].mean(dim=(1, 2)) + 1) * 127.5).round().int().tolist())
    return min(COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLORS[c], rgb)))


def by_color(ds: ImageFolderDataset) -> dict[str, dict]:
    return {item_color(ds[i]): ds[i] for i in range(len(ds))}


def test_formats_nested_folders_and_sidecar_captions(tmp_path: Path):
    save(solid("red"), tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red thing\n")
    save(solid("green"), tmp_path / "sub" / "deeper" / "b.JPG", "JPEG")
    save(solid("blue"), tmp_path / "sub" / "c.webp")
    frames = [solid("white"), solid("red")]
    frames[0].save(tmp_path / "sub" / "anim.gif", save_all=True, append_images=frames[1:])  # first frame is white
    save(solid("blue"), tmp_path / "d.bmp")
    (tmp_path / "notes.md").write_text("not an image")
    save(solid("red"), tmp_path / ".hidden" / "x.png")

    ds = ImageFolderDataset(ImageFolderConfig(root=str(tmp_path), size=8))
    assert ds.files == ["a.png", "d.bmp", "sub/anim.gif", "sub/c.webp", "sub/deeper/b.JPG"]
    colors = [item_color(ds[i]) for i in range(len(ds))]
    assert colors == ["red", "blue", "white", "blue", "green"]
    item = ds[0]
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["caption"] == "a red thing" and ds[1]["caption"] == ""
    assert "label" not in item and "mask" not in item and ds.skipped == []
    grey = ImageFolderDataset(ImageFolderConfig(root=str(tmp_path), size=8, channels=1))[0]["image"]
    assert grey.shape == (1, 8, 8)


def test_captions_from_jsonl_and_csv(tmp_path: Path):
    for name, color in [("a.png", "red"), ("b.png", "green"), ("sub/c.png", "blue")]:
        save(solid(color), tmp_path / name)
    lines = [{"file_name": "a.png", "text": "from jsonl"}, {"file": "./sub/c.png", "caption": "nested, jsonl"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (tmp_path / "captions.csv").write_text('file,caption\na.png,csv loses to jsonl\nb.png,"from csv, quoted"\n')
    (tmp_path / "b.txt").write_text("sidecar loses to the tables")
    ds = ImageFolderDataset(ImageFolderConfig(root=str(tmp_path), size=8))
    assert dict(zip(ds.files, ds.captions)) == {"a.png": "from jsonl", "b.png": "from csv, quoted",
                                                "sub/c.png": "nested, jsonl"}
    assert by_color(ds)["blue"]["caption"] == "nested, jsonl"
    none = ImageFolderDataset(ImageFolderConfig(root=str(tmp_path), size=8, captions="none"))
    assert "caption" not in none[0]


def test_bad_caption_table_names_the_keys(tmp_path: Path):
    save(solid("red"), tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text("image_path,words\na.png,x\n")
    with pytest.raises(ValueError, match=r"image_path.*file_name"):
        ImageFolderDataset(ImageFolderConfig(root=str(tmp_path), size=8))


def test_masks_from_a_parallel_folder_stay_aligned(tmp_path: Path):
    """A 30x20 image whose left third is red, and a label map marking the same third, both cropped and flipped."""
    image = np.zeros((20, 30, 3), np.uint8)
    image[:, :10] = (255, 0, 0)
    labels = np.zeros((20, 30), np.uint8)
    labels[:, :10] = 3
    save(Image.fromarray(image), tmp_path / "images" / "sub" / "x.jpg", "JPEG")
    save(Image.fromarray(labels), tmp_path / "images" / "masks" / "sub" / "x.png")  # mask folder inside the root
    save(Image.fromarray(image), tmp_path / "images" / "y.png")
    save(Image.fromarray(labels, mode=None).convert("P"), tmp_path / "images" / "masks" / "y.png")
    config = ImageFolderConfig(root=str(tmp_path / "images"), masks="masks", size=12, crop="random", flip=True)
    ds = ImageFolderDataset(config)
    assert ds.files == ["sub/x.jpg", "y.png"]  # the masks folder is not taken for images
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(2):
            item = ds[i]
            mask = item["mask"]
            assert mask.shape == (12, 12) and mask.dtype == torch.long and set(mask.unique().tolist()) <= {0, 3}
            red = item["image"][0] > 0  # red channel above mid-grey
            assert ((mask == 3) == red).float().mean() > 0.9
    binary = ImageFolderDataset(ImageFolderConfig(root=str(tmp_path / "images"), masks="masks", size=12,
                                                  mask_kind="binary"))[1]["mask"]
    assert binary.dtype == torch.float32 and set(binary.unique().tolist()) == {0.0, 1.0}


def test_missing_mask_is_skipped_and_reported(tmp_path: Path):
    save(solid("red"), tmp_path / "img" / "a.png")
    save(solid("blue"), tmp_path / "img" / "b.png")
    save(Image.new("L", (24, 16), 1), tmp_path / "masks" / "a.png")
    with pytest.warns(UnreadableImageWarning, match="skipped 1 of 2"):
        ds = ImageFolderDataset(ImageFolderConfig(root=str(tmp_path / "img"), masks=str(tmp_path / "masks"), size=8))
    assert ds.files == ["a.png"] and ds.skipped[0][0] == "b.png" and "no mask" in ds.skipped[0][1]


def test_corrupt_and_truncated_files_are_skipped_counted_and_reported(tmp_path: Path):
    save(solid("red"), tmp_path / "a_good.png")
    (tmp_path / "b_garbage.jpg").write_bytes(b"this is not a jpeg at all")
    png = io.BytesIO()
    solid("green").save(png, "PNG")
    (tmp_path / "c_truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (tmp_path / "sub").mkdir()
    jpeg = noise_jpeg_bytes()
    (tmp_path / "sub" / "d_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # passes verify(), fails to decode
    save(solid("blue"), tmp_path / "sub" / "e_good.png")

    with pytest.warns(UnreadableImageWarning) as record:
        ds = ImageFolderDataset(ImageFolderConfig(root=str(tmp_path), size=8))
    message = str(record[0].message)
    assert "skipped 2 of 5" in message and "b_garbage.jpg" in message and "c_truncated.png" in message
    assert [p for p, _ in ds.skipped] == ["b_garbage.jpg", "c_truncated.png"]
    assert ds.files == ["a_good.png", "sub/d_truncated.jpg", "sub/e_good.png"]

    # a whole epoch runs; the truncated JPEG is replaced by the next readable image and recorded once
    with pytest.warns(UnreadableImageWarning, match="d_truncated.jpg"):
        colors = [item_color(ds[i]) for i in range(len(ds))]
    assert colors == ["red", "blue", "blue"]
    assert list(ds.failed) == ["sub/d_truncated.jpg"] and "truncated" in ds.failed["sub/d_truncated.jpg"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known-bad items are skipped silently from then on
        assert [item_color(ds[i]) for i in range(len(ds))] == ["red", "blue", "blue"]
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    assert next(iter(loader))["image"].shape == (3, 3, 8, 8)

    with pytest.warns(UnreadableImageWarning, match="skipped 3 of 5"):  # verify="full" decodes: catches it up front
        full = ImageFolderDataset(ImageFolderConfig(root=str(tmp_path), size=8, verify="full"))
    assert full.files == ["a_good.png", "sub/e_good.png"]


def test_nothing_readable_is_an_error(tmp_path: Path):
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of the 1 image files"), pytest.warns(UnreadableImageWarning):
        ImageFolderDataset(ImageFolderConfig(root=str(tmp_path), size=8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(ImageFolderConfig(root=str(tmp_path / "empty"), size=8))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(ImageFolderConfig(root=str(tmp_path / "missing"), size=8))


def test_labels_from_folders_and_registry(tmp_path: Path):
    save(solid("red"), tmp_path / "cats" / "1.png")
    save(solid("green"), tmp_path / "dogs" / "2.png")
    save(solid("blue"), tmp_path / "cats" / "deep" / "3.png")
    ds = build_dataset("image_folder", {"root": str(tmp_path), "size": 8, "labels_from_folders": True})
    assert DATASETS.get("image_folder") is ImageFolderDataset
    assert ds.class_names == ["cats", "dogs"] and [ds[i]["label"] for i in range(3)] == [0, 0, 1]
    with pytest.raises(ConfigError, match="'middle'"):
        build_dataset("image_folder", {"root": str(tmp_path), "crop": "middle"})


def test_mask_size_mismatch_is_a_recorded_failure(tmp_path: Path):
    save(solid("red"), tmp_path / "img" / "a.png")
    save(solid("blue"), tmp_path / "img" / "b.png")
    save(Image.new("L", (10, 10), 1), tmp_path / "masks" / "a.png")  # wrong size
    save(Image.new("L", (24, 16), 1), tmp_path / "masks" / "b.png")
    ds = ImageFolderDataset(ImageFolderConfig(root=str(tmp_path / "img"), masks="../masks", size=8))
    with pytest.warns(UnreadableImageWarning, match="they must match"):
        assert item_color(ds[0]) == "blue"
    assert list(ds.failed) == ["a.png"]


def test_fingerprint_follows_files_and_config(tmp_path: Path):
    save(solid("red"), tmp_path / "a.png")
    fp = ImageFolderDataset(ImageFolderConfig(root=str(tmp_path), size=8)).fingerprint()
    assert fp == ImageFolderDataset(ImageFolderConfig(root=str(tmp_path), size=8)).fingerprint()
    assert fp != ImageFolderDataset(ImageFolderConfig(root=str(tmp_path), size=16)).fingerprint()
    (tmp_path / "a.txt").write_text("a caption appears")
    assert fp != ImageFolderDataset(ImageFolderConfig(root=str(tmp_path), size=8)).fingerprint()


def test_captions_that_are_not_utf8_skip_their_image_and_are_reported(tmp_path: Path):
    for name, color in [("a.png", "red"), ("b.png", "green"), ("c.png", "blue"), ("d.png", "white"), ("e.png", "red")]:
        save(solid(color), tmp_path / name)
    (tmp_path / "a.txt").write_bytes("café".encode("latin-1"))  # not UTF-8
    (tmp_path / "b.txt").write_bytes("\ufeffgrün, naïve".encode("utf-8"))  # UTF-8 with a byte-order mark
    (tmp_path / "captions.jsonl").write_bytes(b'{"file": "c.png", "caption": "bad \xff byte"}\n'
                                              b'{"file": "d.png", "caption": "fine"}\n')
    (tmp_path / "captions.csv").write_bytes(b"file,caption\ne.png,\x80oops\n")
    with pytest.warns(UnreadableImageWarning) as record:
        ds = ImageFolderDataset(ImageFolderConfig(root=str(tmp_path), size=8))
    message = str(record[0].message)
    assert "skipped 3 of 5" in message and all(n in message for n in ("a.png", "c.png", "e.png"))
    assert dict(ds.skipped) == {"a.png": "its caption file a.txt is not valid UTF-8 (byte 0xe9 at character 3)",
                                "c.png": "its caption in captions.jsonl is not valid UTF-8 (byte 0xff at character 4)",
                                "e.png": "its caption in captions.csv is not valid UTF-8 (byte 0x80 at character 0)"}
    assert dict(zip(ds.files, ds.captions)) == {"b.png": "grün, naïve", "d.png": "fine"}
    assert [item_color(ds[i]) for i in range(len(ds))] == ["green", "white"] and ds[0]["caption"] == "grün, naïve"
    assert ImageFolderDataset(ImageFolderConfig(root=str(tmp_path), size=8, captions="none")).files == [
        "a.png", "b.png", "c.png", "d.png", "e.png"]  # without captions nothing is skipped


def test_images_above_max_image_pixels_are_reduced_or_skipped(tmp_path: Path):
    save(Image.fromarray(np.full((48, 64, 3), (0, 0, 255), np.uint8)), tmp_path / "big.jpg", "JPEG")
    save(solid("red", (40, 40)), tmp_path / "big.png")
    save(solid("green"), tmp_path / "small.png")
    with pytest.warns(UnreadableImageWarning, match=r"skipped 1 of 3.*big.png.*above max_image_pixels=1000"):
        ds = ImageFolderDataset(ImageFolderConfig(root=str(tmp_path), size=8, max_image_pixels=1000))
    assert ds.files == ["big.jpg", "small.png"]  # the JPEG fits at 1/2 scale (32x24 = 768 pixels)
    assert [item_color(ds[i]) for i in range(2)] == ["blue", "green"]
    unchecked = ImageFolderDataset(ImageFolderConfig(root=str(tmp_path), size=8, max_image_pixels=1000, verify="none"))
    with pytest.warns(UnreadableImageWarning, match="above max_image_pixels"):
        assert item_color(unchecked[1]) == "green"  # the PNG fails when read and is replaced
    assert list(unchecked.failed) == ["big.png"]
    assert len(ImageFolderDataset(ImageFolderConfig(root=str(tmp_path), size=8)).files) == 3  # default 4096*4096
    assert len(ImageFolderDataset(ImageFolderConfig(root=str(tmp_path), size=8, max_image_pixels=None)).files) == 3
    with pytest.raises(ConfigError, match="max_image_pixels=0"):
        build_dataset("image_folder", {"root": str(tmp_path), "max_image_pixels": 0})
