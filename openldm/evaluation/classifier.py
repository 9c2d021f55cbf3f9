"""The Fashion-MNIST classifier behind ``openldm evaluate``: class accuracy of generated images, and the feature
space (its penultimate activations) in which FID and KID are measured.

A small CNN trained from scratch in about a minute on a CPU (the training split of Fashion-MNIST, Xiao et al.
2017, with random 2 px shifts), cached as an openldm model file so every later evaluation
uses the same network. Numbers measured with it compare runs of this project with each other; they are not the
Inception-feature FID of the literature.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from openldm.data.idx import FASHION_MNIST_ROOT, IDXConfig, IDXDataset
from openldm.io.files import cache_dir
from openldm.io.native import load_model, read_metadata, save_model
from openldm.registry import MODELS

CLASSIFIER_FILE = "fmnist_classifier.safetensors"
ACCURACY_KEY = "openldm.test_accuracy"


@dataclass
class ClassifierConfig:
    """``channels``: widths of the convolution stages (each a 3x3 conv -> BatchNorm -> ReLU; every stage after
    the first halves the resolution with stride 2); ``feature_dim``: width of the penultimate layer, the FID/KID
    feature space."""

    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    num_classes: int = 10
    feature_dim: int = 128
    image_size: int = 28
    in_channels: int = 1

    def __post_init__(self) -> None:
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"ClassifierConfig.channels={self.channels}; expected a non-empty list of widths >= 1")
        for name in ("num_classes", "feature_dim", "image_size", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClassifierConfig.{name}={getattr(self, name)}; it must be >= 1")
        if self.image_size % 2 ** (len(self.channels) - 1):
            raise ValueError(f"ClassifierConfig.image_size={self.image_size} is not divisible by "
                             f"{2 ** (len(self.channels) - 1)} (each of {len(self.channels) - 1} stages after the first halves it)")


@MODELS.register("image_classifier")
class ImageClassifier(nn.Module):
    """Images (B, in_channels, image_size, image_size) in [-1, 1] -> class logits (B, num_classes).

    conv stages (3x3 conv, BatchNorm, ReLU; stride 2 from the second stage on) -> flatten -> linear to
    ``feature_dim`` -> ReLU (the features) -> linear head. Flattening keeps where things are in the image; a
    global average pool after so few layers lost about 10 points of accuracy in a short training. BatchNorm, not GroupNorm: it makes a two-epoch
    training converge fast, and in eval mode (how the model is always used for measuring) it is a fixed affine
    map, so an image's features do not depend on the rest of its batch."""

    config_class = ClassifierConfig

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = c = config or ClassifierConfig()
        layers: list[nn.Module] = []
        prev = c.in_channels
        for i, width in enumerate(c.channels):
            stride = 2 if i else 1  # later stages halve the resolution in their convolution (cheaper than pooling)
            layers += [nn.Conv2d(prev, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            prev = width
        self.body = nn.Sequential(*layers)
        side = c.image_size // 2 ** (len(c.channels) - 1)
        self.project = nn.Linear(prev * side * side, c.feature_dim)
        self.head = nn.Linear(c.feature_dim, c.num_classes)

    def _check(self, x: Tensor) -> None:
        c = self.config
        expected = (c.in_channels, c.image_size, c.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"classifier input has shape {tuple(x.shape)}; expected (B, {', '.join(map(str, expected))}) "
                             f"images in [-1, 1]")

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (B, feature_dim): the space FID and KID are measured in."""
        self._check(x)
        h = self.body(x)  # (B, channels[-1], s, s)
        return F.relu(self.project(h.flatten(1)))  # (B, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.features(x))


def _load_split(root: str | Path, split: str, limit: int | None) -> tuple[Tensor, Tensor]:
    """Whole split as float images (N, 1, 28, 28) in [-1, 1] and int64 labels (N,)."""
    data = IDXDataset(IDXConfig(root=str(root), split=split, limit=limit))
    images = torch.from_numpy(data.images).float().div_(127.5).sub_(1.0)[:, None]
    return images, torch.from_numpy(data.labels)


def _augment(images: Tensor, generator: torch.Generator, shift: int = 2) -> Tensor:
    """Shift each image by a random offset of up to ``shift`` px each way, filling with the background (-1)."""
    B, _, H, W = images.shape
    padded = F.pad(images, (shift,) * 4, value=-1.0)  # (B, 1, H + 2 shift, W + 2 shift)
    dy = torch.randint(0, 2 * shift + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (B,), generator=generator)
    rows = (dy[:, None] + torch.arange(H))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(W))[:, None, :]  # (B, 1, W)
    return padded[torch.arange(B)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)


@torch.no_grad()
def classify(model: ImageClassifier, images: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Predicted labels (N,) and features (N, feature_dim) of ``images`` (N, C, H, W) in [-1, 1], in batches of
    ``batch_size`` on the model's device; results come back on the device of ``images``."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; it must be >= 1")
    model._check(images)
    device = next(model.parameters()).device
    labels, features = [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device=device, dtype=next(model.parameters()).dtype)
        f = model.features(x)
        labels.append(model.head(f).argmax(dim=1).to(images.device))
        features.append(f.to(images.device))
    if not labels:
        return (torch.empty(0, dtype=torch.long, device=images.device),
                torch.empty(0, model.config.feature_dim, device=images.device))
    return torch.cat(labels), torch.cat(features)


def accuracy(model: ImageClassifier, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Fraction of ``images`` that ``model`` (put in eval mode) assigns to ``labels``."""
    was_training = model.training
    model.eval()
    predicted, _ = classify(model, images, batch_size)
    model.train(was_training)
    return float((predicted == labels.to(predicted.device)).double().mean())


@torch.enable_grad()  # also when called under no_grad (a benchmark, an evaluation)
def train_classifier(*, root: str | Path = FASHION_MNIST_ROOT, epochs: int = 3, batch_size: int = 128,
                     lr: float = 3e-3, seed: int = 0, limit: int | None = None, progress: bool = True,
                     config: ClassifierConfig | None = None,
                     device: torch.device | str = "cpu") -> tuple[ImageClassifier, float]:
    """Train an :class:`ImageClassifier` on the first ``limit`` (default all) training images and return it in
    eval mode with its accuracy on the whole t10k split. AdamW with a one-cycle learning-rate schedule; random
    2 px shifts. The same seed gives the same model (initialisation, order and augmentation
    all come from it)."""
    if epochs < 1:
        raise ValueError(f"epochs={epochs}; it must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; it must be >= 1")
    train_x, train_y = _load_split(root, "train", limit)
    test_x, test_y = _load_split(root, "test", None)
    with torch.random.fork_rng(devices=[]):  # initialise from the seed without touching the global generator
        torch.manual_seed(seed)
        model = ImageClassifier(config or ClassifierConfig())
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-train_x.shape[0] // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.2)
    bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, desc="train-classifier")
    for _ in range(epochs):
        order = torch.randperm(train_x.shape[0], generator=generator)
        for start in range(0, train_x.shape[0], batch_size):
            idx = order[start:start + batch_size]
            x = _augment(train_x[idx], generator).to(device)
            loss = F.cross_entropy(model(x), train_y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    return model, accuracy(model, test_x.to(device), test_y)


def default_classifier_path() -> Path:
    """``$OPENLDM_CACHE/fmnist_classifier.safetensors`` (OPENLDM_CACHE defaults to ~/.cache/openldm)."""
    return cache_dir() / CLASSIFIER_FILE


def classifier_accuracy(path: str | Path) -> float | None:
    """The t10k accuracy stored in a cached classifier file, or None when it has none."""
    value = read_metadata(path).get(ACCURACY_KEY)
    return float(value) if value is not None else None


def load_classifier(path: str | Path | None = None, *, train_if_missing: bool = True,
                    progress: bool = True) -> ImageClassifier:
    """The cached Fashion-MNIST classifier at ``path`` (default :func:`default_classifier_path`), frozen and in
    eval mode. When the file is missing it is trained (:func:`train_classifier` defaults) and written atomically
    with its test accuracy in the metadata, unless ``train_if_missing`` is False (then FileNotFoundError)."""
    path = Path(path) if path is not None else default_classifier_path()
    if not path.is_file():
        if not train_if_missing:
            raise FileNotFoundError(f"no classifier at {str(path)!r}; pass train_if_missing=True to train one "
                                    f"(about a minute on a CPU)")
        model, test_accuracy = train_classifier(progress=progress)
        save_model(model, path, extra={ACCURACY_KEY: f"{test_accuracy:.6f}"})
    model = load_model(path)
    if not isinstance(model, ImageClassifier):
        raise TypeError(f"{str(path)!r} holds a {type(model).__name__}, not an image_classifier")
    model.requires_grad_(False)
    return model.eval()
