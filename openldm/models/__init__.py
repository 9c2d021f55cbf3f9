"""Networks: UNet, autoencoders (KL, VQ, TAESD), discriminator, LPIPS, text encoders. Importing this package
registers every model and preset in openldm.registry."""
from openldm.models import (  # noqa: F401 (registration)
    autoencoder,
    discriminator,
    lpips,
    presets,
    text_encoder,
    tiny_autoencoder,
    unet,
)
