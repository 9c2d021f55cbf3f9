"""The recipe chain that retrains the bundled Fashion-MNIST model from scratch: the autoencoder, its decoder
fine-tuned with the encoder fixed, then the class + text latent diffusion model on its latents."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from openldm.config import load
from openldm.training.autoencoder import AutoencoderTrainConfig, train_autoencoder
from openldm.training.diffusion import DiffusionTrainConfig, train_diffusion

AUTOENCODER_RECIPE = "configs/fmnist_autoencoder_kl.yaml"
DECODER_RECIPE = "configs/fmnist_autoencoder_kl_decoder.yaml"
DIFFUSION_RECIPE = "configs/fmnist_class_text.yaml"


def retrain(work_dir: str | Path = "runs/demo", *, progress: bool = True,
            autoencoder_recipe: str = AUTOENCODER_RECIPE, decoder_recipe: str = DECODER_RECIPE,
            diffusion_recipe: str = DIFFUSION_RECIPE,
            overrides: list[str] | None = None, autoencoder_overrides: list[str] | None = None,
            log: Callable[[str], None] = print) -> Path:
    """Train the bundled model from scratch with the recipes (the autoencoder, then its decoder fine-tuned with the
    encoder fixed, then the class + text latent diffusion model on its latents) and return the diffusion run's
    directory (``openldm.pipelines.trained.export_run`` packs it as the bundle is packed). ``overrides`` apply to the diffusion recipe, ``autoencoder_overrides`` (dotted, e.g.
    ``steps=100``) to both autoencoder stages. Resumes where a previous call stopped."""
    for recipe in (autoencoder_recipe, decoder_recipe, diffusion_recipe):
        if not Path(recipe).is_file():
            raise FileNotFoundError(f"recipe {recipe!r} not found; run from the repository root (it holds configs/)")
    work = Path(work_dir)
    t0 = time.perf_counter()
    ae_cfg = load(AutoencoderTrainConfig, autoencoder_recipe, [f"out_dir={work / 'autoencoder'}", *(autoencoder_overrides or [])])
    log(f"training the autoencoder ({ae_cfg.steps} steps) into {ae_cfg.out_dir}")
    first = train_autoencoder(ae_cfg, resume="auto", progress=progress)["autoencoder"]
    dec_cfg = load(AutoencoderTrainConfig, decoder_recipe,
                   [f"init_from={first}", f"out_dir={work / 'decoder'}", *(autoencoder_overrides or [])])
    log(f"fine-tuning its decoder ({dec_cfg.steps} steps, encoder fixed) into {dec_cfg.out_dir}")
    ae_file = train_autoencoder(dec_cfg, resume="auto", progress=progress)["autoencoder"]
    cfg = load(DiffusionTrainConfig, diffusion_recipe,
               [f"autoencoder={ae_file}", f"out_dir={work / 'diffusion'}", *(overrides or [])])
    log(f"training the latent diffusion model ({cfg.steps} steps) into {cfg.out_dir}")
    train_diffusion(cfg, resume="auto", progress=progress)
    log(f"retrained in {(time.perf_counter() - t0) / 60:.1f} min")
    return Path(cfg.out_dir)
