"""Image decoding: modes, transparency, EXIF orientation, label maps, and tensor <-> PIL."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openldm.data.image_io import (
    load_image,
    load_image_tensor,
    load_label_map,
    pil_to_tensor,
    tensor_to_pil,
    verify_image,
)


def test_transparency_is_composited_over_white(tmp_path: Path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "t.png")
    img = load_image_tensor(tmp_path / "t.png")
    assert img.shape == (3, 4, 4)
    assert img[:, 0, 0].tolist() == [0.0, 0.0, 1.0] and img[:, 1, 1].tolist() == [1.0, 1.0, 1.0]
    assert load_image_tensor(tmp_path / "t.png", channels=1).shape == (1, 4, 4)
    with pytest.raises(ValueError, match="channels=2"):
        load_image(tmp_path / "t.png", channels=2)


def test_exif_orientation_is_applied(tmp_path: Path):
    img = Image.new("RGB", (6, 2), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (2, 6)


def test_jpeg_draft_keeps_at_least_min_size(tmp_path: Path):
    Image.new("RGB", (800, 600), (10, 200, 30)).save(tmp_path / "big.jpg")
    small = load_image(tmp_path / "big.jpg", min_size=64)
    assert min(small.size) >= 64 and small.size[0] < 800  # decoded at a reduced scale
    assert load_image(tmp_path / "big.jpg").size == (800, 600)


def test_label_maps(tmp_path: Path):
    ids = np.array([[0, 1, 2], [3, 4, 250]], dtype=np.uint8)
    Image.fromarray(ids).save(tmp_path / "l.png")
    p = Image.fromarray(ids).convert("P")
    p.putpalette([v for i in range(256) for v in (i, 0, 0)])
    p.save(tmp_path / "p.png")
    Image.fromarray(ids.astype(np.uint16) * 100).save(tmp_path / "i16.png")
    Image.fromarray(np.stack([ids] * 3, -1)).save(tmp_path / "grey_rgb.png")
    colour = np.stack([ids, ids, ids * 0], -1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    for name, expected in [("l", ids), ("p", ids), ("grey_rgb", ids), ("i16", ids.astype(np.int64) * 100)]:
        out = load_label_map(tmp_path / f"{name}.png")
        assert out.dtype == torch.long and np.array_equal(out.numpy(), expected), name
    with pytest.raises(ValueError, match="colour image"):
        load_label_map(tmp_path / "colour.png")


def test_tensor_pil_round_trip_and_verify(tmp_path: Path):
    x = torch.linspace(-1, 1, 3 * 4 * 5).view(3, 4, 5)
    pil = tensor_to_pil(x)
    assert pil.mode == "RGB" and pil.size == (5, 4)
    assert torch.allclose(pil_to_tensor(pil) * 2 - 1, x, atol=1 / 255)
    assert tensor_to_pil(x[:1]).mode == "L"
    pil.save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert verify_image(tmp_path / "ok.png") is None and verify_image(tmp_path / "ok.png", full=True) is None
    assert verify_image(tmp_path / "bad.png") is not None
