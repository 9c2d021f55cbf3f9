"""openldm's own model file: one ``.safetensors`` file whose metadata carries the model's registered kind and its
resolved config, so that the path alone rebuilds the model (``load_model(path)``).

Metadata keys: ``openldm.kind`` (a name in the MODELS registry), ``openldm.config`` (JSON of the config dataclass)
and ``openldm.format`` (version). Extra string metadata (e.g. a latent scale factor) may ride along.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from openldm.config import ConfigError, from_dict, to_dict
from openldm.io.files import atomic_path
from openldm.io.tensor_files import build_within, check_finite, check_fits, open_safetensors, read_header
from openldm.registry import MODELS

FORMAT_VERSION = "1"


def model_kind(module: nn.Module) -> str:
    """The registry name of ``module``'s class."""
    for name, cls in MODELS.items():
        if type(module) is cls:
            return name
    raise ValueError(f"{type(module).__name__} is not a registered model; registered: {', '.join(MODELS.names())}")


def save_model(module: nn.Module, path: str | Path, extra: dict[str, str] | None = None) -> Path:
    """Write ``module``'s weights and config (``module.config``) to ``path`` atomically."""
    if not hasattr(module, "config"):
        raise ValueError(f"{type(module).__name__} has no .config; only registered openldm models can be saved")
    meta = {
        "openldm.format": FORMAT_VERSION,
        "openldm.kind": model_kind(module),
        "openldm.config": json.dumps(to_dict(module.config)),
        **(extra or {}),
    }
    # safetensors refuses shared storage and non-contiguous tensors: save contiguous clones of shared ones.
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (empty when it has none); the header is checked first."""
    return read_header(path).metadata


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a model from an openldm ``.safetensors`` file alone. The module is built on the meta device and the
    memory-mapped tensors are assigned into it, so the weights are never held twice.

    Nothing in the file is trusted: the header is checked (:func:`~openldm.io.tensor_files.read_header`), the
    config may describe no more tensors and elements than the file holds (checked while the meta module is built,
    so an absurd size fails at once), the file's names, shapes and dtypes must be the module's, and floating
    weights must be finite. Each problem is a ValueError naming the file."""
    path = Path(path)
    header = read_header(path)
    meta = header.metadata
    where = repr(str(path))
    if "openldm.kind" not in meta:
        raise ValueError(f"{where} is not an openldm model file (no 'openldm.kind' metadata); "
                         "for Stable Diffusion or diffusers checkpoints use `openldm convert` or the SD loaders")
    kind = meta["openldm.kind"]
    if kind not in MODELS.names():
        raise ValueError(f"{where}: its openldm.kind {kind!r:.100} is not a registered model; "
                         f"registered: {', '.join(MODELS.names())}")
    cls = MODELS.get(kind)
    module = build_within(cls, _config(path, meta, cls), [t.shape for t in header.tensors.values()], where)
    check_fits(module, {k: (t.dtype, t.shape) for k, t in header.tensors.items()}, where)
    state = {}
    with open_safetensors(path, device) as f:
        for k in header.tensors:
            t = f.get_tensor(k)
            check_finite(t, k, where)
            state[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    module.load_state_dict(state, strict=True, assign=True)
    _check_no_meta(module)
    return module.eval()


def _config(path: Path, meta: dict[str, str], cls) -> object:
    """The config dataclass in ``meta``'s ``openldm.config`` JSON, strictly checked; errors name the file."""
    if "openldm.config" not in meta:
        raise ValueError(f"{str(path)!r} has no openldm.config metadata: it cannot say which {cls.__name__} it holds")
    try:
        data = json.loads(meta["openldm.config"])
    except (ValueError, RecursionError):
        raise ValueError(f"{str(path)!r}: its openldm.config metadata is not valid JSON") from None
    if not isinstance(data, dict):
        problem = f"must be a JSON object (a mapping of {cls.config_class.__name__} fields), not a {type(data).__name__}"
        raise ValueError(f"{str(path)!r}: its openldm.config metadata {problem}")  # noqa: TRY004
    try:
        return from_dict(cls.config_class, data)
    except Exception as e:  # noqa: BLE001 (ConfigError, or whatever a config check does with odd values)
        raise ConfigError(f"{str(path)!r}: its openldm.config does not describe a {cls.config_class.__name__}: "
                          f"{str(e).splitlines()[0][:300] if str(e) else type(e).__name__}") from None


def _check_no_meta(module: nn.Module) -> None:
    """Non-persistent buffers are not in the file and stay on the meta device: registered models must not have any
    (derive such constants in forward instead). Fail loudly rather than compute with meta tensors."""
    left = [n for n, b in module.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"buffers {left} were not restored from the file; make them persistent or derive them lazily")
