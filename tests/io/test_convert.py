"""Conversion between the three layouts: round trips give identical tensors, the openldm folder loads, writes are
atomic; and (slow) the full SD v1.5 topology written as a single file is read by diffusers' from_single_file."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sd_testing import assert_same_outputs, assert_same_weights, tiny_pipeline

from openldm.diffusion.schedules import ScheduleConfig
from openldm.io import sd as sdio
from openldm.io.components import StableDiffusionComponents, read_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

diffusers = pytest.importorskip("diffusers")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_tensors(path)[0]


def test_round_trip_original_diffusers_openldm_original(tmp_path):
    folder, pipe = tiny_pipeline(tmp_path)
    first = sdio.convert(folder, tmp_path / "a.safetensors", to="original")
    dif = sdio.convert(first, tmp_path / "dif", to="diffusers")
    ours = sdio.convert(dif, tmp_path / "ours", to="openldm")
    assert sdio.detect_format(ours) == "openldm"
    last = sdio.convert(ours, tmp_path / "b.safetensors", to="original")
    a, b = _tensors(first), _tensors(last)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_tensors(first)[1] == read_tensors(last)[1]  # configs and settings too
    sd = sdio.load_sd(ours)
    assert_same_weights(sd, pipe)
    assert_same_outputs(sd, pipe)
    assert (sd.prediction, sd.spacing, sd.steps_offset, sd.schedule) == ("eps", "leading", 1, ScheduleConfig())
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary leftovers


def test_convert_casts_and_refuses_bad_targets(tmp_path):
    folder, _ = tiny_pipeline(tmp_path)
    half = sdio.convert(folder, tmp_path / "half.safetensors", to="original", dtype=torch.float16)
    assert {t.dtype for k, t in _tensors(half).items() if k.startswith("model.")} == {torch.float16}
    with pytest.raises(FileExistsError, match="overwrite"):
        sdio.convert(folder, half, to="original")
    with pytest.raises(ValueError, match="original, diffusers, openldm"):
        sdio.convert(folder, tmp_path / "x", to="ckpt")
    sdio.convert(folder, tmp_path / "ours", to="openldm")
    with pytest.raises(FileExistsError):
        sdio.convert(folder, tmp_path / "ours", to="openldm")
    sdio.convert(half, tmp_path / "ours", to="openldm", overwrite=True)
    assert sdio.load_sd(tmp_path / "ours").unet.conv_in.weight.dtype == torch.float16


def test_unrecognised_folder_says_what_it_holds(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="weights.txt"):
        sdio.load_sd(tmp_path)


@pytest.mark.slow
def test_sd15_topology_single_file_read_by_from_single_file(tmp_path):
    """Full SD v1.5 sizes with random weights: our converter's single file, read by diffusers with SD v1.5's
    configs (written by our diffusers writer), every tensor equal. ~4 GB of memory."""
    from openldm.io.original import save_original
    from openldm.models.autoencoder import AutoencoderKL, sd_autoencoder_kl
    from openldm.models.presets import sd15_unet
    from openldm.models.text_encoder import CLIPTextEncoder, sd15_text_config
    from openldm.models.unet import UNet
    from openldm.tokenizers.clip_bpe import CLIPTokenizer

    torch.manual_seed(0)
    sd = StableDiffusionComponents(unet=UNet(sd15_unet()).eval(), vae=AutoencoderKL(sd_autoencoder_kl()).eval(),
                                        text_encoder=CLIPTextEncoder(sd15_text_config()).eval(),
                                        tokenizer=CLIPTokenizer.from_bpe_file())
    with torch.no_grad():  # the UNet zero-initialises some layers: randomise them so mapping errors show
        for p in sd.unet.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    single = save_original(sd, tmp_path / "sd15.safetensors")
    configs = sdio.save_sd(sd, tmp_path / "configs", "diffusers")
    for weights in configs.glob("*/*.safetensors"):
        weights.unlink()  # only the configs are used
    del sd
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(single), config=str(configs), local_files_only=True)
    ours = sdio.load_sd(single)
    assert sum(p.numel() for p in ours.text_encoder.parameters()) == 123_060_480
    assert_same_weights(ours, theirs)
