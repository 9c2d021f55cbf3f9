"""First-stage training: a KL or VQ autoencoder with reconstruction, perceptual (LPIPS), KL or codebook losses and
a PatchGAN discriminator switched on at ``disc_start`` (Esser et al. 2021, "Taming Transformers", sec. 3.1;
Rombach et al. 2022, appendix G).

Generator objective per step, all terms means (so LDM's weights carry over unchanged):

    L = rec + lpips_weight * LPIPS + kl_weight * KL / (C H W)                       (KL autoencoder)
    L = rec + lpips_weight * LPIPS + codebook_weight * L_codebook + commitment_weight * L_commit   (VQ)
    (+ lambda * L_G once step >= disc_start)

``rec`` is the per-pixel L1 or L2 error. KL is summed over the latent per image and divided by the number of image
elements: CompVis sums both the pixel loss and the KL per image, so their ``kl_weight`` (1e-6) means the same here.
The adaptive weight (Esser et al. 2021, eq. 7) is lambda = disc_weight * clamp(|grad_w rec+LPIPS| / (|grad_w L_G| +
1e-4), 0, 1e4) at the decoder's last convolution weight ``w``. The discriminator gets its own AdamW and is trained
on the detached reconstructions of the same batch.

``init_from`` starts from a saved autoencoder; with ``decoder_only`` the encoder side stays fixed and only the
decoder trains (as Stable Diffusion's ft-EMA / ft-MSE VAE decoders were made): every image keeps its latent, so
latent caches and diffusion models trained on the old autoencoder stay valid and decode through the new decoder.

Run directory (``out_dir``):

- ``config.yaml``                   the resolved training config
- ``autoencoder.safetensors``       weights + config (openldm model file; ``load_model(path)`` rebuilds it), with
  ``scaling_factor`` = 1 / std of the latents measured on a sample of the data at every save
- ``discriminator.safetensors``     PatchGAN weights + config
- ``training_state.safetensors``    both optimisers and schedules, step, data position, RNG states (no pickle)
- ``metrics.jsonl``                 every loss term, every ``log_every`` steps
- ``samples/step_XXXXXX.png``       originals (top row) over reconstructions, every ``sample_every`` steps

Every file is written atomically; a resumed run follows the uninterrupted one's losses bit for bit.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from openldm.config import from_dict, to_dict
from openldm.data import build_dataset
from openldm.data.latent_cache import measure_scaling_factor
from openldm.evaluation.grid import image_grid
from openldm.io.files import atomic_path
from openldm.io.native import load_model, save_model
from openldm.models.autoencoder import AutoencoderKL, latent_mode
from openldm.models.discriminator import (
    DiscriminatorConfig,
    PatchGANDiscriminator,
    gan_losses,
)
from openldm.models.lpips import LPIPS
from openldm.registry import MODELS, PRESETS
from openldm.training.checkpoint import LoopState, begin_run, check_finite, check_grad_norm, load_weights
from openldm.training.common import (
    PRECISIONS,
    BatchStream,
    DataSpec,
    StopFlag,
    TrainingDiverged,
    append_metrics,
    autocast_dtype,
    write_config,
)
from openldm.training.optim import OptimConfig, make_optimizer

AUTOENCODER_KINDS = ("autoencoder_kl", "vq_autoencoder")
RECON_LOSSES = ("l1", "l2")
ADAPTIVE_WEIGHT_MAX = 1e4


def _gan_optim() -> OptimConfig:
    return OptimConfig(lr=1e-4, betas=(0.5, 0.9), grad_clip=None)  # taming / LDM use Adam(0.5, 0.9)


@dataclass
class AutoencoderTrainConfig:
    data: DataSpec = field(default_factory=DataSpec)
    autoencoder_preset: str = "tiny-vae"  # a registered autoencoder preset: its kind is autoencoder_kl or vq_autoencoder
    autoencoder: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's fields
    init_from: str | None = None  # an openldm autoencoder file to start from (its architecture replaces the preset's)
    decoder_only: bool = False  # freeze the encoder side (encoder, quant_conv, codebook): the latents stay the same
    recon_loss: str = "l1"  # l1 | l2
    lpips_weight: float = 1.0
    lpips_vgg: str | None = None  # torchvision VGG16 weights; None (with lpips_heads None) = no LPIPS term
    lpips_heads: str | None = None  # lpips v0.1 VGG heads
    kl_weight: float = 1e-6
    codebook_weight: float = 1.0
    commitment_weight: float | None = None  # None = the VQ model's beta
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)  # in_channels follows the data
    disc_start: int = 2000  # first step at which the GAN terms are on
    disc_weight: float = 0.5
    gan_loss: str = "hinge"  # hinge | vanilla | least_squares
    adaptive_weight: bool = True  # False: lambda = disc_weight
    optim: OptimConfig = field(default_factory=_gan_optim)  # the autoencoder's AdamW
    disc_optim: OptimConfig = field(default_factory=_gan_optim)  # the discriminator's AdamW
    batch_size: int = 16  # per optimiser step (over accumulation steps)
    grad_accum: int = 1
    steps: int = 10000
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + grad scaler, GPU)
    seed: int = 0
    device: str = "cpu"
    out_dir: str = "runs/autoencoder"
    log_every: int = 25
    save_every: int = 1000
    keep_checkpoints: int = 2  # whole checkpoints kept under checkpoints/ (the newest; the others are deleted)
    sample_every: int = 500  # reconstruction grid PNG; 0 disables
    num_sample_images: int = 8
    scale_samples: int = 512  # images encoded to measure the latent scale factor
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss {self.recon_loss!r} is not one of {RECON_LOSSES}")
        gan_losses(self.gan_loss)  # raises with the accepted names
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be a positive multiple of grad_accum={self.grad_accum}")
        if (self.lpips_vgg is None) != (self.lpips_heads is None):
            raise ValueError(f"LPIPS needs both lpips_vgg and lpips_heads (got {self.lpips_vgg!r}, {self.lpips_heads!r}); "
                             "set both, or neither for no perceptual loss")
        for name in ("lpips_weight", "kl_weight", "codebook_weight", "disc_weight", "disc_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.steps < 1 or self.log_every < 1 or self.save_every < 1 or self.sample_every < 0:
            raise ValueError(f"steps ({self.steps}), log_every ({self.log_every}) and save_every ({self.save_every}) must "
                             f"be >= 1 and sample_every ({self.sample_every}) >= 0")
        if self.init_from is not None and self.autoencoder:
            raise ValueError(f"autoencoder overrides {sorted(self.autoencoder)} cannot apply with init_from "
                             f"{self.init_from!r}: the architecture comes from that file; remove the overrides")
        if self.decoder_only and self.init_from is None:
            raise ValueError("decoder_only needs init_from: an autoencoder whose encoder is already trained "
                             "(training a decoder on a random frozen encoder is not what you want)")
        if self.scale_samples < 1 or self.num_sample_images < 1:
            raise ValueError(f"scale_samples ({self.scale_samples}) and num_sample_images ({self.num_sample_images}) "
                             "must be >= 1")


def build_autoencoder(cfg: AutoencoderTrainConfig, image_channels: int) -> nn.Module:
    """The preset's autoencoder with the user's overrides; in/out channels follow the data."""
    kind, base = PRESETS.get(cfg.autoencoder_preset)()
    if kind not in AUTOENCODER_KINDS:
        raise ValueError(f"autoencoder_preset {cfg.autoencoder_preset!r} is a {kind} preset; "
                         f"choose an autoencoder preset ({', '.join(AUTOENCODER_KINDS)})")
    data = {**to_dict(base), **cfg.autoencoder, "in_channels": image_channels, "out_channels": image_channels}
    return MODELS.get(kind)(from_dict(type(base), data, where="autoencoder"))


def initial_autoencoder(cfg: AutoencoderTrainConfig, image_channels: int) -> nn.Module:
    """The model training starts from: ``init_from``'s weights and architecture (float32), else a fresh preset."""
    if cfg.init_from is None:
        return build_autoencoder(cfg, image_channels)
    path = Path(cfg.init_from)
    if not path.is_file():
        raise FileNotFoundError(f"init_from {str(path)!r} does not exist; give an openldm autoencoder file such as "
                                "runs/NAME/autoencoder.safetensors")
    model = load_model(path).float()
    if not isinstance(model, tuple(MODELS.get(kind) for kind in AUTOENCODER_KINDS)):
        raise ValueError(f"init_from {str(path)!r} holds a {type(model).__name__}, not an autoencoder "
                         f"({', '.join(AUTOENCODER_KINDS)})")
    if model.config.in_channels != image_channels:
        raise ValueError(f"init_from {str(path)!r} takes {model.config.in_channels}-channel images but the data has "
                         f"{image_channels} channels")
    return model


