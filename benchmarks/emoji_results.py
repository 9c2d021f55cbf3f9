"""The README's emoji results from the runs the emoji recipes leave under runs/ (each section skipped, and said
so, when its run is missing):

- autoencoders: reconstruction PSNR / SSIM of runs/emoji_autoencoder_kl_f4, _f8 and _f4_wide on the two held-out
  splits (unseen images of seen emoji; emoji never seen in training), the figures the factor was chosen by, and the
  style judge's accuracy on their round trips beside the real images';
- quality, per held-out split (unseen images of seen emoji; unseen emoji), on one sample per real image prompted by
  its caption, as ``openldm evaluate --clip runs/emoji_clip/clip.safetensors`` measures it
  (openldm.pipelines.evaluate_emoji): style accuracy (a small CNN trained here on the three art styles judges
  "..., <style> emoji style"), text-image agreement and FID / KID under the small CLIP of configs/emoji_clip.yaml
  (trained here on the emoji, apart from the encoder the model conditions on), each beside the real images' own;
- with --progress, the same figures on the seen emoji against training steps (the run's EMA snapshots,
  ``snapshot_every``) and against sampling steps;
- with --cutters, the training-free step cutters of benchmarks/step_cutters.py (guidance interval, DeepCache, ToMe)
  on the seen emoji: quality and seconds beside the plain sampler;
- text-to-image: a grid of samples from runs/emoji_text_clip_wide (``--run``, the bundled model's recipe) for seen
  emoji in the three styles, unseen emoji and novel combinations (docs/results/emoji-text.png).

    python benchmarks/emoji_results.py            # needs `openldm data emoji` and the runs
    python benchmarks/emoji_results.py --progress --cutters
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import GUIDANCE_INTERVAL, variants

from openldm.data import build_dataset
from openldm.data.emoji import _article as _a
from openldm.evaluation.classifier import ImageClassifier, accuracy
from openldm.evaluation.emoji import HELD_OUT, EmojiJudges, EmojiSplit, load_judge_clip, load_style_judge
from openldm.evaluation.grid import image_grid
from openldm.evaluation.metrics import psnr, ssim
from openldm.io.native import load_model
from openldm.pipelines.common import StepCutters
from openldm.pipelines.evaluate import EvalSettings
from openldm.pipelines.evaluate_emoji import evaluate_emoji
from openldm.pipelines.trained import load_run, sample_trained

STYLES = ("google emoji style", "twitter emoji style", "fluent emoji style")
SEEN = ("a red apple", "a cat face", "a grinning face", "a sun")
UNSEEN = ("a carrot", "a bell", "an alien monster", "a cloud with snow")  # in the held-out emoji split
NOVEL = ("a blue apple", "a green heart", "a grinning face with dark skin tone", "a red cat face")


def settings(steps: int, guidance_scale: float, cutters: StepCutters | None = None) -> EvalSettings:
    """Every image of a split (5000 > either split), one per caption, DDIM, batches of 50 (batch k: seed k)."""
    return EvalSettings(num_samples=5000, steps=steps, guidance_scales=[guidance_scale], batch_size=50,
                        cutters=cutters or StepCutters())


IMAGES = {"real": "real", "reconstructed": "real, autoencoder round trip"}  # what each report row scores


def quality_table(judges: EmojiJudges, run: Path, *, steps: int, guidance_scale: float) -> list[str]:
    """``openldm evaluate`` on the run, per held-out split: the real images and one sample per real image,
    prompted by its caption (style tag included), judged by the style judge and the judge CLIP."""
    rows = ["| split | images | N | style accuracy | top-1 retrieval among the split's prompts | CLIP cosine | "
            "FID (CLIP features) | KID x 1e3 |", "|---|---|---|---|---|---|---|---|"]
    for r in evaluate_emoji(load_run(run), judges, settings(steps, guidance_scale))["rows"]:
        rows.append(f"| {r['split']} | {IMAGES.get(r['task'], 'samples')} | {r['n']} | "
                    f"{100 * r['style_accuracy']:.1f}% | {100 * r['top1']:.1f}% (chance {100 * r['chance']:.1f}%) | "
                    f"{r['cosine']:.3f} | {r['fid']:.3f} | {1e3 * r['kid']:.2f} +- {1e3 * r['kid_std']:.2f} |")
    return rows


def seen_figures(judges: EmojiJudges, model, settings: EvalSettings) -> dict:
    """The samples' row of ``openldm evaluate`` on the seen emoji (``heldout_images``)."""
    rows = evaluate_emoji(model, judges, settings, splits=("heldout_images",))["rows"]
    return next(r for r in rows if r["task"] == "text")


def progress_table(judges: EmojiJudges, run: Path, *, steps: int, guidance_scale: float,
                   sampling_steps: tuple[int, ...] = (10, 20, 50)) -> list[str]:
    """Quality on the seen emoji against training steps (the run's EMA snapshots, sampled with ``steps``) and
    against sampling steps (the last weights)."""
    rows = ["| weights | DDIM steps | style accuracy | top-1 retrieval | CLIP cosine | FID (CLIP features) |",
            "|---|---|---|---|---|---|"]
    snapshots = sorted(int(d.name.split("_")[1]) for d in (run / "snapshots").glob("step_*"))
    plan = [(f"step {k}", k, steps) for k in snapshots] + [("last", None, n) for n in sampling_steps if n != steps]
    for label, step, n in plan:
        r = seen_figures(judges, load_run(run, step=step), settings(n, guidance_scale))
        rows.append(f"| {label} | {n} | {100 * r['style_accuracy']:.1f}% | {100 * r['top1']:.1f}% | "
                    f"{r['cosine']:.3f} | {r['fid']:.3f} |")
    return rows


