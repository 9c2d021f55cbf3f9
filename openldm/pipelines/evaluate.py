"""``openldm evaluate``: sample a trained Fashion-MNIST generator and measure it against real held-out data
(metrics from openldm.evaluation; it samples through the pipelines, so it lives beside them).

Every figure is computed with one cached classifier (openldm.evaluation.classifier) in one feature space:

- the *reference* set is the second half of the test split (images 5000..9999);
- the *real* row is the first half's first N images scored exactly like generated ones: its class accuracy is the
  classifier's own ceiling, its FID/KID against the reference is the floor a perfect generator of N images would
  reach (FID is biased upwards for small N, so generated and real figures are always compared at the same N);
- each task the model's conditions allow is run on N inputs drawn from the first half of the test split:
  ``class`` (label -> image: accuracy, FID, KID), ``text`` (that image's caption -> image: accuracy of the
  caption's class, FID, KID, and the tone gap: mean brightness of "light" minus "dark" prompted garments),
  ``mask`` (silhouette -> image: IoU of the generated silhouette with the mask), ``super_resolution`` (the image
  shrunk by the run's factor -> image: PSNR/SSIM against the original, beside bicubic upsampling),
  ``inpaint`` (a random box redrawn: PSNR/SSIM against the original, beside the box left empty) and
  ``unconditional``.

Images are compared at the dataset's 28x28 (samples come back cropped from the padded 32x32).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional as F

from openldm.data import build_dataset
from openldm.data.captions import SILHOUETTE_LEVEL, image_attributes
from openldm.data.transforms import crop_center
from openldm.evaluation.classifier import ImageClassifier, classify
from openldm.evaluation.metrics import fid, kid, mask_iou, psnr, ssim
from openldm.pipelines.common import StepCutters
from openldm.pipelines.trained import TrainedModel, sample_trained

REFERENCE = slice(5000, 10000)
TASKS = ("class", "text", "mask", "super_resolution", "inpaint", "unconditional")


@dataclass
class EvalSettings:
    """How generated images are drawn: ``num_samples`` per task and guidance scale, in batches of ``batch_size``."""

    num_samples: int = 1000
    sampler: str = "ddim"
    steps: int = 50
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 3.0])
    karras: bool = False
    seed: int = 0
    batch_size: int = 250
    tasks: list[str] | None = None  # None: every task the model's conditions allow
    cutters: StepCutters = field(default_factory=StepCutters)  # training-free step cutters (off by default)

    def __post_init__(self) -> None:
        if not 2 <= self.num_samples <= 5000:
            raise ValueError(f"num_samples={self.num_samples}; choose 2..5000 (the held-out half of the test split)")
        if self.batch_size < 1 or self.steps < 1 or not self.guidance_scales:
            raise ValueError("batch_size and steps must be >= 1 and guidance_scales non-empty")
        bad = [t for t in self.tasks or [] if t not in TASKS]
        if bad:
            raise ValueError(f"unknown task {bad[0]!r}; tasks: {', '.join(TASKS)}")


@dataclass
class HeldOutData:
    """The test split's items as the run's dataset config serves them (padded to the training size, with the
    run's extra columns: captions, masks), stacked images and labels, and the images at the dataset size."""

    items: list[dict[str, Any]]
    images: torch.Tensor  # (N, C, H, W) at the training size, in [-1, 1]
    labels: torch.Tensor  # (N,)
    originals: torch.Tensor  # (N, C, h, w) at the dataset size

    @classmethod
    def load(cls, model: TrainedModel) -> "HeldOutData":
        options = {**model.config.data.options, "split": "test", "limit": None}
        dataset = build_dataset(model.config.data.name, options)
        if len(dataset) < REFERENCE.stop:
            raise ValueError(f"the test split has {len(dataset)} images; evaluation needs {REFERENCE.stop}")
        items = [dataset[i] for i in range(len(dataset))]  # read once: captions and masks are drawn per item
        images = torch.stack([item["image"] for item in items])
        labels = torch.tensor([int(item["label"]) for item in items])
        originals = crop_center(images, model.crop_size) if model.crop_size else images
        return cls(items=items, images=images, labels=labels, originals=originals)


def _distribution_row(classifier: ImageClassifier, images: torch.Tensor, reference: torch.Tensor,
                      labels: torch.Tensor | None) -> dict[str, float]:
    predicted, feats = classify(classifier, images)
    row = {"fid": fid(feats, reference), "kid": kid(feats, reference, subset_size=min(1000, len(feats)))[0]}
    if labels is not None:
        row["accuracy"] = float((predicted == labels).float().mean())
    return row


def in_batches(n: int, size: int, draw: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """``draw`` each slice of ``range(n)`` (at most ``size`` long); every slice must give one image per index."""
    parts = []
    for i in range(0, n, size):
        part = slice(i, min(i + size, n))
        images = draw(part)
        if images.shape[0] != part.stop - part.start:
            raise RuntimeError(f"asked for {part.stop - part.start} images, the sampler gave {images.shape[0]}")
        parts.append(images)
    return torch.cat(parts)


def _box_masks(n: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(n, H, W) float masks, each one box of 30-60% of the side, placed uniformly (1 = redraw)."""
    H, W = size
    masks = torch.zeros(n, H, W)
    for i in range(n):
        h, w = (int(torch.randint(int(0.3 * s), int(0.6 * s) + 1, (1,), generator=generator)) for s in (H, W))
        top = int(torch.randint(0, H - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, W - w + 1, (1,), generator=generator))
        masks[i, top:top + h, left:left + w] = 1.0
    return masks


def evaluate_model(model: TrainedModel, classifier: ImageClassifier, settings: EvalSettings | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The report: {"settings", "rows": [{"task", "guidance", metrics..., "seconds"}]}; the first row is "real"."""
    s = settings or EvalSettings()
    say = progress or (lambda message: None)
    data = HeldOutData.load(model)
    n = s.num_samples
    held = slice(0, n)
    _, reference = classify(classifier, data.originals[REFERENCE])
    rows: list[dict[str, Any]] = [{"task": "real", "guidance": None,
                                   **_distribution_row(classifier, data.originals[held], reference, data.labels[held])}]
    declared = {c.eval_task for c in model.conditioner.conditioners.values()} - {None}
    wanted = s.tasks or [t for t in TASKS if t in declared or (t == "unconditional" and not model.conditioner.conditioners)]

    def sample(guidance: float, part: slice, **conditions) -> torch.Tensor:
        return sample_trained(model, **conditions, sampler=s.sampler, steps=s.steps, karras=s.karras,
                              guidance_scale=guidance, seed=s.seed + part.start, cutters=s.cutters)

    for task in wanted:
        # guidance needs a condition to guide towards; super-resolution is judged against the truth, unguided
        for guidance in s.guidance_scales if task not in ("super_resolution", "unconditional") else [1.0]:
            t0 = time.perf_counter()
            say(f"{task} (guidance {guidance})")
            row = _run_task(task, guidance, model, classifier, data, reference, n, s, sample)
            rows.append({"task": task, "guidance": guidance, **row, "seconds": time.perf_counter() - t0})
    return {"settings": asdict(s), "rows": rows}


def _conditioner_for(model: TrainedModel, task: str):
    """The model's conditioner that the evaluation task ``task`` measures (its declared ``eval_task``)."""
    found = [c for c in model.conditioner.conditioners.values() if c.eval_task == task]
    if not found:
        raise ValueError(f"task {task!r} needs a condition the model does not have")
    return found[0]


def _run_task(task: str, guidance: float, model: TrainedModel, classifier: ImageClassifier, data: HeldOutData,
              reference: torch.Tensor, n: int, s: EvalSettings, sample: Callable[..., torch.Tensor]) -> dict[str, Any]:
    labels = data.labels[:n]
    if task == "class":
        wanted = torch.arange(n) % 10
        images = in_batches(n, s.batch_size, lambda p: sample(guidance, p, class_label=wanted[p].tolist()))
        return _distribution_row(classifier, images, reference, wanted)
    if task == "unconditional":
        images = in_batches(n, s.batch_size, lambda p: sample(guidance, p, num_images=p.stop - p.start))
        return _distribution_row(classifier, images, reference, None)
    if task == "text":
        key = _conditioner_for(model, "text").config.key
        prompts = [data.items[i][key] for i in range(n)]
        images = in_batches(n, s.batch_size, lambda p: sample(guidance, p, prompt=prompts[p]))
        row = _distribution_row(classifier, images, reference, labels)
        row.update(_tone_gap(images, prompts))
        return row
    if task == "mask":
        key = _conditioner_for(model, "mask").config.key
        masks = torch.stack([torch.as_tensor(data.items[i][key]) for i in range(n)])  # (n, H, W) label map
        images = in_batches(n, s.batch_size, lambda p: sample(guidance, p, mask=masks[p]))
        target = crop_center(masks, model.crop_size) if model.crop_size else masks
        level = 2 * SILHOUETTE_LEVEL / 255 - 1  # the silhouette threshold in [-1, 1]
        row = _distribution_row(classifier, images, reference, None)
        row["iou"] = float(mask_iou(images[:, 0] > level, target > 0).mean())
        return row
    truth = data.originals[:n]
    if task == "super_resolution":
        factor = _conditioner_for(model, "super_resolution").config.factor
        size = data.images.shape[-2:]
        small = F.interpolate(data.images[:n], size=(size[0] // factor, size[1] // factor), mode="bicubic",
                              align_corners=False, antialias=True).clamp(-1, 1)
        images = in_batches(n, s.batch_size, lambda p: sample(guidance, p, low_res=small[p]))
        bicubic = F.interpolate(small, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
        bicubic = crop_center(bicubic, model.crop_size) if model.crop_size else bicubic
        row = _paired_row(classifier, images, truth, labels)
        row.update({f"baseline_{k}": v for k, v in _paired_row(classifier, bicubic, truth, labels).items()})
        row["factor"] = factor
        return row
    if task == "inpaint":
        masks = _box_masks(n, tuple(truth.shape[-2:]), torch.Generator().manual_seed(s.seed))  # (n, h, w) at 28
        pad = [(a - b) // 2 for a, b in zip(data.images.shape[-2:], truth.shape[-2:])]
        full = F.pad(masks, (pad[1], data.images.shape[-1] - truth.shape[-1] - pad[1],
                             pad[0], data.images.shape[-2] - truth.shape[-2] - pad[0]))
        images = in_batches(n, s.batch_size,
                            lambda p: sample(guidance, p, init_image=data.images[p], mask=full[p]))
        empty = truth * (1 - masks[:, None]) - masks[:, None]  # the box left black (background)
        row = _paired_row(classifier, images, truth, labels)
        row.update({f"baseline_{k}": v for k, v in _paired_row(classifier, empty, truth, labels).items()})
        return row
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


def _paired_row(classifier: ImageClassifier, images: torch.Tensor, truth: torch.Tensor,
                labels: torch.Tensor) -> dict[str, float]:
    predicted, _ = classify(classifier, images)
    return {"psnr": float(psnr(images, truth).clamp(max=100).mean()), "ssim": float(ssim(images, truth).mean()),
            "accuracy": float((predicted == labels).float().mean())}


def _tone_gap(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Mean garment brightness of "light"-prompted minus "dark"-prompted images (NaN when either is absent)."""
    uint8 = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    tone, _ = image_attributes(uint8)
    light = np.array([" light" in f" {p}" for p in prompts])
    dark = np.array([" dark" in f" {p}" for p in prompts])
    gap = float(tone[light].mean() - tone[dark].mean()) if light.any() and dark.any() else math.nan
    return {"tone_gap": gap}


COLUMNS = [("split", "split", "{}"), ("task", "task", "{}"), ("guidance", "guidance", "{}"), ("n", "N", "{}"),
           ("accuracy", "class acc.", "{:.1%}"), ("style_accuracy", "style acc.", "{:.1%}"),
           ("top1", "top-1 retrieval", "{:.1%}"), ("chance", "chance", "{:.1%}"), ("cosine", "CLIP cosine", "{:.3f}"),
           ("fid", "FID", "{:.3f}"), ("kid", "KID", "{:.5f}"), ("iou", "IoU", "{:.3f}"), ("psnr", "PSNR", "{:.2f}"),
           ("ssim", "SSIM", "{:.3f}"), ("baseline_psnr", "baseline PSNR", "{:.2f}"),
           ("baseline_ssim", "baseline SSIM", "{:.3f}"), ("baseline_accuracy", "baseline class acc.", "{:.1%}"),
           ("tone_gap", "tone gap", "{:+.3f}"),
           ("seconds", "seconds", "{:.0f}")]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows, one column per metric any row has."""
    cols = [(k, title, fmt) for k, title, fmt in COLUMNS if any(r.get(k) is not None for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            value = r.get(key)
            cells.append("" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