ENCODER_SIDE = ("encoder", "quant_conv", "quantizer")  # what maps images to (pre-decoder) latents


def freeze_encoder_side(model: nn.Module) -> None:
    """Fix everything before the decoder (``decoder_only``): no gradients and eval mode (so a VQ codebook's EMA
    does not move either), so every image keeps its latent and a diffusion model trained on them stays valid."""
    for name in ENCODER_SIDE:
        part = getattr(model, name, None)
        if part is not None:
            part.requires_grad_(False)
            part.eval()


def last_layer(autoencoder: nn.Module) -> nn.Parameter:
    """The weight at which the adaptive GAN weight compares gradient norms: the decoder's output convolution."""
    return autoencoder.decoder.conv_out.weight


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, layer: nn.Parameter, disc_weight: float) -> torch.Tensor:
    """Esser et al. 2021, eq. 7: disc_weight * |grad nll| / (|grad L_G| + 1e-4), clamped to [0, 1e4], detached."""
    nll_grad = torch.autograd.grad(nll_loss, layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, layer, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(g_grad) + 1e-4)
    return weight.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach() * disc_weight


def _recon(x: torch.Tensor, recon: torch.Tensor, kind: str) -> torch.Tensor:
    return F.l1_loss(recon, x) if kind == "l1" else F.mse_loss(recon, x)


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # LPIPS's VGG wants 3 channels