def cutters_table(judges: EmojiJudges, run: Path, *, steps: int, guidance_scale: float) -> list[str]:
    """The step cutters of benchmarks/step_cutters.py on the emoji model: per variant, the seen emoji's figures and
    the sampling seconds (this process, one sample per held-out image), with ratios to plain."""
    model = load_run(run)
    rows = ["| variant | style accuracy | top-1 retrieval | CLIP cosine | FID (CLIP features) | FID ratio | s | "
            "s ratio |", "|---|---|---|---|---|---|---|---|"]
    plain = None
    for name, cutters in variants(GUIDANCE_INTERVAL):
        r = seen_figures(judges, model, settings(steps, guidance_scale, cutters))
        plain = plain or r
        rows.append(f"| {name} | {100 * r['style_accuracy']:.1f}% | {100 * r['top1']:.1f}% | {r['cosine']:.3f} | "
                    f"{r['fid']:.3f} | {r['fid'] / plain['fid']:.2f} | {r['seconds']:.1f} | "
                    f"{r['seconds'] / plain['seconds']:.2f} |")
    return rows


AUTOENCODERS = ("emoji_autoencoder_kl_f4", "emoji_autoencoder_kl_f8", "emoji_autoencoder_kl_f4_wide")


@torch.no_grad()
def autoencoder_table(runs: Path, style: ImageClassifier) -> list[str]:
    """Reconstruction PSNR / SSIM of each autoencoder run on the held-out splits, and the style judge's accuracy on
    its round trips beside the real images' own (the ceiling the autoencoder puts on a model's style accuracy)."""
    rows = ["| autoencoder | latents | split | images | PSNR (dB) | SSIM | style accuracy: real / round trip |",
            "|---|---|---|---|---|---|---|"]
    splits = {name: EmojiSplit.load(name) for name in HELD_OUT}
    real_style = {name: accuracy(style, data.images, data.styles) for name, data in splits.items()}
    for name in AUTOENCODERS:
        path = runs / name / "autoencoder.safetensors"
        if not path.is_file():
            print(f"skipped {name}: {path} is missing (train it with configs/{name}.yaml)")
            continue
        model = load_model(path, dtype=torch.float32).eval()  # an exported copy may be float16
        for split, data in splits.items():
            x = data.images
            y = torch.cat([model.decode(model.encode(x[i:i + 128]).mode()).clamp(-1, 1)
                           for i in range(0, len(x), 128)])
            z = model.encode(x[:1]).mode()
            rows.append(f"| {name} | {' x '.join(map(str, z.shape[1:]))} | {split} | {len(x)} | "
                        f"{psnr(y, x).mean():.2f} | {ssim(y, x).mean():.4f} | "
                        f"{100 * real_style[split]:.1f}% / {100 * accuracy(style, y, data.styles):.1f}% |")
    return rows


@torch.no_grad()
def text_grid(run: Path, out: Path, *, steps: int, guidance_scale: float) -> list[str] | None:
    if not (run / "config.yaml").is_file():
        print(f"skipped the text-to-image grid: {run} is missing (train it with configs/{run.name}.yaml)")
        return None
    model = load_run(run)
    prompts = [f"{subject}, {style}" for subject in SEEN for style in STYLES]
    heldout = {_a(r["name"]) for r in build_dataset("emoji", {"split": "heldout_emoji"}).records}
    if not heldout.issuperset(UNSEEN):
        raise SystemExit(f"not held out in this build: {sorted(set(UNSEEN) - heldout)}")
    prompts += [f"{p}, google emoji style" for p in UNSEEN] + [f"{p}, twitter emoji style" for p in NOVEL]
    rows = [sample_trained(model, prompt=p, num_images=4, steps=steps, guidance_scale=guidance_scale, seed=0)
            for p in prompts]
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows).save(out)  # one row per prompt: its 4 seeds side by side
    return prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs")
    p.add_argument("--out", default="docs/results/emoji-text.png")
    p.add_argument("--run", default="emoji_text_clip_wide", help="the text-to-image run under --runs")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--progress", action="store_true",
                   help="also quality against training steps (the run's snapshots) and sampling steps")
    p.add_argument("--cutters", action="store_true",
                   help="also the step cutters' cost (benchmarks/step_cutters.py's variants) on the seen emoji")
    p.add_argument("--guidance-scale", type=float, default=4.0)
    args = p.parse_args()
    torch.manual_seed(0)
    style = load_style_judge()
    print("\n".join(autoencoder_table(Path(args.runs), style)))
    print()
    clip_path, run = Path(args.runs) / "emoji_clip" / "clip.safetensors", Path(args.runs) / args.run
    if not clip_path.is_file() or not (run / "config.yaml").is_file():
        print(f"skipped the quality tables: {clip_path} (configs/emoji_clip.yaml) or {run} is missing")
    else:
        judges = EmojiJudges(style=style, clip=load_judge_clip(clip_path))
        figures = dict(steps=args.steps, guidance_scale=args.guidance_scale)
        print("\n".join(quality_table(judges, run, **figures)))
        if args.progress:
            print()
            print("\n".join(progress_table(judges, run, **figures)))
        if args.cutters:
            print()
            print("\n".join(cutters_table(judges, run, **figures)))
    prompts = text_grid(run, Path(args.out), steps=args.steps,
                        guidance_scale=args.guidance_scale)
    if prompts:
        print(f"\n{args.out}: one row per prompt, 4 seeds each:")
        print("\n".join(f"{i + 1}. {p}" for i, p in enumerate(prompts)))


if __name__ == "__main__":
    main()
