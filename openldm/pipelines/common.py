"""What the Stable Diffusion pipelines share: the model parts they take, prompt encoding, the seed convention,
the sampling loop, latents <-> images, and generation parameters stored in PNGs (AUTOMATIC1111's "parameters").

Reproducibility convention (a seed means the same image as diffusers): one CPU generator seeded with ``seed``
drives every random draw of a run, in diffusers' order (autoencoder posterior samples, then the starting noise
for the whole batch as one tensor, then any noise the sampler draws). Draws are float32 on the CPU, then moved
to the device and dtype, so a seed gives the same image on every machine.
"""
from __future__ import annotations

import io
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Protocol, Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from openldm.conditioning.inputs import as_images
from openldm.data.image_io import load_image
from openldm.diffusion.denoiser import DiscreteDenoiser
from openldm.diffusion.schedules import ScheduleConfig
from openldm.diffusion.spacing import SamplingPlan, make_plan
from openldm.models.autoencoder import LatentCodec
from openldm.models.text_encoder import encode_prompts
from openldm.nn.slots import Slots
from openldm.nn.tome import TokenMergingNet, check_merging
from openldm.registry import SAMPLERS
from openldm.runtime import keep_freed_memory
from openldm.samplers.base import OnStep
from openldm.samplers.guidance import check_interval, with_guidance

