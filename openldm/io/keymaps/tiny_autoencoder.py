"""TAESD state-dict keys: ours <-> the published files <-> diffusers' ``AutoencoderTiny``.

- Published (madebyollin/taesd ``taesd_encoder.pth`` / ``taesd_decoder.pth``, and their ``.safetensors``): one file
  per half, keyed by the ``nn.Sequential`` index (``0.weight``, ``3.conv.0.weight``); ours are the same under
  ``encoder.`` / ``decoder.``.
- Diffusers: ``encoder.layers.N`` is our ``encoder.N``; ``decoder.layers.N`` is our ``decoder.N+1`` (diffusers clamps
  in ``forward`` where TAESD has a parameter-free first layer).

The config comes from the shapes (widths, latent channels, residual blocks per level) or from diffusers' config.json.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from openldm.models.tiny_autoencoder import TinyAutoencoderConfig

PARTS = ("encoder", "decoder")
_DIFFUSERS = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.(.+)")


def from_published(state: Mapping[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    """One published half (keys ``N.rest``) under our names (``part.N.rest``)."""
    if part not in PARTS:
        raise ValueError(f"part={part!r}; accepted: {', '.join(PARTS)}")
    return {f"{part}.{k}": v for k, v in state.items()}


def from_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderTiny`` keys -> ours; a key of neither half raises, listing it."""
    out, unknown = {}, []
    for key, value in state.items():
        m = _DIFFUSERS.fullmatch(key)
        if m is None:
            unknown.append(key)
            continue
        index = int(m[2]) + (1 if m[1] == "decoder" else 0)
        out[f"{m[1]}.{index}.{m[3]}"] = value
    if unknown:
        raise KeyError(f"not AutoencoderTiny keys: {unknown[:10]}")
    return out


def _layers(state: Mapping[str, torch.Tensor], part: str) -> list[tuple[int, str]]:
    """(index, "conv" | "block") of one half's layers that hold weights, in order."""
    kinds: dict[int, str] = {}
    for key in state:
        m = re.fullmatch(rf"{part}\.(\d+)\.(conv\.0\.)?weight", key)
        if m:
            kinds[int(m[1])] = "block" if m[2] else "conv"
    return sorted(kinds.items())


def _blocks_per_level(layers: list[tuple[int, str]]) -> list[int]:
    """Residual blocks after each convolution but the last."""
    counts: list[int] = []
    for _, kind in layers[:-1]:
        if kind == "conv":
            counts.append(0)
        elif counts:
            counts[-1] += 1
    return counts


def config_from_state(state: Mapping[str, torch.Tensor]) -> TinyAutoencoderConfig:
    """The config our-named ``state`` implies (the decoder alone when it has no ``encoder.*``)."""
    decoder = _layers(state, "decoder")
    if not decoder or decoder[0] != (1, "conv"):
        raise KeyError("not a TAESD decoder: decoder.1.weight (its first convolution) is missing")
    first = state["decoder.1.weight"]
    levels = _blocks_per_level(decoder)  # blocks after the first conv and after each upsampling conv
    out_channels = int(state[f"decoder.{decoder[-1][0]}.weight"].shape[0])
    encoder = _layers(state, "encoder")
    common = dict(out_channels=out_channels, z_channels=int(first.shape[1]), channels=int(first.shape[0]),
                  decoder_blocks=tuple(levels))
    if not encoder:
        return TinyAutoencoderConfig(**common, encoder_blocks=(0,) * len(levels), has_encoder=False)
    return TinyAutoencoderConfig(**common, in_channels=int(state["encoder.0.weight"].shape[1]),
                                 encoder_blocks=tuple(_blocks_per_level(encoder)))


_IGNORED = {"latent_magnitude", "latent_shift", "force_upcast", "shift_factor"}  # storage and dtype policy only


def config_from_diffusers(d: Mapping) -> TinyAutoencoderConfig:
    """A diffusers ``AutoencoderTiny`` config.json -> ours; settings our network cannot express raise."""
    d = {k: v for k, v in d.items() if not k.startswith("_") and k not in _IGNORED}
    widths = {w for key in ("encoder_block_out_channels", "decoder_block_out_channels", "block_out_channels")
              for w in d.get(key, (64,))}
    fixed = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2, "scaling_factor": 1.0}
    for key, want in fixed.items():
        if d.get(key, want) != want:
            raise ValueError(f"AutoencoderTiny {key}={d[key]!r} is not supported; only {want!r}")
    if len(widths) != 1:
        raise ValueError(f"AutoencoderTiny block widths {sorted(widths)}: only one width throughout is supported")
    known = {"in_channels", "out_channels", "latent_channels", "encoder_block_out_channels",
             "decoder_block_out_channels", "block_out_channels", "num_encoder_blocks", "num_decoder_blocks", *fixed}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown AutoencoderTiny config key(s) {unknown}")
    return TinyAutoencoderConfig(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
                                 z_channels=d.get("latent_channels", 4), channels=widths.pop(),
                                 encoder_blocks=tuple(d.get("num_encoder_blocks", (1, 3, 3, 3))),
                                 decoder_blocks=tuple(d.get("num_decoder_blocks", (3, 3, 3, 1))))
