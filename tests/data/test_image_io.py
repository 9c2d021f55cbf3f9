"""Image decoding: modes, transparency, EXIF orientation, label maps, size limits, and tensor <-> PIL."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

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


RAMP8 = np.tile(np.arange(256, dtype=np.uint8), (3, 1))  # (3, 256): 0..255 along each row


@pytest.mark.parametrize("name, build", [
    ("i16.png", lambda: Image.fromarray(RAMP8.astype(np.uint16) * 257)),  # mode I;16, 0..65535
    ("i16b.tif", lambda: Image.fromarray((RAMP8.astype(np.uint16) * 257).astype(">u2"))),  # mode I;16B
    ("i16.tif", lambda: Image.fromarray(RAMP8.astype(np.uint16) * 257)),
    ("i32.tif", lambda: Image.fromarray(np.rint(RAMP8 * ((2**31 - 1) / 255)).astype(np.int32))),  # mode I, 32-bit
    ("f.tif", lambda: Image.fromarray(RAMP8.astype(np.float32) / 255)),  # mode F, 0..1
])
def test_high_bit_depth_images_load_on_their_full_range(tmp_path: Path, name: str, build):
    """A ramp over the full range of a 16-bit, 32-bit or float image loads exactly as its 8-bit version."""
    img = build()
    img.save(tmp_path / name)
    assert Image.open(tmp_path / name).mode == img.mode
    Image.fromarray(RAMP8).save(tmp_path / "l8.png")
    for channels in (1, 3):
        expected = load_image_tensor(tmp_path / "l8.png", channels)
        got = load_image_tensor(tmp_path / name, channels)
        assert got.shape == (channels, 3, 256) and torch.equal(got, expected), (name, channels)
    assert load_image_tensor(tmp_path / name)[:, 0, -1].tolist() == [1.0, 1.0, 1.0]


def test_values_outside_the_range_are_clipped(tmp_path: Path):
    Image.fromarray(np.array([[-0.5, 0.5, 2.0]], np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(np.array([[-7, 2**31 - 1]], np.int32)).save(tmp_path / "i.tif")
    assert (load_image_tensor(tmp_path / "f.tif", 1).flatten() * 255).round().tolist() == [0, 128, 255]
    assert load_image_tensor(tmp_path / "i.tif", 1).flatten().tolist() == [0.0, 1.0]


def test_la_palette_transparency_cmyk_and_one_bit_modes(tmp_path: Path):
    grey, alpha = RAMP8[0], RAMP8[0][::-1].copy()
    Image.fromarray(np.stack([grey, alpha], -1)[None], "LA").save(tmp_path / "la.png")
    over_white = grey * (alpha / 255) + 255 * (1 - alpha / 255)
    la = load_image_tensor(tmp_path / "la.png", 1)[0, 0] * 255
    assert (la - torch.from_numpy(over_white)).abs().max() <= 1.0

    p = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    p.save(tmp_path / "p.png", transparency=1)  # palette entry 1 (green) is transparent
    assert load_image_tensor(tmp_path / "p.png")[:, 0].T.tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 1]]
    Image.fromarray(np.array([[0, 90, 255]], np.uint8)).save(tmp_path / "l_trns.png", transparency=90)
    assert load_image_tensor(tmp_path / "l_trns.png", 1).flatten().tolist() == [0.0, 1.0, 1.0]  # grey 90 -> white

    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [100, 50, 20, 10], [0, 0, 0, 255]]], np.uint8)
    Image.frombytes("CMYK", (4, 1), cmyk.tobytes()).save(tmp_path / "cmyk.tif")
    c = cmyk.astype(np.int64)
    rgb = np.rint((255 - c[..., :3]) * (255 - c[..., 3:]) / 255)[0]  # (4, 3)
    assert np.array_equal((load_image_tensor(tmp_path / "cmyk.tif")[:, 0].T * 255).round().numpy(), rgb)

    Image.fromarray(np.array([[True, False, True]])).save(tmp_path / "one.png")
    assert Image.open(tmp_path / "one.png").mode == "1"
    assert load_image_tensor(tmp_path / "one.png").tolist() == [[[1.0, 0.0, 1.0]]] * 3


def test_images_above_max_pixels_are_reduced_or_refused_before_decoding(tmp_path: Path, monkeypatch):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "big.jpg")
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.jpg", max_pixels=300).size == (16, 12)  # 1/4 scale: 192 pixels (1/2: 768)
    assert load_image(tmp_path / "big.jpg", max_pixels=64 * 48).size == (64, 48)
    assert load_image(tmp_path / "big.png", max_pixels=400).size == (20, 20)
    with pytest.raises(ValueError, match=r"big.jpg.*64x48 \(3072 pixels\), above max_image_pixels=47 even at 1/8"):
        load_image(tmp_path / "big.jpg", max_pixels=47)  # 8x6 = 48 at 1/8
    assert "max_image_pixels=399" in verify_image(tmp_path / "big.png", max_pixels=399)
    assert verify_image(tmp_path / "big.jpg", max_pixels=300) is None

    def no_decoding(self):
        raise AssertionError("decoded an image above the limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)  # refused from the header alone
    with pytest.raises(ValueError, match=r"big.png.*20x20 \(400 pixels\), above max_image_pixels=399"):
        load_image(tmp_path / "big.png", max_pixels=399)
    assert "max_image_pixels=399" in verify_image(tmp_path / "big.png", full=True, max_pixels=399)


def test_pil_decompression_bomb_guard_is_handled(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL warns above 1000 pixels and refuses above 2000
    Image.new("L", (40, 40), 7).save(tmp_path / "warned.png")
    Image.new("L", (50, 50), 7).save(tmp_path / "refused.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(tmp_path / "warned.png").size == (40, 40)  # our own limit governs: no stray warning
        with pytest.raises(ValueError, match="above max_image_pixels=1500"):
            load_image(tmp_path / "warned.png", max_pixels=1500)
        with pytest.raises(ValueError, match=r"refused.png' is too large to decode"):
            load_image(tmp_path / "refused.png")
        assert "too large" in verify_image(tmp_path / "refused.png")


def test_images_in_memory_get_the_same_range_and_background_as_files():
    """What a PIL image passed to a pipeline becomes (conditioning.inputs.as_images): a 16-bit ramp equals its 8-bit
    version, and a transparent pixel is white, as load_image makes of the same image in a file."""
    from openldm.conditioning.inputs import as_images

    wide, narrow = Image.fromarray(RAMP8.astype(np.uint16) * 257), Image.fromarray(RAMP8)
    for channels in (1, 3):
        assert torch.equal(as_images(wide, channels, None, "image"), as_images(narrow, channels, None, "image"))
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert torch.equal(as_images(clear, 3, None, "image"), torch.ones(1, 3, 8, 8))
