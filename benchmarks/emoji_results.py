"""The README's emoji results from the runs the emoji recipes leave under runs/ (each section skipped, and said
so, when its run is missing):

- autoencoders: reconstruction PSNR / SSIM of runs/emoji_autoencoder_kl_f4 and _f8 on the two held-out splits
  (unseen images of seen emoji; emoji never seen in training), the figures the factor was chosen by;
- quality, per held-out split (unseen images of seen emoji; unseen emoji), on one sample per real image prompted by
  its caption: style accuracy (a small CNN trained here on the three art styles judges "..., <style> emoji
  style"), text-image agreement and FID / KID under the small CLIP of configs/emoji_clip.yaml (trained here on the
  emoji, not the MiniLM encoder the model conditions on), each beside the real images' own figure;
- with --progress, the same figures on the seen emoji against training steps (the run's EMA snapshots,
  ``snapshot_every``) and against sampling steps;
- with --cutters, the training-free step cutters of benchmarks/step_cutters.py (guidance interval, DeepCache, ToMe)
  on the seen emoji: quality and seconds beside the plain sampler;
- text-to-image: a grid of samples from runs/emoji_text_minilm (``--run``) for seen emoji in the three styles,
  unseen emoji and novel combinations (docs/results/emoji-text.png).

    python benchmarks/emoji_results.py            # needs `openldm data emoji` and the runs
    python benchmarks/emoji_results.py --progress --cutters
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cutters import GUIDANCE_INTERVAL, variants

from openldm.data import build_dataset
from openldm.data.emoji import ART
from openldm.data.emoji import _article as _a
from openldm.evaluation.classifier import ClassifierConfig, ImageClassifier, accuracy
from openldm.evaluation.grid import image_grid
from openldm.evaluation.metrics import fid, kid, psnr, ssim
from openldm.io.native import load_model
from openldm.pipelines.common import StepCutters
from openldm.pipelines.trained import load_run, sample_trained

SPLITS = ("heldout_images", "heldout_emoji")
STYLES = ("google emoji style", "twitter emoji style", "fluent emoji style")
SEEN = ("a red apple", "a cat face", "a grinning face", "a sun")
UNSEEN = ("a carrot", "a bell", "an alien monster", "a cloud with snow")  # in the held-out emoji split
NOVEL = ("a blue apple", "a green heart", "a grinning face with dark skin tone", "a red cat face")


def heldout_images(split: str) -> torch.Tensor:
    return split_images(split)[0]


def split_images(split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All images of a split (N, 3, 64, 64) in [-1, 1], their style indices (N,) in ART's order and a caption
    each as the data set draws them, never empty and always with the style tag ("a red apple, google emoji style")."""
    ds = build_dataset("emoji", {"split": split, "size": 64, "flip": False, "empty_caption": 0.0, "drop_style": 0.0,
                                 "keywords": 0.0})
    styles = torch.tensor([list(ART).index(r["style"]) for r in ds.records])
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["image"] for it in items]), styles, [it["caption"] for it in items]


