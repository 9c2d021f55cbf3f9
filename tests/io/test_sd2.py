"""SD 2.x checkpoints on a tiny random-weight SD2-topology model: an OpenCLIP-style text tower (GELU, 24 blocks of
which SD 2 reads 23, padding with "!"), a UNet with linear projections and heads of width 64 (2 and 4 heads per
level), a 128-wide context. The diffusers folder is written by diffusers itself; the single file is written here
in the CompVis SD 2 layout (OpenCLIP names built by hand from the transformers weights, independently of
openldm's key map) and read by diffusers' own ``from_single_file`` too. openldm's images equal diffusers' for the
same seed within 2/255, for eps and v prediction, from the folder and the single file (prediction from the
argument, the CLI flag or the CompVis sidecar YAML)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sd_testing import clip_vocab_files, randomize

from openldm.diffusion.schedules import ScheduleConfig
from openldm.io import original
from openldm.io import sd as sdio
from openldm.io.keymaps import autoencoder as vae_keys
from openldm.io.keymaps import clip as clip_keys
from openldm.io.keymaps import unet as unet_keys
from openldm.models.presets import sd2_unet
from openldm.models.text_encoder import sd2_text_config
from openldm.models.unet import UNet
from openldm.pipelines import text_to_image

pytestmark = pytest.mark.usefixtures("one_thread")

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

BLOCKS = 24  # OpenCLIP ViT-H/14's text tower; SD 2 reads the output of block 23 (diffusers stores 23)
WIDTH = 128  # text width = UNet context width, 2 heads of 64
SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
            "steps_offset": 1, "timestep_spacing": "leading"}
PROMPT, NEGATIVE = "a photo of a red fox in the snow", "blurry, low quality"
GEN = {"num_inference_steps": 4, "guidance_scale": 7.5, "height": 32, "width": 32}
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}
V_YAML = """model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    cond_stage_key: "txt"
    image_size: 96
    channels: 4
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        num_head_channels: 64
        use_linear_in_transformer: True
        context_dim: 1024
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""  # the shape of Stability's v2-inference-v.yaml (first-stage config left out: we do not read it)


