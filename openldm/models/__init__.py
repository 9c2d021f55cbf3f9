"""Networks: UNet, autoencoders (KL, VQ), discriminator, LPIPS, text encoders. Importing this package
registers every model and preset in openldm.registry."""
import importlib

for _name in ("unet", "autoencoder", "discriminator", "lpips", "text_encoder", "presets"):
    try:
        importlib.import_module(f"openldm.models.{_name}")
    except ModuleNotFoundError as _e:  # a part not written yet
        if _e.name != f"openldm.models.{_name}":
            raise
