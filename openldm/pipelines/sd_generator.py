"""Stable Diffusion weights behind the generation interface (``openldm.pipelines.generate``)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from PIL import Image

from openldm.io.files import LORA_SHORT_HASH, SHORT_HASH, file_sha256, short_hash
from openldm.pipelines.common import (
    compile_networks,
    decode_latents,
    module_device_dtype,
    place,
    sampling_plan,
    thaw_modules,
    to_pil,
)
from openldm.pipelines.generate import (
    Capabilities,
    GenerationRequest,
    GenerationResult,
    OnProgress,
    Recommended,
    RequestError,
    ShouldStop,
    Stopped,
    bytes_per_pixel,
    params_for,
    progress_hook,
)
from openldm.pipelines.hires import HiresFix
from openldm.pipelines.image_to_image import image_to_image
from openldm.pipelines.inpaint import inpaint
from openldm.pipelines.loras import LoraSwitch, request_loras
from openldm.pipelines.text_to_image import text_to_image
from openldm.pipelines.vaes import ChosenVae, VaeSwitch, fitted
from openldm.tokenizers.prompt_syntax import PROMPT_WEIGHTINGS

# Latents -> RGB by one linear map: A1111's "Approx cheap" live preview of SD v1 latents (4 channels).
_SD_LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                               [-0.184, -0.271, -0.473]])


class SDGenerator:
    """A loaded SD v1-family checkpoint (text-to-image, image-to-image, inpainting), with LoRAs per request
    (``request.loras`` and ``<lora:NAME:WEIGHT>`` prompt tags, NAME resolved in ``lora_dir``) and VAEs per request
    (``request.vae``, a name in ``vae_dir``). ``vae_name`` / ``vae_hash``: what PNGs say of ``parts.vae`` when it
    is not the checkpoint's own (one given at load). ``preview_vae``: what live previews decode with (A1111's "TAESD" live
    preview); None: A1111's "Approx cheap" linear map."""

    compiled: str | None = None  # None, or what ``compile_networks`` did: "frozen weights" / "live weights"
    preview_vae: torch.nn.Module | None = None

    def __init__(self, parts, source: str, lora_dir: str | Path | None = None,
                 embeddings: dict[str, torch.Tensor] | None = None, vae_dir: str | Path | None = None,
                 vae_name: str | None = None, vae_hash: str | None = None, unsafe_load: bool = False):
        self.parts = parts
        self.lora_dir = lora_dir
        self.loras = LoraSwitch(parts)
        self.vaes = VaeSwitch(ChosenVae(parts.vae, vae_name, vae_hash), vae_dir, unsafe_load)
        self.model_sha256: str | None = None  # the checkpoint file's SHA-256 (A1111's hashes); None: a folder
        self.embeddings = dict(embeddings or {})  # textual inversion: name -> vectors (N, D), read-only
        from openldm.registry import SAMPLERS

        self.capabilities = Capabilities(
            name=Path(source).stem if Path(source).is_file() else Path(source).name, kind="stable-diffusion",
            source=str(source), prompt=True, negative_prompt=True, class_names=None, num_classes=None, inputs=(),
            image_to_image=True, inpainting=True, channels=3, size_multiple=int(parts.vae.downsampling_factor),
            samplers=tuple(SAMPLERS.names()), recommended=Recommended(),
            max_steps=int(getattr(parts.schedule, "num_train_steps", 1000)), prompt_weightings=PROMPT_WEIGHTINGS,
            embeddings=tuple(sorted(self.embeddings)),
            max_clip_skip=int(parts.text_encoder.config.num_hidden_layers), chunked_prompts=True, vae_tiling=True,
            hires_fix=True, tiling=True, vae_choice=True,
            device=str(module_device_dtype(parts.unet)[0]), **bytes_per_pixel(parts.unet, parts.vae))

    @classmethod
    def load(cls, path: str | Path, source: str | None = None, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
             unsafe_load: bool = False, prediction: str | None = None, lora_dir: str | Path | None = None,
             embeddings_dir: str | Path | None = None, compile: bool = False, vae: str | Path | None = None,
             vae_dir: str | Path | None = None, preview_vae: str | Path | None = None) -> "SDGenerator":
        """``embeddings_dir``: textual-inversion files (see ``openldm.io.embeddings``) the prompts may name.
        ``vae``: a VAE file or folder (``openldm.io.vae``) in place of the checkpoint's own; ``vae_dir``: the VAEs
        requests may name (``openldm.pipelines.vaes``); ``preview_vae``: a VAE (a TAESD, say) for live previews.
        ``compile``: torch.compile the UNet and, off a CPU, the decoder (``compile_networks``), with frozen weights
        unless ``lora_dir`` is given; the first request with LoRAs recompiles a frozen UNet live (``thaw_modules``)."""
        from openldm.io.embeddings import load_embeddings
        from openldm.io.sd import load_sd

        parts = load_sd(path, device=device, unsafe_load=unsafe_load, prediction=prediction)
        width = parts.text_encoder.config.hidden_size
        embeddings = load_embeddings(embeddings_dir, width) if embeddings_dir is not None else {}
        place(parts, device, dtype)  # once, at load: requests never move or cast the modules
        if vae is not None:
            parts = dataclasses.replace(parts, vae=fitted(vae, parts.vae, unsafe_load=unsafe_load))
        for module in (parts.unet, parts.vae, parts.text_encoder):
            module.eval().requires_grad_(False)
        generator = cls(parts, str(path) if source is None else source, lora_dir, embeddings, vae_dir,
                        None if vae is None else Path(vae).name, None if vae is None else short_hash(vae),
                        unsafe_load)
        generator.model_sha256 = file_sha256(path) if Path(path).is_file() else None
        if preview_vae is not None:
            generator.preview_vae = fitted(preview_vae, parts.vae, unsafe_load=unsafe_load)
        if compile:
            generator.compiled = compile_networks(parts.unet, parts.vae.decoder, freeze=lora_dir is None)
        return generator

    def generate(self, request: GenerationRequest, *, on_progress: OnProgress | None = None,
                 should_stop: ShouldStop | None = None, progress: bool = False) -> GenerationResult:
        r = request.resolve(self.capabilities)
        try:
            (prompt, negative_prompt), loras = request_loras([r.prompt, r.negative_prompt], r.loras, self.lora_dir)
            for path, _ in loras:
                self.loras.read(path)  # a bad file is the request's error (read once, cached for use below)
        except (ValueError, FileNotFoundError) as e:
            raise RequestError("loras" if r.loras else "prompt", str(e)) from None
        try:
            vae = self.vaes.get(r.vae)
        except (ValueError, FileNotFoundError) as e:
            raise RequestError("vae", str(e)) from None
        parts = self.parts if vae.module is self.parts.vae else dataclasses.replace(self.parts, vae=vae.module)
        if r.tiling and self.compiled is not None:
            raise RequestError("tiling", "seamless tiling is not available on a compiled model (its graphs keep "
                               "the padding they were compiled with); load it without compile")
        if loras and self.compiled == "frozen weights":  # frozen graphs would not see the fused LoRA weights
            self.compiled = thaw_modules(self.parts.unet)
        with self.loras.use(loras, r.tiling, vae.module):
            result = self._generate(parts, vae, r, prompt, negative_prompt, on_progress, should_stop, progress)
        if loras:  # A1111's "Lora hashes": each file once, by the name its stem gives
            named = {Path(path).stem: file_sha256(path, tensors_only=Path(path).suffix.lower() == ".safetensors")
                     [:LORA_SHORT_HASH] for path, _ in loras}
            text = ", ".join(f"{name}: {digest}" for name, digest in named.items())
            result.params = [dataclasses.replace(p, lora_hashes=text) for p in result.params]
        return result

    def _generate(self, parts, vae: ChosenVae, r: GenerationRequest, prompt: str, negative_prompt: str,
                  on_progress: OnProgress | None, should_stop: ShouldStop | None, progress: bool) -> GenerationResult:
        """``r`` (resolved; its prompts, tags included, go to the PNG parameters) from the tag-free prompts, with
        ``parts`` (the model's, its VAE the request's ``vae``)."""
        strength = r.strength if r.strength is not None else (1.0 if r.mask is not None else 0.75)
        plan = sampling_plan(parts, r.sampler, r.steps, r.karras)
        total = plan.from_strength(strength).num_steps if r.init_image is not None and strength > 0 else plan.num_steps
        hires = None
        if r.hires_scale is not None:
            hires = HiresFix(r.hires_scale, r.hires_upscaler, r.hires_steps, strength)
            second = sampling_plan(parts, r.sampler, r.hires_steps or r.steps, r.karras)
            total += second.from_strength(strength).num_steps if strength > 0 else 0
        common = dict(negative_prompt=negative_prompt, sampler=r.sampler, karras=r.karras, steps=r.steps,
                      guidance_scale=r.guidance_scale, guidance_rescale=r.guidance_rescale, seed=r.seed,
                      num_images=r.num_images, clip_skip=r.clip_skip, chunked=r.chunked,
                      prompt_weighting=r.prompt_weighting, embeddings=self.embeddings, vae_tiling=r.vae_tiling,
                      progress=progress, on_step=progress_hook(total, on_progress, should_stop),
                      cutters=r.cutters(), variation=r.variation())
        interrupted = False
        try:
            if r.mask is not None:
                images = inpaint(parts, prompt, r.init_image, r.mask, strength=strength,
                                 paste_back=r.paste_back, height=r.height, width=r.width, **common)
            elif r.init_image is not None:
                images = image_to_image(parts, prompt, r.init_image, strength=strength, height=r.height,
                                        width=r.width, **common)
            else:
                images = text_to_image(parts, prompt, height=r.height, width=r.width, hires=hires, **common)
        except Stopped as stop:
            images, interrupted = to_pil(decode_latents(parts.vae, stop.denoised, tiling=r.vae_tiling)), True
        if r.init_image is not None:
            r.strength = strength
        width, height = (r.width, r.height) if hires else images[0].size  # A1111's Size: the first pass's
        model_hash = None if self.model_sha256 is None else self.model_sha256[:SHORT_HASH]
        params = params_for(r, self.capabilities.source, len(images), width, height, vae.name, model_hash, vae.hash)
        return GenerationResult(images, params, interrupted)

    def preview(self, denoised: torch.Tensor) -> Image.Image:
        """The first image of a batch of latents, cheaply: decoded by ``preview_vae``, else a linear map for SD's 4
        channels, else a decode."""
        z = denoised[:1].float().cpu()
        if self.preview_vae is not None:
            return to_pil(decode_latents(self.preview_vae, z))[0]
        if z.shape[1] != 4:
            return to_pil(decode_latents(self.parts.vae, z))[0]
        rgb = torch.einsum("bchw,cr->brhw", z, _SD_LATENT_RGB)
        return to_pil(((rgb + 1) / 2).clamp(0, 1))[0]
