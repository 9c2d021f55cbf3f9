"""The one generation interface: a :class:`Generator` (any model source loaded by
``openldm.pipelines.sources.load_generator``) says what it can do (:class:`Capabilities`) and makes images from one
typed :class:`GenerationRequest`. The CLI (``openldm generate`` and ``openldm sample``), the server (``openldm
serve``) and the Python API all call :meth:`Generator.generate`.

A request names only what the user chose; :meth:`GenerationRequest.resolve` fills the rest from the model's
recommended settings (``Capabilities.recommended``, read from the model's own files) and checks every field
against what the model accepts, raising :class:`RequestError` (a ValueError naming the field).

Progress: ``on_progress(Progress)`` after every sampler step (step, total, and the denoiser's current estimate,
which :meth:`Generator.preview` turns into a cheap picture). Cancelling: ``should_stop()`` is asked after every
step; when it says yes, sampling ends there and the current estimate is decoded (``GenerationResult.interrupted``).

Concurrency: a generator's modules are placed (device, dtype) once at load; a request never moves, casts or
otherwise changes them, so several requests may run at once on one loaded model and each gets the images it would
get alone. The one exception, LoRAs: a Stable Diffusion request's LoRAs are fused into the weights while it runs and
the base tensors restored after; requests asking for other LoRAs wait (``openldm.pipelines.loras.LoraSwitch``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from PIL import Image

from openldm.conditioning.compose import RequestField
from openldm.pipelines.common import (
    CUTTER_FIELDS,
    SD_GUIDANCE_SCALE,
    SD_SAMPLER,
    SD_SIZE,
    SD_STEPS,
    GenerationParams,
    RequestError,
    StepCutters,
)
from openldm.pipelines.hires import DEFAULT_STRENGTH, DEFAULT_UPSCALER, HiresFix, hires_size
from openldm.pipelines.seeds import SeedVariation

ImageInput = Image.Image | str | Path


@dataclass(frozen=True)
class Recommended:
    """A model's recommended settings, where the CLI, the API and the page start."""

    sampler: str = SD_SAMPLER  # Stable Diffusion's (pipelines/common.py); sampling.json gives a trained model's
    steps: int = SD_STEPS
    guidance_scale: float = SD_GUIDANCE_SCALE
    karras: bool = False
    width: int = SD_SIZE
    height: int = SD_SIZE

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: "Recommended | None" = None) -> "Recommended":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown recommended settings {unknown}; accepted: {sorted(known)}")
        return replace(base or cls(), **data)


InputField = RequestField  # a condition's input (conditioning/ declares them; the type lives there)


@dataclass(frozen=True)
class Capabilities:
    """What a loaded model can do; ``to_dict()`` is the server's model description."""

    name: str
    kind: str  # "stable-diffusion" | "trained"
    source: str
    prompt: bool
    negative_prompt: bool
    class_names: tuple[str, ...] | None  # class-conditional models: the names, index = label
    num_classes: int | None
    inputs: tuple[InputField, ...]
    image_to_image: bool
    inpainting: bool
    channels: int  # 1 greyscale, 3 RGB
    size_multiple: int  # width and height must be positive multiples of this
    samplers: tuple[str, ...]
    recommended: Recommended
    max_steps: int = 1000
    prompt_weightings: tuple[str, ...] = ("none",)  # how it can read prompts (see GenerationRequest)
    embeddings: tuple[str, ...] = ()  # textual-inversion names its prompts may use
    max_clip_skip: int = 1  # clip_skip may be 1..this (1: the model has no CLIP layers to skip)
    chunked_prompts: bool = False  # takes prompts over 75 tokens in chunks (A1111's ``chunked``)
    vae_tiling: bool = False  # can decode in overlapping tiles
    hires_fix: bool = False  # text-to-image in two passes, the second larger (A1111's hires fix)
    tiling: bool = False  # seamless tiling: circular padding in the networks (A1111's "Tiling")
    vae_choice: bool = False  # takes another VAE by name per request (``GenerationRequest.vae``)
    device: str = "cpu"  # where the modules are: whose free memory bounds a request
    # working memory one output pixel of one image needs at least (estimates): sampling, decoding
    sample_bytes_per_pixel: float = 0.0
    decode_bytes_per_pixel: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_names"] = list(self.class_names) if self.class_names is not None else None
        d["inputs"] = [asdict(f) for f in self.inputs]
        d["samplers"] = list(self.samplers)
        d["prompt_weightings"] = list(self.prompt_weightings)
        d["embeddings"] = list(self.embeddings)
        return d


