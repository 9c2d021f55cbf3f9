"""AUTOMATIC1111's HTTP API (``/sdapi/v1/...``): its request bodies with its field names and defaults, and their
translation to and from the generation interface.

Fields A1111 clients send that decide the image are honoured (prompt, negative_prompt, seed, sampler_name /
sampler_index, scheduler, batch_size, n_iter, steps, cfg_scale, width, height, init_images, denoising_strength,
mask, mask_blur, inpainting_mask_invert, override_settings' sd_model_checkpoint, sd_vae and
CLIP_stop_at_last_layers); settings a model recommends (steps, cfg_scale, sampler, size) start from the model's own
values when a request leaves them out; the hires fix (enable_hr, hr_scale or hr_resize_x/y, hr_upscaler,
hr_second_pass_steps, denoising_strength) runs as A1111's, ``tiling`` makes the image seamless, ``subseed`` /
``subseed_strength`` / ``seed_resize_from_w`` / ``_h`` are A1111's variation seed and seed resize, and ``styles``
from the server's styles.csv apply to the prompts. Requests for features openldm does not have (restore faces, scripts) are refused with a 4xx
naming the field rather than silently ignored; every other unknown field is ignored, as A1111 ignores it.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import secrets
from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict

from openldm.pipelines.common import GenerationParams, png_bytes
from openldm.pipelines.generate import GenerationRequest, RequestError
from openldm.pipelines.styles import Style, apply_styles, choose
from openldm.pipelines.vaes import OWN
from openldm.pipelines.vaes import available as available_vaes

VERSION = "openldm 0.1.0"


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # older clients' name for sampler_name
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_checkpoint_name: str | None = None
    firstphase_width: int = 0
    firstphase_height: int = 0
    denoising_strength: float | None = None  # txt2img: the hires pass's (A1111's 0.75 when left out)
    override_settings: dict[str, Any] | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = None
    send_images: bool = True
    save_images: bool = False


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: int | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    include_init_images: bool = False


SCHEDULERS = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
               "need_inner_model": False},
              {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}]


def decode_image(data: str, field: str) -> Image.Image:
    """A base64 image (raw, or a ``data:image/...;base64,`` URL) as a PIL image; a RequestError naming ``field``
    when it is not one."""
    text = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        image.load()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
        raise RequestError(field, f"{field} is not a base64-encoded image (PNG, JPEG, WebP; raw base64 or a data "
                           "URL)") from None
    return image


def encode_png(image: Image.Image, params: GenerationParams) -> str:
    """Raw base64 of the PNG carrying ``params`` in its "parameters" chunk (A1111's ``images`` entries)."""
    return base64.b64encode(png_bytes(image, params)).decode()


def random_seed(seed: int) -> int:
    """A1111's seed: -1 (or any negative) draws one."""
    return secrets.randbelow(2**32) if seed < 0 else seed


def _sampler(body: Txt2ImgRequest) -> tuple[str | None, bool | None]:
    from openldm.samplers import from_a1111_name

    name = body.sampler_name or body.sampler_index
    karras: bool | None = None
    if body.scheduler is not None:
        scheduler = body.scheduler.lower()
        if scheduler not in ("automatic", "karras"):
            raise RequestError("scheduler", f"scheduler {body.scheduler!r} is not one of Automatic, Karras")
        karras = scheduler == "karras"
    if name is None:
        return None, karras
    try:
        sampler, legacy_karras = from_a1111_name(name)
    except KeyError as e:
        raise RequestError("sampler_name", str(e.args[0])) from None
    return sampler, True if legacy_karras else karras


def _hires(body: Txt2ImgRequest, request: GenerationRequest) -> None:
    """A1111's hires fields onto ``request``: the scale (``hr_scale``, or the size ``hr_resize_x`` / ``_y`` asks
    for), upscaler, second-pass steps and ``denoising_strength``. What openldm cannot do in the second pass (another
    sampler, prompt or checkpoint; a resize to another aspect ratio, which A1111 crops) is refused by name."""
    if body.firstphase_width or body.firstphase_height:
        raise RequestError("firstphase_width", "firstphase_width / firstphase_height (A1111's old hires fields) are "
                           "not supported; give width, height and hr_scale")
    # each second-pass field, the first pass's value, and A1111's word for "the same" (None: none)
    for name, value, same, word in (
            ("hr_sampler_name", body.hr_sampler_name, body.sampler_name or body.sampler_index, "Use same sampler"),
            ("hr_scheduler", body.hr_scheduler, body.scheduler, "Use same scheduler"),
            ("hr_prompt", body.hr_prompt, body.prompt, None),
            ("hr_negative_prompt", body.hr_negative_prompt, body.negative_prompt, None),
            ("hr_checkpoint_name", body.hr_checkpoint_name, None, "Use same checkpoint")):
        if value and value not in (same, word):
            raise RequestError(name, f"{name}: the hires pass uses the first pass's; leave it out or the same")
    scale = body.hr_scale
    if body.hr_resize_x or body.hr_resize_y:
        if body.width is None or body.height is None:
            raise RequestError("hr_resize_x", "hr_resize_x/y need the first pass's width and height in the request")
        width, height = body.width, body.height
        x = body.hr_resize_x or body.hr_resize_y * width // height
        y = body.hr_resize_y or body.hr_resize_x * height // width
        if x * height != y * width:
            raise RequestError("hr_resize_x", f"hr_resize_x/y {x}x{y} has another aspect ratio than {width}x{height} "
                               "(A1111 would crop); give one of them, or the same ratio")
        scale = x / width
    request.hires_scale, request.hires_upscaler = float(scale), body.hr_upscaler
    request.hires_steps = body.hr_second_pass_steps or None
    request.strength = body.denoising_strength


def _refuse_unsupported(body: Txt2ImgRequest) -> None:
    for name, asked in (("restore_faces", body.restore_faces), ("script_name", body.script_name),
                        ("alwayson_scripts", bool(body.alwayson_scripts))):
        if asked:
            raise RequestError(name, f"{name} is not supported by openldm (leave it out, false or empty)")


def model_override(body: Txt2ImgRequest) -> str | None:
    """The checkpoint a request asks for in ``override_settings`` (None: the current model)."""
    return (body.override_settings or {}).get("sd_model_checkpoint")


def to_request(body: Txt2ImgRequest, prompt_weighting: str = "a1111", styles: dict[str, Style] | None = None,
               vae: str | None = None) -> GenerationRequest:
    """The generation request for an A1111 txt2img / img2img body (the seed still A1111's: -1 = random). Prompts
    are read in A1111's syntax (``prompt_weighting="a1111"``) unless the model cannot ("none"); the ``styles`` the
    body names (from the server's styles file) are applied to them. ``vae``: the server's ``sd_vae`` option, which
    the body's ``override_settings.sd_vae`` overrides (Automatic / None: the model's own)."""
    _refuse_unsupported(body)
    sampler, karras = _sampler(body)
    overrides = body.override_settings or {}
    prompt, negative_prompt = body.prompt, body.negative_prompt
    if body.styles:
        if not styles:
            raise RequestError("styles", "styles: this server has no styles file; start it with --styles-file FILE "
                               "(A1111's styles.csv)")
        try:
            prompt, negative_prompt = apply_styles(prompt, negative_prompt, choose(styles, body.styles))
        except ValueError as e:
            raise RequestError("styles", str(e)) from None
    request = GenerationRequest(
        prompt=prompt, negative_prompt=negative_prompt, seed=random_seed(body.seed), sampler=sampler,
        karras=karras, steps=body.steps, guidance_scale=body.cfg_scale, width=body.width, height=body.height,
        num_images=body.batch_size, clip_skip=int(overrides.get("CLIP_stop_at_last_layers", 1)),
        prompt_weighting=prompt_weighting, tiling=bool(body.tiling), subseed_strength=body.subseed_strength,
        subseed=random_seed(body.subseed) if body.subseed_strength else None)
    if body.seed_resize_from_w > 0 and body.seed_resize_from_h > 0:  # A1111: both, or no seed resize
        request.seed_resize_from = (body.seed_resize_from_w, body.seed_resize_from_h)
    vae = overrides.get("sd_vae", vae)
    if vae is not None and vae not in OWN:
        request.vae = str(vae)
    if body.enable_hr:
        if isinstance(body, Img2ImgRequest):
            raise RequestError("enable_hr", "enable_hr is for txt2img (A1111's img2img has no hires fix)")
        _hires(body, request)
    if isinstance(body, Img2ImgRequest):
        if not body.init_images:
            raise RequestError("init_images", "img2img needs init_images: a list of one base64 image")
        request.init_image = decode_image(body.init_images[0], "init_images").convert("RGB")
        request.strength = body.denoising_strength
        if body.resize_mode != 0:
            raise RequestError("resize_mode", "resize_mode: only 0 (just resize) is supported")
        if body.mask is not None:
            request.mask = inpaint_mask(body, request.init_image)
            request.paste_back = True  # A1111 lays the result over the original outside the mask
    return request


def inpaint_mask(body: Img2ImgRequest, image: Image.Image) -> Image.Image:
    """The mask A1111 would use: decoded, the same size as the image, inverted if asked, blurred by mask_blur."""
    mask = decode_image(body.mask, "mask").convert("L")
    check_mask_size(mask, image)
    if body.inpainting_fill not in (0, 1, 2, 3):
        raise RequestError("inpainting_fill", "inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or "
                           "3 (latent nothing)")
    if body.inpainting_mask_invert not in (0, 1):
        raise RequestError("inpainting_mask_invert", "inpainting_mask_invert must be 0 (inpaint masked) or 1 "
                           "(inpaint not masked)")
    if body.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    blur = body.mask_blur if body.mask_blur is not None else max(body.mask_blur_x, body.mask_blur_y)
    if blur < 0:
        raise RequestError("mask_blur", f"mask_blur={blur} must be >= 0")
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur else mask


def check_mask_size(mask: Image.Image, image: Image.Image) -> None:
    if mask.size != image.size:
        raise RequestError("mask", f"the mask is {mask.width}x{mask.height} but the image is "
                           f"{image.width}x{image.height}; they must be the same size")


def response(body: Txt2ImgRequest, images: list[Image.Image], params: list[GenerationParams], model: str,
             seeds: list[int]) -> dict[str, Any]:
    """A1111's response: ``images`` (base64 PNGs with their parameters), ``parameters`` (the request echoed) and
    ``info`` (a JSON string)."""
    first = params[0] if params else None
    infotexts = [p.to_text() for p in params]
    subseeds = [p.subseed + p.batch_index if p.subseed is not None else -1 for p in params]
    resize = first.seed_resize_from if first and first.seed_resize_from else (-1, -1)
    info = {
        "prompt": body.prompt, "all_prompts": [p.prompt for p in params], "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [p.negative_prompt for p in params], "seed": seeds[0] if seeds else body.seed,
        "all_seeds": seeds, "subseed": subseeds[0] if subseeds else body.subseed, "all_subseeds": subseeds,
        "subseed_strength": first.subseed_strength if first else body.subseed_strength,
        "width": first.width if first else body.width, "height": first.height if first else body.height,
        "sampler_name": _a1111(first.sampler) if first else body.sampler_name, "scheduler":
            ("Karras" if first.karras else "Automatic") if first else body.scheduler,
        "cfg_scale": first.guidance_scale if first else body.cfg_scale, "steps": first.steps if first else body.steps,
        "batch_size": body.batch_size, "n_iter": body.n_iter, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model,
        "sd_model_hash": first.model_hash if first else None,
        "sd_vae_name": first.vae if first else None,
        "sd_vae_hash": first.vae_hash if first else None, "seed_resize_from_w": resize[0], "seed_resize_from_h": resize[1],
        "denoising_strength": first.strength if first else None, "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [], "job_timestamp": "",
        "clip_skip": first.clip_skip if first else 1, "is_using_inpainting_conditioning": False, "version": VERSION}
    return {"images": [encode_png(im, p) for im, p in zip(images, params)] if body.send_images else [],
            "parameters": body.model_dump(), "info": json.dumps(info)}


def _a1111(sampler: str) -> str:
    from openldm.samplers import a1111_name

    return a1111_name(sampler)


def embeddings(loaded: dict[str, Any]) -> dict[str, Any]:
    """``/sdapi/v1/embeddings``: the current model's textual-inversion embeddings, as A1111 lists them."""
    return {"loaded": {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                              "shape": int(v.shape[-1]), "vectors": int(v.shape[0])} for name, v in loaded.items()},
            "skipped": {}}


