"""Conditioners: each turns one kind of condition into the UNet's named slots (see slots.py).

Importing this package registers every conditioner in ``openldm.registry.CONDITIONERS``: "class_label", "text",
"segmentation", "low_res", "inpaint", "brightness". ``compose`` merges several into one ``Slots`` with condition dropout and
the null condition classifier-free guidance needs.
"""
from openldm.conditioning.brightness import BrightnessConditioner, BrightnessConfig
from openldm.conditioning.class_label import ClassLabelConditioner, ClassLabelConfig
from openldm.conditioning.compose import (
    ComposedConditioner,
    Conditioner,
    Resources,
    SlotDims,
    build_conditioning,
    merge_slots,
)
from openldm.conditioning.spatial import (
    InpaintConditioner,
    InpaintConfig,
    LowResConditioner,
    LowResConfig,
    MaskGenerator,
    MaskGeneratorConfig,
    SegmentationConditioner,
    SegmentationConfig,
)
from openldm.conditioning.text import PromptEncoder, TextConditioner, TextConfig, wrap_text_encoder
from openldm.config import ConditionConfig  # a model's list of conditions is config (openldm.config)
from openldm.nn.slots import Slots

__all__ = [
    "BrightnessConditioner", "BrightnessConfig",
    "Slots", "Conditioner", "ComposedConditioner", "ConditionConfig", "Resources", "SlotDims", "build_conditioning",
    "merge_slots", "ClassLabelConditioner", "ClassLabelConfig", "TextConditioner", "TextConfig", "PromptEncoder",
    "wrap_text_encoder", "SegmentationConditioner", "SegmentationConfig", "LowResConditioner", "LowResConfig",
    "InpaintConditioner", "InpaintConfig", "MaskGenerator", "MaskGeneratorConfig",
]