@dataclass
class GenerationRequest:
    """Everything that decides the images besides the model. None fields take the model's recommended value.

    ``mask``: the region to redraw (white) of ``init_image``; on a model trained with a segmentation condition and
    no ``init_image``, the segmentation map. ``inputs``: the model's other condition inputs by ``InputField.name``.
    ``strength``: image-to-image, how much of ``init_image`` to redraw (default 0.75; inpainting 1). ``loras``:
    Stable Diffusion models, LoRA files and their weights, applied with those the prompts name (``<lora:NAME:W>``,
    resolved in the generator's LoRA folder).
    ``prompt_weighting``: "none" reads prompts as diffusers does; "a1111" reads AUTOMATIC1111's syntax
    (``(word:1.3)``, ``[word]``, ``BREAK``) over 75-token chunks. ``hires_scale``: text-to-image in two passes
    (A1111's hires fix, ``openldm.pipelines.hires``): ``width`` x ``height`` first, then that upscaled and redrawn at
    ``strength`` (default 0.75)."""

    prompt: str | None = None
    negative_prompt: str = ""
    class_label: int | str | None = None
    seed: int = 0
    sampler: str | None = None
    karras: bool | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    guidance_rescale: float = 0.0
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    init_image: ImageInput | None = None
    strength: float | None = None
    mask: ImageInput | None = None
    paste_back: bool = False
    inputs: dict[str, Any] = field(default_factory=dict)
    clip_skip: int = 1
    chunked: bool = False
    prompt_weighting: str = "none"
    vae_tiling: bool = False
    tiling: bool = False  # seamless: the image wraps around at its edges (A1111's "Tiling")
    loras: list[tuple[str | Path, float]] = field(default_factory=list)
    guidance_interval: tuple[float, float] | None = None  # the step cutters (StepCutters' fields); off by default
    deepcache_interval: int = 1
    token_merging_ratio: float = 0.0
    token_merging_max_downsample: int = 1
    hires_scale: float | None = None  # hires fix: a second pass at this times width x height (None: one pass)
    hires_upscaler: str | None = None  # None: A1111's "Latent"; openldm.pipelines.hires.UPSCALERS
    hires_steps: int | None = None  # the second pass's steps (None: ``steps``); its strength is ``strength``
    vae: str | None = None  # Stable Diffusion: a VAE of the generator's VAE folder by name (None: the model's)
    subseed: int | None = None  # A1111's variation seed (openldm.pipelines.seeds); needs subseed_strength > 0
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None  # (width, height): keep the noise of this image size

    def variation(self) -> SeedVariation | None:
        """The variation seed / seed resize this request asks for (None: the plain seed's noise)."""
        if not self.subseed_strength and self.seed_resize_from is None:
            return None
        return SeedVariation(subseed=self.subseed or 0, strength=self.subseed_strength,
                             resize_from=None if self.seed_resize_from is None else tuple(self.seed_resize_from))

    def cutters(self) -> StepCutters:
        """The step cutters this request asks for."""
        return StepCutters(**{key: getattr(self, key) for key in CUTTER_FIELDS})

    def resolve(self, caps: Capabilities) -> "GenerationRequest":
        """A copy with every None setting filled from ``caps.recommended``, checked against ``caps``."""
        rec = caps.recommended
        r = replace(self, inputs=dict(self.inputs), loras=list(self.loras))
        r.sampler = rec.sampler if r.sampler is None else r.sampler
        r.karras = rec.karras if r.karras is None else bool(r.karras)
        r.steps = rec.steps if r.steps is None else r.steps
        r.guidance_scale = rec.guidance_scale if r.guidance_scale is None else r.guidance_scale
        if r.init_image is None:
            r.width = rec.width if r.width is None else r.width
            r.height = rec.height if r.height is None else r.height
        if r.hires_scale is not None:
            r.hires_upscaler = DEFAULT_UPSCALER if r.hires_upscaler is None else r.hires_upscaler
            r.strength = DEFAULT_STRENGTH if r.strength is None else r.strength
        _check(r, caps)
        return r


