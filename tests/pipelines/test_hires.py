"""The hires fix (A1111's two-pass text-to-image) against diffusers on a tiny random-weight SD model: diffusers'
text-to-image, the upscale as A1111 defines it (latents interpolated, or the image resized), then diffusers'
image-to-image on a generator seeded again with the seed (as A1111 seeds its second pass), beside one openldm
request; its parameters, progress and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sd_testing import tiny_pipeline

from openldm.pipelines import read_png_params
from openldm.pipelines.common import GenerationParams
from openldm.pipelines.generate import GenerationRequest, RequestError, request_from_params
from openldm.pipelines.hires import LATENT_UPSCALERS
from openldm.pipelines.sources import load_generator

diffusers = pytest.importorskip("diffusers")

CALL = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 4, "width": 32, "height": 32, "seed": 4,
        "guidance_scale": 7.5}
HIRES = {"hires_scale": 2.0, "hires_steps": 6, "strength": 0.6}
TOLERANCE = 2  # pixel values, out of 255


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, the diffusers pipeline read back from it)."""
    folder, _ = tiny_pipeline(tmp_path_factory.mktemp("hires"))
    return folder, diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)


@pytest.fixture(scope="module")
def generator(tiny):
    return load_generator(tiny[0])


def _theirs(pipe, upscaler: str) -> np.ndarray:
    euler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    first = diffusers.StableDiffusionPipeline(**{**pipe.components, "scheduler": euler})
    second = diffusers.StableDiffusionImg2ImgPipeline(**{**pipe.components, "scheduler": euler})
    for p in (first, second):
        p.set_progress_bar_config(disable=True)
    g = torch.Generator("cpu").manual_seed(CALL["seed"])
    text = dict(prompt=CALL["prompt"], negative_prompt=CALL["negative_prompt"], guidance_scale=CALL["guidance_scale"],
                generator=g)
    size = (CALL["width"] * 2, CALL["height"] * 2)
    if upscaler in LATENT_UPSCALERS:
        latents = first(**text, num_inference_steps=CALL["steps"], height=CALL["height"], width=CALL["width"],
                        output_type="latent").images
        mode, antialias = LATENT_UPSCALERS[upscaler]
        f = pipe.vae_scale_factor
        init = F.interpolate(latents, size=(size[1] // f, size[0] // f), mode=mode, antialias=antialias)
    else:
        image = first(**text, num_inference_steps=CALL["steps"], height=CALL["height"], width=CALL["width"]).images[0]
        init = image.resize(size, {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}[upscaler])
    text["generator"] = torch.Generator("cpu").manual_seed(CALL["seed"])  # A1111 seeds the second pass again
    out = second(**text, image=init, strength=HIRES["strength"], num_inference_steps=HIRES["hires_steps"]).images[0]
    return np.asarray(out, dtype=np.int16)


def _ours(generator, **change) -> tuple[np.ndarray, GenerationParams]:
    result = generator.generate(GenerationRequest(sampler="euler", **{**CALL, **HIRES, **change}))
    return np.asarray(result.images[0], dtype=np.int16), result.params[0]


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Latent (nearest-exact)", "Lanczos",
                                      "Nearest"])
def test_the_two_passes_match_diffusers_text_to_image_upscaled_then_image_to_image(tiny, generator, upscaler):
    ours, params = _ours(generator, hires_upscaler=upscaler)
    theirs = _theirs(tiny[1], upscaler)
    assert ours.shape == theirs.shape == (64, 64, 3)
    assert np.abs(ours - theirs).max() <= TOLERANCE
    one_pass = np.asarray(generator.generate(GenerationRequest(sampler="euler", **CALL)).images[0], dtype=np.int16)
    assert one_pass.shape == (32, 32, 3)
    assert (params.width, params.height, params.hires_scale, params.hires_upscaler) == (32, 32, 2.0, upscaler)


