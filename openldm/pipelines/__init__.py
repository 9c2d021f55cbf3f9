"""Pipelines: thin functions from prompts (and images) to images, sharing ``common``'s helpers.

- ``text_to_image(parts, prompt, ...)``
- ``image_to_image(parts, prompt, image, strength=..., ...)``
- ``inpaint(parts, prompt, image, mask, strength=..., paste_back=..., ...)``

``parts`` is any object with ``unet, vae, text_encoder, tokenizer, schedule, prediction, spacing, steps_offset``
(``openldm.io``'s loaders return one). ``GenerationParams`` carries a run's settings to and from PNG text chunks.
"""
from openldm.pipelines.common import GenerationParams, ModelParts, output_paths, read_png_params, save_images, save_png
from openldm.pipelines.image_to_image import image_to_image
from openldm.pipelines.inpaint import inpaint
from openldm.pipelines.text_to_image import text_to_image

__all__ = ["text_to_image", "image_to_image", "inpaint", "GenerationParams", "ModelParts", "save_png",
           "save_images", "read_png_params", "output_paths"]