def _check(r: GenerationRequest, caps: Capabilities) -> None:
    """Every field against what the model takes; the first problem raises a RequestError naming the field."""
    from openldm.registry import SAMPLERS

    if r.sampler not in caps.samplers:
        raise RequestError("sampler", f"sampler {r.sampler!r} is not one of {', '.join(caps.samplers)}")
    if r.karras and not SAMPLERS.get(r.sampler).supports_karras:
        raise RequestError("karras", f"sampler {r.sampler!r} has no Karras noise levels; use one of "
                           f"{', '.join(n for n in caps.samplers if SAMPLERS.get(n).supports_karras)}")
    if isinstance(r.steps, bool) or not isinstance(r.steps, int) or not 1 <= r.steps <= caps.max_steps:
        raise RequestError("steps", f"steps={r.steps!r} must be an integer in 1..{caps.max_steps}")
    for name in ("guidance_scale", "guidance_rescale"):
        value = getattr(r, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise RequestError(name, f"{name}={value!r} must be a finite number >= 0")
    if r.guidance_rescale > 1:
        raise RequestError("guidance_rescale", f"guidance_rescale={r.guidance_rescale} must be in [0, 1]")
    for name in CUTTER_FIELDS:
        try:
            StepCutters(**{name: getattr(r, name)})
        except ValueError as e:
            raise RequestError(name, str(e)) from None
    if not isinstance(r.num_images, int) or r.num_images < 1:
        raise RequestError("num_images", f"num_images={r.num_images!r} must be an integer >= 1")
    if isinstance(r.seed, bool) or not isinstance(r.seed, int) or not 0 <= r.seed < 2**64:
        raise RequestError("seed", f"seed={r.seed!r} must be an integer in [0, 2^64)")
    m = caps.size_multiple
    for name in ("width", "height"):
        value = getattr(r, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % m):
            raise RequestError(name, f"{name}={value!r} must be a positive multiple of {m}")
    if r.prompt_weighting not in caps.prompt_weightings:
        raise RequestError("prompt_weighting", f"prompt_weighting={r.prompt_weighting!r}; model {caps.name!r} takes "
                           f"{', '.join(caps.prompt_weightings)}")
    _check_hires(r, caps)
    if r.tiling and r.vae_tiling:
        raise RequestError("tiling", "tiling (seamless) and vae_tiling (a tiled decode) do not go together; choose "
                           "one")
    _check_memory(r, caps)
    if isinstance(r.clip_skip, bool) or not isinstance(r.clip_skip, int) or not 1 <= r.clip_skip <= caps.max_clip_skip:
        raise RequestError("clip_skip", f"clip_skip={r.clip_skip!r} must be 1 (model {caps.name!r} has no CLIP text "
                           "encoder layers to skip)" if caps.max_clip_skip == 1 else
                           f"clip_skip={r.clip_skip!r} must be in 1..{caps.max_clip_skip} (the text encoder's layers)")
    for name, able, what in (("chunked", caps.chunked_prompts, "chunked prompt encoding"),
                             ("vae_tiling", caps.vae_tiling, "tiled decoding"),
                             ("tiling", caps.tiling, "seamless tiling")):
        if getattr(r, name) and not able:
            raise RequestError(name, f"{name}=True: model {caps.name!r} has no {what} (Stable Diffusion weights do)")
    _check_variation(r, caps)
    if r.vae is not None and not caps.vae_choice:
        raise RequestError("vae", f"vae={r.vae!r}: model {caps.name!r} takes no other VAE per request (Stable "
                           "Diffusion weights do)")
    if r.prompt and not caps.prompt:
        raise RequestError("prompt", f"model {caps.name!r} takes no prompt" + _alternatives(caps))
    if r.negative_prompt and not caps.negative_prompt:
        raise RequestError("negative_prompt", f"model {caps.name!r} takes no negative prompt (it guides against its "
                           "null condition)")
    if r.class_label is not None:
        if not caps.num_classes:
            raise RequestError("class_label", f"model {caps.name!r} is not class-conditional" + _alternatives(caps))
        label = r.class_label
        if isinstance(label, str) and label.lstrip("-").isdigit():
            label = int(label)
        names = caps.class_names or ()
        if isinstance(label, str) and label not in names:
            raise RequestError("class_label", f"class {label!r} is not a class of model {caps.name!r}; classes: "
                               f"{', '.join(names) or f'0..{caps.num_classes - 1}'}")
        if isinstance(label, str):
            label = names.index(label)
        if isinstance(label, int) and not 0 <= label < caps.num_classes:
            raise RequestError("class_label", f"class label {label} is out of range; the model has classes "
                               f"0..{caps.num_classes - 1}" + (f" ({', '.join(names)})" if names else ""))
        r.class_label = label
    if r.strength is not None and (not isinstance(r.strength, (int, float)) or not 0 <= r.strength <= 1):
        raise RequestError("strength", f"strength={r.strength!r} must be in [0, 1]")
    if r.init_image is not None and not caps.image_to_image:
        raise RequestError("init_image", f"model {caps.name!r} does not do image-to-image")
    if r.init_image is None and r.hires_scale is None and r.strength is not None and r.strength < 1:
        raise RequestError("strength", f"strength={r.strength} is for image-to-image; give an init image")
    if r.mask is not None and r.init_image is not None and not caps.inpainting:
        raise RequestError("mask", f"model {caps.name!r} does not inpaint")
    if r.mask is not None and r.init_image is None and not any(f.name == "mask" for f in caps.inputs):
        raise RequestError("mask", "a mask needs an init image to inpaint (init_image, --init-image)")
    declared = {f.name for f in caps.inputs}
    unknown = sorted(set(r.inputs) - declared)
    if unknown:
        raise RequestError(unknown[0], f"model {caps.name!r} takes no input {unknown[0]!r}; its inputs: "
                           f"{', '.join(sorted(declared)) or 'none'}")
    if r.loras and caps.kind != "stable-diffusion":
        raise RequestError("loras", f"model {caps.name!r} takes no LoRAs (they are for Stable Diffusion weights)")
    for item in r.loras:
        if (not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[1], (int, float))
                or not math.isfinite(item[1])):
            raise RequestError("loras", f"loras entry {item!r} must be a (file, weight) pair with a finite weight")
    if caps.kind == "stable-diffusion" and not r.prompt and r.prompt != "":
        r.prompt = ""


