"""``openldm evaluate`` on a text-to-image model of the emoji data: per held-out split (unseen images of seen emoji;
emoji never seen in training), one image drawn per real image, prompted by its caption (style tag included), and
judged by openldm.evaluation.emoji (style accuracy, text-image agreement and FID / KID under a judge CLIP trained
apart from the model's text encoder).

The *real* row of a split scores its real images the same way; its FID / KID compare as many train-split images
(a fixed random draw) with the split, the floor of a perfect generator of N images at this N. A latent model's
*reconstructed* row scores the split's real images after a round trip through its autoencoder: the ceiling that
the autoencoder leaves the generator (what the decoder cannot draw, no sample can show). ``num_samples``
caps N per split (a fixed random subset of its images when the split is larger). Images are drawn in batches of
``batch_size``, the k-th batch with seed ``seed + k``.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Callable

import torch

from openldm.evaluation.emoji import HELD_OUT, EmojiJudges, EmojiSplit, clip_embeddings
from openldm.pipelines.evaluate import EvalSettings, in_batches
from openldm.pipelines.trained import TrainedModel, decode, encode, sample_trained

TASKS = ("text",)


def evaluate_emoji(model: TrainedModel, judges: EmojiJudges, settings: EvalSettings | None = None,
                   progress: Callable[[str], None] | None = None,
                   splits: tuple[str, ...] = HELD_OUT) -> dict[str, Any]:
    """The report: {"settings", "rows": [{"split", "task", "guidance", "n", metrics..., "seconds"}]}, each of
    ``splits``' "real" row and (latent models) "reconstructed" row before its "text" rows (one per guidance
    scale)."""
    s = settings or EvalSettings()
    say = progress or (lambda message: None)
    bad = [t for t in s.tasks or [] if t not in TASKS]
    if bad:
        raise ValueError(f"task {bad[0]!r} is not one of an emoji model's; tasks: {', '.join(TASKS)}")
    bad = [name for name in splits if name not in HELD_OUT]
    if bad:
        raise ValueError(f"split {bad[0]!r} is not held out; choose from: {', '.join(HELD_OUT)}")
    size, root = model.image_size[0], model.config.data.options.get("root")
    train = EmojiSplit.load("train", size, root).images
    g = torch.Generator().manual_seed(s.seed)
    rows: list[dict[str, Any]] = []
    for name in splits:
        split = EmojiSplit.load(name, size, root)
        if len(split) > s.num_samples:
            split = split.subset(torch.randperm(len(split), generator=g)[: s.num_samples].sort().values)
        n = len(split)
        real_embeds = clip_embeddings(judges.clip, split.images)
        others = train[torch.randperm(len(train), generator=g)[:n]]
        rows.append({"split": name, "task": "real", "guidance": None, "n": n,
                     **judges.score(split.images, split, real_embeds, distribution=others)})
        if model.autoencoder is not None:
            with torch.no_grad():
                rebuilt = in_batches(n, s.batch_size, lambda p: decode(model, encode(model, split.images[p])))
            rows.append({"split": name, "task": "reconstructed", "guidance": None, "n": n,
                         **judges.score(rebuilt, split, real_embeds)})
        for guidance in s.guidance_scales:
            say(f"{name} (guidance {guidance})")
            t0 = time.perf_counter()
            images = in_batches(n, s.batch_size, lambda p: sample_trained(
                model, prompt=split.prompts[p], num_images=1, sampler=s.sampler, steps=s.steps, karras=s.karras,
                guidance_scale=guidance, seed=s.seed + p.start // s.batch_size, cutters=s.cutters))
            rows.append({"split": name, "task": "text", "guidance": guidance, "n": n,
                         **judges.score(images, split, real_embeds), "seconds": time.perf_counter() - t0})
    return {"settings": asdict(s), "rows": rows}
