"""Spatial conditioners: segmentation masks, low-resolution images with noise augmentation (Saharia et al. 2022),
inpainting's masked-image latent + mask, and the random box / brush-stroke mask generator."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from openldm.conditioning.compose import Resources
from openldm.conditioning.spatial import (
    InpaintConditioner,
    InpaintConfig,
    LowResConditioner,
    LowResConfig,
    MaskGenerator,
    MaskGeneratorConfig,
    RowShard,
    SegmentationConditioner,
    SegmentationConfig,
)
from openldm.diffusion.schedules import make_alphas_cumprod
from openldm.nn.embedding import timestep_embedding
from openldm.registry import CONDITIONERS


def test_registered_names():
    assert CONDITIONERS.get("segmentation") is SegmentationConditioner
    assert CONDITIONERS.get("low_res") is LowResConditioner
    assert CONDITIONERS.get("inpaint") is InpaintConditioner


# ----------------------------------------------------------------------------------------- segmentation


def test_segmentation_label_map_and_one_hot_agree_and_resize_to_the_latent():
    c = SegmentationConditioner(SegmentationConfig(num_classes=3, channels=4, resize="area"))
    labels = torch.randint(0, 3, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    s = c({"mask": labels}, latent_size=(4, 4))
    assert set(s.as_kwargs()) == {"concat"} and s.concat.shape == (2, 4, 4, 4)
    one_hot = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(s.concat, c({"mask": one_hot}, latent_size=(4, 4)).concat)
    torch.testing.assert_close(s.concat, c({"mask": labels[:, None]}, latent_size=(4, 4)).concat)
    fractions = F.avg_pool2d(one_hot, 4)  # "area" = each class's share of every 4x4 cell
    torch.testing.assert_close(s.concat, c.conv(fractions))
    assert c.slot_dims().concat_channels == 4


def test_segmentation_null_is_the_conv_bias_and_differs_from_every_class():
    c = SegmentationConditioner(SegmentationConfig(num_classes=2, channels=3))
    null = c.null(2, latent_size=(5, 6)).concat
    assert null.shape == (2, 3, 5, 6) and torch.equal(null, c.conv.bias.view(1, 3, 1, 1).expand(2, 3, 5, 6))
    for k in range(2):
        real = c({"mask": torch.full((1, 5, 6), k)}, latent_size=(5, 6)).concat
        assert not torch.allclose(real[0], null[0])


def test_segmentation_errors_name_the_value():
    c = SegmentationConditioner(SegmentationConfig(num_classes=2))
    with pytest.raises(ValueError, match=r"label 5 .* 0\.\.1"):
        c({"mask": torch.full((1, 4, 4), 5)}, latent_size=(4, 4))
    with pytest.raises(ValueError, match=r"one-hot \(B, 2, H, W\)"):
        c({"mask": torch.zeros(1, 3, 4, 4)}, latent_size=(4, 4))
    with pytest.raises(ValueError, match="latent_size"):
        c({"mask": torch.zeros(1, 4, 4, dtype=torch.long)})


# ------------------------------------------------------------------------------------- super-resolution


def test_low_res_slots_shapes_and_null():
    c = LowResConditioner(LowResConfig(channels=3, embed_dim=32))
    s = c({"low_res": torch.rand(2, 3, 7, 7) * 2 - 1}, generator=torch.Generator().manual_seed(0), latent_size=(28, 28))
    assert s.concat.shape == (2, 3, 28, 28) and s.vector.shape == (2, 32)
    null = c.null(2, latent_size=(28, 28))
    assert (null.concat == 0).all() and (null.vector == 0).all()
    # the zero vector is never a level's embedding: every (cos, sin) pair of an embedding has norm 1
    pairs = s.vector.view(2, 2, 16)
    torch.testing.assert_close(pairs.pow(2).sum(1), torch.ones(2, 16))
    assert c.slot_dims().vector_dim == 32 and c.slot_dims().concat_channels == 3


def test_low_res_training_levels_are_uniform_and_feed_the_vector():
    c = LowResConditioner(LowResConfig(channels=1, max_noise_level=350, embed_dim=16)).train()
    g = torch.Generator().manual_seed(0)
    n = 20000
    levels = c.noise_levels({}, n, g)
    assert levels.min() >= 0 and levels.max() <= 350 and levels.unique().numel() > 340
    mean_se = math.sqrt((351**2 - 1) / 12 / n)  # discrete uniform on 0..350
    assert abs(levels.float().mean() - 175) < 5 * mean_se
    g = torch.Generator().manual_seed(3)
    s = c({"low_res": torch.zeros(4, 1, 4, 4)}, generator=g, latent_size=(4, 4))
    expected = c.noise_levels({}, 4, torch.Generator().manual_seed(3))  # the levels are drawn first
    torch.testing.assert_close(s.vector, timestep_embedding(expected, 16))


@pytest.mark.parametrize("level", [20, 150, 350])
def test_low_res_noise_augmentation_statistics(level):
    c = LowResConditioner(LowResConfig(channels=3)).eval()
    ab = make_alphas_cumprod(c.config.schedule)[level]
    x = torch.linspace(-1, 1, 16).view(1, 1, 4, 4).expand(64, 3, 4, 4)
    s = c({"low_res": x, "noise_level": level}, generator=torch.Generator().manual_seed(level), latent_size=(32, 32))
    up = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    eps = (s.concat - ab.sqrt() * up) / (1 - ab).sqrt()  # the injected noise, recovered
    n = eps.numel()
    assert abs(eps.mean()) < 5 / math.sqrt(n) and abs(eps.std() - 1) < 5 * math.sqrt(0.5 / n)
    torch.testing.assert_close(s.vector, timestep_embedding(torch.full((64,), level), 128))


def test_low_res_eval_uses_the_sampling_level_and_rejects_bad_levels():
    c = LowResConditioner(LowResConfig(channels=1, sample_noise_level=20, embed_dim=8)).eval()
    s = c({"low_res": torch.zeros(2, 1, 2, 2)}, generator=torch.Generator().manual_seed(0), latent_size=(2, 2))
    torch.testing.assert_close(s.vector, timestep_embedding(torch.tensor([20, 20]), 8))
    with pytest.raises(ValueError, match=r"noise level 1000 .* 0\.\.999"):
        c({"low_res": torch.zeros(1, 1, 2, 2), "noise_level": 1000}, latent_size=(2, 2))
    with pytest.raises(ValueError, match="0..999"):
        LowResConfig(max_noise_level=1000)


# --------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("lo, hi, size, stroke_prob", [
    (0.1, 0.5, (32, 32), 0.5), (0.3, 0.32, (28, 28), 0.5), (0.05, 0.2, (16, 24), 1.0), (0.5, 0.9, (32, 32), 0.0),
])
def test_mask_generator_covers_between_the_configured_fractions(lo, hi, size, stroke_prob):
    gen = MaskGenerator(MaskGeneratorConfig(min_fraction=lo, max_fraction=hi, stroke_prob=stroke_prob))
    masks = gen(48, size, torch.Generator().manual_seed(0))
    assert masks.shape == (48, 1, *size) and set(masks.unique().tolist()) <= {0.0, 1.0}
    cover = masks.mean((1, 2, 3))
    assert cover.min() >= lo - 1e-6 and cover.max() <= hi + 1e-6, (cover.min(), cover.max())
    if hi - lo > 0.1:
        assert cover.std() > 0.03  # spread over the range, not stuck at one value


def test_mask_generator_is_reproducible_and_draws_boxes_and_strokes():
    cfg = MaskGeneratorConfig(0.1, 0.5)
    a = MaskGenerator(cfg)(8, (32, 32), torch.Generator().manual_seed(1))
    assert torch.equal(a, MaskGenerator(cfg)(8, (32, 32), torch.Generator().manual_seed(1)))
    assert not torch.equal(a, MaskGenerator(cfg)(8, (32, 32), torch.Generator().manual_seed(2)))

    def is_rectangle(m: torch.Tensor) -> bool:
        rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
        return bool(m[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1].all())

    strokes = MaskGenerator(MaskGeneratorConfig(0.02, 0.06, stroke_prob=1.0))(16, (64, 64), torch.Generator().manual_seed(0))
    assert sum(not is_rectangle(m[0].bool()) for m in strokes) >= 12  # poly-lines are rarely rectangles
    boxes = MaskGenerator(MaskGeneratorConfig(0.02, 0.5, stroke_prob=0.0))(16, (32, 32), torch.Generator().manual_seed(0))
    assert any(is_rectangle(m[0].bool()) for m in boxes)


def test_mask_generator_rejects_impossible_fractions():
    with pytest.raises(ValueError, match="min <= max"):
        MaskGeneratorConfig(0.6, 0.4)
    with pytest.raises(ValueError, match="4x4"):
        MaskGenerator(MaskGeneratorConfig(0.30, 0.31))(1, (4, 4))


# ----------------------------------------------------------------------------------------- inpainting


class PoolEncoder:
    """A stand-in autoencoder encoder: 4x average pooling then a fixed channel mix, recording its inputs."""

    def __init__(self):
        self.inputs = []
        self.mix = torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(0))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return F.conv2d(F.avg_pool2d(x, 4), self.mix)


def test_inpaint_concat_is_mask_then_masked_image_latent():
    enc = PoolEncoder()
    c = InpaintConditioner(InpaintConfig(latent_channels=4), enc)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:12, 0:8] = 1
    s = c({"image": image, "inpaint_mask": mask}, latent_size=(4, 4))
    assert s.concat.shape == (2, 5, 4, 4) and c.slot_dims().concat_channels == 5
    assert torch.equal(enc.inputs[-1], image * (1 - mask))  # the holes are blanked before encoding
    torch.testing.assert_close(s.concat[:, 1:], enc(image * (1 - mask)))
    assert torch.equal(s.concat[:, :1], F.interpolate(mask, size=(4, 4), mode="nearest"))
    assert not s.concat.requires_grad
    bool_mask = c({"image": image, "inpaint_mask": mask[:, 0].bool()}, latent_size=(4, 4))
    assert torch.equal(bool_mask.concat, s.concat)
    assert copy.deepcopy(c)._encode.value is enc  # an EMA copy shares the autoencoder


def test_inpaint_draws_masks_when_the_batch_has_none_and_null_means_nothing_known():
    cfg = InpaintConfig(latent_channels=3, masks=MaskGeneratorConfig(0.2, 0.4))
    c = InpaintConditioner(cfg)  # pixel space: no encoder
    image = torch.rand(4, 3, 8, 8) + 1  # strictly positive, so the holes are exactly the zeros
    s = c({"image": image}, generator=torch.Generator().manual_seed(0), latent_size=(8, 8))
    holes = s.concat[:, :1] == 1
    cover = holes.float().mean((1, 2, 3))
    assert (cover >= 0.2).all() and (cover <= 0.4).all()
    assert torch.equal(s.concat[:, 1:] == 0, holes.expand(-1, 3, -1, -1))
    null = c.null(2, latent_size=(8, 8)).concat
    assert (null[:, 0] == 1).all() and (null[:, 1:] == 0).all()
    assert list(c.state_dict()) == []


def test_inpaint_latent_channels_come_from_the_resources_when_unset():
    c = InpaintConditioner.build(InpaintConfig(), Resources(encode=PoolEncoder(), latent_channels=3))
    assert c.config.latent_channels == 3 and c.concat_channels == 4
    assert InpaintConditioner.build(InpaintConfig(latent_channels=2), Resources(latent_channels=3)).concat_channels == 3
    with pytest.raises(ValueError, match="options.latent_channels"):
        InpaintConditioner.build(InpaintConfig(), Resources())


def test_inpaint_errors_name_the_shapes():
    c = InpaintConditioner(InpaintConfig(latent_channels=4), PoolEncoder())
    with pytest.raises(ValueError, match=r"\(2, 1, 16, 16\)"):
        c({"image": torch.zeros(2, 3, 16, 16), "inpaint_mask": torch.zeros(2, 1, 8, 8)}, latent_size=(4, 4))
    with pytest.raises(ValueError, match="latent_size"):
        c({"image": torch.zeros(2, 3, 16, 16), "inpaint_mask": torch.zeros(2, 16, 16)}, latent_size=(8, 8))
    with pytest.raises(ValueError, match="latent_channels=3"):
        InpaintConditioner(InpaintConfig(latent_channels=3), PoolEncoder())({"image": torch.zeros(1, 3, 8, 8)}, latent_size=(2, 2))


# ------------------------------------------------------------------------------------ data-parallel draws


def test_sharded_draws_equal_one_process_with_the_whole_batch():
    """Two "ranks" holding rows 0, 2, ... and 1, 3, ... of a batch of 4 draw the noise levels, noise and masks one
    process draws for the whole batch, and leave the generator where that process leaves it."""
    low_res = LowResConditioner(LowResConfig(channels=3, embed_dim=8)).train()
    inpaint = InpaintConditioner(InpaintConfig(latent_channels=3))
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    small = F.interpolate(images, size=(2, 2), mode="area")

    def draw(shard, rows):
        low_res.shard = inpaint.shard = shard
        g = torch.Generator().manual_seed(1)
        a = low_res({"low_res": small[rows]}, generator=g, latent_size=(8, 8))
        b = inpaint({"image": images[rows]}, generator=g, latent_size=(8, 8))
        return a.vector, a.concat, b.concat, torch.rand(1, generator=g)

    whole = draw(RowShard(), slice(None))
    for rank in (0, 1):
        part = draw(RowShard(rank, 2), slice(rank, None, 2))
        for got, want in zip(part[:3], whole[:3]):
            torch.testing.assert_close(got, want[rank::2], rtol=0, atol=1e-6)
        assert torch.equal(part[3], whole[3])  # the generator advanced as much
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        RowShard(2, 2)
