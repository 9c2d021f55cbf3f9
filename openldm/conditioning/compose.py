"""The conditioner interface, and the composition of several conditioners into one ``Slots``.

A conditioner turns one kind of raw condition, read from a batch dict, into a partial :class:`Slots`, and knows
its own *null* condition. Composing them (text + mask, low-res image + its noise level, ...) merges their slots:

- ``vector``:  concatenated along features (B, sum D_i). The UNet lifts the vector with a Linear layer before
  adding it to the time embedding, and a Linear over a concatenation is the sum of a Linear per part, so
  concatenation can express summing and lets each part keep its own width.
- ``context``: concatenated along the sequence (B, sum S_i, D); every part must have the same width D. Masks
  are concatenated too, parts without one counting as all True.
- ``concat``:  concatenated along channels (B, sum C_i, H, W).

Condition dropout (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", sec. 3.2) replaces, per sample and
per condition independently, that condition's slots by its null slots with probability ``drop_prob``
(default 0.1), so one network learns the conditional and the unconditional model; :meth:`ComposedConditioner.null`
is the unconditional input classifier-free guidance pairs with the conditional one.

Registry: ``CONDITIONERS`` maps a name to a :class:`Conditioner` subclass with ``config_class`` and
``build(config, resources)``; :func:`build_conditioning` builds a composition from :class:`ConditionConfig` s.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn

from openldm.config import ConditionConfig, from_dict
from openldm.nn.slots import Slots
from openldm.registry import CONDITIONERS

Batch = Mapping[str, Any]


@dataclass
class Resources:
    """Objects a conditioner needs that a config cannot hold, built elsewhere and handed in.

    ``prompt_encoder``: a text encoder behind the ``PromptEncoder`` protocol (openldm.conditioning.text), for the
    text backend ``"external"`` (e.g. the CLIP text encoder of a loaded SD checkpoint).
    ``encode``: image (B, 3, H, W) in [-1, 1] -> scaled latent (B, C, h, w), e.g. a frozen autoencoder's encoder
    times its scale factor; used by inpainting for the masked image. None = pixel space (identity).
    ``latent_channels``: the channels ``encode`` returns (the autoencoder's latent channels), for conditioners whose
    width follows them (inpainting) when their config leaves it unset.
    ``run_dir``: the run directory being loaded; a file a conditioner's config names (the clip text backend's
    ``path``) is looked for inside it first, so a run that carries its files can be moved (as its autoencoder).
    """

    prompt_encoder: Any = None
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None
    latent_channels: int | None = None
    run_dir: Any = None  # a pathlib.Path


def latent_resources(resources: Resources | None, autoencoder: nn.Module | None, scaling_factor: float) -> Resources:
    """``resources`` with ``encode`` (and its ``latent_channels``) filled in from the autoencoder (a latent run)
    when it has none: the run's :class:`~openldm.models.autoencoder.LatentCodec`."""
    from openldm.models.autoencoder import LatentCodec, latent_channels

    resources = resources or Resources()
    if resources.encode is not None or autoencoder is None:
        return resources
    return replace(resources, encode=LatentCodec(autoencoder, scaling_factor),
                   latent_channels=latent_channels(autoencoder))


@dataclass(frozen=True)
class RequestField:
    """An input a conditioner reads from a generation request: the request's key (``prompt``, ``class_label``,
    ``mask``, ``low_res``, ``noise_level``, ``init_image``), its type ("text" | "class" | "image" | "label_map" |
    "int" | "float"), help, and for "class" the number of classes. The CLI flag is ``--name`` with dashes."""

    name: str
    type: str
    help: str
    num_classes: int | None = None


@dataclass(frozen=True)
class RequestContext:
    """What a conditioner needs to know to build its batch entries from a request: ``batch_size`` rows,
    ``per`` images per class label / prompt (label-major), the image size (H, W) and channels, class names."""

    batch_size: int
    per: int
    image_size: tuple[int, int]
    image_channels: int
    class_names: Sequence[str] | None = None


@dataclass(frozen=True)
class SlotDims:
    """What the UNet must be configured with; the field names are ``UNetConfig``'s."""

    vector_dim: int | None = None
    context_dim: int | None = None
    concat_channels: int = 0


