"""Named model sizes as small factory functions (DiT's habit): each returns a config, nothing else.

Every factory is registered in ``openldm.registry.PRESETS`` under a name; the registered callable returns
``(model name, config)`` so that ``MODELS.get(model)(config)`` builds it. Call the factories directly when
you want the config alone: ``sd15_unet().context_dim``.
"""
from __future__ import annotations

from typing import Callable

from openldm.models.unet import UNetConfig
from openldm.registry import PRESETS


def _preset(name: str, model: str) -> Callable:
    """Register the decorated factory as preset ``name`` of model ``model``; the factory itself is unchanged."""
    def register(factory: Callable) -> Callable:
        PRESETS.register(name, lambda: (model, factory()))
        return factory
    return register


# ---- UNet -----------------------------------------------------------------------------------------------

@_preset("sd15-unet", "unet")
def sd15_unet() -> UNetConfig:
    """Stable Diffusion v1.x (v1.1-v1.5 share it): 859,520,964 parameters, CLIP ViT-L/14 context (768)."""
    return UNetConfig(
        in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
        attention_levels=(0, 1, 2), num_heads=8, head_dim=None, transformer_depth=1, context_dim=768,
    )


@_preset("sd15-inpaint-unet", "unet")
def sd15_inpaint_unet() -> UNetConfig:
    """SD v1.5 inpainting: 4 latent channels + 5 concatenated (mask, masked-image latent)."""
    cfg = sd15_unet()
    cfg.concat_channels = 5
    return cfg


@_preset("sd2-unet", "unet")
def sd2_unet() -> UNetConfig:
    """Stable Diffusion 2.x (base and 768-v): heads of width 64, linear projections, OpenCLIP ViT-H context (1024)."""
    return UNetConfig(
        in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
        attention_levels=(0, 1, 2), num_heads=None, head_dim=64, transformer_depth=1, context_dim=1024,
        use_linear_projection=True,
    )


@_preset("tiny-unet", "unet")
def tiny_unet() -> UNetConfig:
    """Two levels, 32 channels: unit tests and smoke runs on 8-32 px latents (935,524 parameters)."""
    return UNetConfig(
        in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_levels=(1,), num_heads=4, head_dim=None, transformer_depth=1, context_dim=None, norm_groups=8,
    )


@_preset("small-unet", "unet")
def small_unet() -> UNetConfig:
    """Three levels, 64 channels: 28-64 px pixels (set in/out channels) or latents, trainable on a CPU (9,344,900)."""
    return UNetConfig(
        in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
        attention_levels=(1, 2), num_heads=None, head_dim=32, transformer_depth=1, context_dim=None, norm_groups=32,
    )


# ---- autoencoders and text encoders (their factories live beside their configs) ------------------------

def _register_factories() -> None:
    from openldm.models import autoencoder as ae
    from openldm.models import text_encoder as te

    table = [
        ("sd-vae", "autoencoder_kl", ae.sd_autoencoder_kl),
        ("small-vae", "autoencoder_kl", ae.small_autoencoder_kl),
        ("tiny-vae", "autoencoder_kl", ae.tiny_autoencoder_kl),
        ("ldm-vq-f4", "vq_autoencoder", ae.ldm_vq_f4),
        ("small-vq", "vq_autoencoder", ae.small_vq),
        ("tiny-vq", "vq_autoencoder", ae.tiny_vq),
        ("sd15-text-encoder", "clip_text", te.sd15_text_config),
        ("sd2-text-encoder", "clip_text", te.sd2_text_config),
        ("tiny-text-encoder", "clip_text", te.tiny_text_config),
    ]
    for name, model, factory in table:
        _preset(name, model)(factory)


_register_factories()
