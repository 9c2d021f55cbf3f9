"""Reading model files nobody vouched for, the checks every loader shares:

- :func:`read_header`: a ``.safetensors`` header checked before the library sees the file. The format is an
  8-byte little-endian header length N, N bytes of JSON (an object: tensor name -> ``{"dtype", "shape",
  "data_offsets": [begin, end]}``, plus an optional ``"__metadata__"`` of strings), then the data; a file is
  accepted only when the length fits the file, every dtype is known, every tensor's offsets hold exactly its
  ``shape`` x ``dtype`` bytes and the tensors tile the data with no gap and no overlap.
- :func:`build_within`: the module a (file's, untrusted) config describes, built on the meta device within a
  budget the weights set, so ``num_res_blocks: 100000`` fails at once instead of building for hours.
- :func:`check_fits` (names, shapes, dtypes against the module) and :func:`check_finite` (no NaN / inf).
- :func:`names_its_source`: errors raised deep inside a loader name the file or folder it was given.

Every problem is a ``ValueError`` (or ``FileNotFoundError``) whose one-line message names the file, so the CLI
reports it as one line and exit code 2.
"""
from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from openldm.config import ConfigError
from openldm.models.meta import BudgetExceeded, build_on_meta

# safetensors dtype name -> torch dtype (the names torch can hold; others are refused).
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_FINITE_CHUNK = 1 << 22  # elements checked at a time: bounded temporary memory on a multi-GB tensor


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]  # in the header's order
    metadata: dict[str, str]


def _name(path: Path) -> str:
    return repr(str(path))


def _unique_object(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"the name {dup!r} appears twice")
    return dict(pairs)


def _entry(path: Path, name: str, value: object) -> TensorEntry:
    where = f"{_name(path)}: tensor {name!r}"
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"{where} must be an object with exactly dtype, shape and data_offsets; got {value!r:.200}")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"{where} has dtype {dtype!r:.40}; supported: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise ValueError(f"{where} has shape {shape!r:.200}; a shape is a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{where} has data_offsets {offsets!r:.200}; expected [begin, end] with 0 <= begin <= end")
    entry = TensorEntry(DTYPES[dtype], tuple(shape), offsets[0], offsets[1])
    nbytes = entry.numel * DTYPES[dtype].itemsize
    if entry.end - entry.begin != nbytes:
        raise ValueError(f"{where}: shape {shape} of {dtype} is {nbytes} bytes but its data_offsets {offsets} span "
                         f"{entry.end - entry.begin}")
    return entry


def read_header(path: str | Path) -> SafetensorsHeader:
    """The checked header of the safetensors file ``path`` (reads the header only, never the data)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {_name(path)} does not exist")
    if not path.is_file():
        raise ValueError(f"{_name(path)} is a {'directory' if path.is_dir() else 'special file'}, not a model file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{_name(path)} is truncated or not a safetensors file: {size} bytes, less than the "
                             "8-byte header length every safetensors file starts with")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise ValueError(f"{_name(path)} is truncated or not a safetensors file: its header length {n} is past "
                             f"the end of the file ({size} bytes)" if n > size - 8 else
                             f"{_name(path)}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_object)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{_name(path)} is not a safetensors file: its header is not valid JSON "
                         f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    if not isinstance(header, dict):
        found = type(header).__name__
        raise ValueError(f"{_name(path)} is not a safetensors file: its header is a JSON {found}, not an object")  # noqa: TRY004
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{_name(path)}: __metadata__ must map names to strings; got {metadata!r:.200}")
    tensors = {name: _entry(path, name, value) for name, value in header.items()}
    end = 0  # the tensors, sorted by offset, must tile the data section exactly
    ordered = sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end))
    for i, (name, t) in enumerate(ordered):
        if t.begin != end:
            problem = (f"overlaps tensor {ordered[i - 1][0]!r}" if t.begin < end
                       else f"leaves a gap of {t.begin - end} bytes before it")
            raise ValueError(f"{_name(path)} is corrupt: tensor {name!r} at bytes {t.begin}-{t.end} {problem}")
        end = t.end
    data = size - 8 - n
    if end != data:
        raise ValueError(f"{_name(path)} is truncated or corrupt: its header describes {end} bytes of tensor data "
                         f"but the file holds {data}")
    return SafetensorsHeader(tensors, dict(metadata))


@contextmanager
def open_safetensors(path: str | Path, device: torch.device | str = "cpu") -> Iterator:
    """``safetensors.safe_open`` on a file :func:`read_header` accepted; library errors name the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{_name(Path(path))} cannot be read: {str(e).splitlines()[0][:300]}") from None


