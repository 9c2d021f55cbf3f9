"""Models that ship inside the package (safetensors + config, a few MB), so sampling works with no training and no
downloads. Each is an exported run directory (``openldm.pipelines.trained.export_run``), loaded with ``load_run``.

- ``fashion_mnist``: a class- and text-conditional latent diffusion model of Fashion-MNIST garments (28x28,
  greyscale) with its KL autoencoder; prompts go through the bundled MiniLM encoder. Trained by
  ``configs/fmnist_autoencoder_kl.yaml``, ``configs/fmnist_autoencoder_kl_decoder.yaml`` (its decoder fine-tuned,
  encoder fixed) then ``configs/fmnist_class_text.yaml`` (``openldm demo --retrain``).
- ``emoji``: a text-conditional latent diffusion model of 64x64 colour emoji in three art styles (Noto, Twemoji,
  Fluent 3D; ``ATTRIBUTION.md`` beside it) with its KL-f4 autoencoder; prompts through the frozen text tower of
  a small CLIP trained here on the emoji captions (``text_encoder.safetensors`` beside it). Trained by
  ``configs/emoji_autoencoder_kl_f4_wide.yaml``, ``configs/emoji_clip_text.yaml`` then
  ``configs/emoji_text_clip_wide.yaml`` on ``openldm data emoji``.
"""
from __future__ import annotations

from pathlib import Path

BUNDLED = ("fashion_mnist", "emoji")
DEFAULT = "fashion_mnist"


def available() -> list[str]:
    """The bundled models whose files are present, the default first."""
    return [name for name in BUNDLED if (Path(__file__).parent / name / "config.yaml").is_file()]


def bundled_dir(name: str = DEFAULT, *, must_exist: bool = True) -> Path:
    """The folder of a bundled model; a clear error when the name is unknown or (``must_exist``) the files are
    missing. ``must_exist=False``: where a bundle goes (``openldm demo --retrain --update-bundle``)."""
    if name not in BUNDLED:
        raise ValueError(f"no bundled model {name!r}; bundled: {', '.join(BUNDLED)}")
    path = Path(__file__).parent / name
    if must_exist and not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"the bundled model {name!r} is missing from {path}; reinstall openldm or retrain it "
                                "with `openldm demo --retrain`")
    return path
