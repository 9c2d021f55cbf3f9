"""A VAE on its own, in each published layout, against diffusers' AutoencoderKL on the same random weights: a
diffusers folder, a lone diffusers weights file, a CompVis file (checked by diffusers' own converter) with the
bookkeeping keys published files carry, a whole checkpoint's first_stage_model, a .ckpt, openldm's own file."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from openldm.io.keymaps import autoencoder as keymap
from openldm.io.native import save_model
from openldm.io.sd import load_sd, save_sd
from openldm.io.vae import load_vae
from openldm.models.autoencoder import VQAutoencoder, tiny_vq

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as DiffusersAutoencoderKL  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402
from sd_testing import randomize, tiny_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random diffusers VAE (SD's block types, 2 levels, 2 ResBlocks) saved with save_pretrained."""
    vae = DiffusersAutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=2,
                                 down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                                 sample_size=16)
    randomize(vae, 7)
    vae.eval()
    folder = tmp_path_factory.mktemp("vae") / "sd-vae-tiny"
    vae.save_pretrained(str(folder))
    return folder, vae


def original_state(reference) -> dict[str, torch.Tensor]:
    """The reference's weights in the CompVis layout, checked by diffusers' single-file converter."""
    folder, vae = reference
    cfg = keymap.autoencoder_config_from_diffusers(json.loads((folder / "config.json").read_text()))
    original = keymap.to_original(keymap.from_diffusers(vae.state_dict(), cfg), cfg)
    back = convert_ldm_vae_checkpoint({keymap.ORIGINAL_PREFIX + k: v for k, v in original.items()},
                                      keymap.autoencoder_config_to_diffusers(cfg))
    assert all(torch.equal(back[k], v) for k, v in vae.state_dict().items())
    return {k: v.contiguous() for k, v in original.items()}


@torch.no_grad()
def assert_same_as(ours, ref) -> None:
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    torch.testing.assert_close(ours.encode(image).mode(), ref.encode(image).latent_dist.mode(), atol=1e-5, rtol=0)
    z = torch.randn(1, 4, 8, 8, generator=g)
    torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-5, rtol=0)


def test_a_diffusers_folder_and_its_lone_weights_file(reference, tmp_path):
    folder, ref = reference
    assert_same_as(load_vae(folder), ref)
    lone = tmp_path / "sd-vae-tiny.safetensors"  # the weights downloaded without their config.json
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", lone)
    assert_same_as(load_vae(lone), ref)


def test_a_compvis_file_with_the_keys_published_files_carry(reference, tmp_path):
    _, ref = reference
    state = original_state(reference)
    extra = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.ones(2, 3, 4, 4),
             "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(840000)}
    path = tmp_path / "vae-ft-tiny.safetensors"
    save_file({**state, **extra}, str(path))
    assert_same_as(load_vae(path), ref)
    prefixed = tmp_path / "prefixed.vae.pt"  # A1111's NAME.vae.pt: a torch pickle with a state_dict inside
    torch.save({"state_dict": {keymap.ORIGINAL_PREFIX + k: v for k, v in state.items()}}, prefixed)
    vae = load_vae(prefixed, dtype=torch.bfloat16)
    assert next(vae.parameters()).dtype == torch.bfloat16
    assert_same_as(load_vae(prefixed), ref)


def test_a_whole_checkpoint_gives_its_autoencoder(tmp_path):
    folder, pipe = tiny_pipeline(tmp_path)
    single = save_sd(load_sd(folder), tmp_path / "tiny.safetensors", "original")
    assert_same_as(load_vae(single), pipe.vae)
    assert_same_as(load_vae(folder), pipe.vae)  # a diffusers pipeline folder: its vae/


def test_openldm_file_and_the_latent_scale_given(reference, tmp_path):
    folder, ref = reference
    ours = load_vae(folder, scaling_factor=0.13025, shift_factor=0.1)
    assert (ours.config.scaling_factor, ours.config.shift_factor) == (0.13025, 0.1)
    assert load_vae(folder).config.scaling_factor == ref.config.scaling_factor
    path = save_model(load_vae(folder), tmp_path / "ours.safetensors")
    again = load_vae(path, scaling_factor=0.5)
    assert again.config.scaling_factor == 0.5
    assert_same_as(again, ref)


