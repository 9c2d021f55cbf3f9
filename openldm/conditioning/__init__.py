"""Conditioners: each turns one kind of condition into the UNet's named slots (see slots.py)."""
from openldm.conditioning.slots import Slots

__all__ = ["Slots"]
