"""Fashion-MNIST captions: phrases and articles, attributes measured against class tertiles, determinism, and the
dataset option that adds them."""
import numpy as np
import pytest
import torch

from openldm.data.captions import (
    TEMPLATES,
    GarmentCaptioner,
    all_captions,
    fill_template,
    garment_phrase,
    image_attributes,
)


def test_phrases_take_the_right_article_and_put_attributes_after_pair_of():
    assert garment_phrase(9, []) == "an ankle boot"
    assert garment_phrase(9, ["dark"]) == "a dark ankle boot"
    assert garment_phrase(1, []) == "a pair of trousers"
    assert garment_phrase(1, ["light", "wide"]) == "a pair of light, wide trousers"
    assert garment_phrase(2, ["light", "wide"]) == "a light, wide pullover"
    assert fill_template("{}", "an ankle boot") == "ankle boot"
    assert fill_template("a photo of {}", "an ankle boot") == "a photo of an ankle boot"
    with pytest.raises(ValueError, match="not a Fashion-MNIST class"):
        garment_phrase(10, [])


def _images(tones, widths):
    """28x28 uint8 images whose garment pixels have the given value and span the given number of columns."""
    out = np.zeros((len(tones), 28, 28), np.uint8)
    for i, (t, w) in enumerate(zip(tones, widths)):
        out[i, 4:24, 2:2 + w] = t
    return out


def test_attributes_are_measured_and_compared_with_the_class_tertiles():
    tones = [60, 60, 120, 120, 250, 250]
    widths = [5, 20, 5, 20, 12, 12]
    images = _images(tones, widths)
    tone, width = image_attributes(images)
    assert np.allclose(tone, np.array(tones) / 255) and list(width) == widths
    cap = GarmentCaptioner(images, np.zeros(6, np.int64))
    assert cap.attributes(0) == ["dark", "narrow"]
    assert cap.attributes(1) == ["dark", "wide"]
    assert cap.attributes(4) == ["light"]  # middle width: no word


def test_captions_are_deterministic_varied_and_all_listed():
    images = _images([60, 250] * 20, [5, 20] * 20)
    cap = GarmentCaptioner(images, np.arange(40) % 10)
    first = [cap.caption(i, torch.Generator().manual_seed(i)) for i in range(40)]
    again = [cap.caption(i, torch.Generator().manual_seed(i)) for i in range(40)]
    assert first == again
    assert len(set(first)) > 20
    listed = set(all_captions())
    assert set(first) <= listed and len(listed) == 10 * 9 * len(TEMPLATES)
    assert "a pair of trousers" in listed and "a photo of a dark ankle boot" in listed


def test_fashion_mnist_items_carry_captions_naming_their_class():
    from openldm.data import build_dataset
    from openldm.data.captions import GARMENTS

    data = build_dataset("fashion_mnist", {"captions": True, "limit": 200})
    for i in range(0, 200, 7):
        item = data[i]
        assert GARMENTS[item["label"]][1] in item["caption"]
    assert data[3]["caption"] == data[3]["caption"]  # same epoch, same caption