def test_files_that_are_no_vae_name_the_problem(reference, tmp_path):
    unet_only = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(unet_only))
    with pytest.raises(ValueError, match=r"no autoencoder weights.*model\.diffusion_model"):
        load_vae(unet_only)
    state = original_state(reference)
    state.pop("decoder.conv_out.weight")
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    with pytest.raises(ValueError, match="not a complete autoencoder.*decoder.conv_out.weight"):
        load_vae(broken)
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    with pytest.raises(ValueError, match="must end in"):
        load_vae(notes)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae(tmp_path / "missing.safetensors")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(empty)
    with pytest.raises(ValueError, match="holds a VQAutoencoder, not a KL autoencoder"):
        load_vae(save_model(VQAutoencoder(tiny_vq()), tmp_path / "vq.safetensors"))


# ---- TAESD ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    """A random diffusers AutoencoderTiny (narrower than TAESD, the same structure) saved with save_pretrained."""
    from diffusers import AutoencoderTiny

    vae = AutoencoderTiny(encoder_block_out_channels=(32, 32, 32), decoder_block_out_channels=(32, 32, 32),
                          num_encoder_blocks=(1, 2, 1), num_decoder_blocks=(2, 1, 1), latent_channels=4)
    randomize(vae, 9)
    vae.eval()
    folder = tmp_path_factory.mktemp("taesd") / "taesd-tiny"
    vae.save_pretrained(str(folder))
    return folder, vae


def published_halves(vae) -> tuple[dict, dict]:
    """The reference's weights as madebyollin publishes them (diffusers' converter's rule, inverted: encoder indices
    as they are, decoder indices one higher, the clamp being layer 0)."""
    encoder, decoder = {}, {}
    for key, value in vae.state_dict().items():
        half, _, index, rest = key.split(".", 3)
        target = encoder if half == "encoder" else decoder
        target[f"{int(index) + (half == 'decoder')}.{rest}"] = value.contiguous()
    return encoder, decoder


@torch.no_grad()
def assert_same_as_tiny(ours, ref, encoder: bool = True) -> None:
    g = torch.Generator().manual_seed(4)
    if encoder:
        image = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
        torch.testing.assert_close(ours.encode(image), ref.encode(image).latents, atol=1e-5, rtol=0)
    z = torch.randn(1, 4, 4, 4, generator=g)
    torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-5, rtol=0)


def test_taesd_as_diffusers_saves_it_and_as_madebyollin_publishes_it(tiny_reference, tmp_path):
    from openldm.models.tiny_autoencoder import TinyAutoencoder

    folder, ref = tiny_reference
    ours = load_vae(folder, scaling_factor=0.18215)  # a TAESD keeps its own scale: it decodes scaled latents
    assert isinstance(ours, TinyAutoencoder) and ours.config.scaling_factor == 1.0
    assert ours.downsampling_factor == 4 and ours.config.encoder_blocks == (1, 2, 1)
    assert_same_as_tiny(ours, ref)
    lone = tmp_path / "taesd-lone.safetensors"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", lone)
    assert_same_as_tiny(load_vae(lone), ref)

    encoder, decoder = published_halves(ref)
    save_file(decoder, str(tmp_path / "taesd_decoder.safetensors"))
    alone = load_vae(tmp_path / "taesd_decoder.safetensors")  # no encoder beside it: decodes only
    assert alone.encoder is None
    assert_same_as_tiny(alone, ref, encoder=False)
    with pytest.raises(ValueError, match="decoder only"):
        alone.encode(torch.zeros(1, 3, 16, 16))
    save_file(encoder, str(tmp_path / "taesd_encoder.safetensors"))
    assert_same_as_tiny(load_vae(tmp_path / "taesd_decoder.safetensors"), ref)
    torch.save(decoder, tmp_path / "taesd_decoder.pth")  # A1111's download: the .pth halves
    torch.save(encoder, tmp_path / "taesd_encoder.pth")
    assert_same_as_tiny(load_vae(tmp_path / "taesd_decoder.pth"), ref)
    with pytest.raises(ValueError, match="TAESD's encoder alone"):
        load_vae(tmp_path / "taesd_encoder.safetensors")
    again = load_vae(save_model(load_vae(folder), tmp_path / "ours-taesd.safetensors"))
    assert_same_as_tiny(again, ref)
