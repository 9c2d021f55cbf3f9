"""TAESD's network on its own (its parity with diffusers' AutoencoderTiny is in tests/io/test_vae.py): the shapes and
factor its config gives, the decoder-only form, tiled encoding and decoding, and configs refused."""
from __future__ import annotations

import pytest
import torch

from openldm.models.tiny_autoencoder import TinyAutoencoder, TinyAutoencoderConfig

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = TinyAutoencoderConfig(channels=16, encoder_blocks=(1, 1, 1), decoder_blocks=(1, 1, 1))


def _model(cfg: TinyAutoencoderConfig = SMALL) -> TinyAutoencoder:
    torch.manual_seed(0)
    return TinyAutoencoder(cfg).eval()


@torch.no_grad()
def test_shapes_factor_and_the_published_layout():
    model = _model()
    assert model.downsampling_factor == 4
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    z = model.encode(x)
    assert z.shape == (2, 4, 8, 6)
    assert model.decode(z).shape == (2, 3, 32, 24)
    names = set(model.state_dict())  # TAESD's Sequential indices: conv 1 after the clamp, ReLU 2, then blocks
    assert {"decoder.1.weight", "decoder.3.conv.0.weight", "decoder.3.conv.4.bias", "encoder.1.conv.0.weight"} <= names
    assert "decoder.0.weight" not in names
    default = TinyAutoencoder(TinyAutoencoderConfig())
    assert 1.1e6 < sum(p.numel() for p in default.decoder.parameters()) < 1.3e6  # TAESD's ~1.2 M a side


@torch.no_grad()
def test_tiles_give_the_whole_image_where_one_tile_covers_it_and_stay_close_elsewhere():
    model = _model()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    z = model.encode(x)
    assert torch.equal(model.tiled_encode(x, tile_size=64, overlap=16), z)
    assert torch.equal(model.tiled_decode(z, tile_size=64, overlap=16), model.decode(z))
    tiled = model.tiled_decode(z, tile_size=32, overlap=16)
    other = model.decode(torch.randn_like(z))
    assert tiled.shape == (1, 3, 64, 64)
    assert (tiled - model.decode(z)).abs().mean() < 0.5 * (other - model.decode(z)).abs().mean()
    with pytest.raises(ValueError, match="multiples of 4"):
        model.tiled_decode(z, tile_size=30, overlap=8)


def test_a_decoder_alone_decodes_and_refuses_to_encode():
    model = _model(TinyAutoencoderConfig(channels=16, encoder_blocks=(0, 0, 0), decoder_blocks=(1, 1, 1),
                                         has_encoder=False))
    assert model.encoder is None and not any(k.startswith("encoder") for k in model.state_dict())
    assert model.decode(torch.randn(1, 4, 4, 4)).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="decoder only"):
        model.encode(torch.zeros(1, 3, 16, 16))


@pytest.mark.parametrize("change", [dict(encoder_blocks=(1, 1)), dict(decoder_blocks=()), dict(channels=0)])
def test_inconsistent_configs_are_refused(change):
    with pytest.raises(ValueError):
        TinyAutoencoderConfig(**{**dict(encoder_blocks=(1, 1, 1), decoder_blocks=(1, 1, 1)), **change})
