"""Contrastive training of a small CLIP (openldm.models.contrastive) on captioned images, and a retrieval report.

Objective: the symmetric InfoNCE loss of CLIP (Radford et al. 2021, fig. 3): cross-entropy of the image->text
logits over the batch's captions plus that of the text->image logits over its images, halved. Captioned
Fashion-MNIST has only 450 distinct captions, so a batch of 256 holds many images with the same caption; the
usual one-hot targets would call those pairs negatives and push identical captions apart from their own images.
Here every pair with the same caption string is a positive: each row's target is uniform over its positives
(multi-positive InfoNCE, as in SupCon, Khosla et al. 2020, eq. 2 "L_out"). Each distinct caption of a batch is
encoded once. Captions are redrawn each epoch (``dataset.set_epoch``), so an image meets its different captions.

Run directory (``out_dir``):

- ``config.yaml``                the resolved training config
- ``clip.safetensors``           the SmallCLIP (openldm model file; ``load_model(path)`` rebuilds it)
- ``training_state.safetensors`` optimiser, schedule, step, data position, RNG states (no pickle)
- ``metrics.jsonl``              loss terms every ``log_every`` steps, retrieval numbers every ``eval_every``
- ``retrieval.json``             the final :func:`retrieval_report` on the evaluation split

Every file is written atomically; a resumed run follows the uninterrupted one's losses bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from openldm.config import to_dict
from openldm.data import build_dataset
from openldm.data.captions import GARMENTS, GarmentCaptioner, all_captions, garment_phrase, image_attributes
from openldm.io.files import atomic_path
from openldm.io.native import load_model, save_model
from openldm.models.contrastive import ContrastiveConfig, SmallCLIP, prompt_vocabulary
from openldm.training.checkpoint import LoopState, begin_run, check_finite, check_grad_norm, load_weights
from openldm.training.common import (
    BatchStream,
    DataSpec,
    StopFlag,
    TrainingDiverged,
    append_metrics,
    write_config,
)
from openldm.training.optim import OptimConfig, make_optimizer

VOCABULARIES = ("captions", "full")


def _data() -> DataSpec:
    return DataSpec(name="fashion_mnist", options={"split": "train", "size": 32, "captions": True})


def _optim() -> OptimConfig:
    return OptimConfig(lr=2e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6, warmup_steps=50, schedule="cosine",
                       min_lr_ratio=0.05, grad_clip=1.0)


@dataclass
class CLIPTrainConfig:
    """``data``: a captioned dataset (items with "image", "label", "caption"). ``eval_data``: options merged over
    the data options for evaluation (default the test split). ``model``: the SmallCLIP; its ``image_shape``
    follows the data. ``vocabulary``: "captions" keeps only the BPE tokens of the data set's captions
    (its ``caption_texts()``), "full" CLIP's 49,408. ``eval_every``: steps between retrieval reports in
    metrics.jsonl (0 = only the final one). ``eval_pairs``: image-caption pairs of the image->text recall test.
    ``threads``: torch CPU threads during the run (0 = leave torch's setting; on a busy machine 1 is often fastest)."""

    data: DataSpec = field(default_factory=_data)
    eval_data: dict[str, Any] = field(default_factory=lambda: {"split": "test"})
    model: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    vocabulary: str = "captions"
    optim: OptimConfig = field(default_factory=_optim)
    batch_size: int = 128
    steps: int = 1000
    seed: int = 0
    device: str = "cpu"
    out_dir: str = "runs/clip"
    log_every: int = 25
    save_every: int = 500
    keep_checkpoints: int = 2  # whole checkpoints kept under checkpoints/ (the newest; the others are deleted)
    eval_every: int = 0
    eval_pairs: int = 1000
    num_workers: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        if self.vocabulary not in VOCABULARIES:
            raise ValueError(f"vocabulary {self.vocabulary!r}; choose one of: {', '.join(VOCABULARIES)}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size={self.batch_size}; a contrastive batch needs >= 2 pairs")
        if self.steps < 1 or self.log_every < 1 or self.save_every < 1 or self.eval_every < 0 or self.eval_pairs < 1:
            raise ValueError(f"steps ({self.steps}), log_every ({self.log_every}), save_every ({self.save_every}) and "
                             f"eval_pairs ({self.eval_pairs}) must be >= 1 and eval_every ({self.eval_every}) >= 0")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads}; must be >= 1, or 0 for torch's setting")


