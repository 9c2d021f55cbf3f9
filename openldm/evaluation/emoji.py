"""Judges of colour text-to-image on the emoji data (openldm.data.emoji), none of them the encoder a model
conditions on:

- a *style judge*: a small CNN of the three art styles (google / twitter / fluent), trained on the train split
  with random flips and cached per build of the data, so "..., twitter emoji style" can be checked for Twemoji;
- a *judge CLIP* (openldm.models.contrastive, trained with ``openldm train-clip`` apart from the model's text
  encoder): text-image agreement (top-1 retrieval of an image's own prompt among a split's distinct prompts, and
  the mean cosine with it) and FID / KID in its image features.

:class:`EmojiJudges` scores a set of images drawn for a held-out split's captions; the real images of the split
are scored the same way, so every figure has the real one beside it at the same N.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from openldm.data import build_dataset
from openldm.data.emoji import ART
from openldm.evaluation.classifier import ClassifierConfig, ImageClassifier, accuracy
from openldm.evaluation.metrics import fid, kid
from openldm.io.files import cache_dir
from openldm.io.native import load_model, save_model
from openldm.models.contrastive import SmallCLIP

HELD_OUT = ("heldout_images", "heldout_emoji")  # unseen images of seen emoji; emoji never seen in training
STYLE_JUDGE_FILE = "emoji_style_judge-{}.safetensors"


@dataclass
class EmojiSplit:
    """A split's images (N, 3, size, size) in [-1, 1], their style indices (N,) in ART's order and a caption each
    as the data set draws them, never empty and always with the style tag ("a red apple, google emoji style")."""

    images: torch.Tensor
    styles: torch.Tensor
    prompts: list[str]

    @classmethod
    def load(cls, split: str, size: int = 64, root: str | None = None) -> "EmojiSplit":
        """``split`` of the emoji data built at ``root`` (default: the data set's own default)."""
        ds = build_dataset("emoji", {"split": split, "size": size, "flip": False, "empty_caption": 0.0,
                                     "drop_style": 0.0, "keywords": 0.0, **({"root": root} if root else {})})
        items = [ds[i] for i in range(len(ds))]
        styles = torch.tensor([list(ART).index(r["style"]) for r in ds.records])
        return cls(torch.stack([it["image"] for it in items]), styles, [it["caption"] for it in items])

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, index: torch.Tensor) -> "EmojiSplit":
        return EmojiSplit(self.images[index], self.styles[index], [self.prompts[i] for i in index.tolist()])


@torch.enable_grad()  # also when called under no_grad
def train_style_judge(train: EmojiSplit, *, epochs: int = 2, seed: int = 0) -> ImageClassifier:
    """A CNN of the three art styles on ``train`` (random horizontal flips: a flip keeps the style); Adam at 2e-3,
    batches of 64. The same seed gives the same judge."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ImageClassifier(ClassifierConfig(channels=[16, 32, 64, 64], num_classes=len(ART),
                                                 image_size=train.images.shape[-1], in_channels=3))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    x, y = train.images, train.styles
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(x), generator=g).split(64):
            batch = torch.where(torch.rand(len(rows), 1, 1, 1, generator=g) < 0.5, x[rows], x[rows].flip(-1))
            loss = F.cross_entropy(model(batch), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def default_style_judge_path(root: str | None = None, size: int = 64) -> Path:
    """``$OPENLDM_CACHE/emoji_style_judge-<key>.safetensors``: one judge per build of the emoji data (at ``root``)
    and image size."""
    options = {"split": "train", "size": size, **({"root": root} if root else {})}
    build = hashlib.sha256(build_dataset("emoji", options).fingerprint().encode()).hexdigest()[:12]
    return cache_dir() / STYLE_JUDGE_FILE.format(build)


def load_style_judge(path: str | Path | None = None, root: str | None = None, size: int = 64) -> ImageClassifier:
    """The cached style judge at ``path`` (default :func:`default_style_judge_path`); trained on the train split
    of the data at ``root``, at ``size`` px (:func:`train_style_judge`), and written atomically when missing."""
    path = Path(path) if path is not None else default_style_judge_path(root, size)
    if not path.is_file():
        save_model(train_style_judge(EmojiSplit.load("train", size, root)), path)
    model = load_model(path)
    if not isinstance(model, ImageClassifier) or model.config.num_classes != len(ART):
        raise ValueError(f"{str(path)!r} is not a style judge of the {len(ART)} emoji styles")
    if model.config.image_size != size:
        raise ValueError(f"{str(path)!r} judges {model.config.image_size} px images; this model draws {size} px")
    return model.requires_grad_(False).eval()


def load_judge_clip(path: str | Path) -> SmallCLIP:
    """A CLIP of ``openldm train-clip`` (its clip.safetensors), frozen, as the judge of text-image agreement."""
    model = load_model(path)
    if not isinstance(model, SmallCLIP):
        raise ValueError(f"{str(path)!r} holds a {type(model).__name__}, not a CLIP of `openldm train-clip`")
    return model.requires_grad_(False).eval()


@torch.no_grad()
def clip_embeddings(clip: SmallCLIP, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The judge CLIP's image embeddings (N, E), the images resized (antialiased) to its input size."""
    size = clip.config.image_shape[1:]
    return torch.cat([clip.encode_image(F.interpolate(images[i:i + batch_size], size=size, mode="bilinear",
                                                      antialias=True)) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def agreement(clip: SmallCLIP, embeds: torch.Tensor, prompts: list[str]) -> tuple[float, float]:
    """(top-1 retrieval: the share of images whose nearest of the distinct ``prompts`` is their own, the mean
    cosine of each image with its own prompt)."""
    distinct = list(dict.fromkeys(prompts))
    where = {p: i for i, p in enumerate(distinct)}
    own = torch.tensor([where[p] for p in prompts])
    text = torch.cat([clip.encode_text(distinct[i:i + 256]) for i in range(0, len(distinct), 256)])
    similarity = embeds @ text.T  # (N, D)
    top1 = float((similarity.argmax(dim=1) == own).float().mean())
    return top1, float(similarity.gather(1, own[:, None]).mean())


@dataclass
class EmojiJudges:
    """The style judge and the judge CLIP together: :meth:`score` gives a sample set's figures for a split."""

    style: ImageClassifier
    clip: SmallCLIP

    @torch.no_grad()
    def score(self, images: torch.Tensor, split: EmojiSplit, real_embeds: torch.Tensor,
              distribution: torch.Tensor | None = None) -> dict[str, float]:
        """Figures of ``images``, one for each of ``split``'s prompts: style accuracy against the prompted style,
        top-1 retrieval (with its chance level) and cosine under the judge CLIP, and FID / KID of the judge CLIP's
        features of ``distribution`` (default ``images``; for the real images themselves, as many other real
        images) against ``real_embeds`` (the split's real images, :func:`clip_embeddings`)."""
        if len(images) != len(split):
            raise ValueError(f"{len(images)} images for {len(split)} prompts")
        embeds = clip_embeddings(self.clip, images)
        top1, cosine = agreement(self.clip, embeds, split.prompts)
        other = embeds if distribution is None else clip_embeddings(self.clip, distribution)
        kid_mean, kid_std = kid(other, real_embeds, subset_size=min(100, len(other)))
        return {"style_accuracy": accuracy(self.style, images, split.styles), "top1": top1,
                "chance": 1 / len(set(split.prompts)), "cosine": cosine, "fid": fid(other, real_embeds),
                "kid": kid_mean, "kid_std": kid_std}