def build_within(cls: type[nn.Module], config: object, shapes: Iterable[tuple[int, ...]], where: str) -> nn.Module:
    """``cls(config)`` on the meta device, for weights of ``shapes``: the build stops as soon as the config asks
    for more tensors or elements than they could fill, and any error building it becomes a ValueError naming
    ``where``. The budget is twice what the weights hold (tied or re-registered tensors) plus a floor of a
    thousand tensors and 16M elements, so that a few missing tensors are still reported as missing ones."""
    shapes = list(shapes)
    count, elements = len(shapes), sum(math.prod(s) for s in shapes)
    try:
        return build_on_meta(cls, config, max_tensors=2 * count + 1024, max_elements=2 * elements + (1 << 24))
    except BudgetExceeded as e:
        raise ValueError(f"{where}: its config describes a bigger {cls.__name__} than its {count} tensors "
                         f"({elements:,} elements) can fill ({e}); the config or the file is damaged") from None
    except Exception as e:  # noqa: BLE001 (a constructor fed an untrusted config may fail in any way)
        message = str(e).splitlines()[0][:300] if str(e) else ""
        raise ValueError(f"{where}: its config cannot build a {cls.__name__}: {type(e).__name__}: {message}") from None


def check_finite(tensor: torch.Tensor, name: str, where: str) -> None:
    """Raise when floating ``tensor`` holds NaN or inf (a diverged or damaged file makes black images)."""
    if not tensor.is_floating_point():
        return
    native = tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    # A finite sum proves every element finite (NaN and inf propagate); a sum is one fast pass with no temporary.
    # Only a non-finite sum (bad values, or finite ones overflowing it) pays for the exact count.
    if torch.isfinite(tensor.sum() if native else tensor.sum(dtype=torch.float32)):
        return
    flat = tensor.reshape(-1)
    bad = sum(int((~torch.isfinite(c if native else c.float())).sum()) for c in flat.split(_FINITE_CHUNK))
    if bad:
        raise ValueError(f"{where}: tensor {name!r} holds {bad} non-finite values (NaN or inf) of {flat.numel()}; "
                         "the file is damaged or was saved from a diverged run")


def check_fits(module: nn.Module, found: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], where: str) -> None:
    """Raise unless ``found`` (name -> (dtype, shape) of the file's tensors) is exactly ``module``'s state: the
    same names, shapes, and floating weights where the module has floating ones (integer ones of its dtype)."""
    wanted = {k: (v.dtype, tuple(v.shape)) for k, v in module.state_dict().items()}
    missing = [k for k in wanted if k not in found]
    extra = [k for k in found if k not in wanted]
    shapes = [f"{k} {list(found[k][1])} (expected {list(s)})" for k, (_, s) in wanted.items()
              if k in found and tuple(found[k][1]) != s]
    dtypes = [f"{k} {str(found[k][0]).removeprefix('torch.')} (expected {str(d).removeprefix('torch.')})"
              for k, (d, _) in wanted.items() if k in found and
              (found[k][0].is_floating_point != d.is_floating_point or
               (not d.is_floating_point and found[k][0] != d))]
    problems = []
    for label, items in (("missing tensors", missing), ("unexpected tensors", extra), ("wrong shapes", shapes),
                         ("wrong dtypes", dtypes)):
        if items:
            problems.append(f"{len(items)} {label}: {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}")
    if problems:
        raise ValueError(f"{where}: the weights do not fit the model its config describes ({'; '.join(problems)})")


def names_its_source(load: Callable) -> Callable:
    """Decorate a loader whose first argument is a path: a ValueError or KeyError from deep inside it (a key map, a
    config check) that does not name the path is raised again with the path in front, so one line says which
    file is bad."""
    @functools.wraps(load)
    def wrapper(path, *args, **kwargs):
        try:
            return load(path, *args, **kwargs)
        except (ValueError, KeyError) as e:
            message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            if str(path) in message:
                raise
            raise (ConfigError if isinstance(e, ConfigError) else ValueError)(f"{str(path)!r}: {message}") from e
    return wrapper