# Stable Diffusion's sampling defaults (diffusers' and A1111's): SD weights' recommended settings and the defaults of
# the SD pipeline functions. Models trained here have theirs in io/run_dir.py (TRAINED_SAMPLING).
SD_SAMPLER, SD_STEPS, SD_GUIDANCE_SCALE, SD_SIZE = "euler", 30, 7.5, 512
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelParts(Protocol):
    """What a pipeline needs from a loaded checkpoint (``openldm.io``'s StableDiffusionComponents has these)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    schedule: ScheduleConfig | torch.Tensor  # training schedule, or its alphas_cumprod
    prediction: str  # eps | v
    spacing: str  # leading | trailing | linspace
    steps_offset: int


# ----------------------------------------------------------------------------------------- devices and checks

def auto_dtype(device: str | torch.device = "cpu") -> tuple[torch.dtype, str]:
    """bfloat16 where the hardware computes it natively (a CUDA GPU that supports it, a CPU with AMX or
    AVX512-BF16), else float32; and the reason, to tell the user which was chosen."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"{name} computes bfloat16"
        return torch.float32, f"{name} has no bfloat16"
    if device.type == "cpu":
        for probe, what in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16")):
            if getattr(torch.cpu, probe, lambda: False)():
                return torch.bfloat16, f"the CPU has {what} instructions"
    return torch.float32, f"no bfloat16 instructions on {device}"


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype | None:
    """A dtype from its name; "auto" is :func:`auto_dtype` for ``device``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto_dtype(device)[0]
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join([*DTYPES, 'auto'])}")
    return DTYPES[dtype]


def place(parts: ModelParts, device: str | torch.device | None, dtype: str | torch.dtype | None) -> None:
    """Move the parts' modules (in place) to ``device`` and ``dtype``; None keeps what they have. With float16 the
    autoencoder stays float32, as diffusers' ``force_upcast`` does for SD's VAE (it overflows in float16)."""
    dtype = resolve_dtype(dtype, device or "cpu")
    if torch.device(device or module_device_dtype(parts.unet)[0]).type == "cpu":
        keep_freed_memory()
    for name in ("unet", "text_encoder", "vae"):
        module = getattr(parts, name)
        module_dtype = torch.float32 if (name == "vae" and dtype == torch.float16) else dtype
        module.to(device=device, dtype=module_dtype)
        if name != "text_encoder":
            # channels_last convolution weights: oneDNN then keeps activations in that layout instead of reordering
            # them around every convolution (SD v1 UNet at 256 px, batch 2, 2 threads of an AVX512-BF16 EPYC, quiet:
            # 0.81 -> 0.75 s in bf16, 2.21 -> 2.23 s in float32; outputs identical)
            module.to(memory_format=torch.channels_last)


def compile_modules(*modules: torch.nn.Module | None, freeze: bool = False) -> str:
    """``torch.compile`` (inductor) ``modules`` in place (``nn.Module.compile``; names, state dicts and parameters
    stay as they are). A graph compiles on a module's first call with each input shape and stays with the module: a
    generator, and a server that keeps it, compile once. None entries are skipped.

    ``freeze``: inductor's weight freezing, the weights become constants of the graphs (folded, and prepacked for
    oneDNN on a CPU). Bare SD v1.5 UNet call, bf16, channels_last, batch 2, 256 px, 2 threads of an AMX Xeon,
    quiet, median of 4: eager 0.64 s, compiled 0.68 s, compiled with frozen weights 0.43 s (75 s to compile).
    Frozen graphs never see later changes to the weights, so a module that is to take LoRAs fused into its weights
    must be recompiled live first (:func:`thaw_modules`). A module's ``compiled_methods`` (names of other methods
    it is called through) are compiled the same way. Returns what was done: "frozen weights" or "live weights".
    """
    for module in modules:
        if module is not None:
            module.compile(backend="inductor")
            if freeze:
                module._compiled_call_impl = _frozen(module._compiled_call_impl)
            for name in getattr(module, "compiled_methods", ()):  # other entry points (the UNet's DeepCache passes)
                method = torch.compile(getattr(type(module), name).__get__(module), backend="inductor")
                setattr(module, name, _frozen(method) if freeze else method)  # an instance attribute over the method
    return "frozen weights" if freeze else "live weights"


def compile_networks(unet: torch.nn.Module, decoder: torch.nn.Module | None, *, freeze: bool) -> str:
    """What ``--compile`` compiles (:func:`compile_modules`): the UNet, and the autoencoder's decoder off a CPU only.
    On a CPU inductor's decoder is slower than the eager one, its generated GroupNorm + SiLU loops losing to ATen's
    kernels (SD v1 decoder in bfloat16, channels_last, frozen weights, 2 threads of an AMX Xeon, best of 3: 256 px
    0.35 s eager against 0.40 s compiled, 512 px 1.44 s against 1.69 s)."""
    on_cpu = decoder is None or module_device_dtype(decoder)[0].type == "cpu"
    return compile_modules(unet, None if on_cpu else decoder, freeze=freeze)


def _frozen(compiled):
    """``compiled`` called with inductor's freezing switched on. Dynamo reads the setting while it traces, at a
    call, so it is set around every call; ``torch.compile(options={"freezing": True})`` sets it for inductor's
    compile only, too late (measured: such graphs still read changed weights)."""
    import torch._inductor.config as inductor_config

    def call(*args, **kwargs):
        with inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return call


def thaw_modules(*modules: torch.nn.Module | None) -> str:
    """Drop every graph compiled so far in this process (``torch._dynamo.reset``: they recompile on their next
    call, each with its own options) and compile ``modules`` again with live weights, which then read whatever the
    weights hold at each call. Returns "live weights"."""
    torch._dynamo.reset()
    return compile_modules(*modules)


def compile_seconds() -> float:
    """Seconds this process has spent so far in torch.compile (dynamo and inductor), to report compile time
    apart from generation time."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", ())))


def module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def check_size(height: int, width: int, factor: int = 8) -> None:
    """Image sizes must be positive multiples of the autoencoder's downsampling factor."""
    if height <= 0 or width <= 0 or height % factor or width % factor:
        raise ValueError(f"image size {width}x{height} (width x height) must be positive multiples of {factor}; "
                         f"try {max(factor, width // factor * factor)}x{max(factor, height // factor * factor)}")


def make_generator(seed: int) -> torch.Generator:
    """The run's one source of randomness: a CPU generator, whatever the device (the seed convention)."""
    return torch.Generator("cpu").manual_seed(int(seed))


