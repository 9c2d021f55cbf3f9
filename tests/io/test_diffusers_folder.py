"""diffusers folders: a tiny StableDiffusionPipeline with random weights, written by diffusers itself, loads into
our modules with every tensor equal after mapping and equal outputs (1e-5); the folders we write load back in
diffusers; missing parts are named."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
from sd_testing import (
    assert_same_outputs,
    assert_same_weights,
    tiny_pipeline,
)

from openldm.diffusion.schedules import ScheduleConfig
from openldm.io import sd as sdio
from openldm.io.keymaps import unet as unet_keys

pytestmark = pytest.mark.usefixtures("one_thread")

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_pipeline(tmp_path_factory.mktemp("diffusers"))


# ---- tests ---------------------------------------------------------------------------------------------------

def test_load_diffusers_folder_matches_every_tensor_and_output(tiny):
    folder, pipe = tiny
    assert sdio.detect_format(folder) == "diffusers"
    sd = sdio.load_sd(folder)
    assert_same_weights(sd, pipe)
    assert_same_outputs(sd, pipe)
    assert sd.prediction == "eps" and sd.spacing == "leading" and sd.steps_offset == 1
    assert sd.schedule == ScheduleConfig()
    assert not sd.is_inpainting
    assert sd.unet.config.model_channels == 32 and sd.text_encoder.config.hidden_size == 128


def test_scheduler_settings_follow_the_folder(tmp_path):
    folder, _ = tiny_pipeline(tmp_path, scheduler="DDIMScheduler", prediction_type="v_prediction",
                              timestep_spacing="trailing")
    sd = sdio.load_sd(folder)
    assert (sd.prediction, sd.spacing, sd.steps_offset) == ("v", "trailing", 1)


def test_fp16_weights_load_into_fp16_bf16_fp32(tmp_path, tiny):
    folder, pipe = tiny
    half = tmp_path / "half"
    shutil.copytree(folder, half)
    for sub, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "model")):  # the fp16 variant only
        copy.deepcopy(getattr(pipe, sub)).half().save_pretrained(str(tmp_path / "v" / sub), variant="fp16")
        (half / sub / f"{name}.safetensors").unlink()
        shutil.copy(tmp_path / "v" / sub / f"{name}.fp16.safetensors", half / sub)
    for dtype in (None, torch.float16, torch.bfloat16, torch.float32):
        sd = sdio.load_sd(half, dtype=dtype)
        want = dtype or torch.float16
        assert {p.dtype for p in sd.unet.parameters()} == {want}
        assert {p.dtype for p in sd.text_encoder.parameters()} == {want}
        if dtype == torch.float32:
            ref = pipe.unet.state_dict()
            ours = unet_keys.to_diffusers(sd.unet.state_dict(), sd.unet.config)
            assert all(torch.equal(ours[k], ref[k].half().float()) for k in ref)


def test_bin_weights_load_weights_only(tmp_path, tiny):
    folder, pipe = tiny
    binf = tmp_path / "bin"
    shutil.copytree(folder, binf)
    (binf / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(pipe.vae.state_dict(), binf / "vae" / "diffusion_pytorch_model.bin")
    sd = sdio.load_sd(binf)
    assert_same_weights(sd, pipe)


def test_missing_component_is_named(tmp_path, tiny):
    folder, _ = tiny
    for part in ("text_encoder", "scheduler/scheduler_config.json", "tokenizer", "unet/diffusion_pytorch_model.safetensors"):
        broken = tmp_path / part.replace("/", "_")
        shutil.copytree(folder, broken)
        target = broken / part
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        with pytest.raises(FileNotFoundError, match=part.split("/")[0]):
            sdio.load_sd(broken)


def test_written_folder_loads_in_diffusers(tmp_path, tiny):
    folder, pipe = tiny
    sd = sdio.load_sd(folder)
    out = sdio.save_sd(sd, tmp_path / "ours", "diffusers")
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert_same_weights(sd, theirs)
    assert theirs.scheduler.config.steps_offset == 1
    assert theirs.scheduler.config.timestep_spacing == "leading"
    assert theirs.tokenizer("a cat").input_ids == pipe.tokenizer("a cat").input_ids
