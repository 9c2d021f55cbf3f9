"""Seamless tiling (A1111's "Tiling"): every zero-padded convolution of the networks pads circularly instead, so
each layer sees the image as wrapping around at its edges and the result repeats without a seam. Only the padding
mode changes; the weights do not."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def circular_padding(*modules: nn.Module) -> Iterator[int]:
    """Within the context, the padded ``nn.Conv2d`` layers of ``modules`` pad circularly (as A1111 switches them);
    afterwards they pad with zeros again. Yields the number of layers switched."""
    convs = [m for module in modules for m in module.modules()
             if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and any(p > 0 for p in m.padding)]
    for conv in convs:
        conv.padding_mode = "circular"
    try:
        yield len(convs)
    finally:
        for conv in convs:
            conv.padding_mode = "zeros"
