"""Models trained here (run directories, exported and bundled runs) behind the generation interface
(``openldm.pipelines.generate``). What a model can take comes from its conditioners' declared request fields."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from openldm.data.image_io import tensor_to_pil
from openldm.io import run_dir as runs
from openldm.pipelines.common import compile_networks, module_device_dtype, resolve_dtype, sampling_plan
from openldm.pipelines.generate import (
    Capabilities,
    GenerationRequest,
    GenerationResult,
    OnProgress,
    Recommended,
    ShouldStop,
    Stopped,
    bytes_per_pixel,
    params_for,
    progress_hook,
)
from openldm.pipelines.trained import TrainedModel, crop_output, decode, load_run, sample_trained

_REQUEST_KEYS = ("prompt", "class_label", "init_image")  # request fields of their own, not ``inputs``


class TrainedGenerator:
    """A run trained here. Images come out at the run's channels (greyscale for Fashion-MNIST), cropped back to the
    dataset's own size when its images were padded."""

    compiled: str | None = None  # None, or what ``compile_networks`` did (its weights never change: frozen)

    def __init__(self, model: TrainedModel, source: str):
        from openldm.registry import SAMPLERS

        self.model = model
        fields = [f for c in model.conditioner.conditioners.values() for f in c.request_fields()]
        classes = next((f.num_classes for f in fields if f.type == "class"), None)
        inputs = {f.name: f for f in fields if f.name not in _REQUEST_KEYS and not (f.name == "mask" and f.type == "image")}
        size = model.image_size or (64, 64)
        rec = runs.read_sampling(model.run_dir) if model.run_dir is not None else dict(runs.TRAINED_SAMPLING)
        recommended = Recommended.from_dict(rec, Recommended(width=size[1], height=size[0]))
        self.capabilities = Capabilities(
            name=Path(source).name or str(source), kind="trained", source=str(source), prompt=any(f.type == "text" for f in fields),
            negative_prompt=False, num_classes=classes,
            class_names=tuple(model.class_names) if classes and model.class_names else None,
            inputs=tuple(inputs.values()), image_to_image=True, inpainting=True, channels=model.channels,
            size_multiple=_size_multiple(model), samplers=tuple(SAMPLERS.names()), recommended=recommended,
            max_steps=int(model.schedule.num_train_steps), device=str(module_device_dtype(model.unet)[0]),
            **bytes_per_pixel(model.unet, model.autoencoder))

    @classmethod
    def load(cls, path: str | Path, source: str | None = None, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
             ema: bool = True, vae: str | Path | None = None, step: int | None = None,
             compile: bool = False) -> "TrainedGenerator":
        """``compile``: torch.compile the UNet (and off a CPU the decoder) with frozen weights
        (``compile_networks``)."""
        model = load_run(path, ema=ema, device=device, dtype=resolve_dtype(dtype, device) or torch.float32, autoencoder=vae,
                         step=step)
        generator = cls(model, str(path) if source is None else source)
        if compile:
            generator.compiled = compile_networks(model.unet, getattr(model.autoencoder, "decoder", None), freeze=True)
        return generator

    def sample(self, request: GenerationRequest, *, on_progress: OnProgress | None = None,
               should_stop: ShouldStop | None = None, progress: bool = False) -> tuple[torch.Tensor, bool]:
        """The resolved request's images as a tensor (B, C, H, W) in [-1, 1], and whether it was interrupted."""
        r = request.resolve(self.capabilities)
        strength = 1.0 if r.strength is None else r.strength
        plan = sampling_plan(self.model, r.sampler, r.steps, r.karras)
        total = plan.from_strength(strength).num_steps if strength < 1 else plan.num_steps
        try:
            images = sample_trained(
                self.model, class_label=r.class_label, prompt=r.prompt, mask=r.mask, inputs=r.inputs,
                init_image=r.init_image, strength=strength,
                num_images=r.num_images, sampler=r.sampler, karras=r.karras, steps=r.steps,
                guidance_scale=r.guidance_scale, guidance_rescale=r.guidance_rescale, seed=r.seed, height=r.height,
                width=r.width, progress=progress, on_step=progress_hook(total, on_progress, should_stop),
                cutters=r.cutters(), variation=r.variation())
            return images, False
        except Stopped as stop:
            return crop_output(self.model, decode(self.model, stop.denoised)), True

    def generate(self, request: GenerationRequest, *, on_progress: OnProgress | None = None,
                 should_stop: ShouldStop | None = None, progress: bool = False) -> GenerationResult:
        r = request.resolve(self.capabilities)
        images, interrupted = self.sample(r, on_progress=on_progress, should_stop=should_stop, progress=progress)
        pictures = [tensor_to_pil(x) for x in images]
        # the size asked for (outputs of padded data come out cropped): what regenerates the image
        height, width = r.height or images.shape[-2], r.width or images.shape[-1]
        params = params_for(r, self.capabilities.source, len(pictures), width, height)
        return GenerationResult(pictures, params, interrupted)

    def preview(self, denoised: torch.Tensor) -> Image.Image:
        return tensor_to_pil(crop_output(self.model, decode(self.model, denoised[:1]))[0])


def _size_multiple(model: TrainedModel) -> int:
    """Sizes the UNet can take: the autoencoder's factor times 2 per UNet downsampling."""
    levels = len(getattr(model.unet.config, "channel_mult", (1,)))
    return model.downsampling_factor * 2 ** (levels - 1)
