"""Shared building blocks for the UNet and the autoencoders. Nothing here knows about models/."""
