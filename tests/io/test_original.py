"""Original (CompVis) single files: what our converter writes is read by diffusers' ``from_single_file`` with every
tensor equal; .ckpt files (nested state_dict, fp16, model_ema.*) load safely; unsafe pickles are refused;
inpainting checkpoints are detected from shapes; weights stay memory-mapped (no second copy)."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sd_testing import assert_same_outputs, assert_same_weights, tiny_pipeline

from openldm.diffusion.schedules import ScheduleConfig
from openldm.io import original
from openldm.io import sd as sdio
from openldm.io.components import read_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("original")
    folder, pipe = tiny_pipeline(tmp)
    single = sdio.convert(folder, tmp / "tiny.safetensors", to="original")
    return folder, pipe, single


def _plain_state(single: Path) -> dict[str, torch.Tensor]:
    """The single file's tensors without openldm metadata (as another writer would leave it)."""
    return dict(read_tensors(single)[0])


class NotAWeight:  # a custom class inside a pickle: needs full unpickling
    def __init__(self):
        self.note = "trainer state"


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where ``path`` is memory mapped in this process (Linux)."""
    name = str(path.resolve())
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(name):
                lo, hi = line.split()[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def assert_backed_by_file(module: torch.nn.Module, path: Path) -> None:
    """Every tensor of ``module`` lies inside the memory mapping of ``path``: no copy of the weights was made."""
    ranges = mapped_ranges(path)
    assert ranges, f"{path} is not memory mapped"
    for name, t in module.state_dict().items():
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        assert any(lo <= start and end <= hi for lo, hi in ranges), f"{name} is a copy, not the mapped file"


# ---- tests ---------------------------------------------------------------------------------------------------

def test_written_single_file_is_read_by_diffusers_from_single_file(tiny):
    folder, pipe, single = tiny
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(single), config=str(folder), local_files_only=True)
    sd = sdio.load_sd(single)
    assert_same_weights(sd, theirs)
    assert_same_weights(sd, pipe)
    assert_same_outputs(sd, pipe)
    keys = _plain_state(single)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert "alphas_cumprod" in keys


def test_ckpt_nested_fp16_with_ema_shapes_only(tmp_path, tiny):
    """A .ckpt as CompVis training leaves it: nested state_dict, fp16, model_ema.* and schedule buffers, no
    openldm metadata (configs derived from shapes)."""
    _, pipe, single = tiny
    state = {k: v.half() if v.is_floating_point() else v for k, v in _plain_state(single).items()}
    unet_keys = [k for k in state if k.startswith(original.UNET_PREFIX)]
    ema = {original.ema_key(k): -state[k] for k in unet_keys}  # different values, to see which are used
    assert original.ema_key("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {**state, **ema, "model_ema.decay": torch.tensor(0.9999),
                               "model_ema.num_updates": torch.tensor(10)}, "global_step": 10}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp16 schedule buffers are still SD v1's schedule
        sd = sdio.load_sd(path)
    assert {p.dtype for p in sd.unet.parameters()} == {torch.float16}
    assert sd.unet.config == sdio.load_sd(single).unet.config  # from shapes == from metadata
    assert (sd.prediction, sd.spacing, sd.steps_offset, sd.schedule) == ("eps", "leading", 1, ScheduleConfig())
    assert sd.tokenizer.pad_id == sd.tokenizer.end_id
    ref = pipe.unet.state_dict()
    from openldm.io.keymaps import unet as unet_map
    ours = unet_map.to_diffusers(sd.unet.state_dict(), sd.unet.config)
    assert all(torch.equal(ours[k], ref[k].half()) for k in ref)
    sd32 = sdio.load_sd(path, dtype=torch.float32, use_ema=True)
    ours = unet_map.to_diffusers(sd32.unet.state_dict(), sd32.unet.config)
    assert all(torch.equal(ours[k], -ref[k].half().float()) for k in ref)
    assert {p.dtype for p in sd32.text_encoder.parameters()} == {torch.float32}


def test_unsafe_ckpt_is_refused_unless_asked(tmp_path, tiny):
    _, pipe, single = tiny
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": _plain_state(single), "callbacks": NotAWeight()}, path)
    with pytest.raises(ValueError, match="--unsafe-load"):
        sdio.load_sd(path)
    sd = sdio.load_sd(path, unsafe_load=True)
    assert_same_weights(sd, pipe)


def test_inpainting_detected_from_shapes(tmp_path):
    folder, pipe = tiny_pipeline(tmp_path, in_channels=9, seed=3)
    single = sdio.convert(folder, tmp_path / "inpaint.safetensors", to="original")
    plain = tmp_path / "plain.safetensors"  # no metadata: shapes only
    save_file({k: v.contiguous() for k, v in _plain_state(single).items()}, str(plain))
    sd = sdio.load_sd(plain)
    assert sd.is_inpainting and sd.unet.config.in_channels == 4 and sd.unet.config.concat_channels == 5
    assert_same_outputs(sd, pipe)
    assert sdio.load_sd(folder).is_inpainting


def test_safetensors_weights_are_the_mapped_file(tiny):
    """Loading never holds two copies: with a matching dtype every module tensor *is* the memory-mapped file."""
    _, _, single = tiny
    sd = sdio.load_sd(single)
    for module in (sd.unet, sd.vae, sd.text_encoder):
        assert_backed_by_file(module, single)
    cast = sdio.load_sd(single, dtype=torch.bfloat16)  # casting makes the one copy in the new dtype
    assert all(p.dtype == torch.bfloat16 for p in cast.unet.parameters())


def test_ckpt_weights_are_the_mapped_file(tmp_path, tiny):
    _, _, single = tiny
    path = tmp_path / "mm.ckpt"
    torch.save({"state_dict": _plain_state(single)}, path)
    sd = sdio.load_sd(path)
    for module in (sd.unet, sd.vae, sd.text_encoder):
        assert_backed_by_file(module, path)


def test_unknown_layout_names_the_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2), "decoder.layers.0.bias": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match=r"decoder\.layers.*encoder\.weight"):
        sdio.load_sd(path)


def test_missing_component_is_named(tmp_path, tiny):
    _, _, single = tiny
    state = {k: v for k, v in _plain_state(single).items() if not k.startswith("first_stage_model.")}
    path = tmp_path / "novae.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"first_stage_model"):
        sdio.load_sd(path)


def test_sd2_open_clip_file_is_refused_clearly(tmp_path, tiny):
    _, _, single = tiny
    state = {k: v for k, v in _plain_state(single).items() if not k.startswith("cond_stage_model.")}
    state["cond_stage_model.model.token_embedding.weight"] = torch.zeros(4, 2)
    path = tmp_path / "sd2.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="SD 2"):
        sdio.load_sd(path)


def test_schedule_settings_survive_our_single_file(tmp_path, tiny):
    _, _, single = tiny
    sd = dataclasses.replace(sdio.load_sd(single), prediction="v", spacing="trailing", steps_offset=0)
    again = sdio.load_sd(original.save_original(sd, tmp_path / "v.safetensors"))
    assert (again.prediction, again.spacing, again.steps_offset) == ("v", "trailing", 0)
