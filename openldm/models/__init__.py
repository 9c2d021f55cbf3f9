"""Networks: UNet, autoencoders (KL, VQ), discriminator, LPIPS, text encoders. Importing this package
registers every model and preset in openldm.registry."""
from openldm.models import autoencoder, discriminator, lpips, presets, text_encoder, unet  # noqa: F401 (registration)
