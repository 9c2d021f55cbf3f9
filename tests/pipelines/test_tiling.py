"""Seamless tiling (A1111's "Tiling") on a tiny random-weight SD model. The oracle is a measured property: with
circular padding the networks commute with circular shifts, so rolling the starting noise by an even number of
latent pixels rolls the image by the same amount times the autoencoder's factor (the seamless wrap), while with
zero padding it does not. The request path gives that image, and afterwards the model pads with zeros again."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sd_testing import diffusers_vae, save_compvis, tiny_pipeline

from openldm.pipelines.common import (
    GenerationParams,
    decode_latents,
    denoise,
    draw_noise,
    encode_text,
    latent_shape,
    make_generator,
    module_device_dtype,
    sampling_plan,
    to_pil,
)
from openldm.pipelines.generate import GenerationRequest, RequestError
from openldm.pipelines.sources import load_generator
from openldm.pipelines.tiling import circular_padding

CALL = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 3, "width": 32, "height": 32, "seed": 6,
        "guidance_scale": 7.5, "sampler": "euler"}
SHIFT = (4, 6)  # latent pixels, even: the tiny UNet downsamples once


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    folder, _ = tiny_pipeline(tmp_path_factory.mktemp("tiling"))
    return load_generator(folder)


def _images(parts, roll: tuple[int, int] = (0, 0)) -> torch.Tensor:
    cond, uncond = encode_text(parts, CALL["prompt"], CALL["negative_prompt"])
    plan = sampling_plan(parts, "euler", CALL["steps"])
    generator = make_generator(CALL["seed"])
    noise = draw_noise(latent_shape(parts, 1, CALL["height"], CALL["width"]), generator,
                       *module_device_dtype(parts.unet))
    x = plan.initial_sample(torch.roll(noise, roll, dims=(2, 3)))
    latents = denoise(parts, x, plan, cond, uncond, sampler="euler", guidance_scale=CALL["guidance_scale"],
                      guidance_rescale=0.0, generator=generator, progress=False)
    return decode_latents(parts.vae, latents)


def test_circular_padding_makes_the_image_wrap_around(generator):
    parts = generator.parts
    factor = generator.capabilities.size_multiple
    pixels = tuple(s * factor for s in SHIFT)
    with circular_padding(parts.unet, parts.vae) as switched:
        assert switched > 0
        base, rolled = _images(parts), _images(parts, SHIFT)
    assert torch.allclose(rolled, torch.roll(base, pixels, dims=(2, 3)), atol=1e-4)
    plain, plain_rolled = _images(parts), _images(parts, SHIFT)  # zero padding: the edges show
    assert (plain_rolled - torch.roll(plain, pixels, dims=(2, 3))).abs().max() > 0.05
    assert not torch.allclose(plain, base, atol=1e-3)


def test_a_tiling_request_gives_that_image_and_leaves_the_model_as_it_was(generator):
    before = np.asarray(generator.generate(GenerationRequest(**CALL)).images[0], dtype=np.int16)
    tiled = generator.generate(GenerationRequest(**CALL, tiling=True))
    with circular_padding(generator.parts.unet, generator.parts.vae):
        expect = np.asarray(to_pil(_images(generator.parts))[0], dtype=np.int16)
    assert np.abs(np.asarray(tiled.images[0], dtype=np.int16) - expect).max() <= 1
    after = np.asarray(generator.generate(GenerationRequest(**CALL)).images[0], dtype=np.int16)
    assert np.array_equal(before, after)
    text = tiled.params[0].to_text()
    assert "Tiling: True" in text and GenerationParams.from_text(text).tiling


def test_a_tiling_request_with_another_vae_pads_that_vae(generator, tmp_path):
    """The VAE a request picks (openldm.pipelines.vaes) wraps around too, and pads with zeros afterwards."""
    (tmp_path / "VAE").mkdir()
    save_compvis(diffusers_vae(51), tmp_path / "VAE" / "other.safetensors")
    swapped = load_generator(generator.capabilities.source, vae_dir=tmp_path / "VAE")
    tiled = swapped.generate(GenerationRequest(**CALL, tiling=True, vae="other.safetensors"))
    other = swapped.vaes.get("other.safetensors").module
    parts = swapped.parts.__class__(**{**swapped.parts.__dict__, "vae": other})
    with circular_padding(parts.unet, other):
        expect = np.asarray(to_pil(_images(parts))[0], dtype=np.int16)
    assert np.abs(np.asarray(tiled.images[0], dtype=np.int16) - expect).max() <= 1
    assert all(m.padding_mode == "zeros" for m in other.modules() if isinstance(m, torch.nn.Conv2d))


def test_tiling_is_refused_where_it_cannot_run(generator):
    with pytest.raises(RequestError) as info:
        generator.generate(GenerationRequest(**CALL, tiling=True, vae_tiling=True))
    assert info.value.field == "tiling"
    compiled = load_generator(generator.capabilities.source)
    compiled.compiled = "live weights"  # what compile_networks reports; its graphs would keep zero padding
    with pytest.raises(RequestError) as info:
        compiled.generate(GenerationRequest(**CALL, tiling=True))
    assert info.value.field == "tiling" and "compiled" in str(info.value)
    with pytest.raises(RequestError) as info:
        load_generator().generate(GenerationRequest(class_label=1, tiling=True))
    assert info.value.field == "tiling" and "seamless tiling" in str(info.value)


def test_concurrent_requests_with_and_without_tiling_get_their_own_images(generator):
    import threading

    kinds = [True, False] * 3
    alone = {t: np.asarray(generator.generate(GenerationRequest(**CALL, tiling=t)).images[0]) for t in (True, False)}
    together: list = [None] * len(kinds)

    def run(i):
        together[i] = np.asarray(generator.generate(GenerationRequest(**CALL, tiling=kinds[i])).images[0])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(kinds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(alone[t], image) for t, image in zip(kinds, together))