def generator_terms(cfg: AutoencoderTrainConfig, model: nn.Module, x: torch.Tensor, generator: torch.Generator,
                    lpips: LPIPS | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One autoencoder forward: (reconstruction, nll = rec + lpips_weight * LPIPS, {term name: scalar}) where the
    terms include the weighted regulariser ``reg`` (KL or codebook + commitment)."""
    terms: dict[str, torch.Tensor] = {}
    if isinstance(model, AutoencoderKL):
        recon, posterior = model(x, sample_posterior=True, generator=generator)
        terms["kl"] = posterior.kl().mean() / x[0].numel()  # nats per image element (see the module doc)
        terms["reg"] = cfg.kl_weight * terms["kl"]
    else:
        recon, q = model(x, generator=generator)
        beta = q.beta if cfg.commitment_weight is None else cfg.commitment_weight
        terms.update(codebook=q.codebook_loss, commitment=q.commitment_loss, perplexity=q.perplexity.detach())
        terms["reg"] = cfg.codebook_weight * q.codebook_loss + beta * q.commitment_loss
    recon = recon.float()
    terms["rec"] = _recon(x, recon, cfg.recon_loss)
    nll = terms["rec"]
    if lpips is not None:
        terms["lpips"] = lpips(_rgb(x), _rgb(recon)).mean()
        nll = nll + cfg.lpips_weight * terms["lpips"]
    terms["nll"] = nll
    return recon, nll, terms


@torch.no_grad()
def autoencoder_scaling_factor(model: nn.Module, dataset, num_images: int, batch_size: int, device: torch.device,
                               seed: int = 0) -> float:
    """1 / std of the latents (posterior mode, or pre-quantisation VQ latents: what ``encode`` gives a latent
    cache) of ``num_images`` images drawn without replacement from ``dataset`` with ``seed``."""
    was_training = model.training
    model.eval()
    n = min(num_images, len(dataset))
    rows = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    latents = []
    for i in range(0, n, batch_size):
        x = torch.stack([dataset[j]["image"] for j in rows[i:i + batch_size]]).to(device).float()
        z = model.encode(x)
        latents.append(latent_mode(z).float().cpu())
    model.train(was_training)
    return measure_scaling_factor(torch.cat(latents), max_items=None)


@torch.no_grad()
def save_reconstructions(model: nn.Module, images: torch.Tensor, path: Path) -> None:
    """PNG grid: ``images`` on the top row, their deterministic reconstructions (posterior mode / quantised
    latents) below."""
    was_training = model.training
    model.eval()
    z = model.encode(images)
    recon = model.decode(latent_mode(z))
    model.train(was_training)
    with atomic_path(path) as tmp:
        image_grid([images, recon.clamp(-1, 1)]).save(tmp, format="PNG")


def _save_weights(folder: Path, model: nn.Module, disc: nn.Module, scale: float) -> None:
    model.config = dataclasses.replace(model.config, scaling_factor=scale)
    save_model(model, folder / "autoencoder.safetensors")
    save_model(disc, folder / "discriminator.safetensors")


def train_autoencoder(cfg: AutoencoderTrainConfig, *, resume: bool | str = False, progress: bool = True,
                      on_log: Callable[[dict], None] | None = None, fail_at_step: int | None = None,
                      overwrite: bool = False) -> dict[str, Any]:
    """Train (or, with ``resume``, continue the run in ``cfg.out_dir``) and return
    {"step", "history" (the logged records), "stopped" (by a signal), "scaling_factor", "autoencoder" (path)}.
    ``resume`` and ``overwrite``: see :func:`~openldm.training.checkpoint.begin_run`. ``fail_at_step`` injects a
    NaN loss into the update after that many steps (tests; the error names the logged step, one more)."""
    out_dir = Path(cfg.out_dir)
    device = torch.device(cfg.device)
    start = begin_run(out_dir, to_dict(cfg), resume=resume, overwrite=overwrite, keep=cfg.keep_checkpoints)
    write_config(cfg, out_dir)
    dataset = build_dataset(cfg.data.name, cfg.data.options)
    channels = dataset[0]["image"].shape[0]
    torch.manual_seed(cfg.seed)  # parameter initialisation
    model = initial_autoencoder(cfg, channels).to(device)
    disc = PatchGANDiscriminator(dataclasses.replace(cfg.discriminator, in_channels=channels)).to(device)
    lpips = LPIPS.from_files(cfg.lpips_vgg, cfg.lpips_heads).to(device) if cfg.lpips_vgg else None
    d_loss_fn, g_loss_fn = gan_losses(cfg.gan_loss)
    if cfg.decoder_only:
        freeze_encoder_side(model)
    g_params = [p for p in model.parameters() if p.requires_grad]
    d_params = list(disc.parameters())
    opt_g, sched_g = make_optimizer(g_params, cfg.optim, cfg.steps)
    opt_d, sched_d = make_optimizer(d_params, cfg.disc_optim, max(1, cfg.steps - cfg.disc_start))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    amp = autocast_dtype(cfg.precision)
    gen = torch.Generator(device).manual_seed(cfg.seed + 1)  # posterior samples, dead-code restarts
    micro = cfg.batch_size // cfg.grad_accum
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"dataset has {len(dataset)} items, fewer than one batch of {cfg.batch_size}")
    stream = BatchStream(dataset, micro, cfg.seed, cfg.num_workers)
    loop = LoopState(stream, {"g": opt_g, "d": opt_d}, {"g": sched_g, "d": sched_d}, {"gen": gen}, scaler)
    step = 0
    if start.folder is not None:
        for module, name in ((model, "autoencoder.safetensors"), (disc, "discriminator.safetensors")):
            load_weights(module, load_model(start.folder / name).state_dict(), start.folder / name)
        step = loop.load_state_dict(start.state, lrs={"g": cfg.optim.lr, "d": cfg.disc_optim.lr})
    fixed = torch.stack([dataset[i]["image"] for i in range(min(cfg.num_sample_images, len(dataset)))]).to(device)

    def checkpoint() -> float:
        scale = autoencoder_scaling_factor(model, dataset, cfg.scale_samples, micro, device, cfg.seed)
        start.checkpoints.save(step, loop.state_dict(step), lambda d: _save_weights(d, model, disc, scale))
        return scale

    history: list[dict] = []
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train-autoencoder")
    stopper = StopFlag()
    t_last, seen, scale = time.perf_counter(), 0, None
    with stopper.installed():
        while step < cfg.steps and not stopper.stop:
            model.train()
            if cfg.decoder_only:
                freeze_encoder_side(model)
            disc.train()
            gan_on = step >= cfg.disc_start
            sums: dict[str, float] = {}
            for _ in range(cfg.grad_accum):
                x = next(stream)["image"].to(device).float()
                # Generator: the discriminator is frozen so L_G's gradient reaches only the autoencoder.
                disc.requires_grad_(False)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    recon, nll, terms = generator_terms(cfg, model, x, gen, lpips)
                    loss = nll + terms["reg"]
                    if gan_on:
                        terms["g_loss"] = g_loss_fn(disc(recon).float())
                        terms["gan_weight"] = (adaptive_weight(nll, terms["g_loss"], last_layer(model), cfg.disc_weight)
                                               if cfg.adaptive_weight else torch.tensor(cfg.disc_weight, device=device))
                        loss = loss + terms["gan_weight"] * terms["g_loss"]
                if fail_at_step is not None and step == fail_at_step:
                    loss = loss * float("nan")
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"autoencoder loss is {loss.item()} at step {step + 1}; training stopped, the "
                                           f"last good checkpoint in {str(out_dir)!r} is untouched")
                scaler.scale(loss / cfg.grad_accum).backward()
                terms["loss"] = loss
                # Discriminator, on the same batch's detached reconstructions.
                if gan_on:
                    disc.requires_grad_(True)
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        logits_real, logits_fake = disc(x).float(), disc(recon.detach()).float()
                        terms["d_loss"] = d_loss_fn(logits_real, logits_fake)
                    if not torch.isfinite(terms["d_loss"]):
                        raise TrainingDiverged(f"discriminator loss is {terms['d_loss'].item()} at step {step + 1}; "
                                               f"training stopped, the last good checkpoint in {str(out_dir)!r} is untouched")
                    scaler.scale(terms["d_loss"] / cfg.grad_accum).backward()
                    terms.update(logits_real=logits_real.mean().detach(), logits_fake=logits_fake.mean().detach())
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
                seen += x.shape[0]
            scaler.unscale_(opt_g)
            sums["grad_norm"] = float(nn.utils.clip_grad_norm_(g_params, cfg.optim.grad_clip or math.inf))
            check_grad_norm(sums["grad_norm"], step + 1, out_dir, scaler)
            scaler.step(opt_g)
            if gan_on:
                scaler.unscale_(opt_d)
                sums["d_grad_norm"] = float(nn.utils.clip_grad_norm_(d_params, cfg.disc_optim.grad_clip or math.inf))
                check_grad_norm(sums["d_grad_norm"], step + 1, out_dir, scaler, "discriminator's gradient norm")
                scaler.step(opt_d)
            scaler.update()
            check_finite(g_params + d_params, step + 1, out_dir)
            opt_g.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            sched_g.step()
            if gan_on:
                sched_d.step()  # the discriminator's schedule starts at disc_start
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                rec = {"step": step, **sums, "lr": sched_g.get_last_lr()[0], "images_per_s": seen / max(now - t_last, 1e-9)}
                t_last, seen = now, 0
                history.append(rec)
                bar.set_postfix(rec=f"{sums['rec']:.4f}")
                append_metrics(out_dir, rec)
                if on_log:
                    on_log(rec)
            if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
                save_reconstructions(model, fixed, out_dir / "samples" / f"step_{step:06d}.png")
            if step % cfg.save_every == 0 or step == cfg.steps or stopper.stop:
                scale = checkpoint()
    bar.close()
    if scale is None:  # nothing trained this call (a finished run resumed): the saved file already holds the factor
        scale = float(load_model(out_dir / "autoencoder.safetensors").config.scaling_factor) \
            if (out_dir / "autoencoder.safetensors").is_file() else checkpoint()
    return {"step": step, "history": history, "stopped": stopper.stop, "scaling_factor": scale,
            "autoencoder": str(out_dir / "autoencoder.safetensors")}