class Conditioner(nn.Module):
    """One kind of condition -> a partial ``Slots``.

    Subclasses set ``config_class`` and the widths they fill (``vector_dim``, ``context_dim``,
    ``concat_channels``), and implement ``forward`` and ``null``. ``latent_size`` is the spatial size (h, w) of
    the tensor being denoised (latent or pixels); spatial conditioners need it. ``generator`` feeds every random
    draw (noise augmentation, random masks).
    """

    config_class: ClassVar[type]
    eval_task: ClassVar[str | None] = None  # the `openldm evaluate` task that measures this condition
    reads_pixels: ClassVar[bool] = False  # training keeps the pixel images beside cached latents for it
    vector_dim: int | None = None
    context_dim: int | None = None
    concat_channels: int = 0

    def __init__(self) -> None:
        super().__init__()
        # follows .to(): tells the device of conditioners whose only weights live outside the module tree
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    @classmethod
    def build(cls, config: Any, resources: Resources | None = None) -> "Conditioner":
        """Build from the typed config and the shared resources (most conditioners need none)."""
        return cls(config)

    def forward(self, batch: Batch, *, generator: torch.Generator | None = None,
                latent_size: tuple[int, int] | None = None) -> Slots:
        raise NotImplementedError

    def null(self, batch_size: int, *, latent_size: tuple[int, int] | None = None) -> Slots:
        """The slots of "no condition" for ``batch_size`` samples."""
        raise NotImplementedError

    def slot_dims(self) -> SlotDims:
        return SlotDims(self.vector_dim, self.context_dim, self.concat_channels)

    def request_fields(self) -> tuple[RequestField, ...]:
        """What this condition reads from a generation request (the CLI, the server and the page show these)."""
        return ()

    def set_shard(self, rank: int, world_size: int) -> None:
        """Under DDP: conditioners that draw randomness per row draw for the whole micro-batch on every rank and
        keep this rank's rows, so N processes equal one. Default: no per-row draws, nothing to do."""

    def derive_input(self, batch: dict[str, Any]) -> str | None:
        """Training: fill in what this condition reads from the batch's pixel images ("image") when the data has no
        column for it; returns the key it needs from the pixels (None: it needs none)."""
        return None

    def request_batch(self, values: Mapping[str, Any], ctx: RequestContext) -> dict[str, Any] | None:
        """The batch entries this conditioner reads, built from a request's ``values`` (keyed by the request
        field names); None when the request gives this condition nothing (it then gets its null slots)."""
        return None


# ---------------------------------------------------------------------------------------- shared helpers


