"""Reading LoRA files (kohya/A1111, LoCon, diffusers/PEFT) onto openldm's modules: the fused weights equal
diffusers' (load_lora_weights + fuse_lora) tensor for tensor, every layer counted, CompVis UNet names read as
diffusers' sgm remapping reads them, and every key that fits no layer refused by name."""
from __future__ import annotations

import json

import pytest
import torch
from lora_testing import diffusers, kohya_lora, peft_lora, save_kohya, with_loras
from safetensors.torch import save_file
from sd_testing import tiny_pipeline

from openldm.io.keymaps import clip as clip_keys
from openldm.io.keymaps import unet as unet_keys
from openldm.io.lora import read_lora
from openldm.io.sd import load_sd
from openldm.pipelines.loras import fused_loras


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(our components, diffusers pipeline, a folder for LoRA files)."""
    tmp = tmp_path_factory.mktemp("lora_io")
    folder, _ = tiny_pipeline(tmp)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    return load_sd(folder), pipe, tmp


def _fused_difference(sd, pipe, path, weight: float) -> tuple[float, int]:
    """(largest |ours - diffusers'| over every UNet and text-encoder tensor with the LoRA fused at ``weight``,
    the number of weight tensors diffusers changed)."""
    fused = with_loras(pipe, [(path, weight)])
    fused.unload_lora_weights()  # drops the adapters, keeps the fused weights
    lora = read_lora(path, sd.unet, sd.text_encoder)
    with fused_loras(sd, [(lora, weight)]) as counts:
        ours = {**{f"unet.{k}": v for k, v in unet_keys.to_diffusers(sd.unet.state_dict(), sd.unet.config).items()},
                **{f"te.{k}": v for k, v in sd.text_encoder.state_dict().items()}}
        theirs = {**{f"unet.{k}": v for k, v in fused.unet.state_dict().items()},
                  **{f"te.{k}": v for k, v in clip_keys.from_diffusers(fused.text_encoder.state_dict()).items()}}
        base = {**{f"unet.{k}": v for k, v in pipe.unet.state_dict().items()},
                **{f"te.{k}": v for k, v in clip_keys.from_diffusers(pipe.text_encoder.state_dict()).items()}}
        worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
        changed = sum(not torch.equal(theirs[k], base[k]) for k in ours)
        assert counts == {part: len(modules) for part, modules in lora.modules.items()}
    assert changed == lora.num_modules  # diffusers changed exactly the layers we did
    return worst, changed


@pytest.mark.parametrize("layout", ["kohya", "locon", "peft_patterns", "peft_rslora", "peft_no_metadata"])
def test_fused_weights_equal_diffusers(tiny, layout):
    sd, pipe, tmp = tiny
    path = tmp / f"{layout}.safetensors"
    if layout == "kohya":
        save_kohya(kohya_lora(pipe, rank=4, alpha=1.5, seed=1), path)
    elif layout == "locon":
        save_kohya(kohya_lora(pipe, rank=3, alpha=5.0, conv=True, te_prefix="lora_te1_", seed=2), path)
    else:
        unet = {"r": 4, "lora_alpha": 3, "target_modules": ["to_q", "to_v", "proj_in", "conv1", "conv_shortcut"],
                "rank_pattern": {"to_v": 2}, "alpha_pattern": {"attn2.to_q": 7}}
        text = {"r": 2, "lora_alpha": 5, "target_modules": ["q_proj", "fc2"], "alpha_pattern": {"fc2": 1}}
        if layout == "peft_rslora":
            unet, text = {**unet, "use_rslora": True}, {**text, "use_rslora": True}
        peft_lora(pipe, path, unet=unet, text=text, seed=3)
        if layout == "peft_no_metadata":  # diffusers' convention without metadata: alpha = rank, scale 1
            from safetensors.torch import load_file

            save_file(load_file(str(path)), str(path))
    worst, changed = _fused_difference(sd, pipe, path, 0.7)
    print(f"{layout}: {changed} layers, largest weight difference {worst:.2e}")
    assert worst < 1e-5 and changed > 10


def test_counts_and_summary(tiny):
    sd, pipe, tmp = tiny
    state = kohya_lora(pipe, conv=True)
    lora = read_lora(save_kohya(state, tmp / "count.safetensors"), sd.unet, sd.text_encoder)
    te = sum(k.startswith("lora_te_") and k.endswith(".lora_down.weight") for k in state)
    unet = sum(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in state)
    assert (lora.layout, len(lora.modules["unet"]), len(lora.modules["text_encoder"])) == ("kohya", unet, te)
    assert lora.num_modules == unet + te
    assert lora.summary() == f"count.safetensors: kohya layout, {unet} unet modules, {te} text-encoder modules"


# CompVis (original) paths of some tiny-UNet layers and their diffusers paths, written out by hand: layers_per_block=1,
# two levels, attention at level 0 (input_blocks 1 = level 0's ResBlock + transformer, 2 its downsampler, 3 level 1;
# output_blocks 0-1 level 1 (+ upsampler), 2-3 level 0). Not the upsampler output_blocks_1_1_conv: diffusers' sgm
# remapping takes the second layer of every output block for an attention, as in SDXL, where this one has none.
COMPVIS = {
    "input_blocks_1_1_transformer_blocks_0_attn1_to_q": "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "input_blocks_1_0_in_layers_2": "down_blocks_0_resnets_0_conv1",
    "input_blocks_3_0_skip_connection": "down_blocks_1_resnets_0_conv_shortcut",
    "middle_block_1_proj_in": "mid_block_attentions_0_proj_in",
    "middle_block_2_out_layers_3": "mid_block_resnets_1_conv2",
    "output_blocks_3_1_transformer_blocks_0_ff_net_2": "up_blocks_1_attentions_1_transformer_blocks_0_ff_net_2",
}


def test_compvis_unet_names_read_as_diffusers_remaps_them(tiny):
    sd, pipe, tmp = tiny
    state = kohya_lora(pipe, conv=True, text=False, seed=5)
    diffusers_named = {k: v for k, v in state.items() if k.split(".")[0].removeprefix("lora_unet_") in COMPVIS.values()}
    assert len(diffusers_named) == 3 * len(COMPVIS)
    inverse = {v: k for k, v in COMPVIS.items()}
    compvis_named = {}
    for key, value in diffusers_named.items():
        name, _, suffix = key.partition(".")
        compvis_named[f"lora_unet_{inverse[name.removeprefix('lora_unet_')]}.{suffix}"] = value
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    remapped = _maybe_map_sgm_blocks_to_diffusers(dict(compvis_named), pipe.unet.config)
    converted = _convert_non_diffusers_lora_to_diffusers(remapped)[0]
    assert converted.keys() == _convert_non_diffusers_lora_to_diffusers(dict(diffusers_named))[0].keys()
    ours = read_lora(save_kohya(compvis_named, tmp / "compvis.safetensors"), sd.unet, sd.text_encoder)
    ref = read_lora(save_kohya(diffusers_named, tmp / "named.safetensors"), sd.unet, sd.text_encoder)
    assert ours.modules["unet"].keys() == ref.modules["unet"].keys() and ours.num_modules == len(COMPVIS)
    for name, module in ref.modules["unet"].items():
        other = ours.modules["unet"][name]
        assert torch.equal(other.down, module.down) and torch.equal(other.up, module.up) and other.scale == module.scale


def test_linear_shaped_projection_updates_a_1x1_conv(tiny):
    sd, pipe, tmp = tiny
    state = kohya_lora(pipe, text=False, seed=6)
    name = "lora_unet_mid_block_attentions_0_proj_in"
    flat = {**state, f"{name}.lora_down.weight": state[f"{name}.lora_down.weight"][:, :, 0, 0],
            f"{name}.lora_up.weight": state[f"{name}.lora_up.weight"][:, :, 0, 0]}
    assert state[f"{name}.lora_down.weight"].dim() == 4  # diffusers' tiny UNet has conv projections
    conv = read_lora(save_kohya(state, tmp / "conv.safetensors"), sd.unet, sd.text_encoder)
    linear = read_lora(save_kohya(flat, tmp / "flat.safetensors"), sd.unet, sd.text_encoder)
    conv, linear = conv.modules["unet"]["mid.1.proj_in"], linear.modules["unet"]["mid.1.proj_in"]
    shape = sd.unet.get_submodule("mid.1.proj_in").weight.shape
    expect = state[f"{name}.alpha"] / 4 * (flat[f"{name}.lora_up.weight"] @ flat[f"{name}.lora_down.weight"])
    torch.testing.assert_close(linear.delta(shape, torch.device("cpu")), expect.reshape(shape), rtol=0, atol=1e-6)
    assert torch.equal(conv.delta(shape, torch.device("cpu")), linear.delta(shape, torch.device("cpu")))


def _refused(tiny, state, match: str, name: str = "bad.safetensors", metadata: dict | None = None):
    sd, _, tmp = tiny
    path = tmp / name
    save_file(state, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=match):
        read_lora(path, sd.unet, sd.text_encoder)


def test_unknown_keys_are_refused_by_name(tiny):
    pipe = tiny[1]
    good = kohya_lora(pipe, text=False, seed=7)
    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    _refused(tiny, {**good, f"{layer}.lora_mid.weight": torch.ones(4, 4, 3, 3)}, rf"{layer}\.lora_mid\.weight")
    _refused(tiny, {**good, f"{layer}.hada_w1_a": torch.ones(4, 4)}, rf"{layer}\.hada_w1_a")
    _refused(tiny, {**good, "lora_unet_down_blocks_7_resnets_0_conv1.lora_down.weight": torch.ones(4, 32, 3, 3)},
             "lora_unet_down_blocks_7_resnets_0_conv1.lora_down.weight")
    _refused(tiny, {**good, "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(4, 128)},
             "lora_te2_text_model_encoder_layers_0_mlp_fc1")
    _refused(tiny, {**good, "unet.conv_in.lora_A.weight": torch.ones(4, 4, 3, 3)}, "not mixed")
    _refused(tiny, {"model.diffusion_model.out.2.weight": torch.ones(4, 32, 3, 3)}, "model.diffusion_model.out.2")
    peft = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(4, 32, 1, 1),
            "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.ones(32, 4, 1, 1)}
    _refused(tiny, {**peft, "unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector": torch.ones(32)},
             "proj_in.lora_magnitude_vector")
    _refused(tiny, peft, "DoRA", metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.use_dora": True})})


def test_incomplete_or_misshaped_modules_are_refused(tiny):
    sd, pipe, tmp = tiny
    good = kohya_lora(pipe, text=False, seed=8)
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    _refused(tiny, {k: v for k, v in good.items() if k != f"{layer}.lora_up.weight"}, f"without both.*{layer}")
    _refused(tiny, {**good, f"{layer}.lora_up.weight": torch.ones(32, 3)},
             rf"{layer}: down \(4, 128\) and up \(32, 3\)")
    _refused(tiny, {**good, f"{layer}.lora_down.weight": torch.ones(4, 64)}, rf"{layer}: down \(4, 64\)")
    _refused(tiny, {}, "no tensors")
    (tmp / "old.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="only .safetensors"):
        read_lora(tmp / "old.pt", sd.unet, sd.text_encoder)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_lora(tmp / "missing.safetensors", sd.unet, sd.text_encoder)
    (tmp / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_lora(tmp / "junk.safetensors", sd.unet, sd.text_encoder)
