"""A1111's variation seeds and seed resize: the slerp against its closed form, the per-image noise against
independent draws, and whole images against diffusers given that noise as ``latents``; the batch is variations of
one image; strength 1 is the variation seed's own image; PNG parameters and errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sd_testing import tiny_pipeline

from openldm.pipelines.common import GenerationParams, draw_noise, make_generator
from openldm.pipelines.generate import GenerationRequest, RequestError, request_from_params
from openldm.pipelines.seeds import SeedVariation, initial_noise, slerp
from openldm.pipelines.sources import load_generator

diffusers = pytest.importorskip("diffusers")

CPU, F32 = torch.device("cpu"), torch.float32
CALL = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 3, "width": 32, "height": 32, "seed": 9,
        "guidance_scale": 7.5, "sampler": "euler"}


def randn(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def closed_form_slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Column by column (over H, per channel and column), the textbook slerp in float64."""
    out = np.empty_like(a, dtype=np.float64)
    for c in range(a.shape[0]):
        for w in range(a.shape[2]):
            u, v = a[:, :, w][c].astype(np.float64), b[:, :, w][c].astype(np.float64)
            omega = math.acos(np.dot(u / np.linalg.norm(u), v / np.linalg.norm(v)))
            out[c, :, w] = (math.sin((1 - t) * omega) * u + math.sin(t * omega) * v) / math.sin(omega)
    return out


