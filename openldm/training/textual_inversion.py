"""Textual inversion: learn a name's token vectors for a frozen Stable Diffusion model, saved as an A1111 embedding.

Gal et al. 2022, "An Image is Worth One Word: Personalizing Text-to-Image Generation using Textual Inversion",
eq. 2: v* = argmin_v E_{x, y, eps, t} || eps - eps_theta(x_t, t, c_theta(y(v))) ||^2, where y(v) is a prompt naming
the concept and c_theta the frozen text encoder reading the N vectors v in place of the name's tokens. Only v
trains (AdamW, as AUTOMATIC1111 trains embeddings); UNet, autoencoder and text encoder stay as loaded. The target
follows the checkpoint's prediction type (eps or v).

As in A1111: the vectors start from the token embeddings of ``init_text`` spread over the N vectors; prompts come
from ``template`` with ``[name]`` replaced by the name and ``[filewords]`` by the image's caption (image folders
with captions, ``openldm.data.folder``); each image is encoded once (one posterior sample, from the seed). The file
is written by ``openldm.io.embeddings.save_embedding`` in A1111's layout, which A1111 and diffusers load.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from openldm.data import build_dataset
from openldm.diffusion.objectives import sample_timesteps, target
from openldm.diffusion.schedules import ScheduleConfig, make_alphas_cumprod, q_sample
from openldm.io.embeddings import save_embedding
from openldm.io.sd import load_sd
from openldm.models.autoencoder import LatentCodec
from openldm.models.text_encoder import encode_prompts


@dataclass
class TextualInversionConfig:
    """``openldm train-embedding``: the base model, a captioned image folder, the name to learn and where to save it
    (``.pt`` or ``.safetensors``; A1111 and openldm name an embedding after its file, so ``out``'s stem is usually
    ``name``), and the optimisation."""

    base_model: str
    data: str
    name: str
    out: str
    num_vectors: int = 1
    init_text: str = "*"
    template: str = "a photo of [name], [filewords]"
    size: int = 512
    steps: int = 1000
    batch_size: int = 1
    lr: float = 5e-3
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("num_vectors", "size", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TextualInversionConfig.{name}={getattr(self, name)}; must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"TextualInversionConfig.lr={self.lr}; must be > 0")
        if "[name]" not in self.template:
            raise ValueError(f"TextualInversionConfig.template={self.template!r} must contain [name]")
        if Path(self.out).suffix.lower() not in (".pt", ".safetensors"):
            raise ValueError(f"TextualInversionConfig.out={self.out!r} must end in .pt or .safetensors")
        if not self.name.strip():
            raise ValueError("TextualInversionConfig.name is empty; give the word prompts will use")


def initial_vectors(tokenizer, text_encoder, init_text: str, num_vectors: int) -> torch.Tensor:
    """(N, D) float32: the token embeddings of ``init_text``, vector i taken from token ``i * len // N`` (A1111)."""
    ids = tokenizer.encode(init_text)
    if not ids:
        raise ValueError(f"init_text={init_text!r} has no tokens; give a word such as '*' or 'style'")
    table = text_encoder.embeddings.token_embedding.weight.detach().float().cpu()
    return torch.stack([table[ids[i * len(ids) // num_vectors]] for i in range(num_vectors)])


def _prompt(template: str, name: str, caption: str) -> str:
    return template.replace("[name]", name).replace("[filewords]", caption).strip(" ,")


def train_embedding(cfg: TextualInversionConfig, *, device: str | torch.device = "cpu",
                    progress: bool = True) -> dict:
    """Train ``cfg.name``'s vectors and save them to ``cfg.out``; returns {"out", "losses" (one per step),
    "vectors" (N, D)}."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{str(out)!r} exists; set overwrite=true to replace it")
    sd = load_sd(cfg.base_model, device=device)
    for module in (sd.unet, sd.vae, sd.text_encoder):
        module.eval().requires_grad_(False)
    data = build_dataset("image_folder", {"root": cfg.data, "size": cfg.size, "crop": "center"})
    if len(data) == 0:
        raise ValueError(f"image folder {cfg.data!r} holds no readable images")
    generator = torch.Generator().manual_seed(cfg.seed)
    codec = LatentCodec(sd.vae, sd.vae.config.scaling_factor)
    latents, captions = [], []
    with torch.no_grad():
        for i in range(len(data)):
            item = data[i]
            latents.append(codec.encode(item["image"][None].to(device), generator).float().cpu())
            captions.append(str(item.get("caption", "")))
    latents = torch.cat(latents)  # (num_images, C, h, w)
    schedule = sd.schedule
    alphas_cumprod = make_alphas_cumprod(schedule) if isinstance(schedule, ScheduleConfig) else schedule.float()

    vectors = torch.nn.Parameter(initial_vectors(sd.tokenizer, sd.text_encoder, cfg.init_text, cfg.num_vectors)
                                 .to(device))
    optimizer = torch.optim.AdamW([vectors], lr=cfg.lr)
    losses: list[float] = []
    for _ in tqdm(range(cfg.steps), disable=not progress, desc=f"textual inversion {cfg.name}"):
        index = torch.randint(len(data), (cfg.batch_size,), generator=generator)
        x0 = latents[index].to(device)
        t = sample_timesteps(cfg.batch_size, alphas_cumprod.shape[0], generator)
        eps = torch.randn(x0.shape, generator=generator).to(device)
        x_t = q_sample(x0, t.to(device), alphas_cumprod, eps)
        prompts = [_prompt(cfg.template, cfg.name, captions[i]) for i in index.tolist()]
        context = encode_prompts(sd.tokenizer, sd.text_encoder, prompts, embeddings={cfg.name: vectors})
        output = sd.unet(x_t, t.to(device).float(), context=context)
        loss = F.mse_loss(output.float(), target(x0, eps, alphas_cumprod[t].to(device), sd.prediction))
        if not torch.isfinite(loss):
            raise ValueError(f"the loss became {loss.item()} at step {len(losses)}; lower lr={cfg.lr}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    saved = save_embedding(vectors.detach().cpu(), out, name=cfg.name, step=cfg.steps)
    return {"out": saved, "losses": losses, "vectors": vectors.detach().cpu()}


__all__ = ["TextualInversionConfig", "initial_vectors", "train_embedding"]
