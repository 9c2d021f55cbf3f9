"""Another VAE in place of a checkpoint's own (A1111's sd_vae, ComfyUI's VAELoader) against diffusers' pipelines
given that VAE (``vae=``) on a tiny random-weight SD model: text-to-image and image-to-image (whose encoding is the
chosen VAE's too), by name from a VAE folder and as a file at load; the PNG's "VAE" and the errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sd_testing import diffusers_vae, randomize, save_compvis, tiny_pipeline

from openldm.pipelines.common import GenerationParams
from openldm.pipelines.generate import GenerationRequest, RequestError
from openldm.pipelines.sources import load_generator
from openldm.pipelines.vaes import available

diffusers = pytest.importorskip("diffusers")

CALL = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 3, "width": 32, "height": 32, "seed": 5,
        "guidance_scale": 7.5}
TOLERANCE = 2  # pixel values, out of 255
NAME = "ft-tiny.safetensors"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    folder, _ = tiny_pipeline(root)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    other = diffusers_vae(11)
    vae_dir = root / "VAE"
    (vae_dir / "more").mkdir(parents=True)
    save_compvis(other, vae_dir / NAME)
    other.save_pretrained(str(vae_dir / "more" / "ft-tiny-diffusers"))  # a diffusers folder: one entry
    save_compvis(diffusers_vae(12, widths=(32, 64, 64)), vae_dir / "for-another-model.safetensors")
    return folder, pipe, other, vae_dir


def _theirs(pipe, vae, init: Image.Image | None = None) -> np.ndarray:
    euler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    cls = diffusers.StableDiffusionPipeline if init is None else diffusers.StableDiffusionImg2ImgPipeline
    p = cls(**{**pipe.components, "scheduler": euler, "vae": vae})
    p.set_progress_bar_config(disable=True)
    kw = dict(prompt=CALL["prompt"], negative_prompt=CALL["negative_prompt"], guidance_scale=CALL["guidance_scale"],
              generator=torch.Generator("cpu").manual_seed(CALL["seed"]), num_inference_steps=CALL["steps"])
    kw.update(dict(height=32, width=32) if init is None else dict(image=init, strength=0.7))
    return np.asarray(p(**kw).images[0], dtype=np.int16)


def _ours(generator, **change) -> tuple[np.ndarray, GenerationParams]:
    result = generator.generate(GenerationRequest(sampler="euler", **{**CALL, **change}))
    return np.asarray(result.images[0], dtype=np.int16), result.params[0]


def test_the_folder_lists_files_and_diffusers_folders_by_name(setup):
    names = list(available(setup[3]))
    assert names == ["for-another-model.safetensors", "ft-tiny-diffusers", NAME]


def test_a_vae_by_name_matches_diffusers_given_that_vae(setup):
    folder, pipe, other, vae_dir = setup
    generator = load_generator(folder, vae_dir=vae_dir)
    ours, params = _ours(generator, vae=NAME)
    theirs = _theirs(pipe, other)
    assert np.abs(ours - theirs).max() <= TOLERANCE
    own, own_params = _ours(generator)
    assert np.abs(own - _theirs(pipe, pipe.vae)).max() <= TOLERANCE
    assert np.abs(own - ours).mean() > 10  # the swap is not a no-op
    automatic, _ = _ours(generator, vae="Automatic")
    assert np.array_equal(automatic, own)
    as_folder, _ = _ours(generator, vae="ft-tiny-diffusers")
    assert np.array_equal(as_folder, ours)
    assert params.vae == NAME and own_params.vae is None
    text = params.to_text()
    assert f"VAE: {NAME}" in text and GenerationParams.from_text(text).vae == NAME


def test_image_to_image_encodes_with_the_chosen_vae(setup):
    folder, pipe, other, vae_dir = setup
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    ours, _ = _ours(load_generator(folder, vae_dir=vae_dir), vae=NAME, init_image=init, strength=0.7, width=None,
                    height=None)
    assert np.abs(ours - _theirs(pipe, other, init)).max() <= TOLERANCE


def test_a_vae_given_at_load_is_the_models_own_then(setup):
    folder, pipe, other, vae_dir = setup
    generator = load_generator(folder, vae=vae_dir / NAME)
    ours, params = _ours(generator)
    by_name, _ = _ours(load_generator(folder, vae_dir=vae_dir), vae=NAME)
    assert np.array_equal(ours, by_name)
    assert params.vae == NAME


def test_bad_choices_name_the_field(setup, tmp_path):
    folder, _, _, vae_dir = setup
    generator = load_generator(folder, vae_dir=vae_dir)
    with pytest.raises(RequestError, match=r"no VAE 'missing.pt' in .*ft-tiny-diffusers") as e:
        generator.generate(GenerationRequest(**CALL, vae="missing.pt"))
    assert e.value.field == "vae"
    with pytest.raises(RequestError, match="latents of 4 channels at 1/4 .* this model's are 4 channels at 1/2"):
        generator.generate(GenerationRequest(**CALL, vae="for-another-model.safetensors"))
    with pytest.raises(RequestError, match="no VAE folder is set; pass --vae-dir"):
        load_generator(folder).generate(GenerationRequest(**CALL, vae=NAME))
    with pytest.raises(ValueError, match="it is a VAE for another model"):
        load_generator(folder, vae=vae_dir / "for-another-model.safetensors")
    with pytest.raises(RequestError, match="takes no other VAE per request") as e:
        load_generator().generate(GenerationRequest(vae=NAME))
    assert e.value.field == "vae"


def diffusers_taesd(folder):
    """A random diffusers AutoencoderTiny for the tiny pipeline (downsampling 2), saved in ``folder``."""
    taesd = diffusers.AutoencoderTiny(encoder_block_out_channels=(32, 32), decoder_block_out_channels=(32, 32),
                                      num_encoder_blocks=(1, 2), num_decoder_blocks=(2, 1), latent_channels=4)
    randomize(taesd, 13)
    taesd.eval().save_pretrained(str(folder))
    return taesd


def test_taesd_in_place_of_the_vae_matches_diffusers_given_it(setup, tmp_path):
    """A TAESD (diffusers' AutoencoderTiny folder) decodes the model's scaled latents directly; image-to-image
    encodes with it and draws no posterior noise, as diffusers' pipelines do."""
    folder, pipe, _, _ = setup
    vae_dir = tmp_path / "VAE"
    taesd = diffusers_taesd(vae_dir / "taesd")
    generator = load_generator(folder, vae_dir=vae_dir)
    ours, params = _ours(generator, vae="taesd")
    assert np.abs(ours - _theirs(pipe, taesd)).max() <= TOLERANCE
    assert params.vae == "taesd"
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    ours, _ = _ours(generator, vae="taesd", init_image=init, strength=0.7, width=None, height=None)
    assert np.abs(ours - _theirs(pipe, taesd, init)).max() <= TOLERANCE


@torch.no_grad()
def test_live_previews_decode_with_the_preview_vae(setup, tmp_path):
    folder = setup[0]
    taesd = diffusers_taesd(tmp_path / "taesd")
    generator = load_generator(folder, preview_vae=tmp_path / "taesd")
    seen = []
    generator.generate(GenerationRequest(sampler="euler", **CALL), on_progress=seen.append)
    latents = seen[-1].denoised
    preview = np.asarray(generator.preview(latents), dtype=np.int16)
    theirs = ((taesd.decode(latents[:1].float()).sample / 2 + 0.5).clamp(0, 1) * 255).round()
    assert preview.shape == (32, 32, 3)
    assert np.abs(preview - theirs[0].permute(1, 2, 0).numpy()).max() <= 1
    plain = load_generator(folder).preview(latents)  # A1111's cheap linear map: one pixel per latent
    assert plain.size == (16, 16)
