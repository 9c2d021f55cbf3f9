"""Load any model source behind the generation interface (``openldm.pipelines.generate``): the one place that
knows which :class:`~openldm.pipelines.generate.Generator` a source is.

Model sources: a bundled model's name (``fashion_mnist``) or None for the default one, a run directory of
``openldm train`` (or an exported / bundled run), a Stable Diffusion v1 single file (``.safetensors`` / ``.ckpt``),
a diffusers folder, or an openldm SD folder.
"""
from __future__ import annotations

from pathlib import Path

import torch

from openldm.pipelines.generate import Generator
from openldm.runtime import keep_freed_memory


def load_generator(source: str | Path | None = None, *, device: str | torch.device = "cpu",
                   dtype: str | torch.dtype = "float32", unsafe_load: bool = False, ema: bool = True,
                   vae: str | Path | None = None, step: int | None = None,
                   prediction: str | None = None, lora_dir: str | Path | None = None,
                   embeddings_dir: str | Path | None = None, compile: bool = False,
                   vae_dir: str | Path | None = None, preview_vae: str | Path | None = None) -> Generator:
    """Load ``source`` (see the module docstring; None = the default bundled model) behind the generation
    interface. ``dtype`` applies to the network weights. ``vae``: another autoencoder file in place of the model's
    (models trained here: one with the same encoder; Stable Diffusion: a published VAE, ``openldm.io.vae``).
    Models trained here: ``ema`` picks the EMA weights, ``step`` an EMA snapshot. Stable Diffusion weights:
    ``prediction`` (eps | v) overrides what the model says (``openldm.io.sd.load_sd``); ``vae_dir`` holds the VAEs
    requests may name; ``preview_vae`` decodes the live previews (a TAESD, say);
    ``lora_dir`` is where prompt tags ``<lora:NAME:WEIGHT>`` find ``NAME.safetensors``;
    ``embeddings_dir`` holds textual-inversion embeddings its prompts may name. ``compile``: torch.compile the
    UNet, and off a CPU the autoencoder's decoder (``openldm.pipelines.common.compile_networks``; graphs compile on
    first use)."""
    from openldm.io.run_dir import is_run_dir, resolve_source

    if torch.device(device).type == "cpu":
        keep_freed_memory()  # activations freed by one network call are reused by the next without page faults
    path = resolve_source(source)
    label = _bundled_name(path) or str(source)  # what PNGs record: a bundled model's name, else the source as given
    if is_run_dir(path):
        if prediction is not None:
            raise ValueError("prediction= is for Stable Diffusion weights; a run directory's config says what its "
                             "network predicts")
        from openldm.pipelines.trained_generator import TrainedGenerator

        for flag, value in (("embeddings_dir", embeddings_dir), ("vae_dir", vae_dir), ("preview_vae", preview_vae)):
            if value is not None:
                raise ValueError(f"{flag}= (--{flag.replace('_', '-')}) is for Stable Diffusion weights, not a model "
                                 "trained here")
        return TrainedGenerator.load(path, label, device=device, dtype=dtype, ema=ema, vae=vae, step=step,
                                     compile=compile)
    if step is not None:
        raise ValueError("step= is for models trained here (a run directory), not Stable Diffusion weights")
    from openldm.pipelines.sd_generator import SDGenerator

    return SDGenerator.load(path, label, device=device, dtype=dtype, unsafe_load=unsafe_load, prediction=prediction,
                            lora_dir=lora_dir, embeddings_dir=embeddings_dir, compile=compile, vae=vae,
                            vae_dir=vae_dir, preview_vae=preview_vae)


def _bundled_name(path: Path) -> str | None:
    """The name of the bundled model at ``path`` (however it was spelled), so that PNGs name it portably."""
    from openldm.bundled import BUNDLED, bundled_dir

    return next((name for name in BUNDLED if path.resolve() == bundled_dir(name, must_exist=False).resolve()), None)


__all__ = ["load_generator"]
