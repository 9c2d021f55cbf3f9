"""Regenerate the README's Fashion-MNIST results (tables and sample grids) from the bundled model and the runs the
recipes in configs/ leave under runs/. Every number comes from `openldm.pipelines.evaluate` (one cached classifier,
FID/KID in its features, real held-out images beside), so the README shows what the current code measures.

    python benchmarks/fmnist_results.py                 # writes docs/results/ and the README's results section
    python benchmarks/fmnist_results.py --num-samples 200 --no-readme   # a quick look

Sections (each skipped, and said so, when its run is missing):
- autoencoders: reconstruction PSNR/SSIM and FID of reconstructions (runs/fmnist_autoencoder_{kl,kl_decoder,vq});
- the bundled model: class- and caption-conditioned samples at several guidance scales;
- sampling steps: DDPM 1000 steps against DDIM and DPM-Solver++(2M) at 10/20/50 (class-conditional, guided);
- training time: the bundled recipe's EMA snapshots (runs/fmnist_class_text/snapshots);
- the other recipes: unconditional, mask, super-resolution, inpainting, text with MiniLM vs the small CLIP;
- the small CLIP's retrieval numbers (runs/fmnist_clip/retrieval.json);
- grids: classes, prompts, and input | output | truth strips for super-resolution, inpainting and masks.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from openldm.bundled import bundled_dir
from openldm.data.transforms import crop_center
from openldm.evaluation.classifier import classifier_accuracy, classify, default_classifier_path, load_classifier
from openldm.evaluation.grid import image_grid
from openldm.evaluation.metrics import fid, psnr, ssim
from openldm.io.native import load_model
from openldm.models.autoencoder import latent_mode
from openldm.pipelines.demo import DEMO_PROMPTS, demo_grids
from openldm.pipelines.evaluate import REFERENCE, EvalSettings, evaluate_model, format_table
from openldm.pipelines.trained import load_run, sample_trained

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs"
OUT = ROOT / "docs" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def autoencoder_table(classifier, n: int) -> str:
    from openldm.data import build_dataset

    data = build_dataset("fashion_mnist", {"split": "test", "size": 32})
    images = torch.stack([data[i]["image"] for i in range(n)])
    truth = crop_center(images, (28, 28))
    held = torch.stack([data[i]["image"] for i in range(*REFERENCE.indices(len(data)))])
    _, reference = classify(classifier, crop_center(held, (28, 28)))
    lines = ["| autoencoder | latent | PSNR | SSIM | rFID | params |", "|---|---|---|---|---|---|",
             f"| none (the real images) | | | | {fid(classify(classifier, truth)[1], reference):.2f} | |"]
    names = {"kl": "KL-f4", "kl_decoder": "KL-f4, decoder fine-tuned (the recipes' and the bundle's)", "vq": "VQ-f4"}
    for kind, name in names.items():
        path = RUNS / f"fmnist_autoencoder_{kind}" / "autoencoder.safetensors"
        if not path.is_file():
            log(f"skip autoencoder {kind}: {path} missing")
            continue
        ae = load_model(path).eval()
        with torch.no_grad():
            z = latent_mode(ae.encode(images))
            rec = crop_center(ae.decode(z).clamp(-1, 1), (28, 28))
        _, feats = classify(classifier, rec)
        params = sum(p.numel() for p in ae.parameters())
        lines.append(f"| {name} | {tuple(z.shape[1:])} | {float(psnr(rec, truth).mean()):.2f} | "
                     f"{float(ssim(rec, truth).mean()):.3f} | {fid(feats, reference):.2f} | {params:,} |")
    return "\n".join(lines)


def evaluate(run: Path, settings: EvalSettings, classifier, step: int | None = None) -> list[dict]:
    t0 = time.perf_counter()
    report = evaluate_model(load_run(run, step=step), classifier, settings, progress=lambda m: log(f"{run.name}: {m}"))
    log(f"{run.name} evaluated in {time.perf_counter() - t0:.0f} s")
    return report["rows"]


def steps_table(model_dir: Path, classifier, n: int, n_ddpm: int, guidance: float) -> str:
    lines = ["| sampler | steps | N | class acc. | FID | KID | s / image |", "|---|---|---|---|---|---|---|"]
    plans = [("ddpm", 1000, n_ddpm)] + [(s, k, n) for s in ("ddim", "dpmpp_2m") for k in (10, 20, 50)]
    real: dict[int, dict] = {}
    for sampler, steps, count in plans:
        settings = EvalSettings(num_samples=count, sampler=sampler, steps=steps, guidance_scales=[guidance],
                                tasks=["class"], batch_size=250)
        rows = evaluate(model_dir, settings, classifier)
        r = rows[1]
        real[count] = rows[0]
        lines.append(f"| {sampler} | {steps} | {count} | {r['accuracy']:.1%} | {r['fid']:.2f} | {r['kid']:.4f} | "
                     f"{r['seconds'] / count:.3f} |")
    for count, r in sorted(real.items()):
        lines.append(f"| real held-out | | {count} | {r['accuracy']:.1%} | {r['fid']:.2f} | {r['kid']:.4f} | |")
    return "\n".join(lines)


def training_table(run: Path, classifier, n: int, guidance: float) -> str:
    snapshots = sorted(run.glob("snapshots/step_*"))
    if not snapshots:
        return ""
    snapshots = snapshots[len(snapshots) % 2 + 1::2] if len(snapshots) > 4 else snapshots  # at most half, last kept
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cfg = load_run(run).config
    lines = [f"| step | images seen | training time (min) | class acc. (guidance {guidance}) | FID |",
             "|---|---|---|---|---|"]
    for snap in snapshots:
        step = int(snap.name.split("_")[1])
        seconds, last = 0.0, 0
        for m in metrics:  # time of each logged window = images in it / its images per second
            if m["step"] <= step:
                seconds += (m["step"] - last) * cfg.batch_size / max(m["images_per_s"], 1e-9)
                last = m["step"]
        settings = EvalSettings(num_samples=n, guidance_scales=[guidance], tasks=["class"])
        r = evaluate(run, settings, classifier, step=step)[1]
        lines.append(f"| {step} | {step * cfg.batch_size:,} | {seconds / 60:.1f} | {r['accuracy']:.1%} | {r['fid']:.2f} |")
    return "\n".join(lines)


def strips(classifier) -> list[str]:
    """input | output | truth grids for the spatial recipes; returns Markdown image lines."""
    from openldm.data import build_dataset

    out = []
    data = build_dataset("fashion_mnist", {"split": "test", "size": 32, "silhouette_threshold": 0.1})
    idx = list(range(0, 80, 10))
    images = torch.stack([data[i]["image"] for i in idx])
    truth = crop_center(images, (28, 28))
    for name, title in (("super_resolution", "super-resolution 7x7 -> 28x28"), ("inpaint", "inpainting"),
                        ("mask", "mask -> garment")):
        run = RUNS / f"fmnist_{name}"
        if not (run / "unet_ema.safetensors").is_file():
            continue
        model = load_run(run)
        if name == "super_resolution":
            factor = next(c.config.factor for c in model.conditioner.conditioners.values() if hasattr(c.config, "factor"))
            small = F.interpolate(images, scale_factor=1 / factor, mode="bicubic", antialias=True).clamp(-1, 1)
            result = sample_trained(model, low_res=small, guidance_scale=1.0)
            shown = crop_center(F.interpolate(small, size=images.shape[-2:], mode="nearest"), (28, 28))
        elif name == "inpaint":
            masks = torch.zeros(len(idx), 32, 32)
            masks[:, 8:20, 6:26] = 1.0
            result = sample_trained(model, init_image=images, mask=masks)
            shown = crop_center(images * (1 - masks[:, None]) - masks[:, None], (28, 28))
        else:
            masks = torch.stack([torch.as_tensor(data[i]["mask"]) for i in idx])
            result = sample_trained(model, mask=masks)
            shown = crop_center(masks[:, None].float() * 2 - 1, (28, 28))
        grid = image_grid([shown, result, truth])
        grid = grid.resize((grid.width * 3, grid.height * 3))
        grid.save(OUT / f"{name}.png")
        out.append(f"**{title}** (rows: input, output, original)\n\n![{title}](docs/results/{name}.png)")
    return out


RECIPES = ("uncond", "mask", "super_resolution", "inpaint", "text_minilm", "text_clip")
SECTIONS = ("classifier", "autoencoders", "bundled", "steps", "training", "recipes", "clip", "grids")


def section(name: str, args: argparse.Namespace, classifier) -> str:
    """The Markdown of one results section (empty when its run is missing)."""
    model_dir = bundled_dir() if name in ("bundled", "steps", "grids") else None
    n_small = min(args.num_samples, 500) if args else 500
    if name == "classifier":
        return (f"Classifier (the evaluation feature space): a small CNN trained on the train split, "
                f"{classifier_accuracy(default_classifier_path()) or 0:.1%} test accuracy. FID/KID are computed in "
                "its 128-d penultimate features against test images 5000-9999; the *real* rows score N held-out test "
                "images the same way, the figure a perfect generator of N images would reach. Samples come out at "
                "28x28 (the 32x32 padding cropped).")
    if name == "autoencoders":
        return "### Autoencoders (32x32 input, 1000 test images)\n\n" + autoencoder_table(classifier, 1000)
    if name == "bundled":
        rows = evaluate(model_dir, EvalSettings(num_samples=args.num_samples, guidance_scales=args.guidance),
                        classifier)
        return (f"### The bundled model (class + caption, DDIM 50 steps, N = {args.num_samples})\n\n"
                + format_table(rows))
    if name == "steps":
        return (f"### Sampling steps (class-conditional, guidance {args.best})\n\n"
                + steps_table(model_dir, classifier, n_small, args.ddpm_samples, args.best))
    if name == "training":
        table = training_table(RUNS / "fmnist_class_text", classifier, n_small, args.best)
        return "### Quality against training time (the bundled recipe's EMA snapshots)\n\n" + table if table else ""
    if name == "recipes":
        rows = []
        for recipe in RECIPES:
            run, saved = RUNS / f"fmnist_{recipe}", OUT / f"recipe_{recipe}.json"
            if recipe in (args.recipes or RECIPES) and (run / "unet_ema.safetensors").is_file():
                found = evaluate(run, EvalSettings(num_samples=n_small, guidance_scales=[1.0, 3.0]), classifier)
                cfg = load_run(run).config
                trained = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]  # a stopped run: less
                saved.write_text(json.dumps({"rows": found, "steps": trained, "batch_size": cfg.batch_size}))
            if not saved.is_file():
                log(f"skip {recipe}: no run and no saved rows")
                continue
            result = json.loads(saved.read_text())
            tag = f"{recipe} ({result['steps']} x {result['batch_size']})"
            rows.extend(dict(r, task=f"{tag}: {r['task']}") for r in result["rows"] if r["task"] != "real" or not rows)
        return f"### The other recipes (N = {n_small})\n\n" + format_table(rows) if rows else ""
    if name == "clip":
        retrieval = RUNS / "fmnist_clip" / "retrieval.json"
        if not retrieval.is_file():
            return ""
        r = json.loads(retrieval.read_text())
        chance = r.get("chance", {})
        rows = [("zero-shot class accuracy (image -> nearest of the 10 class phrases)", "zero_shot_accuracy"),
                ("text -> image precision@10 over the 450 captions", "text_to_image_precision"),
                ('"dark X" retrieves darker images than "light X" (classes)', "tone_accuracy"),
                ('"narrow X" retrieves narrower images than "wide X" (classes)', "width_accuracy"),
                ("image -> exact caption recall@1", "image_to_text_recall_at_1"),
                ("image -> exact caption recall@5", "image_to_text_recall_at_5")]
        lines = [f"### The small CLIP (`openldm train-clip`, {r['step']} steps; {r['num_images']:,} test images)",
                 "", "| measure | value | chance |", "|---|---|---|"]
        lines += [f"| {title} | {r[key]:.1%} | {chance.get(key, float('nan')):.1%} |" for title, key in rows if key in r]
        return "\n".join(lines)
    if name == "grids":
        grids = demo_grids(load_run(model_dir))
        for key, grid in grids.items():
            grid.save(OUT / f"{key}.png")
        text = ("### Samples from the bundled model\n\nOne row per class (0 t-shirt/top ... 9 ankle boot), guidance 3, "
                "DDIM 50:\n\n![classes](docs/results/classes.png)\n\nOne row per prompt ("
                + ", ".join(f'"{p}"' for p in DEMO_PROMPTS) + "):\n\n![prompts](docs/results/prompts.png)")
        return "\n\n".join([text, *strips(classifier)])
    raise ValueError(f"unknown section {name!r}; sections: {', '.join(SECTIONS)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-samples", type=int, default=1000, help="images per task and guidance scale")
    p.add_argument("--ddpm-samples", type=int, default=100, help="images for the 1000-step DDPM row")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0], help="guidance scales (bundled model)")
    p.add_argument("--best", type=float, default=3.0, help="the guidance scale of the steps and training tables")
    p.add_argument("--sections", nargs="*", default=list(SECTIONS),
                   help=f"sections to (re)compute, each saved as docs/results/<name>.md (default all: "
                        f"{' '.join(SECTIONS)}); none = only reassemble the saved ones")
    p.add_argument("--recipes", nargs="*", default=None, help=f"recipes the recipes section re-evaluates (default "
                                                             f"all: {' '.join(RECIPES)}); the others' saved rows are reused")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite the README's results section")
    args = p.parse_args()
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier()
    for name in args.sections:
        t0 = time.perf_counter()
        log(f"section {name}")
        (OUT / f"{name}.md").write_text(section(name, args, classifier))
        log(f"section {name} done in {time.perf_counter() - t0:.0f} s")
    sections = [(OUT / f"{name}.md").read_text() for name in SECTIONS if (OUT / f"{name}.md").is_file()]
    sections = [text for text in sections if text.strip()]
    text = "\n\n".join(sections) + "\n"
    (OUT / "results.md").write_text(text)
    print(text)
    if not args.no_readme:
        readme = ROOT / "README.md"
        current = readme.read_text()
        if START in current and END in current:
            head, rest = current.split(START, 1)
            _, tail = rest.split(END, 1)
            readme.write_text(head + START + "\n" + text + END + tail)
            log("README results section rewritten")
        else:
            log(f"README has no {START} ... {END} markers; left alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