def _check_variation(r: GenerationRequest, caps: Capabilities) -> None:
    if r.subseed_strength and r.subseed is None:
        raise RequestError("subseed", f"subseed_strength={r.subseed_strength} needs a subseed (the variation seed)")
    try:
        r.variation()
    except ValueError as e:
        field = str(e).split("=", 1)[0]
        raise RequestError(field if field in ("subseed", "subseed_strength") else "seed_resize_from", str(e)) from None
    if r.seed_resize_from is not None and min(r.seed_resize_from) < caps.size_multiple:
        raise RequestError("seed_resize_from", f"seed_resize_from={tuple(r.seed_resize_from)} must be at least "
                           f"{caps.size_multiple} a side (one latent pixel)")


def _check_hires(r: GenerationRequest, caps: Capabilities) -> None:
    if r.hires_scale is None:
        if r.hires_upscaler is not None or r.hires_steps is not None:
            name = "hires_upscaler" if r.hires_upscaler is not None else "hires_steps"
            raise RequestError(name, f"{name} is for the hires fix; give hires_scale too (e.g. 2)")
        return
    if not caps.hires_fix:
        raise RequestError("hires_scale", f"model {caps.name!r} has no hires fix (Stable Diffusion weights do)")
    if r.init_image is not None:
        raise RequestError("hires_scale", "the hires fix is for text-to-image; leave out the init image (or "
                           "hires_scale)")
    hires = HiresFix(r.hires_scale, r.hires_upscaler, r.hires_steps, r.strength)
    if r.hires_steps is not None and (isinstance(r.hires_steps, bool) or not isinstance(r.hires_steps, int)
                                      or not 1 <= r.hires_steps <= caps.max_steps):
        raise RequestError("hires_steps", f"hires_steps={r.hires_steps!r} must be an integer in 1..{caps.max_steps}")
    width, height = hires.size(r.width, r.height)
    m = caps.size_multiple
    if width % m or height % m:
        raise RequestError("hires_scale", f"hires_scale={r.hires_scale:g} makes {r.width}x{r.height} into "
                           f"{width}x{height}, which is not a multiple of {m}; choose a scale that is (e.g. 2)")


