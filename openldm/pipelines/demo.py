"""The README's demo: sample grids from the bundled Fashion-MNIST model (one row per class, one row per prompt).
Retraining that model is training's (``openldm.training.recipes``); ``openldm demo --retrain`` chains the two.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from openldm.evaluation.grid import image_grid
from openldm.io.run_dir import TRAINED_SAMPLING
from openldm.pipelines.trained import TrainedModel, load_run, sample_trained

DEMO_PROMPTS = ["a pair of trousers", "a dark ankle boot", "a light, wide pullover", "a photo of a sneaker",
                "a narrow dress", "an image of a bag"]
EMOJI_PROMPTS = ["a red apple, google emoji style", "a red apple, twitter emoji style",
                 "a red apple, fluent emoji style", "a cat face, twitter emoji style", "a sun, google emoji style",
                 "a carrot, google emoji style", "a blue apple, twitter emoji style"]  # carrot: a held-out emoji
PROMPTS = {"fashion_mnist": DEMO_PROMPTS, "emoji": EMOJI_PROMPTS}  # the demo's prompts per bundled model


def demo_grids(model: TrainedModel, *, per_row: int = 8, steps: int = TRAINED_SAMPLING["steps"],
               guidance_scale: float = TRAINED_SAMPLING["guidance_scale"],
               sampler: str = TRAINED_SAMPLING["sampler"], seed: int = 0, zoom: int = 3,
               prompts: list[str] | None = None) -> dict[str, Image.Image]:
    """{"classes": one row of ``per_row`` samples per class label, "prompts": one row per prompt}; each grid
    enlarged ``zoom`` times (nearest neighbour, so pixels stay pixels). Rows share their seeds."""
    grids = {}
    conditioners = list(model.conditioner.conditioners.values())
    plan: list[tuple[str, dict[str, Any], int]] = []
    fields = [f for c in conditioners for f in c.request_fields()]
    classes = next((f.num_classes for f in fields if f.type == "class"), None)
    if classes is not None:
        plan.append(("classes", {"class_label": list(range(classes))}, classes))
    if any(f.type == "text" for f in fields):
        prompts = prompts or DEMO_PROMPTS
        plan.append(("prompts", {"prompt": prompts}, len(prompts)))
    if not plan:
        plan.append(("samples", {}, 1))
    for name, condition, rows in plan:
        images = sample_trained(model, **condition, num_images=per_row, steps=steps, sampler=sampler,
                                guidance_scale=guidance_scale, seed=seed)  # (rows * per_row, C, h, w), row-major
        grid = image_grid(list(images.view(rows, per_row, *images.shape[1:])))
        grids[name] = grid.resize((grid.width * zoom, grid.height * zoom), Image.Resampling.NEAREST)
    return grids


def run_demo(model_dir: str | Path, out: str | Path = "demo.png", *, log: Callable[[str], None] = print,
             **options: Any) -> list[Path]:
    """Write the demo grids next to ``out`` (``demo.png`` -> ``demo-classes.png``, ``demo-prompts.png``) and
    return their paths."""
    t0 = time.perf_counter()
    model = load_run(model_dir)
    with torch.inference_mode():
        grids = demo_grids(model, **options)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, grid in grids.items():
        path = out.with_name(f"{out.stem}-{name}{out.suffix or '.png'}")
        grid.save(path)
        paths.append(path)
    log(f"{len(paths)} grid(s) from {model_dir} in {time.perf_counter() - t0:.1f} s")
    return paths