def test_slerp_is_the_closed_form_and_keeps_unit_columns_on_the_sphere():
    a, b = randn(1, (4, 8, 5)), randn(2, (4, 8, 5))
    for t in (0.0, 0.3, 1.0):
        np.testing.assert_allclose(slerp(t, a, b).numpy(), closed_form_slerp(t, a.numpy(), b.numpy()), atol=2e-5)
    ua, ub = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    torch.testing.assert_close(slerp(0.4, ua, ub).norm(dim=1), torch.ones(4, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(slerp(0.7, a, a), a, atol=1e-6, rtol=0)  # one direction: no angle to divide by


def test_the_noise_per_image_is_a1111s():
    shape = (2, 4, 6, 8)
    plain = initial_noise(shape, make_generator(5), CPU, F32, seed=5, variation=SeedVariation(subseed=3))
    assert torch.equal(plain, draw_noise(shape, make_generator(5), CPU, F32))  # strength 0: the seed's batch draw
    varied = initial_noise(shape, make_generator(5), CPU, F32, seed=5, variation=SeedVariation(3, 0.25))
    for i in range(2):  # one seed for the batch, the variation seed counting up
        expected = closed_form_slerp(0.25, randn(5, shape[1:]).numpy(), randn(3 + i, shape[1:]).numpy())
        np.testing.assert_allclose(varied[i].numpy(), expected, atol=2e-5)

    small = initial_noise(shape, make_generator(5), CPU, F32, seed=5,
                          variation=SeedVariation(resize_from=(32, 16)))  # 4x2 latents inside 8x6 (factor 8)
    for i in range(2):  # without a variation the seed counts up, as A1111's
        own, kept = randn(5 + i, (4, 6, 8)), randn(5 + i, (4, 2, 4))
        assert torch.equal(small[i, :, 2:4, 2:6], kept)
        outside = torch.ones(6, 8, dtype=torch.bool)
        outside[2:4, 2:6] = False
        assert torch.equal(small[i][:, outside], own[:, outside])
    large = initial_noise((1, 4, 2, 2), make_generator(5), CPU, F32, seed=5,
                          variation=SeedVariation(resize_from=(40, 40)))  # 5x5 cropped to the centre of 2x2
    kept = randn(5, (4, 5, 5))  # (2 - 5) // 2 = -2: A1111 keeps 5 - 4 = 1 row and column, from offset 2
    assert torch.equal(large[0, :, :1, :1], kept[:, 2:3, 2:3])
    assert torch.equal(large[0, :, 1:, :], randn(5, (4, 2, 2))[:, 1:, :])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder, _ = tiny_pipeline(tmp_path_factory.mktemp("seeds"))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    euler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe = diffusers.StableDiffusionPipeline(**{**pipe.components, "scheduler": euler})
    pipe.set_progress_bar_config(disable=True)
    return load_generator(folder), pipe


def _image(result, i: int = 0) -> np.ndarray:
    return np.asarray(result.images[i], dtype=np.int16)


def test_a_variation_is_diffusers_given_that_noise_and_its_png_regenerates_it(tiny):
    generator, pipe = tiny
    result = generator.generate(GenerationRequest(**CALL, subseed=4, subseed_strength=0.3))
    shape = (4, 16, 16)  # the tiny VAE downsamples by 2
    noise = torch.from_numpy(closed_form_slerp(0.3, randn(9, shape).numpy(), randn(4, shape).numpy())).float()
    theirs = pipe(CALL["prompt"], negative_prompt=CALL["negative_prompt"], num_inference_steps=3, height=32, width=32,
                  guidance_scale=7.5, latents=noise[None], generator=torch.Generator().manual_seed(9)).images[0]
    assert np.abs(_image(result) - np.asarray(theirs, dtype=np.int16)).max() <= 2
    text = result.params[0].to_text()
    assert "Variation seed: 4, Variation seed strength: 0.3" in text
    again = generator.generate(request_from_params(GenerationParams.from_text(text)))
    assert np.array_equal(_image(again), _image(result))
    plain = generator.generate(GenerationRequest(**CALL))
    assert np.abs(_image(plain) - _image(result)).mean() > 3
    assert "Variation seed" not in plain.params[0].to_text()


def test_a_batch_is_variations_of_one_image_and_strength_1_is_the_subseeds_own(tiny):
    generator, _ = tiny
    batch = generator.generate(GenerationRequest(**{**CALL, "num_images": 2}, subseed=20, subseed_strength=0.5))
    for i in range(2):
        alone = generator.generate(GenerationRequest(**CALL, subseed=20 + i, subseed_strength=0.5))
        assert np.abs(_image(batch, i) - _image(alone)).max() <= 1
    full = generator.generate(GenerationRequest(**CALL, subseed=33, subseed_strength=1.0))
    own = generator.generate(GenerationRequest(**{**CALL, "seed": 33}))
    assert np.abs(_image(full) - _image(own)).max() <= 1


def test_the_seed_resize_keeps_the_smaller_images_noise_in_the_middle(tiny):
    generator, _ = tiny
    resized = generator.generate(GenerationRequest(**{**CALL, "width": 48, "height": 48}, seed_resize_from=(32, 32)))
    assert "Seed resize from: 32x32" in resized.params[0].to_text()
    assert GenerationParams.from_text(resized.params[0].to_text()).seed_resize_from == (32, 32)
    plain = generator.generate(GenerationRequest(**{**CALL, "width": 48, "height": 48}))
    assert not np.array_equal(_image(resized), _image(plain))


def test_the_bundled_models_variation_at_strength_1_is_the_subseeds_image():
    bundled = load_generator()
    full = bundled.generate(GenerationRequest(class_label=3, seed=1, subseed=8, subseed_strength=1.0, steps=8))
    own = bundled.generate(GenerationRequest(class_label=3, seed=8, steps=8))
    assert np.abs(_image(full) - _image(own)).max() <= 1
    half = bundled.generate(GenerationRequest(class_label=3, seed=1, subseed=8, subseed_strength=0.5, steps=8))
    assert not np.array_equal(_image(half), _image(own))


@pytest.mark.parametrize("change, field", [
    (dict(subseed_strength=0.5), "subseed"),
    (dict(subseed=3, subseed_strength=1.5), "subseed_strength"),
    (dict(subseed=-1, subseed_strength=0.5), "subseed"),
    (dict(seed_resize_from=(0, 32)), "seed_resize_from"),
    (dict(seed_resize_from=(1, 32)), "seed_resize_from"),
])
def test_bad_variations_name_the_field(tiny, change, field):
    with pytest.raises(RequestError) as e:
        tiny[0].generate(GenerationRequest(**CALL, **change))
    assert e.value.field == field