def _check_memory(r: GenerationRequest, caps: Capabilities) -> None:
    """Refuse, before anything is allocated, a request whose images cannot fit in the device's free memory (a lower
    bound: the larger of sampling's and decoding's bytes per output pixel, times the pixels of all images; a tiled
    decode needs only a tile)."""
    per_pixel = max(caps.sample_bytes_per_pixel, 0.0 if r.vae_tiling else caps.decode_bytes_per_pixel)
    width, height = r.width, r.height
    if (width is None or height is None) and r.init_image is not None:  # the size of the init image
        width, height = _image_size(r.init_image) or (width, height)
    if width is None or height is None or not per_pixel:
        return
    if r.hires_scale is not None:  # the second pass's size (checked before this)
        width, height = hires_size(width, height, r.hires_scale)
    need = per_pixel * width * height * r.num_images
    free = free_memory(caps.device)
    if free is not None and need > free:
        raise RequestError("num_images" if r.num_images > 1 else "init_image" if r.width is None else "width",
                           f"{r.num_images} image(s) of {width}x{height} (width x height) need at least "
                           f"{_gib(need)} of memory to sample; {caps.device} has {_gib(free)} free. Ask for fewer "
                           "or smaller images")


def _image_size(image: Any) -> tuple[int, int] | None:
    """(width, height) of an image input without decoding it; None for tensors and unreadable files (those are
    reported where they are read)."""
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as img:
                return img.size
        except (OSError, ValueError, Image.DecompressionBombError):
            return None
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def free_memory(device: str | torch.device) -> int | None:
    """Bytes free on ``device`` now (CPU: MemAvailable of /proc/meminfo, capped by a cgroup limit), None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":  # free, plus what PyTorch's allocator holds unused
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0] + cached)
    if device.type != "cpu":
        return None
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:  # a container's limit (cgroup v2); its usage counts page cache, of which the inactive part is reclaimable
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
            free = min(free if free is not None else 2**63, int(limit) - used + int(stat.get("inactive_file", 0)))
    except (OSError, ValueError):
        pass
    return free


def bytes_per_pixel(unet: torch.nn.Module, autoencoder: torch.nn.Module | None) -> dict[str, float]:
    """Lower bounds of the working memory one output pixel of one image needs, as Capabilities fields: sampling
    holds three activations of the UNet's first level per latent pixel, for the conditional and the unconditional
    pass; decoding three of the decoder's last level, at full resolution."""
    f = 1 if autoencoder is None else int(autoencoder.downsampling_factor)
    sample = 2 * 3 * unet.config.model_channels * next(unet.parameters()).element_size() / f**2
    decode = 0.0
    if autoencoder is not None:
        cfg = autoencoder.config
        decode = 3 * cfg.channels * cfg.channel_mult[0] * next(autoencoder.parameters()).element_size()
    return {"sample_bytes_per_pixel": sample, "decode_bytes_per_pixel": decode}


def _alternatives(caps: Capabilities) -> str:
    said = [w for w, ok in (("a prompt", caps.prompt), ("a class label", caps.num_classes)) if ok]
    said += [f"--{f.name.replace('_', '-')}" for f in caps.inputs]
    return f"; it takes {', '.join(said)}" if said else "; it is unconditional"


@dataclass(frozen=True)
class Progress:
    """After sampler step ``step`` (1-based) of ``total``; ``denoised`` is the current estimate of the clean
    sample (latents or pixels), for :meth:`Generator.preview`."""

    step: int
    total: int
    denoised: torch.Tensor


@dataclass
class GenerationResult:
    """The images (PIL, at the model's channels), their parameters (one each, ``batch_index`` set, for the PNG
    "parameters" chunk), and whether sampling was cut short by ``should_stop``."""

    images: list[Image.Image]
    params: list[GenerationParams]
    interrupted: bool = False