def test_the_parameters_record_the_hires_pass_and_regenerate_the_image(generator, tmp_path):
    from openldm.pipelines.common import save_png

    result = generator.generate(GenerationRequest(sampler="euler", **{**CALL, **HIRES}))
    text = result.params[0].to_text()
    assert "Size: 32x32" in text and "Denoising strength: 0.6" in text
    assert "Hires upscale: 2, Hires upscaler: Latent, Hires steps: 6" in text
    save_png(result.images[0], tmp_path / "a.png", result.params[0])
    again = generator.generate(request_from_params(read_png_params(tmp_path / "a.png")))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))


def test_progress_counts_both_passes(generator):
    seen = []
    generator.generate(GenerationRequest(sampler="euler", **{**CALL, **HIRES}),
                       on_progress=lambda p: seen.append((p.step, p.total, tuple(p.denoised.shape[-2:]))))
    run = int(HIRES["hires_steps"] * HIRES["strength"])  # the second pass runs the last int(steps * strength)
    total = CALL["steps"] + run
    assert [s[:2] for s in seen] == [(i, total) for i in range(1, total + 1)]
    small = CALL["width"] // generator.capabilities.size_multiple  # the latents' side in each pass
    assert {s[2] for s in seen[:CALL["steps"]]} == {(small, small)}
    assert {s[2] for s in seen[CALL["steps"]:]} == {(2 * small, 2 * small)}


@pytest.mark.parametrize("change, field, says", [
    ({"hires_scale": 0.5}, "hires_scale", "in [1, 4]"),
    ({"hires_scale": float("nan")}, "hires_scale", "in [1, 4]"),
    ({"hires_scale": 1.1}, "hires_scale", "32x32 into 35x35, which is not a multiple of"),
    ({"hires_upscaler": "R-ESRGAN 4x+"}, "hires_upscaler", "is not one of Latent"),
    ({"hires_steps": 0}, "hires_steps", "1..1000"),
    ({"strength": 1.5}, "strength", "[0, 1]"),
    ({"hires_scale": None, "hires_steps": 5}, "hires_steps", "give hires_scale too"),
    ({"init_image": Image.new("RGB", (32, 32))}, "hires_scale", "for text-to-image"),
])
def test_bad_hires_requests_name_the_field(generator, change, field, says):
    with pytest.raises(RequestError) as info:
        generator.generate(GenerationRequest(sampler="euler", **{**CALL, **HIRES, **change}))
    assert info.value.field == field and says in str(info.value)


def test_a_model_trained_here_refuses_the_hires_fix():
    bundled = load_generator()
    with pytest.raises(RequestError) as info:
        bundled.generate(GenerationRequest(class_label=1, hires_scale=2.0))
    assert info.value.field == "hires_scale" and "no hires fix" in str(info.value)


def test_a1111_infotexts_of_the_hires_fix_parse_by_scale_or_by_size():
    text = ("a castle\nNegative prompt: fog\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
            "Seed: 1, Size: 512x768, Model hash: abc, Denoising strength: 0.45, Hires upscale: 1.5, Hires steps: 10, "
            "Hires upscaler: Latent (antialiased), Version: v1.10.1")
    p = GenerationParams.from_text(text)
    assert (p.hires_scale, p.hires_upscaler, p.hires_steps, p.strength) == (1.5, "Latent (antialiased)", 10, 0.45)
    r = request_from_params(p)
    assert (r.width, r.height, r.hires_scale, r.strength) == (512, 768, 1.5, 0.45)
    by_size = GenerationParams.from_text(text.replace("Hires upscale: 1.5", "Hires resize: 1024x1536"))
    assert by_size.hires_scale == 2.0 and by_size.hires_upscaler == "Latent (antialiased)"
    with pytest.raises(ValueError, match="Hires resize 1024x1024 has another aspect ratio"):
        GenerationParams.from_text(text.replace("Hires upscale: 1.5", "Hires resize: 1024x1024"))
