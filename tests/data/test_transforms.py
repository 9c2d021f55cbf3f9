"""Transforms without torchvision: exact flips and crops, resizing, normalisation, and image/mask alignment."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from openldm.data.transforms import (
    CenterCrop,
    Compose,
    Normalize,
    Pad,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    ResizeShorter,
    center_crop_box,
    denormalize,
    hflip,
    image_transform,
    item_generator,
    normalize,
    pad_to,
    random_crop_box,
    resize_image,
    resize_mask,
    shorter_side_size,
)


def coordinate_sample(h: int = 12, w: int = 20) -> dict:
    """An image whose channel 0 encodes each pixel's id (row * w + col) / (h * w) and a mask holding the id itself."""
    ids = torch.arange(h * w).view(h, w)
    image = torch.stack([ids.float() / (h * w), torch.zeros(h, w), torch.ones(h, w)])
    return {"image": image, "mask": ids, "caption": "kept"}


def ids_of(sample: dict, h: int = 12, w: int = 20) -> torch.Tensor:
    return torch.round(sample["image"][0] * (h * w)).long()


def test_hflip_is_exact_and_involutive():
    s = coordinate_sample()
    flipped = hflip(s["image"])
    assert torch.equal(flipped[:, :, 0], s["image"][:, :, -1])
    assert torch.equal(flipped[:, 3, 5], s["image"][:, 3, 20 - 1 - 5])
    assert torch.equal(hflip(flipped), s["image"])


def test_random_flip_flips_mask_with_image_and_follows_the_generator():
    s = coordinate_sample()
    flip = RandomHorizontalFlip(p=1.0)
    out = flip(s, torch.Generator().manual_seed(0))
    assert torch.equal(out["mask"], s["mask"].flip(-1))
    assert torch.equal(ids_of(out), out["mask"])
    assert out["caption"] == "kept"
    assert torch.equal(RandomHorizontalFlip(p=0.0)(s, torch.Generator())["mask"], s["mask"])
    # p = 0.5: the decision is a function of the generator's state
    draws = [torch.equal(RandomHorizontalFlip()(s, item_generator(0, 0, i))["mask"], s["mask"]) for i in range(64)]
    again = [torch.equal(RandomHorizontalFlip()(s, item_generator(0, 0, i))["mask"], s["mask"]) for i in range(64)]
    assert draws == again and 16 < sum(draws) < 48


def test_random_transforms_refuse_to_run_without_a_generator():
    with pytest.raises(ValueError, match="torch.Generator"):
        RandomCrop(4)(coordinate_sample())
    with pytest.raises(ValueError, match="torch.Generator"):
        RandomHorizontalFlip()(coordinate_sample())


def test_center_crop_coordinates():
    assert center_crop_box(12, 20, 8) == (2, 6)
    assert center_crop_box(13, 21, 8) == (2, 6)  # odd margin: the extra pixel goes to bottom/right
    out = CenterCrop(8)(coordinate_sample())
    assert out["mask"][0, 0].item() == 2 * 20 + 6
    assert out["mask"].shape == (8, 8) and out["image"].shape == (3, 8, 8)
    assert torch.equal(ids_of(out), out["mask"])
    with pytest.raises(ValueError, match="larger than the image 12x20"):
        center_crop_box(12, 20, 13)


def test_random_crop_coordinates_are_uniform_inside_and_reproducible():
    boxes = [random_crop_box(12, 20, 8, item_generator(3, 0, i)) for i in range(400)]
    assert boxes == [random_crop_box(12, 20, 8, item_generator(3, 0, i)) for i in range(400)]
    tops, lefts = {b[0] for b in boxes}, {b[1] for b in boxes}
    assert tops == set(range(0, 5)) and lefts == set(range(0, 13))  # every position reachable, none outside
    g = torch.Generator().manual_seed(1)
    top, left = random_crop_box(12, 20, 8, torch.Generator().manual_seed(1))
    out = RandomCrop(8)(coordinate_sample(), g)
    assert out["mask"][0, 0].item() == top * 20 + left
    assert torch.equal(ids_of(out), out["mask"])


def test_paired_pipeline_keeps_image_and_mask_aligned():
    t = Compose([RandomCrop(8), RandomHorizontalFlip(), Pad(10, "reflect")])
    for i in range(20):
        out = t(coordinate_sample(), item_generator(0, 0, i))
        assert torch.equal(ids_of(out), out["mask"]), i