def _plain(state: dict) -> dict:
    """transformers 4 and 5 name CLIPTextModel tensors with or without ``text_model.``: drop it."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def open_clip_state(tower, projection: bool = True) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel's weights under OpenCLIP's names in an SD 2 file (``cond_stage_model.model.*``):
    q, k, v stacked into ``in_proj``, ``ln_1``/``ln_2``, ``mlp.c_fc``/``c_proj``, plus the unused projection."""
    s, p = _plain(tower.state_dict()), "cond_stage_model.model."
    out = {p + "token_embedding.weight": s["embeddings.token_embedding.weight"],
           p + "positional_embedding": s["embeddings.position_embedding.weight"],
           p + "ln_final.weight": s["final_layer_norm.weight"], p + "ln_final.bias": s["final_layer_norm.bias"]}
    if projection:
        out[p + "text_projection"] = torch.randn(WIDTH, 64, generator=torch.Generator().manual_seed(5))
        out[p + "logit_scale"] = torch.tensor(4.6052)
    for i in range(tower.config.num_hidden_layers):
        ours, theirs = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat(
                [s[f"{ours}self_attn.{q}_proj.{kind}"] for q in ("q", "k", "v")])
            for old, new in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{theirs}{new}.{kind}"] = s[f"{ours}{old}.{kind}"]
    return out


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """Folders per prediction type (written by diffusers), one SD 2 single file, and the modules."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("sd2")
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(128, 256), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True, cross_attention_dim=WIDTH,
        norm_num_groups=32).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
        sample_size=16).eval()
    config = {"vocab_size": 49408, "hidden_size": WIDTH, "intermediate_size": 256, "num_attention_heads": WIDTH // 64,
              "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": WIDTH}
    tower = transformers.CLIPTextModel(transformers.CLIPTextConfig(num_hidden_layers=BLOCKS, **config)).eval()
    for i, m in enumerate((unet, vae, tower)):
        randomize(m, 10 + i)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(num_hidden_layers=BLOCKS - 1, **config)).eval()
    missing, unexpected = text.load_state_dict(tower.state_dict(), strict=False)
    assert not missing and len(unexpected) == 16 and all(".23." in k for k in unexpected)  # the last block
    clip_vocab_files(tmp / "tok", pad_token="!")  # as SD 2's tokenizer/ folder
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tmp / "tok"))
    folders = {}
    for ours, theirs in PREDICTIONS.items():
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
            scheduler=diffusers.EulerDiscreteScheduler(**SCHEDULE, prediction_type=theirs))
        folders[ours] = tmp / f"sd2-{ours}"
        pipe.save_pretrained(str(folders[ours]))

    ucfg = unet_keys.unet_config_from_diffusers(dict(unet.config))
    vcfg = vae_keys.autoencoder_config_from_diffusers(dict(vae.config))
    state = {"model.diffusion_model." + k: v for k, v in
             unet_keys.to_original(unet_keys.from_diffusers(unet.state_dict(), ucfg), ucfg).items()}
    state.update({"first_stage_model." + k: v for k, v in
                  vae_keys.to_original(vae_keys.from_diffusers(vae.state_dict(), vcfg), vcfg).items()})
    state.update(open_clip_state(tower))
    single = tmp / "single" / "v2-tiny.safetensors"
    single.parent.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(single))
    return {"folders": folders, "single": single, "unet": unet, "vae": vae, "text": text, "tower": tower,
            "tokenizer": tokenizer}


def reference_images(sd2, prediction: str, seed: int = 3):
    pipe = diffusers.StableDiffusionPipeline(
        vae=sd2["vae"], text_encoder=sd2["text"], tokenizer=sd2["tokenizer"], unet=sd2["unet"], safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
        scheduler=diffusers.EulerDiscreteScheduler(**SCHEDULE, prediction_type=PREDICTIONS[prediction]))
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator("cpu").manual_seed(seed), **GEN).images


def ours_images(parts, seed: int = 3):
    return text_to_image(parts, PROMPT, negative_prompt=NEGATIVE, sampler="euler", steps=GEN["num_inference_steps"],
                         guidance_scale=GEN["guidance_scale"], height=GEN["height"], width=GEN["width"], seed=seed,
                         progress=False)


def max_pixel_diff(a, b) -> int:
    x = np.stack([np.asarray(i, dtype=np.int16) for i in a])
    y = np.stack([np.asarray(i, dtype=np.int16) for i in b])
    assert x.shape == y.shape, (x.shape, y.shape)
    return int(np.abs(x - y).max())


# ---- tests ---------------------------------------------------------------------------------------------------

def test_single_file_is_detected_as_sd2_and_configured_from_keys(sd2):
    sd = sdio.load_sd(sd2["single"], prediction="eps")
    assert original.is_sd2_state(original.read_tensors(sd2["single"])[0])
    cfg = sd.unet.config
    assert cfg.use_linear_projection and cfg.head_dim == 64 and cfg.context_dim == WIDTH
    assert [cfg.heads(level) for level in (0, 1)] == [(2, 64), (4, 64)]
    assert unet_keys.unet_config_from_diffusers(dict(sd2["unet"].config)) == cfg
    t = sd.text_encoder.config
    assert (t.hidden_act, t.num_hidden_layers, t.hidden_size, t.num_attention_heads) == ("gelu", BLOCKS - 1, WIDTH, 2)
    assert sd.tokenizer.pad_id == 0  # OpenCLIP pads with "!"
    folder = sdio.load_sd(sd2["folders"]["eps"])
    assert folder.unet.config == cfg and folder.text_encoder.config == t and folder.tokenizer.pad_id == 0
    for name in ("unet", "vae", "text_encoder"):  # the same tensors by either route
        a, b = getattr(sd, name).state_dict(), getattr(folder, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@torch.no_grad()
def test_text_encoder_hidden_states_match_transformers(sd2):
    ids = sd2["tokenizer"]([PROMPT, "", "an astronaut riding a horse on mars"], padding="max_length", max_length=77,
                           return_tensors="pt").input_ids
    single = sdio.load_sd(sd2["single"], prediction="eps")
    assert torch.equal(single.tokenizer([PROMPT, "", "an astronaut riding a horse on mars"]), ids)
    tower = sd2["tower"](ids, output_hidden_states=True)
    penultimate = sd2["tower"].final_layer_norm(tower.hidden_states[-2])  # CompVis' layer="penultimate"
    for parts in (single, sdio.load_sd(sd2["folders"]["v"])):
        ours = parts.text_encoder(ids)
        torch.testing.assert_close(ours, sd2["text"](ids).last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours, penultimate, atol=1e-5, rtol=0)
    assert (ours - tower.last_hidden_state).abs().max() > 1e-2  # the last block is not what SD 2 reads


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_images_match_diffusers_from_folder_and_single_file(sd2, prediction):
    ref = reference_images(sd2, prediction)
    folder = sdio.load_sd(sd2["folders"][prediction])
    assert folder.prediction == prediction  # from scheduler_config.json
    single = sdio.load_sd(sd2["single"], prediction=prediction)
    theirs_single = diffusers.StableDiffusionPipeline.from_single_file(
        str(sd2["single"]), config=str(sd2["folders"][prediction]), local_files_only=True)
    theirs_single.set_progress_bar_config(disable=True)
    assert theirs_single.scheduler.config.prediction_type == PREDICTIONS[prediction]
    ref_single = theirs_single(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator("cpu").manual_seed(3),
                               **GEN).images
    diffs = {"folder": max_pixel_diff(ours_images(folder), ref),
             "single": max_pixel_diff(ours_images(single), ref),
             "diffusers single vs folder": max_pixel_diff(ref_single, ref)}
    print(prediction, diffs)
    assert all(d <= 2 for d in diffs.values()), diffs
    assert np.asarray(ref[0], dtype=np.float64).std() > 10  # a picture, not a flat or saturated field
    other = ours_images(sdio.load_sd(sd2["single"], prediction="v" if prediction == "eps" else "eps"))
    assert max_pixel_diff(other, ref) > 10  # the prediction type matters


def test_sidecar_yaml_gives_v_and_the_flag_overrides_it(sd2, tmp_path):
    single = tmp_path / sd2["single"].name
    shutil.copy(sd2["single"], single)
    with pytest.raises(ValueError, match=r"SD 2\.x single file.*--prediction-type eps\|v.*v2-tiny\.yaml"):
        sdio.load_sd(single)
    original.sidecar_path(single).write_text(V_YAML, encoding="utf-8")
    sd = sdio.load_sd(single)
    assert sd.prediction == "v" and sd.text_encoder.config.num_hidden_layers == BLOCKS - 1
    assert sd.schedule == ScheduleConfig()  # linear_start/linear_end/timesteps of SD 2 are SD v1's
    assert max_pixel_diff(ours_images(sd), reference_images(sd2, "v")) <= 2
    assert sdio.load_sd(single, prediction="eps").prediction == "eps"
    assert sdio.load_sd(sd2["folders"]["eps"], prediction="v").prediction == "v"  # folders too
    # layer: "last" reads all 24 blocks (CompVis' FrozenOpenCLIPEmbedder default); no parameterization means eps
    original.sidecar_path(single).write_text(V_YAML.replace('"penultimate"', '"last"').replace(
        '    parameterization: "v"\n', ""), encoding="utf-8")
    sd = sdio.load_sd(single)
    assert sd.prediction == "eps" and sd.text_encoder.config.num_hidden_layers == BLOCKS
    assert sd.schedule == ScheduleConfig()
    ids = sd.tokenizer([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(sd.text_encoder(ids), sd2["tower"](ids).last_hidden_state, atol=1e-5, rtol=0)
    # CompVis' beta_schedule names: its "linear" is diffusers' scaled_linear, its "sqrt_linear" plain linear
    original.sidecar_path(single).write_text("model:\n  params:\n    beta_schedule: sqrt_linear\n"
                                             "    linear_start: 0.0001\n    linear_end: 0.02\n", encoding="utf-8")
    assert sdio.load_sd(single, prediction="v").schedule == ScheduleConfig(kind="linear", beta_start=1e-4,
                                                                           beta_end=0.02)


@pytest.mark.parametrize("yaml_text,match", [
    ("model: [1, 2]\n", "no model.params"),
    ("model:\n  params:\n    parameterization: x0\n", "parameterization='x0'; accepted: eps, v"),
    ("model:\n  params:\n    beta_schedule: sqrt\n", "beta_schedule='sqrt'"),
    ("model: {params: [\n", "not valid YAML"),
])
def test_bad_sidecar_yaml_is_named(sd2, tmp_path, yaml_text, match):
    single = tmp_path / "m.safetensors"
    single.symlink_to(sd2["single"])
    original.sidecar_path(single).write_text(yaml_text, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        sdio.load_sd(single)


def test_cli_prediction_type_flag(sd2, tmp_path, capsys):
    from PIL import Image

    from openldm.cli import main

    out = tmp_path / "v.png"
    args = ["generate", "--model", str(sd2["single"]), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
            "--sampler", "euler", "--steps", "4", "--guidance-scale", "7.5", "--height", "32", "--width", "32",
            "--seed", "3", "--quiet", "--out", str(out)]
    assert main([*args, "--prediction-type", "v"]) == 0
    assert max_pixel_diff([Image.open(out).convert("RGB")], reference_images(sd2, "v")) <= 2
    assert main(args) == 2  # an SD 2 file without YAML or flag: one line naming the fix
    assert "--prediction-type eps|v" in capsys.readouterr().err
    assert main([*args, "--prediction-type", "x0"]) == 2
    assert "'x0'" in capsys.readouterr().err
    folder = tmp_path / "converted"
    assert main(["convert", str(sd2["single"]), str(folder), "--to", "diffusers", "--prediction-type", "v"]) == 0
    assert sdio.load_sd(folder).prediction == "v"


def test_sd2_round_trips_through_our_single_file_and_folder(sd2, tmp_path):
    sd = sdio.load_sd(sd2["single"], prediction="v")
    for to, dst in (("original", tmp_path / "ours.safetensors"), ("diffusers", tmp_path / "dif"),
                    ("openldm", tmp_path / "old")):
        back = sdio.load_sd(sdio.save_sd(sd, dst, to))
        assert back.prediction == "v" and back.tokenizer.pad_id == 0, to
        assert back.text_encoder.config == sd.text_encoder.config and back.unet.config == sd.unet.config, to
        a, b = sd.text_encoder.state_dict(), back.text_encoder.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), to
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "dif"))
    assert theirs.scheduler.config.prediction_type == "v_prediction"
    assert theirs.tokenizer.pad_token == "!" and theirs.unet.config.use_linear_projection



def test_published_sd21_configs_and_full_size_shapes_give_the_sd2_presets():
    """The real SD 2.1 folder's config.json files, and the shapes of a full-size SD 2 single file (meta tensors,
    no memory), map to openldm's SD 2 presets."""
    unet_json = {  # stabilityai/stable-diffusion-2-1 unet/config.json
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
        "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False, "cross_attention_dim": 1024,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
        "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
        "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
        "sample_size": 96, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                              "CrossAttnUpBlock2D"],
        "use_linear_projection": True, "upcast_attention": True}
    text_json = {  # stabilityai/stable-diffusion-2-1 text_encoder/config.json
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1024, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 4096, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
        "model_type": "clip_text_model", "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1,
        "projection_dim": 512, "torch_dtype": "float32", "transformers_version": "4.25.0.dev0", "vocab_size": 49408}
    assert unet_keys.unet_config_from_diffusers(unet_json) == sd2_unet()
    assert clip_keys.clip_config_from_diffusers(text_json) == sd2_text_config()

    with torch.device("meta"):
        unet = UNet(sd2_unet())
        tower = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            **{**text_json, "num_hidden_layers": 24, "architectures": None}))
    unet_state = unet_keys.to_original(unet.state_dict(), sd2_unet())
    assert unet_keys.unet_config_from_original(unet_state, head_dim=original.SD2_UNET_HEAD_DIM) == sd2_unet()
    text_state = clip_keys.from_open_clip(open_clip_state(tower, projection=False))
    assert original.clip_config_from_original(text_state, "gelu") == sd2_text_config()
