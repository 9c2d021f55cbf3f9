"""The UNet: exact parameter counts, shapes of every preset, slots, memory formats, checkpointing, learning."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from model_testing import randomize
from torch.nn import functional as F

from openldm.config import ConfigError, from_dict
from openldm.models.presets import sd2_unet, sd15_unet, small_unet, tiny_unet
from openldm.models.unet import UNet, UNetConfig
from openldm.registry import MODELS, PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")

UNET_PRESETS = [name for name in PRESETS.names() if PRESETS.get(name)()[0] == "unet"]


def conditioned() -> UNetConfig:
    """tiny-unet with all three slots."""
    return dataclasses.replace(tiny_unet(), context_dim=12, vector_dim=6, concat_channels=2)


def slots(cfg: UNetConfig, B: int, H: int, W: int) -> dict:
    kw = {}
    if cfg.context_dim:
        kw["context"] = torch.randn(B, 5, cfg.context_dim)
    if cfg.vector_dim:
        kw["vector"] = torch.randn(B, cfg.vector_dim)
    if cfg.concat_channels:
        kw["concat"] = torch.randn(B, cfg.concat_channels, H, W)
    return kw


def count(cfg: UNetConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in UNet(cfg).parameters())


def test_sd_parameter_counts_are_exact():
    assert count(sd15_unet()) == 859_520_964
    assert count(sd2_unet()) == 865_910_724  # diffusers' stabilityai/stable-diffusion-2-1 UNet


def test_registry():
    assert MODELS.get("unet") is UNet and UNet.config_class is UNetConfig
    assert {"sd15-unet", "sd15-inpaint-unet", "sd2-unet", "tiny-unet", "small-unet"} <= set(UNET_PRESETS)
    model, cfg = PRESETS.get("sd15-unet")()
    assert model == "unet" and cfg == sd15_unet()


@pytest.mark.parametrize("name", UNET_PRESETS)
def test_preset_output_shape_at_sd_size(name: str):
    """Every preset on a 64x64 latent, shape-inferred on the meta device (no memory, no compute)."""
    cfg = PRESETS.get(name)()[1]
    with torch.device("meta"):
        model = UNet(cfg)
        out = model(torch.randn(2, cfg.in_channels, 64, 64), torch.tensor([1.0, 999.0]), **slots(cfg, 2, 64, 64))
    assert out.shape == (2, cfg.out_channels, 64, 64)


@pytest.mark.parametrize("factory", [tiny_unet, small_unet])
def test_small_preset_output_shapes(factory):
    """Real forward passes at the data sizes the small presets are for, odd sizes included."""
    cfg = factory()
    model = randomize(UNet(cfg)).eval()
    for size in [(28, 28), (32, 32), (7, 9), (64, 64)]:
        with torch.no_grad():
            out = model(torch.randn(1, cfg.in_channels, *size), 10)
        assert out.shape == (1, cfg.out_channels, *size) and torch.isfinite(out).all()


def test_untrained_model_predicts_zero():
    cfg = conditioned()
    x = torch.randn(2, cfg.in_channels, 8, 8)
    assert torch.equal(UNet(cfg)(x, 5, **slots(cfg, 2, 8, 8)), torch.zeros_like(x))


def test_every_slot_changes_the_output():
    cfg = conditioned()
    model = randomize(UNet(cfg)).eval()
    x = torch.randn(2, cfg.in_channels, 8, 8)
    kw = slots(cfg, 2, 8, 8)
    base = model(x, 5, **kw)
    for name in ("vector", "context", "concat"):
        changed = {**kw, name: kw[name] + 1}
        assert not torch.allclose(model(x, 5, **changed), base), name
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, 3:] = False
    kw_masked = {**kw, "context_mask": mask}
    changed_masked_tokens = {**kw_masked, "context": kw["context"].clone()}
    changed_masked_tokens["context"][:, 3:] += 10
    torch.testing.assert_close(model(x, 5, **kw_masked), model(x, 5, **changed_masked_tokens))


def test_timesteps_scalar_batch_and_fractional():
    cfg = tiny_unet()
    model = randomize(UNet(cfg)).eval()
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        scalar = model(x, 250.5)
        batch = model(x, torch.full((3,), 250.5))
        one = model(x, torch.tensor([250.5]))
        integer = model(x, torch.tensor([250, 250, 250]))
    torch.testing.assert_close(scalar, batch)
    torch.testing.assert_close(one, batch)
    assert not torch.allclose(integer, batch)  # fractional timesteps are not rounded
    with pytest.raises(ValueError, match="timesteps"):
        model(x, torch.zeros(2))


def test_slot_errors_name_the_problem():
    cfg = conditioned()
    model = UNet(cfg)
    x = torch.randn(2, 4, 8, 8)
    kw = slots(cfg, 2, 8, 8)
    with pytest.raises(ValueError, match="expects vector"):
        model(x, 1, **{**kw, "vector": None})
    with pytest.raises(ValueError, match="context has shape"):
        model(x, 1, **{**kw, "context": torch.randn(2, 5, 7)})
    with pytest.raises(ValueError, match="concat has shape"):
        model(x, 1, **{**kw, "concat": torch.randn(2, 3, 8, 8)})
    with pytest.raises(ValueError, match="context_mask"):
        model(x, 1, **kw, context_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="x has shape"):
        model(torch.randn(2, 6, 8, 8), 1, **kw)
    with pytest.raises(ValueError, match="no context slot"):
        UNet(tiny_unet())(x, 1, context=torch.randn(2, 5, 12))


def test_config_validation():
    with pytest.raises(ValueError, match="exactly one of num_heads"):
        UNetConfig(num_heads=8, head_dim=64)
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(channel_mult=(1, 2), attention_levels=(2,))
    with pytest.raises(ValueError, match="do not split into"):
        UNetConfig(model_channels=48, num_heads=5)
    with pytest.raises(ConfigError, match="did you mean 'model_channels'"):
        from_dict(UNetConfig, {"model_channel": 32})
    cfg = from_dict(UNetConfig, {**dataclasses.asdict(tiny_unet()), "channel_mult": [1, 2]})
    assert cfg == tiny_unet()


def test_channels_last_gives_the_same_output():
    cfg = conditioned()
    model = randomize(UNet(cfg)).eval()
    x = torch.randn(2, cfg.in_channels, 16, 12)
    kw = slots(cfg, 2, 16, 12)
    with torch.no_grad():
        expected = model(x, 7.0, **kw)
        model = model.to(memory_format=torch.channels_last)
        kw["concat"] = kw["concat"].to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last), 7.0, **kw)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    cfg = conditioned()
    plain = randomize(UNet(cfg))
    checkpointed = randomize(UNet(dataclasses.replace(cfg, gradient_checkpointing=True)))
    x = torch.randn(2, cfg.in_channels, 8, 8)
    kw = slots(cfg, 2, 8, 8)
    grads = []
    for model in (plain, checkpointed):
        out = model(x, torch.tensor([3.0, 400.0]), **kw)
        out.square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(plain(x, 3, **kw), checkpointed(x, 3, **kw))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_overfitting_lowers_the_denoising_loss():
    """eps-prediction DDPM loss (Ho et al. 2020, eq. 14) on 8 fixed images, measured on fixed (t, noise) draws."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_unet(), in_channels=1, out_channels=1, model_channels=16, num_heads=2)
    model = UNet(cfg)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    images = torch.stack([torch.sin(3 * (xx * torch.cos(a) + yy * torch.sin(a))) for a in torch.linspace(0, 3, 8)])[:, None]
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), dim=0)

    def loss(t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = alpha_bar[t][:, None, None, None]
        return F.mse_loss(model(a.sqrt() * images + (1 - a).sqrt() * noise, t), noise)

    g = torch.Generator().manual_seed(1)
    probe = [(torch.randint(0, 1000, (8,), generator=g), torch.randn(images.shape, generator=g)) for _ in range(8)]

    def probe_loss() -> float:
        with torch.no_grad():
            return sum(loss(t, n).item() for t, n in probe) / len(probe)

    before = probe_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(300):
        optimizer.zero_grad(set_to_none=True)
        loss(torch.randint(0, 1000, (8,)), torch.randn_like(images)).backward()
        optimizer.step()
    after = probe_loss()
    assert after < 0.5 * before, (before, after)