def train_style_judge(epochs: int = 2) -> ImageClassifier:
    """A CNN of the three art styles on the train split (random flips), a judge the diffusion model never saw."""
    x, y, _ = split_images("train")
    model = ImageClassifier(ClassifierConfig(channels=[16, 32, 64, 64], num_classes=len(ART), image_size=64,
                                             in_channels=3))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(x), generator=g).split(64):
            batch = torch.where(torch.rand(len(rows), 1, 1, 1, generator=g) < 0.5, x[rows], x[rows].flip(-1))
            loss = torch.nn.functional.cross_entropy(model(batch), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def samples_for(model, prompts: list[str], *, steps: int, guidance_scale: float, chunk: int = 50,
                cutters: StepCutters | None = None) -> torch.Tensor:
    """One sample per prompt (seed: the chunk's index)."""
    return torch.cat([sample_trained(model, prompt=prompts[i:i + chunk], num_images=1, steps=steps,
                                     guidance_scale=guidance_scale, seed=i // chunk, cutters=cutters)
                      for i in range(0, len(prompts), chunk)])


@torch.no_grad()
def clip_embeddings(clip, images: torch.Tensor) -> torch.Tensor:
    """The judge CLIP's image embeddings (N, E) of 64 px images, shrunk to its 32 px input (antialiased)."""
    size = clip.config.image_shape[1:]
    return torch.cat([clip.encode_image(F.interpolate(images[i:i + 256], size=size, mode="bilinear",
                                                      antialias=True)) for i in range(0, len(images), 256)])


def agreement(clip, embeds: torch.Tensor, prompts: list[str]) -> tuple[float, float]:
    """(top-1 retrieval: the share of images whose nearest of the split's distinct prompts is their own, the mean
    cosine of each image with its own prompt)."""
    distinct = list(dict.fromkeys(prompts))
    where = {p: i for i, p in enumerate(distinct)}
    own = torch.tensor([where[p] for p in prompts])
    with torch.no_grad():
        text = torch.cat([clip.encode_text(distinct[i:i + 256]) for i in range(0, len(distinct), 256)])
    similarity = embeds @ text.T  # (N, D)
    top1 = float((similarity.argmax(dim=1) == own).float().mean())
    return top1, float(similarity.gather(1, own[:, None]).mean())


@torch.no_grad()
def quality_table(judge: ImageClassifier, clip_path: Path, run: Path, *, steps: int,
                  guidance_scale: float) -> list[str]:
    """Per held-out split: the real images and one sample per real image, prompted by its caption (style tag
    included). Style accuracy by the style judge; text-image agreement and FID / KID by the judge CLIP (trained
    here on the emoji, apart from the MiniLM encoder the model conditions on); the real row's FID / KID compare a
    random set of as many train-split images with the held-out ones."""
    rows = ["| split | images | N | style accuracy | top-1 retrieval among the split's prompts | CLIP cosine | "
            "FID (CLIP features) | KID x 1e3 |", "|---|---|---|---|---|---|---|---|"]
    clip = load_model(clip_path).eval() if clip_path.is_file() else None
    if clip is None:
        print(f"no text-image agreement or FID: {clip_path} is missing (train it with configs/emoji_clip.yaml)")
    model = load_run(run) if (run / "config.yaml").is_file() else None
    train_x = split_images("train")[0] if clip is not None else None
    g = torch.Generator().manual_seed(0)
    for split in SPLITS:
        x, styles, prompts = split_images(split)
        sets = [("real", x)]
        if model is not None:
            sets.append(("samples", samples_for(model, prompts, steps=steps, guidance_scale=guidance_scale)))
        real_embeds = clip_embeddings(clip, x) if clip is not None else None
        for label, images in sets:
            cells = [split, label, str(len(images)), f"{100 * accuracy(judge, images, styles):.1f}%"]
            if clip is not None:
                embeds = real_embeds if label == "real" else clip_embeddings(clip, images)
                top1, cosine = agreement(clip, embeds, prompts)
                other = embeds if label != "real" else clip_embeddings(
                    clip, train_x[torch.randperm(len(train_x), generator=g)[: len(x)]])
                mean, std = kid(other, real_embeds, subset_size=min(100, len(x)))
                cells += [f"{100 * top1:.1f}% (chance {100 / len(set(prompts)):.1f}%)", f"{cosine:.3f}",
                          f"{fid(other, real_embeds):.3f}", f"{1e3 * mean:.2f} +- {1e3 * std:.2f}"]
            else:
                cells += ["", "", "", ""]
            rows.append("| " + " | ".join(cells) + " |")
    return rows


class SeenEmoji:
    """The figures of :func:`quality_table` for samples of the seen emoji (``heldout_images``, one sample per real
    image prompted by its caption): the real images' judge-CLIP features are computed once for every row."""

    def __init__(self, judge: ImageClassifier, clip_path: Path):
        self.judge, self.clip = judge, load_model(clip_path).eval()
        x, self.styles, self.prompts = split_images("heldout_images")
        self.real_embeds = clip_embeddings(self.clip, x)

    @torch.no_grad()
    def figures(self, images: torch.Tensor) -> tuple[float, float, float, float]:
        """(style accuracy, top-1 retrieval, CLIP cosine, FID) of samples for ``self.prompts``."""
        embeds = clip_embeddings(self.clip, images)
        top1, cosine = agreement(self.clip, embeds, self.prompts)
        return accuracy(self.judge, images, self.styles), top1, cosine, fid(embeds, self.real_embeds)


@torch.no_grad()
def progress_table(seen: SeenEmoji, run: Path, *, steps: int, guidance_scale: float,
                   sampling_steps: tuple[int, ...] = (10, 20, 50)) -> list[str]:
    """Quality on the seen emoji against training steps (the run's EMA snapshots, sampled with ``steps``) and
    against sampling steps (the last weights)."""
    rows = ["| weights | DDIM steps | style accuracy | top-1 retrieval | CLIP cosine | FID (CLIP features) |",
            "|---|---|---|---|---|---|"]
    snapshots = sorted(int(d.name.split("_")[1]) for d in (run / "snapshots").glob("step_*"))
    plan = [(f"step {k}", k, steps) for k in snapshots] + [("last", None, n) for n in sampling_steps if n != steps]
    for label, step, n in plan:
        images = samples_for(load_run(run, step=step), seen.prompts, steps=n, guidance_scale=guidance_scale)
        style, top1, cosine, score = seen.figures(images)
        rows.append(f"| {label} | {n} | {100 * style:.1f}% | {100 * top1:.1f}% | {cosine:.3f} | {score:.3f} |")
    return rows


@torch.no_grad()
def cutters_table(seen: SeenEmoji, run: Path, *, steps: int, guidance_scale: float) -> list[str]:
    """The step cutters of benchmarks/step_cutters.py on the emoji model: per variant, the seen emoji's figures and
    the sampling seconds (this process, one sample per held-out image), with ratios to plain."""
    model = load_run(run)
    rows = ["| variant | style accuracy | top-1 retrieval | CLIP cosine | FID (CLIP features) | FID ratio | s | "
            "s ratio |", "|---|---|---|---|---|---|---|---|"]
    plain = None
    for name, cutters in variants(GUIDANCE_INTERVAL):
        start = time.perf_counter()
        images = samples_for(model, seen.prompts, steps=steps, guidance_scale=guidance_scale, cutters=cutters)
        seconds = time.perf_counter() - start
        style, top1, cosine, score = seen.figures(images)
        plain = plain or (score, seconds)
        rows.append(f"| {name} | {100 * style:.1f}% | {100 * top1:.1f}% | {cosine:.3f} | {score:.3f} | "
                    f"{score / plain[0]:.2f} | {seconds:.1f} | {seconds / plain[1]:.2f} |")
    return rows


@torch.no_grad()
def autoencoder_table(runs: Path) -> list[str]:
    rows = ["| autoencoder | latents | split | images | PSNR (dB) | SSIM |", "|---|---|---|---|---|---|"]
    for name in ("emoji_autoencoder_kl_f4", "emoji_autoencoder_kl_f8"):
        path = runs / name / "autoencoder.safetensors"
        if not path.is_file():
            print(f"skipped {name}: {path} is missing (train it with configs/{name}.yaml)")
            continue
        model = load_model(path).eval()
        for split in SPLITS:
            x = heldout_images(split)
            y = torch.cat([model.decode(model.encode(x[i:i + 128]).mode()).clamp(-1, 1)
                           for i in range(0, len(x), 128)])
            z = model.encode(x[:1]).mode()
            rows.append(f"| {name} | {' x '.join(map(str, z.shape[1:]))} | {split} | {len(x)} | "
                        f"{psnr(y, x).mean():.2f} | {ssim(y, x).mean():.4f} |")
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
    p.add_argument("--run", default="emoji_text_minilm", help="the text-to-image run under --runs")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--progress", action="store_true",
                   help="also quality against training steps (the run's snapshots) and sampling steps")
    p.add_argument("--cutters", action="store_true",
                   help="also the step cutters' cost (benchmarks/step_cutters.py's variants) on the seen emoji")
    p.add_argument("--guidance-scale", type=float, default=4.0)
    args = p.parse_args()
    torch.manual_seed(0)
    print("\n".join(autoencoder_table(Path(args.runs))))
    print()
    judge = train_style_judge()
    clip_path, run = Path(args.runs) / "emoji_clip" / "clip.safetensors", Path(args.runs) / args.run
    print("\n".join(quality_table(judge, clip_path, run, steps=args.steps, guidance_scale=args.guidance_scale)))
    if (args.progress or args.cutters) and clip_path.is_file() and (run / "config.yaml").is_file():
        seen = SeenEmoji(judge, clip_path)
        if args.progress:
            print()
            print("\n".join(progress_table(seen, run, steps=args.steps, guidance_scale=args.guidance_scale)))
        if args.cutters:
            print()
            print("\n".join(cutters_table(seen, run, steps=args.steps, guidance_scale=args.guidance_scale)))
    prompts = text_grid(run, Path(args.out), steps=args.steps,
                        guidance_scale=args.guidance_scale)
    if prompts:
        print(f"\n{args.out}: one row per prompt, 4 seeds each:")
        print("\n".join(f"{i + 1}. {p}" for i, p in enumerate(prompts)))


if __name__ == "__main__":
    main()