def loras(lora_dir: str | Path | None) -> list[dict[str, Any]]:
    """``/sdapi/v1/loras``: the LoRA files prompts can name, as A1111 lists them: ``name`` (what a
    ``<lora:NAME:W>`` tag resolves), ``alias`` (the trainer's ``ss_output_name``, which tags may use too; the name
    when there is none), ``path`` and ``metadata`` (the file's ``__metadata__``, with values that hold JSON objects
    decoded, as A1111 decodes them). Read from the folder at each call; no folder, no LoRAs."""
    from openldm.pipelines.loras import ALIAS_KEY, available, metadata

    if lora_dir is None or not Path(lora_dir).is_dir():
        return []
    listed = []
    for name, path in available(lora_dir).items():
        meta: dict[str, Any] = metadata(path)
        for key, value in meta.items():
            if value.startswith("{"):
                with contextlib.suppress(ValueError):
                    meta[key] = json.loads(value)
        alias = meta.get(ALIAS_KEY)
        listed.append({"name": name, "alias": alias if isinstance(alias, str) and alias else name,
                       "path": str(path), "metadata": meta})
    return listed


def vaes(vae_dir: str | Path | None) -> list[dict[str, str]]:
    """``/sdapi/v1/sd-vae``: the VAEs requests can name (``override_settings.sd_vae``, the ``sd_vae`` option), as
    A1111 lists them: ``model_name`` and ``filename``. Read from the folder at each call; no folder, no VAEs."""
    if vae_dir is None or not Path(vae_dir).is_dir():
        return []
    return [{"model_name": name, "filename": str(path)} for name, path in available_vaes(vae_dir).items()]