class Shared:
    """Holds an object a conditioner uses but does not own (a frozen text encoder, an autoencoder's ``encode``):
    not a submodule, so it has no place in ``parameters()``, ``state_dict()`` or ``train()``, and deep copies of
    the owner (an EMA copy) share it instead of duplicating it."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __deepcopy__(self, memo: dict) -> "Shared":
        return self


def batch_value(batch: Batch, key: str, who: str) -> Any:
    """``batch[key]`` with an error naming the conditioner, the key and the keys the batch has."""
    if key not in batch:
        raise KeyError(f"{who} reads batch[{key!r}], which is missing; the batch has keys {sorted(batch)}")
    return batch[key]


def require_size(latent_size: tuple[int, int] | None, who: str) -> tuple[int, int]:
    if latent_size is None or len(latent_size) != 2:
        raise ValueError(f"{who} needs latent_size=(h, w), the spatial size of the tensor being denoised; got {latent_size!r}")
    return int(latent_size[0]), int(latent_size[1])


def random_on(generator: torch.Generator | None, device: torch.device | str) -> torch.device:
    """The device a draw from ``generator`` must be made on (a generator only draws on its own device)."""
    return generator.device if generator is not None else torch.device(device)


def merge_slots(parts: Sequence[Slots]) -> Slots:
    """Merge partial slots: vectors and concat channels concatenated along features/channels, contexts (and
    their masks) along the sequence. Parts must agree on the batch size."""
    sizes = {t.shape[0] for p in parts for t in p.as_kwargs().values()}
    if len(sizes) > 1:
        raise ValueError(f"cannot merge conditions with different batch sizes {sorted(sizes)}")
    vectors = [p.vector for p in parts if p.vector is not None]
    concats = [p.concat for p in parts if p.concat is not None]
    with_context = [p for p in parts if p.context is not None]
    widths = sorted({p.context.shape[-1] for p in with_context})
    if len(widths) > 1:
        raise ValueError(f"cannot concatenate contexts of widths {widths}; give each text conditioner the same context_dim")
    spatial = sorted({tuple(c.shape[-2:]) for c in concats})
    if len(spatial) > 1:
        raise ValueError(f"cannot concatenate concat inputs of spatial sizes {spatial}")
    context = mask = None
    if with_context:
        context = torch.cat([p.context for p in with_context], dim=1)  # (B, sum S_i, D)
        if any(p.context_mask is not None for p in with_context):
            mask = torch.cat([
                p.context_mask if p.context_mask is not None
                else torch.ones(p.context.shape[:2], dtype=torch.bool, device=p.context.device)
                for p in with_context
            ], dim=1)  # (B, sum S_i)
    return Slots(
        vector=torch.cat(vectors, dim=-1) if vectors else None,  # (B, sum D_i)
        context=context,
        context_mask=mask,
        concat=torch.cat(concats, dim=1) if concats else None,  # (B, sum C_i, H, W)
    )


def where_dropped(drop: torch.Tensor, null: Slots, cond: Slots) -> Slots:
    """Per sample: ``null`` where ``drop`` (B,) is True, else ``cond``. Both must fill the same slots."""
    if sorted(null.as_kwargs()) != sorted(cond.as_kwargs()):
        raise ValueError(f"null fills {sorted(null.as_kwargs())} but the condition fills {sorted(cond.as_kwargs())}")
    out = {}
    for name, c in cond.as_kwargs().items():
        n = getattr(null, name)
        d = drop.to(c.device).view(-1, *([1] * (c.dim() - 1)))  # (B, 1, ...)
        out[name] = torch.where(d, n.to(c.dtype), c)
    return Slots(**out)


# ----------------------------------------------------------------------------------------- composition


class ComposedConditioner(nn.Module):
    """Several named conditioners -> one ``Slots``, with per-condition dropout and the fully-null condition.

    ``forward(batch, generator=..., latent_size=...)`` drops conditions only in training mode (or where ``drop``
    is given explicitly). With no conditioners it returns empty slots (an unconditional model).
    """

    def __init__(self, conditioners: Mapping[str, Conditioner], drop_probs: Mapping[str, float] | float = 0.1):
        super().__init__()
        for name in conditioners:
            if not name or "." in name:
                raise ValueError(f"condition name {name!r} must be non-empty and contain no '.'")
        self.conditioners = nn.ModuleDict(dict(conditioners))
        probs = {n: float(drop_probs) for n in conditioners} if isinstance(drop_probs, (int, float)) else dict(drop_probs)
        unknown = sorted(set(probs) - set(conditioners))
        if unknown:
            raise ValueError(f"drop_probs names unknown conditions {unknown}; the conditions are {list(conditioners)}")
        for n, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"drop probability {p} for condition {n!r}; it must lie in [0, 1]")
        self.drop_probs = {n: probs.get(n, 0.1) for n in conditioners}
        self.slot_dims()  # fail now, not at the first batch, if contexts have different widths

    def slot_dims(self) -> SlotDims:
        """The UNet's ``vector_dim``, ``context_dim`` and ``concat_channels`` for this composition."""
        dims = [c.slot_dims() for c in self.conditioners.values()]
        vectors = [d.vector_dim for d in dims if d.vector_dim is not None]
        widths = sorted({d.context_dim for d in dims if d.context_dim is not None})
        if len(widths) > 1:
            raise ValueError(f"text conditions have context widths {widths}; they must share one (set context_dim)")
        return SlotDims(
            vector_dim=sum(vectors) if vectors else None,
            context_dim=widths[0] if widths else None,
            concat_channels=sum(d.concat_channels for d in dims),
        )

    def sample_drops(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Independent Bernoulli(drop_prob) per condition and sample: {name: (B,) bool}. One uniform draw per
        (condition, sample) in condition order, whatever the probabilities, so the stream is stable."""
        u = torch.rand(len(self.conditioners), batch_size, generator=generator,
                       device=random_on(generator, "cpu"))  # (N, B)
        return {n: u[i] < self.drop_probs[n] for i, n in enumerate(self.conditioners)}

    def forward(self, batch: Batch, *, generator: torch.Generator | None = None,
                latent_size: tuple[int, int] | None = None,
                drop: Mapping[str, torch.Tensor] | None = None) -> Slots:
        parts = {n: c(batch, generator=generator, latent_size=latent_size) for n, c in self.conditioners.items()}
        if not parts:
            return Slots()
        batch_size = next(t.shape[0] for p in parts.values() for t in p.as_kwargs().values())
        if drop is None and self.training:
            drop = self.sample_drops(batch_size, generator)
        for name, d in (drop or {}).items():
            if name not in parts:
                raise KeyError(f"drop names unknown condition {name!r}; the conditions are {list(parts)}")
            d = torch.as_tensor(d, dtype=torch.bool)
            if d.shape != (batch_size,):
                raise ValueError(f"drop[{name!r}] has shape {tuple(d.shape)}; expected ({batch_size},)")
            if bool(d.any()):
                null = self.conditioners[name].null(batch_size, latent_size=latent_size)
                parts[name] = where_dropped(d, null, parts[name])
        return merge_slots(list(parts.values()))

    def null(self, batch_size: int, *, latent_size: tuple[int, int] | None = None) -> Slots:
        """Every condition null: the unconditional input of classifier-free guidance (Ho & Salimans 2022)."""
        return merge_slots([c.null(batch_size, latent_size=latent_size) for c in self.conditioners.values()])


def build_conditioning(conditions: Sequence[ConditionConfig], resources: Resources | None = None) -> ComposedConditioner:
    """Build each registered conditioner from its ``options`` (strictly typed) and compose them."""
    resources = resources or Resources()
    built: dict[str, Conditioner] = {}
    probs: dict[str, float] = {}
    for i, cond in enumerate(conditions):
        cls = CONDITIONERS.get(cond.kind)
        name = cond.name or cond.kind
        if name in built:
            raise ValueError(f"condition name {name!r} is used twice; give one of them another name")
        config = from_dict(cls.config_class, cond.options, where=f"conditions[{i}].options")
        built[name] = cls.build(config, resources)
        probs[name] = cond.drop_prob
    return ComposedConditioner(built, probs)