def test_resize_keeps_a_block_aligned_with_its_mask():
    """Bicubic image and nearest mask resized from 30x50 to shorter side 12: the block lands in the same place."""
    image = torch.zeros(3, 30, 50)
    mask = torch.zeros(30, 50, dtype=torch.long)
    image[:, 5:20, 10:35] = 1.0
    mask[5:20, 10:35] = 7
    out = ResizeShorter(12)({"image": image, "mask": mask})
    assert out["image"].shape == (3, 12, 20) and out["mask"].shape == (12, 20)
    assert out["mask"].dtype == torch.long and set(out["mask"].unique().tolist()) == {0, 7}
    from_image = out["image"][0] > 0.5
    from_mask = out["mask"] == 7
    iou = (from_image & from_mask).sum() / (from_image | from_mask).sum()
    assert iou > 0.9
    assert out["image"].min() >= 0 and out["image"].max() <= 1  # clamped bicubic overshoot


def test_resize_mask_is_nearest_and_matches_pil():
    labels = torch.randint(0, 5, (9, 13), generator=torch.Generator().manual_seed(0))
    ours = resize_mask(labels, 20, 31)
    pil = np.asarray(Image.fromarray(labels.numpy().astype(np.uint8)).resize((31, 20), Image.Resampling.NEAREST))
    assert torch.equal(ours, torch.from_numpy(pil.astype(np.int64)))
    assert torch.equal(resize_mask(labels, 18, 26)[::2, ::2], labels)  # 2x up then every other pixel
    assert resize_mask(labels.float(), 4, 4).dtype == torch.float32


def test_resize_image_close_to_pil_bicubic():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 40, 60, generator=g)
    ours = resize_image(img, 20, 30)
    arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pil = np.asarray(Image.fromarray(arr).resize((30, 20), Image.Resampling.BICUBIC)).astype(np.float32) / 255
    assert np.abs(ours.permute(1, 2, 0).numpy() - pil).mean() < 0.02


def test_shorter_side_size():
    assert shorter_side_size(100, 200, 50) == (50, 100)
    assert shorter_side_size(300, 200, 64) == (96, 64)
    assert shorter_side_size(64, 64, 32) == (32, 32)


def test_pad_modes():
    x = torch.arange(4.0).view(1, 2, 2)
    assert torch.equal(pad_to(x, 4)[0], torch.tensor([[0, 0, 0, 0], [0, 0, 1, 0], [0, 2, 3, 0], [0, 0, 0, 0.0]]))
    assert torch.equal(pad_to(torch.arange(9.0).view(1, 3, 3), 5, "reflect")[0, 2], torch.tensor([4, 3, 4, 5, 4.0]))
    with pytest.raises(ValueError, match="reflect"):
        pad_to(torch.zeros(1, 1, 3), 5, "reflect")
    assert pad_to(torch.zeros(28, 28, dtype=torch.long), 32).shape == (32, 32)
    with pytest.raises(ValueError, match="'wrap'"):
        pad_to(x, 4, "wrap")


def test_normalise_range():
    img = torch.tensor([0.0, 0.25, 1.0]).view(1, 1, 3)
    out = Normalize()({"image": img, "mask": torch.ones(1, 3)})
    assert torch.equal(out["image"], torch.tensor([-1.0, -0.5, 1.0]).view(1, 1, 3))
    assert torch.equal(out["mask"], torch.ones(1, 3))
    assert torch.equal(denormalize(normalize(img)), img)


def test_image_transform_pipeline_output():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 50, 70, generator=g)
    out = image_transform(32, crop="random", flip=True)({"image": img}, g)
    assert out["image"].shape == (3, 32, 32)
    assert out["image"].min() >= -1 and out["image"].max() <= 1
    with pytest.raises(ValueError, match="'middle'"):
        image_transform(32, crop="middle")
    assert Resize(5, 7)({"image": img})["image"].shape == (3, 5, 7)


def test_item_generator_is_deterministic_and_distinct():
    a = torch.rand(4, generator=item_generator(0, 1, 2))
    assert torch.equal(a, torch.rand(4, generator=item_generator(0, 1, 2)))
    assert not torch.equal(a, torch.rand(4, generator=item_generator(0, 2, 1)))
    assert not torch.equal(a, torch.rand(4, generator=item_generator(1, 1, 2)))
