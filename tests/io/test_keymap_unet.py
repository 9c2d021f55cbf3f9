"""UNet key maps and configs against diffusers: identical outputs on identical random weights, and the original
CompVis layout checked by diffusers' own single-file converter."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from openldm.io.keymaps import unet as keymap
from openldm.models.presets import sd2_unet, sd15_inpaint_unet, sd15_unet, tiny_unet
from openldm.models.unet import UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

# Two tiny topologies that between them exercise every option the diffusers layout can express.
TINY_A = UNetConfig(  # SD 1.x style: fixed head count, conv projections; plus depth 2 and every slot
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=4, head_dim=None,
    transformer_depth=2, context_dim=16, vector_dim=10, concat_channels=3, norm_groups=8,
)
TINY_B = UNetConfig(  # SD 2.x style: fixed head width, linear projections; plus AdaGN and a gap in attention
    in_channels=3, out_channels=6, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
    attention_levels=(0, 2), num_heads=None, head_dim=16, context_dim=24, use_linear_projection=True,
    scale_shift=True, norm_groups=16, norm_eps=1e-6,
)

from sd_testing import random_state  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def our_shapes(cfg: UNetConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in UNet(cfg).state_dict().items()}


def build_pair(cfg: UNetConfig, seed: int = 0) -> tuple[UNet, UNet2DConditionModel]:
    """Our UNet and diffusers' on the same random weights, the latter's converted through the key map.

    Both are built on the meta device and take their tensors by assignment, so the SD v1 topology costs one
    copy of its weights and no initialisation.
    """
    with torch.device("meta"):
        ours = UNet(cfg)
        ref = UNet2DConditionModel(**keymap.unet_config_to_diffusers(cfg))
    ref_state = keymap.to_diffusers(random_state(our_shapes(cfg), seed), cfg)
    ref.load_state_dict(ref_state, strict=True, assign=True)
    ours.load_state_dict(keymap.from_diffusers(ref.state_dict(), cfg), strict=True, assign=True)
    return ours.eval(), ref.eval()


def compare(cfg: UNetConfig, B: int, H: int, W: int, S: int, mask: bool) -> float:
    ours, ref = build_pair(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, cfg.in_channels, H, W, generator=g)
    t = torch.linspace(3.5, 977.25, B)  # fractional timesteps
    context = torch.randn(B, S, cfg.context_dim, generator=g)
    kw = {"context": context}
    if mask:
        kw["context_mask"] = torch.arange(S)[None] < torch.randint(1, S + 1, (B, 1), generator=g)  # (B, S)
    if cfg.vector_dim:
        kw["vector"] = torch.randn(B, cfg.vector_dim, generator=g)
    if cfg.concat_channels:
        kw["concat"] = torch.randn(B, cfg.concat_channels, H, W, generator=g)
    with torch.no_grad():
        out = ours(x, t, **kw)
        expected = ref(
            torch.cat([x, kw["concat"]], dim=1) if cfg.concat_channels else x,
            t,
            encoder_hidden_states=context,
            class_labels=kw.get("vector"),
            encoder_attention_mask=kw["context_mask"].float() if mask else None,
        ).sample
    assert out.shape == expected.shape and expected.std() > 0.1
    return ((out - expected).abs().max() / expected.abs().max()).item()


# ---- outputs -----------------------------------------------------------------------------------------------

def test_sd15_topology_matches_diffusers():
    """The full SD v1 UNet (859,520,964 random parameters) on a 1x4x16x16 latent with a 77-token context."""
    assert compare(sd15_unet(), B=1, H=16, W=16, S=77, mask=False) < 1e-4


@pytest.mark.slow
def test_sd2_topology_matches_diffusers():
    assert compare(sd2_unet(), B=1, H=16, W=16, S=77, mask=False) < 1e-4


@pytest.mark.parametrize("cfg", [TINY_A, TINY_B], ids=["tiny-a", "tiny-b"])
@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "mask"])
def test_tiny_topologies_match_diffusers(cfg: UNetConfig, mask: bool):
    assert compare(cfg, B=2, H=12, W=10, S=7, mask=mask) < 1e-4


def test_odd_sizes_match_diffusers():
    """Sizes not divisible by the total downsampling: both size each upsample to its skip."""
    assert compare(TINY_B, B=1, H=9, W=7, S=3, mask=False) < 1e-4


# ---- the original layout -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [TINY_A, TINY_B, sd15_unet(), sd2_unet(), sd15_inpaint_unet()],
                         ids=["tiny-a", "tiny-b", "sd15", "sd2", "sd15-inpaint"])
def test_original_layout_agrees_with_diffusers_single_file_converter(cfg: UNetConfig):
    """ours -> original (our map) -> diffusers (diffusers' converter) must give exactly ours -> diffusers (our map).
    Meta tensors carry the shapes, so the full SD topologies cost nothing."""
    with torch.device("meta"):
        state = UNet(cfg).state_dict()
    original = keymap.to_original(state, cfg)
    converted = convert_ldm_unet_checkpoint(
        {keymap.ORIGINAL_PREFIX + k: v for k, v in original.items()}, keymap.unet_config_to_diffusers(cfg)
    )
    direct = keymap.to_diffusers(state, cfg)
    assert sorted(converted) == sorted(direct)
    assert all(converted[k] is direct[k] for k in direct)


@pytest.mark.parametrize("cfg", [TINY_A, TINY_B], ids=["tiny-a", "tiny-b"])
def test_original_round_trip_is_identical(cfg: UNetConfig):
    state = random_state(our_shapes(cfg))
    back = keymap.from_original(keymap.to_original(state, cfg), cfg)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_sd15_original_keys():
    """Spot checks against key names in the released v1-5 checkpoint."""
    keys = keymap.original_keymap(sd15_unet())
    for ours, original in {
        "time_embed.linear_1.weight": "time_embed.0.weight",
        "conv_in.weight": "input_blocks.0.0.weight",
        "down.0.1.blocks.0.cross_attn.to_k.weight": "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "down.2.0.conv.weight": "input_blocks.3.0.op.weight",
        "down.3.0.skip.weight": "input_blocks.4.0.skip_connection.weight",
        "mid.1.proj_out.weight": "middle_block.1.proj_out.weight",
        "up.2.1.conv.weight": "output_blocks.2.1.conv.weight",
        "up.5.2.conv.weight": "output_blocks.5.2.conv.weight",
        "up.11.1.blocks.0.ff.proj.weight": "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        "norm_out.weight": "out.0.weight",
        "conv_out.bias": "out.2.bias",
    }.items():
        assert keys[ours] == original
    assert len(keys) == len(set(keys.values())) == 686


def test_projection_layouts_convert_on_load():
    """A linear-projection (SD 2.x-style) file loads into a conv-projection model and vice versa."""
    conv_cfg = dataclasses.replace(TINY_B, use_linear_projection=False)
    linear_state = keymap.to_original(random_state(our_shapes(TINY_B)), TINY_B)
    loaded = keymap.from_original(linear_state, conv_cfg)
    assert loaded["down.0.1.proj_in.weight"].shape == (32, 32, 1, 1)
    UNet(conv_cfg).load_state_dict(loaded)
    back = keymap.from_diffusers(keymap.to_diffusers(loaded, conv_cfg), TINY_B)
    assert back["down.0.1.proj_in.weight"].shape == (32, 32)


# ---- strictness --------------------------------------------------------------------------------------------

def test_missing_and_unexpected_keys_are_listed():
    original = keymap.to_original(random_state(our_shapes(TINY_A)), TINY_A)
    del original["middle_block.1.proj_in.weight"]
    original["model_ema.decay"] = torch.tensor(0.999)
    with pytest.raises(KeyError, match=r"1 missing keys \['middle_block.1.proj_in.weight'\]; 1 unexpected keys \['model_ema.decay'\]"):
        keymap.from_original(original, TINY_A)


def test_wrong_shapes_are_named():
    state = keymap.to_diffusers(random_state(our_shapes(TINY_A)), TINY_A)
    state["conv_in.weight"] = torch.zeros(32, 4, 3, 3)
    with pytest.raises(ValueError, match=r"conv_in.weight has shape \(32, 4, 3, 3\); expected \(32, 7, 3, 3\)"):
        keymap.from_diffusers(state, TINY_A)


# ---- configs -----------------------------------------------------------------------------------------------

# The unet/config.json of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1 (values as
# published; the diffusers version key is left out).
SD15_DIFFUSERS = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_DIFFUSERS = {
    **SD15_DIFFUSERS, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "dual_cross_attention": False,
    "use_linear_projection": True, "num_class_embeds": None, "only_cross_attention": False, "upcast_attention": True,
    "class_embed_type": None, "resnet_time_scale_shift": "default", "sample_size": 96,
}


def test_published_diffusers_configs():
    assert keymap.unet_config_from_diffusers(SD15_DIFFUSERS) == sd15_unet()
    assert keymap.unet_config_from_diffusers(SD21_DIFFUSERS) == sd2_unet()
    assert keymap.unet_config_from_diffusers({**SD15_DIFFUSERS, "in_channels": 9}) == sd15_inpaint_unet()


@pytest.mark.parametrize("cfg", [TINY_A, TINY_B, sd15_unet(), sd2_unet(), sd15_inpaint_unet()],
                         ids=["tiny-a", "tiny-b", "sd15", "sd2", "sd15-inpaint"])
def test_diffusers_config_round_trip(cfg: UNetConfig):
    assert keymap.unet_config_from_diffusers(keymap.unet_config_to_diffusers(cfg)) == cfg


def test_unsupported_diffusers_settings_raise():
    with pytest.raises(ValueError, match="addition_embed_type='text_time' is not supported"):
        keymap.unet_config_from_diffusers({**SD15_DIFFUSERS, "addition_embed_type": "text_time"})
    with pytest.raises(ValueError, match="unsupported diffusers UNet config keys: \\['made_up'\\]"):
        keymap.unet_config_from_diffusers({**SD15_DIFFUSERS, "made_up": 1})
    with pytest.raises(ValueError, match="no self-attention-only transformer"):
        keymap.unet_config_to_diffusers(tiny_unet())


@pytest.mark.parametrize("cfg", [sd15_unet(), sd2_unet(), sd15_inpaint_unet(), TINY_B], ids=["sd15", "sd2", "sd15-inpaint", "tiny-b"])
def test_config_from_original_shapes(cfg: UNetConfig):
    """Shapes alone recover the topology (9-channel inpainting included); heads and groups follow SD's conventions."""
    with torch.device("meta"):
        original = keymap.to_original(UNet(cfg).state_dict(), cfg)
    derived = keymap.unet_config_from_original(original, head_dim=cfg.head_dim, num_heads=cfg.num_heads,
                                               norm_groups=cfg.norm_groups)
    assert derived == dataclasses.replace(cfg, norm_eps=derived.norm_eps)
    if cfg.context_dim in (768, 1024):  # the SD defaults need no hints
        assert keymap.unet_config_from_original(original) == cfg