def request_from_params(params: GenerationParams) -> GenerationRequest:
    """The request that regenerates an image from its stored parameters (PNG "parameters", ``--from-png``)."""
    return GenerationRequest(
        prompt=params.prompt or None, negative_prompt=params.negative_prompt, class_label=params.class_label,
        seed=params.seed, sampler=params.sampler, karras=params.karras, steps=params.steps,
        guidance_scale=params.guidance_scale, guidance_rescale=params.guidance_rescale, width=params.width,
        height=params.height, num_images=params.num_images, strength=params.strength, paste_back=params.paste_back,
        clip_skip=params.clip_skip, chunked=params.chunked, prompt_weighting=params.prompt_weighting,
        hires_scale=params.hires_scale, hires_upscaler=params.hires_upscaler, hires_steps=params.hires_steps,
        tiling=params.tiling, subseed=params.subseed, subseed_strength=params.subseed_strength,
        seed_resize_from=params.seed_resize_from, **{key: getattr(params, key) for key in CUTTER_FIELDS})


OnProgress = Callable[[Progress], None]
ShouldStop = Callable[[], bool]


class Generator(Protocol):
    """A loaded model behind the one generation interface."""

    capabilities: Capabilities
    compiled: str | None  # None, or how --compile compiled it: "frozen weights" / "live weights"

    def generate(self, request: GenerationRequest, *, on_progress: OnProgress | None = None,
                 should_stop: ShouldStop | None = None, progress: bool = False) -> GenerationResult: ...

    def preview(self, denoised: torch.Tensor) -> Image.Image: ...


class Stopped(Exception):
    """Raised inside a sampler's step hook when ``should_stop`` says so; carries the current estimate."""

    def __init__(self, denoised: torch.Tensor):
        super().__init__("stopped")
        self.denoised = denoised


def progress_hook(total: int, on_progress: OnProgress | None, should_stop: ShouldStop | None):
    """A sampler ``on_step`` hook reporting progress and stopping on request (returns None: x unchanged)."""
    def hook(i: int, sigma: float, sigma_next: float, x: torch.Tensor, denoised: torch.Tensor) -> None:
        if on_progress is not None:
            on_progress(Progress(i + 1, total, denoised))
        if should_stop is not None and should_stop():
            raise Stopped(denoised)
    return hook


def params_for(request: GenerationRequest, model: str, count: int, width: int, height: int,
               vae: str | None = None, model_hash: str | None = None, vae_hash: str | None = None,
               lora_hashes: str | None = None) -> list[GenerationParams]:
    """One GenerationParams per image of a resolved request; ``vae``: the name of the VAE that decoded them when
    it is not the model's own; the hashes: A1111's short hashes of the files."""
    base = GenerationParams(
        prompt=request.prompt or "", negative_prompt=request.negative_prompt,
        sampler=request.sampler, karras=bool(request.karras), steps=request.steps,
        guidance_scale=float(request.guidance_scale), guidance_rescale=float(request.guidance_rescale),
        seed=request.seed, height=height, width=width, num_images=count, clip_skip=request.clip_skip,
        chunked=request.chunked, prompt_weighting=request.prompt_weighting, strength=request.strength,
        paste_back=request.paste_back, model=model, hires_scale=request.hires_scale,
        hires_upscaler=request.hires_upscaler, hires_steps=request.hires_steps, tiling=request.tiling, vae=vae,
        model_hash=model_hash, vae_hash=vae_hash, lora_hashes=lora_hashes,
        subseed=request.subseed if request.subseed_strength else None, subseed_strength=request.subseed_strength,
        seed_resize_from=None if request.seed_resize_from is None else tuple(request.seed_resize_from),
        class_label=None if request.class_label is None else str(request.class_label),
        **{key: getattr(request.cutters(), key) for key in CUTTER_FIELDS})
    return [replace(base, batch_index=i) for i in range(count)]


# ------------------------------------------------------------------------------------------------- loading

def process_share(count: int) -> range:
    """The items of ``count`` this process makes under ``torchrun`` (its RANK of WORLD_SIZE: items rank, rank +
    world, ...), so that N processes make every item once; all of them without torchrun."""
    import os

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return range(rank, count, world)


__all__ = ["Capabilities", "GenerationRequest", "GenerationResult", "Generator", "InputField", "Progress",
           "Recommended", "RequestError"]