def draw_noise(shape: Sequence[int], generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Unit Gaussian noise drawn float32 on the CPU from ``generator``, then moved to ``device`` and ``dtype``."""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device, dtype)


# ----------------------------------------------------------------------------------------------------- prompts

def encode_text(parts: ModelParts, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", *,
                num_images: int = 1, clip_skip: int = 1, chunked: bool = False, prompt_weighting: str = "none",
                embeddings: Mapping[str, torch.Tensor] | None = None) -> tuple[Slots, Slots]:
    """(cond, uncond) context slots for prompts, each repeated ``num_images`` times (prompt-major, as diffusers'
    ``num_images_per_prompt``). One negative prompt applies to every prompt.

    ``chunked=False`` follows diffusers: 77 tokens (longer prompts truncated with a warning), clip skip on the
    prompts only. ``chunked=True`` follows AUTOMATIC1111: 75-token chunks, prompts and negatives padded to one
    chunk count, clip skip on both. ``prompt_weighting="a1111"``: A1111's attention syntax and ``BREAK`` in prompts
    and negatives, encoded in chunks as ``chunked=True``. ``embeddings``: textual-inversion vectors by name, used
    where the names occur in prompts and negatives (see ``encode_prompts``)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one or one per prompt")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    tok, enc = parts.tokenizer, parts.text_encoder
    text = dict(weighting=prompt_weighting, embeddings=embeddings)
    with torch.no_grad():
        if chunked or prompt_weighting != "none":
            states = encode_prompts(tok, enc, prompts + negatives, chunked=True, clip_skip=clip_skip, **text)
            cond, uncond = states[: len(prompts)], states[len(prompts):]
        else:
            cond = encode_prompts(tok, enc, prompts, clip_skip=clip_skip, **text)
            uncond = encode_prompts(tok, enc, negatives, **text)
    return Slots(context=cond).repeat(num_images), Slots(context=uncond).repeat(num_images)


# ---------------------------------------------------------------------------------------------------- sampling

def sampling_plan(parts: ModelParts, sampler: str, steps: int, karras: bool = False) -> SamplingPlan:
    """The noise levels of ``steps`` steps of ``sampler``, following the checkpoint's scheduler config."""
    return make_plan(sampler, parts.schedule, steps, spacing=parts.spacing, steps_offset=parts.steps_offset,
                     karras=karras)


class _AtNetworkDtype(torch.nn.Module):
    """Feed a network inputs in its own dtype: samplers integrate in float32 (the denoiser returns float32 for
    float32 x), while the network may run in bfloat16/float16."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, **slots: torch.Tensor) -> torch.Tensor:
        _, dtype = module_device_dtype(self.net)
        return self.net(x.to(dtype), t, **slots)


@dataclass(frozen=True)
class StepCutters:
    """Training-free ways to spend fewer network evaluations on an image (issue 16), all off by default.

    ``guidance_interval``: (sigma_lo, sigma_hi); classifier-free guidance only at noise levels inside it, one
    conditional network call of batch B elsewhere (Kynkaanniemi et al. 2024).
    ``deepcache_interval``: a full UNet pass every N calls, the shallow branch on the kept deep features in between
    (DeepCache, Ma et al. 2023; 1 = off).
    ``token_merging_ratio``: the share of tokens merged before self-attention in the spatial transformers at most
    ``token_merging_max_downsample`` times below the latent size (ToMe for SD, Bolya & Hoffman 2023; 0 = off)."""

    guidance_interval: tuple[float, float] | None = None
    deepcache_interval: int = 1
    token_merging_ratio: float = 0.0
    token_merging_max_downsample: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "guidance_interval", check_interval(self.guidance_interval))
        n = self.deepcache_interval
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"deepcache interval {n!r} must be an integer >= 1 (1 = off)")
        check_merging(self.token_merging_ratio, self.token_merging_max_downsample)

    def wrap(self, net: torch.nn.Module) -> torch.nn.Module:
        """``net`` with the network-side cutters (DeepCache, token merging): a new wrapper, ``net`` unchanged."""
        if self.deepcache_interval > 1:
            from openldm.models.deepcache import DeepCacheUNet

            net = DeepCacheUNet(net, self.deepcache_interval)
        if self.token_merging_ratio > 0:
            net = TokenMergingNet(net, self.token_merging_ratio, self.token_merging_max_downsample)
        return net


CUTTER_FIELDS = tuple(f.name for f in fields(StepCutters))  # the same names in requests and PNG parameters


def guided_denoiser(parts: ModelParts, plan: SamplingPlan, uncond: Slots, guidance_scale: float,
                    guidance_rescale: float = 0.0, cutters: StepCutters | None = None) -> torch.nn.Module:
    """The UNet as ``D(x, sigma, cond)``, with classifier-free guidance (``with_guidance``'s rule) and the
    ``cutters`` asked for (a fresh wrapper per call: the shared UNet is never changed)."""
    cutters = cutters or StepCutters()
    schedule = parts.schedule
    alphas_cumprod = schedule if isinstance(schedule, torch.Tensor) else None
    if alphas_cumprod is None:
        from openldm.diffusion.schedules import make_alphas_cumprod
        alphas_cumprod = make_alphas_cumprod(schedule)
    device, _ = module_device_dtype(parts.unet)
    net = _AtNetworkDtype(cutters.wrap(parts.unet))
    denoiser = DiscreteDenoiser(net, alphas_cumprod, prediction=parts.prediction,
                                quantize=not plan.timesteps.is_floating_point()).to(device)
    return with_guidance(denoiser, uncond, guidance_scale, guidance_rescale, parts.prediction,
                         interval=cutters.guidance_interval)


def chain_hooks(*hooks: OnStep | None) -> OnStep | None:
    """One ``on_step`` hook running ``hooks`` in order (None entries skipped), each seeing the ``x`` the previous
    one returned (inpainting's blend, then progress reporting)."""
    hooks = tuple(h for h in hooks if h is not None)
    if len(hooks) <= 1:
        return hooks[0] if hooks else None

    def hook(i: int, sigma: float, sigma_next: float, x: torch.Tensor, denoised: torch.Tensor):
        for h in hooks:
            out = h(i, sigma, sigma_next, x, denoised)
            x = x if out is None else out
        return x
    return hook


def run_sampler(sampler: str, denoiser, x: torch.Tensor, plan: SamplingPlan, cond: Slots,
                generator: torch.Generator, on_step: OnStep | None = None, progress: bool = True) -> torch.Tensor:
    """Run the registered ``sampler`` over the plan from ``x`` and return the final latents."""
    with torch.no_grad():
        return SAMPLERS.get(sampler)(denoiser, x, plan.sigmas, cond=cond, generator=generator, on_step=on_step,
                                     progress=progress, **plan.options)


# --------------------------------------------------------------------------------------- latents <-> images

def _codec(vae: torch.nn.Module) -> LatentCodec:
    return LatentCodec(vae, vae.config.scaling_factor)


def encode_images(vae: torch.nn.Module, images: torch.Tensor, generator: torch.Generator, *,
                  tiling: bool = False, tile_size: int = 512) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> diffusion latents ``scaling_factor * (z - shift_factor)`` with z sampled
    from the posterior using noise drawn from ``generator`` (float32, CPU), as diffusers' ``latent_dist.sample``."""
    return _codec(vae).encode(images, generator, tile_size=tile_size if tiling else None)


def decode_latents(vae: torch.nn.Module, latents: torch.Tensor, *, tiling: bool = False,
                   tile_size: int = 512) -> torch.Tensor:
    """Diffusion latents -> images (B, 3, H, W) in [0, 1], float32 on the CPU."""
    return (_codec(vae).decode(latents, tile_size=tile_size if tiling else None) / 2 + 0.5).clamp(0, 1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> RGB images, ``round(255 x)`` as diffusers' image processor does."""
    array = (images.permute(0, 2, 3, 1).float().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def image_to_tensor(image: Image.Image | str | Path | torch.Tensor, height: int | None = None,
                    width: int | None = None, channels: int = 3, factor: int = 8) -> torch.Tensor:
    """An image (a path, a PIL image, or a tensor in [-1, 1]) -> (1, C, H, W) in [-1, 1] at ``height`` x ``width``
    (default: its own size; resized as :func:`~openldm.conditioning.inputs.as_images` does, Lanczos as diffusers),
    which must be multiples of ``factor``: the image reader of both inference stacks."""
    if isinstance(image, (str, Path)):
        image = load_image(image, channels)
    own_height, own_width = tuple(image.shape[-2:]) if isinstance(image, torch.Tensor) else image.size[::-1]
    height, width = height or own_height, width or own_width
    check_size(height, width, factor)
    return as_images(image, channels, (height, width), "image")


def paste_unmasked(generated: torch.Tensor, original: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep the original pixels where the (binarised) mask says "known" (< 0.5), the generated ones elsewhere."""
    keep = (mask < 0.5).to(generated.dtype)
    return keep * original + (1 - keep) * generated


class RequestError(ValueError):
    """A request field the model cannot take; ``field`` names it (the server answers 4xx with both)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# ------------------------------------------------------------------------------------- generation parameters

@dataclass
class GenerationParams:
    """Everything that determines an image besides the model and input images; serialises to (and parses from)
    AUTOMATIC1111's "parameters" text, which PNGs carry in a tEXt chunk."""

    prompt: str = ""
    negative_prompt: str = ""
    sampler: str = SD_SAMPLER
    karras: bool = False
    steps: int = SD_STEPS
    guidance_scale: float = SD_GUIDANCE_SCALE
    guidance_rescale: float = 0.0
    seed: int = 0
    height: int = SD_SIZE
    width: int = SD_SIZE
    num_images: int = 1
    clip_skip: int = 1
    chunked: bool = False
    prompt_weighting: str = "none"  # none | a1111
    strength: float | None = None  # image-to-image / inpainting
    paste_back: bool = False  # inpainting
    batch_index: int = 0  # which image of the seed's batch this is
    model: str | None = None
    class_label: str | None = None  # class-conditional models trained here (an index or a class name)
    guidance_interval: tuple[float, float] | None = None  # StepCutters' fields
    deepcache_interval: int = 1
    token_merging_ratio: float = 0.0
    token_merging_max_downsample: int = 1
    hires_scale: float | None = None  # hires fix (text-to-image): the second pass's size over the first's
    hires_upscaler: str | None = None
    hires_steps: int | None = None  # None: the first pass's steps
    tiling: bool = False  # seamless tiling
    vae: str | None = None  # the VAE's name when it is not the model's own
    model_hash: str | None = None  # A1111's short hashes: the first 10 hex digits of the file's SHA-256
    vae_hash: str | None = None
    lora_hashes: str | None = None  # A1111's "NAME: HASH, ..." of the LoRAs applied
    subseed: int | None = None  # A1111's variation seed, with its strength; and the seed resize's (width, height)
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None

    def cutters(self) -> StepCutters:
        """The step cutters these parameters ask for."""
        return StepCutters(**{key: getattr(self, key) for key in CUTTER_FIELDS})

    def to_text(self) -> str:
        """AUTOMATIC1111's format: prompt, "Negative prompt: ..." line, then "Key: value, ..." pairs."""
        items = [("Steps", self.steps), ("Sampler", _a1111_sampler(self.sampler)),
                 ("Schedule type", "Karras" if self.karras else "Automatic"), ("CFG scale", _num(self.guidance_scale)),
                 ("Seed", self.seed), ("Size", f"{self.width}x{self.height}")]
        if self.subseed_strength:
            items += [("Variation seed", self.subseed), ("Variation seed strength", _num(self.subseed_strength))]
        if self.seed_resize_from is not None:
            items.append(("Seed resize from", "{}x{}".format(*self.seed_resize_from)))
        if self.model_hash:
            items.append(("Model hash", self.model_hash))  # A1111's keys and order
        if self.model:
            items.append(("Model", self.model))
        if self.vae_hash:
            items.append(("VAE hash", self.vae_hash))
        if self.vae:
            items.append(("VAE", self.vae))
        if self.class_label is not None:
            items.append(("Class label", self.class_label))
        if self.strength is not None:
            items.append(("Denoising strength", _num(self.strength)))
        if self.lora_hashes:
            items.append(("Lora hashes", self.lora_hashes))
        if self.hires_scale is not None:
            items += [("Hires upscale", _num(self.hires_scale)), ("Hires upscaler", self.hires_upscaler)]
            if self.hires_steps is not None:
                items.append(("Hires steps", self.hires_steps))
        if self.tiling:
            items.append(("Tiling", "True"))  # A1111's key
        if self.clip_skip != 1:
            items.append(("Clip skip", self.clip_skip))
        if self.guidance_rescale:
            items.append(("CFG rescale phi", _num(self.guidance_rescale)))
        if self.num_images > 1:
            items += [("Batch size", self.num_images), ("Batch pos", self.batch_index)]
        if self.chunked:
            items.append(("Chunked prompt", "True"))
        if self.prompt_weighting != "none":
            items.append(("Prompt weighting", self.prompt_weighting))
        if self.paste_back:
            items.append(("Paste back", "True"))
        if self.guidance_interval is not None:
            items.append(("Guidance interval", ", ".join(_num(v) for v in self.guidance_interval)))
        if self.deepcache_interval != 1:
            items.append(("DeepCache interval", self.deepcache_interval))
        if self.token_merging_ratio:
            items.append(("Token merging ratio", _num(self.token_merging_ratio)))  # AUTOMATIC1111's name
            if self.token_merging_max_downsample != 1:
                items.append(("Token merging max downsample", self.token_merging_max_downsample))
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in items))
        return "\n".join(lines)

    @classmethod
    def from_text(cls, text: str) -> "GenerationParams":
        """Parse :meth:`to_text`'s format (and AUTOMATIC1111's, e.g. "Sampler: DPM++ 2M Karras")."""
        settings = parameters_items(text)
        p = cls(prompt=settings.pop("Prompt"), negative_prompt=settings.pop("Negative prompt"))
        from openldm.samplers import from_a1111_name

        try:
            p.sampler, p.karras = from_a1111_name(settings.get("Sampler", _a1111_sampler(p.sampler)))
        except KeyError as e:
            raise ValueError(f"in the parameters: {e.args[0]}") from None
        p.karras = p.karras or settings.get("Schedule type") == "Karras"
        if "Size" in settings:
            p.width, p.height = (int(v) for v in settings["Size"].split("x"))
        conversions = {"Steps": ("steps", int), "CFG scale": ("guidance_scale", float), "Seed": ("seed", int),
                       "Denoising strength": ("strength", float), "Clip skip": ("clip_skip", int),
                       "CFG rescale phi": ("guidance_rescale", float), "Batch size": ("num_images", int),
                       "Batch pos": ("batch_index", int), "Model": ("model", str), "VAE": ("vae", str),
                       "Model hash": ("model_hash", str), "VAE hash": ("vae_hash", str),
                       "Lora hashes": ("lora_hashes", str),
                       "Class label": ("class_label", str),
                       "Chunked prompt": ("chunked", lambda v: v == "True"),
                       "Prompt weighting": ("prompt_weighting", str),
                       "Paste back": ("paste_back", lambda v: v == "True"),
                       "Guidance interval": ("guidance_interval", lambda v: tuple(float(x) for x in v.split(","))),
                       "DeepCache interval": ("deepcache_interval", int),
                       "Token merging ratio": ("token_merging_ratio", float),
                       "Variation seed": ("subseed", int), "Variation seed strength": ("subseed_strength", float),
                       "Seed resize from": ("seed_resize_from", lambda v: tuple(int(x) for x in v.split("x"))),
                       "Token merging max downsample": ("token_merging_max_downsample", int),
                       "Hires upscale": ("hires_scale", float), "Hires upscaler": ("hires_upscaler", str),
                       "Hires steps": ("hires_steps", int), "Tiling": ("tiling", lambda v: v == "True")}
        for key, (name, convert) in conversions.items():
            if key in settings:
                setattr(p, name, convert(settings[key]))
        if "Hires resize" in settings and p.hires_scale is None:  # A1111's hires fix to a size rather than a scale
            width, height = (int(v) for v in settings["Hires resize"].split("x"))
            if width * p.height != height * p.width:
                raise ValueError(f"in the parameters: Hires resize {width}x{height} has another aspect ratio than "
                                 f"Size {p.width}x{p.height} (A1111 crops it), which openldm does not do")
            p.hires_scale = width / p.width
        return p


def _a1111_sampler(name: str) -> str:
    from openldm.samplers import a1111_name

    return a1111_name(name)


def _num(x: float) -> str:
    return f"{x:g}"


def _quote(value: str) -> str:
    return f'"{value}"' if ("," in value or ":" in value or '"' in value) else value


_SETTING = re.compile(r'\s*([\w ().\-/]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _parse_settings(line: str) -> dict[str, str]:
    out = {}
    for key, value in _SETTING.findall(line):
        out[key.strip()] = value[1:-1] if value.startswith('"') else value.strip()
    return out


def save_png(image: Image.Image, path: str | Path | BinaryIO, params: GenerationParams) -> None:
    """Write ``image`` as PNG (to a path or a binary file) with ``params.to_text()`` in a "parameters" tEXt chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", params.to_text())
    image.save(path, format="PNG", pnginfo=info)


def png_bytes(image: Image.Image, params: GenerationParams) -> bytes:
    """:func:`save_png`'s file as bytes (what the server sends)."""
    buffer = io.BytesIO()
    save_png(image, buffer, params)
    return buffer.getvalue()


def parameters_items(text: str) -> dict[str, str]:
    """A "parameters" text as AUTOMATIC1111's png-info lists it: "Prompt", "Negative prompt", then every
    "Key: value" setting ("Size" also as "Size-1" / "Size-2")."""
    lines = text.strip().split("\n")
    settings = _parse_settings(lines[-1]) if lines and "Steps:" in lines[-1] else {}
    body = lines[:-1] if settings else lines
    split = next((i for i, line in enumerate(body) if line.startswith("Negative prompt:")), len(body))
    negative = "\n".join(body[split:])[len("Negative prompt:"):].strip() if split < len(body) else ""
    items = {"Prompt": "\n".join(body[:split]), "Negative prompt": negative, **settings}
    if "x" in settings.get("Size", ""):
        items["Size-1"], items["Size-2"] = settings["Size"].split("x", 1)
    return items


def read_png_params(path: str | Path) -> GenerationParams:
    """The GenerationParams stored in a PNG by :func:`save_png` (or AUTOMATIC1111)."""
    with Image.open(path) as img:
        text = img.info.get("parameters")
    if text is None:
        raise ValueError(f"{str(path)!r} has no 'parameters' text chunk; it was not written by openldm or A1111")
    return GenerationParams.from_text(text)


def output_paths(out: str | Path, count: int) -> list[Path]:
    """``out`` itself for one image; otherwise ``-0``, ``-1``, ... inserted before the extension."""
    out = Path(out)
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def save_images(images: Sequence[Image.Image], out: str | Path, params: GenerationParams) -> list[Path]:
    """Save a run's images with their parameters (``batch_index`` set per image); returns the paths."""
    paths = output_paths(out, len(images))
    for i, (image, path) in enumerate(zip(images, paths)):
        save_png(image, path, GenerationParams(**{**asdict(params), "batch_index": i}))
    return paths


# ------------------------------------------------------------------------------------------ the shared core

def latent_shape(parts: ModelParts, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    f = parts.vae.downsampling_factor
    check_size(height, width, f)
    return batch, parts.vae.config.z_channels, height // f, width // f


def denoise_and_decode(parts: ModelParts, x: torch.Tensor, plan: SamplingPlan, cond: Slots, uncond: Slots, *,
                       sampler: str, guidance_scale: float, guidance_rescale: float, generator: torch.Generator,
                       on_step: OnStep | None = None, vae_tiling: bool = False, progress: bool = True,
                       cutters: StepCutters | None = None) -> torch.Tensor:
    """Sample from ``x`` (at ``plan.sigmas[0]``) with guidance, then decode: images (B, 3, H, W) in [0, 1]."""
    latents = denoise(parts, x, plan, cond, uncond, sampler=sampler, guidance_scale=guidance_scale,
                      guidance_rescale=guidance_rescale, generator=generator, on_step=on_step, progress=progress,
                      cutters=cutters)
    return decode_latents(parts.vae, latents, tiling=vae_tiling)


def denoise(parts: ModelParts, x: torch.Tensor, plan: SamplingPlan, cond: Slots, uncond: Slots, *, sampler: str,
            guidance_scale: float, guidance_rescale: float, generator: torch.Generator,
            on_step: OnStep | None = None, progress: bool = True, cutters: StepCutters | None = None) -> torch.Tensor:
    """Sample from ``x`` (at ``plan.sigmas[0]``) with guidance: the clean latents. The sampler's state is float32
    whatever the network's dtype."""
    device, _ = module_device_dtype(parts.unet)
    denoiser = guided_denoiser(parts, plan, uncond.to(device=device), guidance_scale, guidance_rescale, cutters)
    return run_sampler(sampler, denoiser, x.to(device, torch.float32), plan, cond.to(device=device), generator,
                       on_step=on_step, progress=progress)
