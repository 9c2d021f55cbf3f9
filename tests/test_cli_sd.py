"""`openldm convert` and `openldm generate` end to end on a tiny random-weight SD model written by diffusers."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from sd_testing import diffusers_vae, save_compvis, tiny_pipeline  # noqa: E402

from openldm.cli import main  # noqa: E402
from openldm.pipelines import read_png_params  # noqa: E402


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("cli")
    folder, _ = tiny_pipeline(tmp)
    out = tmp / "tiny.safetensors"
    assert main(["convert", str(folder), str(out), "--to", "original"]) == 0
    return out


def test_generate_writes_numbered_pngs_that_regenerate_themselves(single_file, tmp_path):
    out = tmp_path / "img.png"
    rc = main(["generate", "--model", str(single_file), "--prompt", "a red circle", "--negative-prompt", "blurry",
               "--sampler", "dpmpp_2m", "--karras", "--steps", "3", "--height", "32", "--width", "48",
               "--num-images", "2", "--seed", "7", "--out", str(out), "--quiet"])
    assert rc == 0
    files = [tmp_path / "img-0.png", tmp_path / "img-1.png"]
    assert all(f.is_file() for f in files)
    params = read_png_params(files[1])
    assert (params.prompt, params.negative_prompt, params.sampler, params.karras, params.steps, params.seed,
            params.width, params.height, params.batch_index) == ("a red circle", "blurry", "dpmpp_2m", True, 3, 7,
                                                                 48, 32, 1)
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(files[1]), "--model", str(single_file), "--out", str(again),
                 "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(files[1])))


def test_image_to_image_and_inpaint_from_the_cli(single_file, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(init)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert main(["generate", "--model", str(single_file), "--prompt", "x", "--init-image", str(init),
                 "--strength", "0.5", "--steps", "4", "--out", str(tmp_path / "i2i.png"), "--quiet"]) == 0
    assert Image.open(tmp_path / "i2i.png").size == (32, 32)
    assert main(["generate", "--model", str(single_file), "--prompt", "x", "--init-image", str(init),
                 "--mask", str(tmp_path / "mask.png"), "--paste-back", "--steps", "3",
                 "--out", str(tmp_path / "inp.png"), "--quiet"]) == 0
    out, src = np.asarray(Image.open(tmp_path / "inp.png")), np.asarray(Image.open(init))
    assert np.array_equal(out[mask == 0], src[mask == 0])  # pasted back outside the mask


def test_user_errors_are_one_line(single_file, tmp_path, capsys):
    assert main(["generate", "--model", str(single_file), "--prompt", "x", "--height", "31", "--out",
                 str(tmp_path / "a.png"), "--quiet"]) == 2
    assert main(["generate", "--model", str(tmp_path / "missing.safetensors"), "--prompt", "x"]) == 2
    Image.new("L", (8, 8), 255).save(tmp_path / "m.png")
    assert main(["generate", "--model", str(single_file), "--prompt", "x", "--mask", str(tmp_path / "m.png")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and "31" in errors[0] and "missing" in errors[1] and "--init-image" in errors[2]


def test_generate_png_equals_diffusers_pipeline(tmp_path):
    """The PNG `openldm generate` writes equals StableDiffusionPipeline's image for the same seed and settings."""
    folder, pipe = tiny_pipeline(tmp_path, scheduler="EulerDiscreteScheduler", timestep_spacing="leading")
    out = tmp_path / "ours.png"
    assert main(["generate", "--model", str(folder), "--prompt", "a blue square", "--negative-prompt", "red",
                 "--sampler", "euler", "--steps", "4", "--guidance-scale", "6", "--seed", "3", "--height", "32",
                 "--width", "32", "--out", str(out), "--quiet"]) == 0
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a blue square", negative_prompt="red", num_inference_steps=4, guidance_scale=6.0, height=32,
               width=32, generator=torch.Generator("cpu").manual_seed(3)).images[0]
    a, b = np.asarray(Image.open(out), dtype=np.int16), np.asarray(ref, dtype=np.int16)
    assert a.shape == b.shape
    assert (np.abs(a - b) <= 2).mean() >= 0.99


def test_generate_with_another_vae_equals_diffusers_given_it(tmp_path):
    """`--vae FILE` (a CompVis-layout file) gives StableDiffusionPipeline(vae=that VAE)'s image; the PNG names it."""
    folder, pipe = tiny_pipeline(tmp_path, scheduler="EulerDiscreteScheduler", timestep_spacing="leading")
    other = diffusers_vae(21)
    vae_file = tmp_path / "vae-ft-tiny.safetensors"
    save_compvis(other, vae_file)
    out = tmp_path / "ours.png"
    assert main(["generate", "--model", str(folder), "--prompt", "a blue square", "--sampler", "euler", "--steps", "3",
                 "--seed", "3", "--height", "32", "--width", "32", "--vae", str(vae_file), "--out", str(out),
                 "--quiet"]) == 0
    pipe.vae = other
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a blue square", num_inference_steps=3, height=32, width=32,
               generator=torch.Generator("cpu").manual_seed(3)).images[0]
    a, b = np.asarray(Image.open(out), dtype=np.int16), np.asarray(ref, dtype=np.int16)
    assert np.abs(a - b).max() <= 2
    params = read_png_params(out)
    assert params.vae == "vae-ft-tiny.safetensors"
    assert params.vae_hash == hashlib.sha256(vae_file.read_bytes()).hexdigest()[:10]  # A1111's "VAE hash"
    assert params.model_hash is None  # a diffusers folder: A1111 hashes files only


def test_a_variation_seed_from_the_cli_regenerates_from_its_png(single_file, tmp_path):
    out, plain = tmp_path / "varied.png", tmp_path / "plain.png"
    common = ["generate", "--model", str(single_file), "--prompt", "a red circle", "--steps", "2", "--height", "32",
              "--width", "32", "--seed", "7", "--quiet"]
    assert main([*common, "--subseed", "11", "--subseed-strength", "0.4", "--seed-resize-from", "48x48", "--out",
                 str(out)]) == 0
    params = read_png_params(out)
    assert (params.subseed, params.subseed_strength, params.seed_resize_from) == (11, 0.4, (48, 48))
    assert params.model_hash == hashlib.sha256(single_file.read_bytes()).hexdigest()[:10]  # A1111's "Model hash"
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--model", str(single_file), "--out", str(again), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    assert main([*common, "--out", str(plain)]) == 0
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(out)))