# ------------------------------------------------------------------------------------------------- the loss


def caption_positives(captions: list[str]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(distinct captions in first-seen order, index (B,) of each caption among them, positives (B, B) bool: True
    where two items share a caption, the diagonal included)."""
    distinct = list(dict.fromkeys(captions))
    where = {c: i for i, c in enumerate(distinct)}
    index = torch.tensor([where[c] for c in captions])
    return distinct, index, index[:, None] == index[None, :]


def multi_positive_infonce(logits_per_image: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Symmetric InfoNCE with every positive pair as a target: (loss, terms). ``logits_per_image`` (B, B): image i
    against text j; ``positives`` (B, B) bool, symmetric, True on the diagonal. Each row's target distribution is
    uniform over its positives; with one-hot positives this is CLIP's loss."""
    targets = positives.float() / positives.sum(dim=1, keepdim=True)  # (B, B), rows sum to 1
    loss_i2t = F.cross_entropy(logits_per_image, targets)
    loss_t2i = F.cross_entropy(logits_per_image.T, targets)  # positives are symmetric: the same targets
    hits = positives.gather(1, logits_per_image.argmax(dim=1, keepdim=True)).float().mean()
    return (loss_i2t + loss_t2i) / 2, {"loss_i2t": loss_i2t.detach(), "loss_t2i": loss_t2i.detach(), "batch_acc": hits}


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and kernels only: not on biases, norms, embeddings or the temperature."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embedding" not in name else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------- evaluation


def _captions_of_class(label: int) -> list[str]:
    return all_captions(label + 1)[len(all_captions(label)):]


@torch.no_grad()
def _encode_dataset(model: SmallCLIP, dataset: Dataset, batch_size: int) -> tuple[torch.Tensor, ...]:
    device = model.logit_scale.device
    embeds, labels, captions, images = [], [], [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        x = torch.stack([it["image"] for it in items])  # (b, C, H, W)
        embeds.append(model.encode_image(x.to(device).float()).float().cpu())
        labels.extend(int(it["label"]) for it in items)
        captions.extend(it.get("caption") for it in items)
        images.append(x[:, 0].float())  # first channel, for tone and width
    return torch.cat(embeds), torch.tensor(labels), captions, torch.cat(images)


def _hit_chance(multiplicity: torch.Tensor, candidates: int, r: int) -> float:
    """The mean chance that r of ``candidates`` drawn at random hold one of an item's ``multiplicity`` matches."""
    r = min(r, candidates)
    miss = torch.ones(len(multiplicity), dtype=torch.float64)
    for j in range(r):  # C(P - m, r) / C(P, r) as a product
        miss *= ((candidates - multiplicity - j) / (candidates - j)).clamp(min=0)
    return float((1 - miss).mean())


@torch.no_grad()
def retrieval_report(model: SmallCLIP, dataset: Dataset, *, batch_size: int = 500, num_pairs: int = 1000,
                     top_k: int = 10, seed: int = 0) -> dict[str, Any]:
    """Retrieval numbers of ``model`` on a captioned ``dataset`` (items "image" in [-1, 1], "label", "caption").

    On any captioned set, over ``num_pairs`` random (image, caption) pairs:

    - ``image_to_text_recall_at_1`` / ``_at_5``: each image ranks the pairs' distinct captions; a hit when its own
      caption string is among the first 1 / 5;
    - ``text_to_image_recall_at_1`` / ``_at_5``: each distinct caption ranks the pairs' images; a hit when one of
      the first 1 / 5 carries that caption.

    On captioned Fashion-MNIST (openldm.data.captions) also:

    - ``zero_shot_accuracy``: each image classified as the nearest of the 10 plain class phrases ("a pullover");
    - ``text_to_image_precision``: for each of the 450 possible captions, the fraction of its ``top_k`` nearest
      images that are of the caption's class, averaged (and ``..._per_class``);
    - ``tone_accuracy`` / ``width_accuracy``: the fraction of classes whose "dark X" retrieves ``top_k`` images of
      lower mean tone than "light X" (and "narrow X" narrower ones than "wide X"), with the mean gaps.
    ``chance`` holds each number's value for a model that ranks at random.
    """
    was_training = model.training
    model.eval()
    image_embeds, labels, captions, images = _encode_dataset(model, dataset, batch_size)  # (N, E), (N,)
    if any(c is None for c in captions):
        raise ValueError("retrieval_report needs items with a 'caption' (e.g. fashion_mnist with captions: true)")
    n = len(labels)
    k = min(top_k, n)

    def text(prompts: list[str]) -> torch.Tensor:
        return model.encode_text(prompts).float().cpu()  # (P, E)

    # image -> text and text -> image recall over random pairs
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n, generator=g)[: min(num_pairs, n)]
    pair_captions = [captions[i] for i in rows.tolist()]
    distinct = list(dict.fromkeys(pair_captions))
    where = {c: i for i, c in enumerate(distinct)}
    own = torch.tensor([where[c] for c in pair_captions])  # (P,)
    similarity = image_embeds[rows] @ text(distinct).T  # (P, D)
    ranked = similarity.argsort(dim=1, descending=True)  # (P, D)
    ranked_images = similarity.T.argsort(dim=1, descending=True)  # (D, P)
    multiplicity = torch.bincount(own, minlength=len(distinct))  # (D,) images per distinct caption
    report: dict[str, Any] = {"num_images": n}
    chance: dict[str, float] = {}
    for r in (1, 5):
        report[f"image_to_text_recall_at_{r}"] = float((ranked[:, :r] == own[:, None]).any(dim=1).float().mean())
        chance[f"image_to_text_recall_at_{r}"] = min(1.0, r / len(distinct))
        hits = (own[ranked_images[:, :r]] == torch.arange(len(distinct))[:, None]).any(dim=1)
        report[f"text_to_image_recall_at_{r}"] = float(hits.float().mean())
        chance[f"text_to_image_recall_at_{r}"] = _hit_chance(multiplicity, len(rows), r)
    report.update({"num_pairs": len(rows), "num_distinct_captions_in_pairs": len(distinct), "top_k": k})
    if isinstance(getattr(dataset, "captioner", None), GarmentCaptioner):
        garments, garment_chance = _garment_probes(text, image_embeds, labels, images, k)
        report.update(garments)
        chance.update(garment_chance)
    model.train(was_training)
    return {**report, "chance": chance}


def _garment_probes(text, image_embeds: torch.Tensor, labels: torch.Tensor, images: torch.Tensor,
                    k: int) -> tuple[dict[str, Any], dict[str, float]]:
    """The Fashion-MNIST probes of :func:`retrieval_report`: zero-shot classes, precision@k, tone and width."""
    num_classes = len(GARMENTS)
    class_prompts = [garment_phrase(c, []) for c in range(num_classes)]
    predicted = (image_embeds @ text(class_prompts).T).argmax(dim=1)  # (N,)
    out: dict[str, Any] = {"zero_shot_accuracy": float((predicted == labels).float().mean())}

    precision: dict[int, list[float]] = {}
    for c in range(num_classes):
        top = (text(_captions_of_class(c)) @ image_embeds.T).topk(k, dim=1).indices  # (P, k)
        precision[c] = (labels[top] == c).float().mean(dim=1).tolist()
    per_class = [float(np.mean(precision[c])) for c in range(num_classes)]
    out["text_to_image_precision"] = float(np.mean(per_class))
    out["text_to_image_precision_per_class"] = per_class

    uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()  # (N, H, W)
    tone, width = (torch.from_numpy(a).float() for a in image_attributes(uint8))
    for name, measure, (low, high) in (("tone", tone, ("dark", "light")), ("width", width, ("narrow", "wide"))):
        prompts = [garment_phrase(c, [w]) for c in range(num_classes) for w in (low, high)]
        top = (text(prompts) @ image_embeds.T).topk(k, dim=1).indices  # (2 * classes, k)
        means = measure[top].mean(dim=1).view(num_classes, 2)  # (classes, [low, high])
        out[f"{name}_accuracy"] = float((means[:, 0] < means[:, 1]).float().mean())
        out[f"{name}_gap"] = float((means[:, 1] - means[:, 0]).mean())
    chance = {"zero_shot_accuracy": 1 / num_classes, "text_to_image_precision": 1 / num_classes,
              "tone_accuracy": 0.5, "width_accuracy": 0.5}
    return out, chance


def summary(report: dict[str, Any]) -> str:
    """One line of the headline retrieval numbers."""
    parts = []
    if "zero_shot_accuracy" in report:
        parts.append(f"zero-shot acc {report['zero_shot_accuracy']:.3f}, text->image P@{report['top_k']} "
                     f"{report['text_to_image_precision']:.3f}, tone acc {report['tone_accuracy']:.2f}, width acc "
                     f"{report['width_accuracy']:.2f}")
    parts.append(f"image->text R@1 {report['image_to_text_recall_at_1']:.3f} "
                 f"R@5 {report['image_to_text_recall_at_5']:.3f}, text->image R@1 "
                 f"{report['text_to_image_recall_at_1']:.3f} R@5 {report['text_to_image_recall_at_5']:.3f} "
                 f"({report['num_distinct_captions_in_pairs']} captions)")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------- the loop


def build_clip(cfg: CLIPTrainConfig, image_shape: tuple[int, int, int], dataset: Dataset) -> SmallCLIP:
    """The SmallCLIP of ``cfg.model`` with the data's image shape and the chosen vocabulary ("captions": the BPE
    tokens of the strings ``dataset.caption_texts()`` gives)."""
    vocabulary = []
    if cfg.vocabulary == "captions":
        if not hasattr(dataset, "caption_texts"):
            raise ValueError(f"vocabulary: captions needs a data set that lists its caption words (caption_texts); "
                             f"{type(dataset).__name__} does not: set vocabulary: full")
        vocabulary = prompt_vocabulary(dataset.caption_texts())
    return SmallCLIP(dataclasses.replace(cfg.model, image_shape=tuple(image_shape), vocabulary=vocabulary))


def train_clip(cfg: CLIPTrainConfig, resume: bool | str = False, progress: bool = True,
               fail_at_step: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train (or, with ``resume``, continue the run in ``cfg.out_dir``) and return {"step", "history" (the logged
    records), "stopped" (by a signal), "clip" (path), "retrieval" (the final report; None when a signal stopped
    the run: the checkpoint is saved, resume to finish)}. ``resume`` and ``overwrite``: see
    :func:`~openldm.training.checkpoint.begin_run`. ``fail_at_step`` injects a NaN loss into
    the update after that many steps (tests; the error names the logged step, one more)."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, resume, overwrite, progress, fail_at_step)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: CLIPTrainConfig, resume: bool | str, overwrite: bool, progress: bool,
           fail_at_step: int | None) -> dict[str, Any]:
    out_dir = Path(cfg.out_dir)
    device = torch.device(cfg.device)
    start = begin_run(out_dir, to_dict(cfg), resume=resume, overwrite=overwrite, keep=cfg.keep_checkpoints)
    write_config(cfg, out_dir)
    dataset = build_dataset(cfg.data.name, cfg.data.options)
    first = dataset[0]
    if "caption" not in first:
        raise ValueError(f"dataset {cfg.data.name!r} with options {cfg.data.options} gives no 'caption'; train-clip "
                         "needs captioned images (fashion_mnist: captions: true)")
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"dataset has {len(dataset)} items, fewer than one batch of {cfg.batch_size}")
    eval_set = build_dataset(cfg.data.name, {**cfg.data.options, **cfg.eval_data})
    torch.manual_seed(cfg.seed)  # parameter initialisation
    model = build_clip(cfg, tuple(first["image"].shape), dataset).to(device)
    params = list(model.parameters())
    opt, sched = make_optimizer(_param_groups(model, cfg.optim.weight_decay), cfg.optim, cfg.steps)
    stream = BatchStream(dataset, cfg.batch_size, cfg.seed, cfg.num_workers)
    loop = LoopState(stream, {"opt": opt}, {"sched": sched})
    step = 0
    if start.folder is not None:
        path = start.folder / "clip.safetensors"
        load_weights(model, load_model(path).state_dict(), path)
        step = loop.load_state_dict(start.state, lrs={"sched": cfg.optim.lr})

    def checkpoint() -> None:
        start.checkpoints.save(step, loop.state_dict(step), lambda d: save_model(model, d / "clip.safetensors"))

    def evaluate() -> dict[str, Any]:
        return retrieval_report(model, eval_set, num_pairs=cfg.eval_pairs, seed=cfg.seed)

    history: list[dict] = []
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train-clip")
    stopper = StopFlag()
    t_last, seen = time.perf_counter(), 0
    with stopper.installed():
        while step < cfg.steps and not stopper.stop:
            model.train()
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(stream.epoch)  # fresh captions each epoch
            batch = next(stream)
            x = batch["image"].to(device).float()  # (B, C, H, W)
            distinct, index, positives = caption_positives(list(batch["caption"]))
            image_embeds = model.encode_image(x)  # (B, E)
            text_embeds = model.encode_text(distinct)[index.to(device)]  # (B, E): each distinct caption encoded once
            logits_per_image = model.temperature() * image_embeds @ text_embeds.T  # (B, B)
            loss, terms = multi_positive_infonce(logits_per_image, positives.to(device))
            if fail_at_step is not None and step == fail_at_step:
                loss = loss * float("nan")
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"contrastive loss is {loss.item()} at step {step + 1}; training stopped, the last "
                                       f"good checkpoint in {str(out_dir)!r} is untouched")
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or math.inf)
            check_grad_norm(grad_norm, step + 1, out_dir, None)
            opt.step()
            check_finite(params, step + 1, out_dir)
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            seen += x.shape[0]
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                rec = {"step": step, "loss": float(loss.detach()), **{k: float(v) for k, v in terms.items()},
                       "temperature": float(model.temperature().detach()), "distinct_captions": len(distinct),
                       "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0],
                       "images_per_s": seen / max(now - t_last, 1e-9)}
                t_last, seen = now, 0
                history.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['batch_acc']:.2f}")
                append_metrics(out_dir, rec)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                report = evaluate()
                append_metrics(out_dir, {"step": step, **{k: v for k, v in report.items()
                                                         if isinstance(v, float) and k != "chance"}})
                t_last = time.perf_counter()
            if step % cfg.save_every == 0 or step == cfg.steps or stopper.stop:
                checkpoint()
    bar.close()
    if not (out_dir / "clip.safetensors").is_file():
        checkpoint()
    result = {"step": step, "history": history, "stopped": stopper.stop, "clip": str(out_dir / "clip.safetensors"),
              "retrieval": None}
    if stopper.stop:
        return result
    report = evaluate()
    append_metrics(out_dir, {"step": step, **{k: v for k, v in report.items() if isinstance(v, float)}})
    with atomic_path(out_dir / "retrieval.json") as tmp:
        tmp.write_text(json.dumps({"step": step, **report}, indent=2) + "\n")
    return {**result, "retrieval": report}


__all__ = ["CLIPTrainConfig", "build_clip", "caption_positives", "multi_positive_infonce", "retrieval_report",
           "summary", "train_clip"]
