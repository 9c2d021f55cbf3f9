"""The one generation entry point: every model kind behind load_generator, typed requests checked against the
model's capabilities, progress and cancelling, concurrency, the run directory's recommended settings."""
import math
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from sd_testing import tiny_pipeline

from openldm.cli import main
from openldm.pipelines import read_png_params
from openldm.pipelines.generate import GenerationRequest, RequestError
from openldm.pipelines.sources import load_generator
from openldm.pipelines.text_to_image import text_to_image
from openldm.pipelines.trained import sample_trained


@pytest.fixture(scope="module")
def bundled():
    return load_generator()


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    folder, _ = tiny_pipeline(tmp_path_factory.mktemp("sd"))
    return folder


def _pixels(images):
    return np.stack([np.asarray(im) for im in images])


def test_bundled_model_declares_what_it_takes_and_starts_from_its_recommended_settings(bundled):
    caps = bundled.capabilities
    assert caps.kind == "trained" and caps.name == "fashion_mnist" and caps.channels == 1
    assert caps.prompt and not caps.negative_prompt and caps.num_classes == 10
    assert caps.class_names[9] == "ankle boot"
    # the settings that meet the model's targets (guidance 2: 90 % accuracy at FID 2.8x real), from sampling.json
    assert (caps.recommended.sampler, caps.recommended.steps, caps.recommended.guidance_scale) == ("ddim", 50, 2.0)
    assert (caps.recommended.width, caps.recommended.height) == (32, 32)
    r = GenerationRequest(class_label="ankle boot").resolve(caps)
    assert (r.sampler, r.steps, r.guidance_scale, r.class_label) == ("ddim", 50, 2.0, 9)


def test_trained_generation_is_the_trained_sampler_with_the_resolved_settings(bundled):
    result = bundled.generate(GenerationRequest(class_label=3, steps=8, seed=5, num_images=2))
    ref = sample_trained(bundled.model, class_label=3, steps=8, seed=5, num_images=2, sampler="ddim",
                         guidance_scale=2.0)
    expect = ((ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    assert np.array_equal(_pixels(result.images), expect)
    assert [p.batch_index for p in result.params] == [0, 1]
    assert result.params[0].class_label == "3" and result.params[0].guidance_scale == 2.0


@pytest.mark.parametrize("change, field", [
    ({"sampler": "no_such"}, "sampler"), ({"steps": 0}, "steps"), ({"steps": 1001}, "steps"),
    ({"guidance_scale": math.nan}, "guidance_scale"), ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"negative_prompt": "blurry"}, "negative_prompt"), ({"class_label": 10}, "class_label"),
    ({"class_label": "hat"}, "class_label"), ({"width": 30}, "width"), ({"num_images": 0}, "num_images"),
    ({"seed": -1}, "seed"), ({"karras": True, "sampler": "ddim"}, "karras"), ({"strength": 0.5}, "strength"),
    ({"inputs": {"low_res": "x.png"}}, "low_res"),
])
def test_bad_requests_name_their_field(bundled, change, field):
    with pytest.raises(RequestError) as info:
        bundled.generate(GenerationRequest(**change))
    assert info.value.field == field and field.split("_")[0] in str(info.value).lower()


def test_progress_reports_every_step_and_should_stop_ends_sampling_with_the_current_estimate(bundled):
    seen = []
    result = bundled.generate(GenerationRequest(prompt="a bag", steps=10), on_progress=lambda p: seen.append(p),
                              should_stop=lambda: len(seen) >= 3)
    assert result.interrupted and [(p.step, p.total) for p in seen] == [(1, 10), (2, 10), (3, 10)]
    assert result.images[0].size == (28, 28)
    preview = bundled.preview(seen[-1].denoised)
    assert preview.size == (28, 28)
    full = bundled.generate(GenerationRequest(prompt="a bag", steps=10))
    assert not full.interrupted and not np.array_equal(_pixels(full.images), _pixels(result.images))


def test_two_requests_at_once_give_the_images_each_gives_alone(bundled):
    requests = [GenerationRequest(prompt="a dark ankle boot", steps=6, seed=1),
                GenerationRequest(class_label=1, steps=6, seed=2, num_images=2)]
    alone = [_pixels(bundled.generate(r).images) for r in requests]
    together = [None, None]

    def run(i):
        together[i] = _pixels(bundled.generate(requests[i]).images)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))


def test_stable_diffusion_weights_behind_the_same_interface(tiny_sd):
    gen = load_generator(tiny_sd)
    caps = gen.capabilities
    assert caps.kind == "stable-diffusion" and caps.negative_prompt and caps.image_to_image and caps.inpainting
    assert (caps.recommended.sampler, caps.recommended.steps, caps.recommended.guidance_scale) == ("euler", 30, 7.5)
    request = GenerationRequest(prompt="a red circle", negative_prompt="blue", steps=3, width=32, height=32, seed=4)
    seen = []
    result = gen.generate(request, on_progress=seen.append)
    expect = text_to_image(gen.parts, "a red circle", negative_prompt="blue", steps=3, width=32, height=32, seed=4,
                           progress=False)
    assert np.array_equal(_pixels(result.images), _pixels(expect)) and len(seen) == 3
    f = gen.parts.vae.downsampling_factor  # the preview is the latent grid, coloured by A1111's cheap linear map
    assert gen.preview(seen[-1].denoised).size == (32 // f, 32 // f)
    with pytest.raises(RequestError) as info:
        gen.generate(GenerationRequest(prompt="x", class_label=1))
    assert info.value.field == "class_label"


def test_a_run_directory_moved_elsewhere_still_loads_and_regenerates_from_its_png(bundled, tmp_path, monkeypatch):
    moved = tmp_path / "somewhere" / "my_model"
    shutil.copytree(bundled.model.run_dir, moved)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "boot.png"
    assert main(["generate", "--model", str(moved), "--class-label", "ankle boot", "--steps", "5", "--out", str(out),
                 "--quiet"]) == 0
    assert read_png_params(out).class_label == "9"
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--out", str(again), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))


def test_from_png_regenerates_an_image_of_the_bundled_model(tmp_path):
    out = tmp_path / "t.png"
    assert main(["generate", "--prompt", "a pair of trousers", "--steps", "5", "--num-images", "2", "--out",
                 str(out), "--quiet"]) == 0
    assert read_png_params(tmp_path / "t-1.png").model == "fashion_mnist"
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(tmp_path / "t-1.png"), "--out", str(again), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(tmp_path / "t-1.png")))