def prompt_styles(styles: dict[str, Style]) -> list[dict[str, str]]:
    """``/sdapi/v1/prompt-styles``: the server's styles file, as A1111 lists it."""
    return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in styles.values()]


def upscalers() -> list[dict[str, Any]]:
    """``/sdapi/v1/upscalers``: the pixel upscalers the hires fix takes (A1111's built-in ones; no model files)."""
    from openldm.pipelines.hires import PIXEL_UPSCALERS

    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": None}
            for name in PIXEL_UPSCALERS]


def latent_upscale_modes() -> list[dict[str, str]]:
    """``/sdapi/v1/latent-upscale-modes``: the latent upscalers the hires fix takes, by A1111's names."""
    from openldm.pipelines.hires import LATENT_UPSCALERS

    return [{"name": name} for name in LATENT_UPSCALERS]


def samplers() -> list[dict[str, Any]]:
    """``/sdapi/v1/samplers``: A1111's names, our registry names as aliases."""
    from openldm.registry import SAMPLERS

    return [{"name": spec.a1111_name, "aliases": [name], "options": {"scheduler": "karras"}
             if spec.supports_karras else {}} for name, spec in SAMPLERS.items()]


def png_info(image: Image.Image) -> dict[str, Any]:
    """``/sdapi/v1/png-info``: the "parameters" text, the PNG's text items, and the parameters parsed as A1111 does."""
    from openldm.pipelines.common import parameters_items

    text = image.info.get("parameters", "")
    items = {k: v for k, v in image.info.items() if isinstance(v, str)}
    return {"info": text, "items": items, "parameters": parameters_items(text) if text else {}}
