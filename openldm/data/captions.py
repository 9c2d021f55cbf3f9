"""Captions for Fashion-MNIST garments, built from the class name and attributes read from the image.

Two attributes are measured on every 28x28 image: its *tone* (the mean brightness of the garment's pixels) and
its *width* (how many pixel columns the silhouette spans). Each is compared with the tertiles of its class, so
every class has dark and light, narrow and wide examples: the lowest third is "dark" / "narrow", the highest
third "light" / "wide", the middle third gets no word. A caption then picks a template and keeps each attribute
word with probability 1/2, e.g. "a photo of a dark ankle boot", "a light, wide pullover", "a pair of trousers".

The captions are a deterministic function of (image, label, generator); the vocabulary stays small (a few
hundred distinct captions), so a frozen text encoder's per-prompt cache holds them all.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# (words before the attributes, the noun) per Fashion-MNIST label: "a pair of dark trousers"
GARMENTS: list[tuple[str, str]] = [
    ("", "t-shirt"), ("pair of", "trousers"), ("", "pullover"), ("", "dress"), ("", "coat"),
    ("", "sandal"), ("", "shirt"), ("", "sneaker"), ("", "bag"), ("", "ankle boot"),
]
TEMPLATES = ["a {}", "a photo of {}", "a picture of {}", "an image of {}", "{}"]
TONES = ("dark", "light")
WIDTHS = ("narrow", "wide")
SILHOUETTE_LEVEL = 26  # uint8 pixels above this (0.1 of full scale) belong to the garment


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def garment_phrase(label: int, attributes: list[str]) -> str:
    """The noun phrase with its article: garment_phrase(9, ["dark"]) = "a dark ankle boot"; attributes go after
    "pair of" (``"a pair of light trousers"``) and are joined by commas ("a light, wide pullover")."""
    if not 0 <= label < len(GARMENTS):
        raise ValueError(f"label {label} is not a Fashion-MNIST class (0..{len(GARMENTS) - 1})")
    before, noun = GARMENTS[label]
    words = ", ".join(attributes)
    phrase = " ".join(part for part in (before, words, noun) if part)
    return _with_article(phrase)


def fill_template(template: str, phrase: str) -> str:
    """A template of TEMPLATES around a phrase with its article: "a {}" keeps the phrase's own article ("an"
    where due), "{}" drops it, the others take the whole phrase."""
    if template == "a {}":
        return phrase
    if template == "{}":
        return phrase.split(" ", 1)[1]
    return template.format(phrase)


def image_attributes(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tone, width) of uint8 images (N, H, W): the mean value of the garment's pixels in [0, 1], and the number
    of columns holding any garment pixel."""
    on = images > SILHOUETTE_LEVEL  # (N, H, W)
    count = np.maximum(on.sum(axis=(1, 2)), 1)
    tone = (images * on).sum(axis=(1, 2)) / count / 255.0
    width = on.any(axis=1).sum(axis=1)
    return tone.astype(np.float64), width.astype(np.int64)


@dataclass
class Tertiles:
    """Per-class (lower, upper) tertile boundaries of tone and width, each (num_classes, 2)."""

    tone: np.ndarray
    width: np.ndarray

    @classmethod
    def measure(cls, images: np.ndarray, labels: np.ndarray, num_classes: int = len(GARMENTS)) -> "Tertiles":
        tone, width = image_attributes(images)
        t = np.zeros((num_classes, 2))
        w = np.zeros((num_classes, 2))
        for c in range(num_classes):
            sel = labels == c
            if sel.any():
                t[c] = np.quantile(tone[sel], [1 / 3, 2 / 3])
                w[c] = np.quantile(width[sel], [1 / 3, 2 / 3])
        return cls(tone=t, width=w)


class GarmentCaptioner:
    """Captions for a set of Fashion-MNIST images; the attribute boundaries are measured on that set."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.tertiles = Tertiles.measure(images, labels)
        self.tone, self.width = image_attributes(images)
        self.labels = labels

    def attributes(self, index: int) -> list[str]:
        """The attribute words the image at ``index`` earns (0, 1 or 2 of them, tone first)."""
        label = int(self.labels[index])
        words = []
        for value, (low, high), (small, large) in ((self.tone[index], self.tertiles.tone[label], TONES),
                                                   (self.width[index], self.tertiles.width[label], WIDTHS)):
            if value < low:
                words.append(small)
            elif value > high:
                words.append(large)
        return words

    def caption(self, index: int, generator: torch.Generator) -> str:
        """A template and a random subset of the image's attribute words, drawn from ``generator``."""
        draws = torch.rand(3, generator=generator).tolist()
        template = TEMPLATES[min(int(draws[0] * len(TEMPLATES)), len(TEMPLATES) - 1)]
        kept = [w for w, u in zip(self.attributes(index), draws[1:]) if u < 0.5]
        return fill_template(template, garment_phrase(int(self.labels[index]), kept))


def all_captions(num_classes: int = len(GARMENTS)) -> list[str]:
    """Every caption the captioner can write (for vocabularies and prompt lists)."""
    out = []
    for label in range(num_classes):
        for tone in ((), *((t,) for t in TONES)):
            for width in ((), *((w,) for w in WIDTHS)):
                phrase = garment_phrase(label, [*tone, *width])
                out.extend(fill_template(template, phrase) for template in TEMPLATES)
    return list(dict.fromkeys(out))
