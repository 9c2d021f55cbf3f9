"""Encode a dataset once into a memory-mapped latent cache, read it back as a dataset, and measure the latents'
scale factor.

A cache is a folder:
- ``latents.npy``: (copies * N, C, h, w) float16 or float32, rows [0, N) the images, rows [N, 2N) their
  horizontally flipped copies when built with ``flip=True`` (the flipped *image* is encoded: an autoencoder's
  latent of a mirrored picture is not exactly the mirrored latent);
- ``<key>.npy`` for every other per-item value: ints -> int64, floats -> float32, integer tensors (label maps)
  -> int16, float tensors (silhouettes) -> float16; one row per source item;
- ``strings.json``: {key: [str, ...]} for text values such as captions;
- ``meta.json``, written last: format, fingerprint, shapes, columns, and the latents' mean, std and 1/std.
Only NumPy ``.npy`` and JSON: nothing is unpickled (``np.load(..., allow_pickle=False)``).

Atomicity: every file is written under a temporary name and renamed into place (``atomic_path``), and ``meta.json``
is the commit marker: it is removed before a rebuild and written only after every array is complete, so a crash
(or an encoder that raises) leaves no cache that could be taken for a finished one.

Reuse: the fingerprint is a SHA-256 over the format version, the dataset's fingerprint (its ``fingerprint()``
method: config + file names, sizes and mtimes for our datasets; else class name, length and the bytes of its
first, middle and last images), the encoder's fingerprint, ``flip`` and ``dtype``. The encoder's fingerprint is,
in order of preference: the ``encoder_fingerprint`` argument; ``encode.fingerprint()`` if it has one (see
:func:`autoencoder_encoder`); a hash of the parameters and buffers when ``encode`` is an ``nn.Module``; otherwise
"probe": a matching cache is reused only if re-encoding its first items reproduces the stored latents.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from openldm.data.transforms import Sample, hflip, item_generator
from openldm.io.files import atomic_path
from openldm.models.autoencoder import latent_mode
from openldm.registry import DATASETS

FORMAT = "openldm-latent-cache"
VERSION = 2  # 2: the measured scale is stored as "scaling_factor"
DTYPES = ("float16", "float32")
FLIP_MODES = ("random", "both", "none")
PROBE_ITEMS = 4
Encoder = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------ fingerprints
def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def fingerprint_dataset(dataset: Dataset) -> str:
    """``dataset.fingerprint()`` when it exists; else a hash of its class name, length and a few images."""
    if callable(getattr(dataset, "fingerprint", None)):
        return str(dataset.fingerprint())
    h = hashlib.sha256(f"{type(dataset).__module__}.{type(dataset).__qualname__}:{len(dataset)}".encode())
    for i in sorted({0, len(dataset) // 2, len(dataset) - 1}):
        _hash_tensor(h, dataset[i]["image"])
    return h.hexdigest()


def fingerprint_module(module: nn.Module) -> str:
    """SHA-256 over a module's class, parameter and buffer names, shapes, dtypes and values."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def fingerprint_encoder(encode: Encoder) -> str:
    """The encoder part of the cache fingerprint (see the module doc); "probe" when nothing better is known."""
    if callable(getattr(encode, "fingerprint", None)):
        return str(encode.fingerprint())
    if isinstance(encode, nn.Module):
        return fingerprint_module(encode)
    return "probe"


class autoencoder_encoder:  # noqa: N801 (used like a function)
    """``encode`` for :func:`build_latent_cache` from an autoencoder with ``encode(x) -> posterior``: the posterior's
    ``mode()`` (deterministic; default) or ``sample(generator)`` with a generator seeded once from ``seed``. Has a
    ``fingerprint()`` from the weights, so a cache built with it is reused exactly when the weights are the same."""

    def __init__(self, autoencoder: nn.Module, sample: bool = False, seed: int = 0):
        self.autoencoder, self.sample, self.seed = autoencoder, sample, seed
        self._generator: torch.Generator | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self.autoencoder.encode(images)
        if isinstance(posterior, torch.Tensor) or not self.sample:  # VQ latents as they are, or the KL mode
            return latent_mode(posterior)
        if self._generator is None:
            device = images.device if images.device.type != "mps" else torch.device("cpu")
            self._generator = torch.Generator(device).manual_seed(self.seed)
        return posterior.sample(self._generator)

    def fingerprint(self) -> str:
        mode = f"sample:{self.seed}" if self.sample else "mode"
        return f"{fingerprint_module(self.autoencoder)}:{mode}"


# ------------------------------------------------------------------------------------------------ scale factor
def _sample_rows(latents: torch.Tensor | np.ndarray, max_items: int | None,
                 generator: torch.Generator | None) -> torch.Tensor:
    """All rows, or ``max_items`` random ones (sorted, for sequential memmap reads), flattened to float64."""
    n = len(latents)
    if n == 0:
        raise ValueError("measuring latents needs at least one latent, got an empty array")
    rows: Any = slice(None)
    if max_items is not None and n > max_items:
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        rows = torch.randperm(n, generator=g)[:max_items].sort().values.numpy()
    sample = latents[rows]
    x = sample if isinstance(sample, torch.Tensor) else torch.from_numpy(np.array(sample))
    return x.detach().double().flatten()


def measure_scaling_factor(latents: torch.Tensor | np.ndarray, max_items: int | None = 10000,
                           generator: torch.Generator | None = None) -> float:
    """1 / std of all elements of (a sample of) ``latents`` (N, ...): the SD convention for the factor that brings
    latents to unit variance (Rombach et al. 2022, sec. 4.3.2 / appendix G: 0.18215 for SD v1's autoencoder).
    With more than ``max_items`` rows, a random subset drawn from ``generator`` (seed 0 by default) is used;
    std is the unbiased estimate in float64. Accepts a tensor, an array or a memory map."""
    x = _sample_rows(latents, max_items, generator)
    if x.numel() < 2:
        raise ValueError(f"measure_scaling_factor needs at least 2 elements, got {x.numel()}")
    std = float(x.std())
    if not math.isfinite(std) or std == 0.0:
        raise ValueError(f"latents have std {std}; cannot take 1/std (are they constant or non-finite?)")
    return 1.0 / std


# ------------------------------------------------------------------------------------------------ building
def _column_dtype(key: str, value: Any) -> np.dtype | str:
    """Storage type of one per-item value; "str" for text."""
    if isinstance(value, str):
        return "str"
    if isinstance(value, bool) or isinstance(value, (int, np.integer)):
        return np.dtype(np.int64)
    if isinstance(value, (float, np.floating)):
        return np.dtype(np.float32)
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or not value.is_floating_point():
            return np.dtype(np.int16)
        return np.dtype(np.float16)
    raise TypeError(f"cannot cache item value {key!r} of type {type(value).__name__}; accepted: int, float, str, tensor")


def _batch_values(key: str, value: Any, dtype: np.dtype) -> np.ndarray:
    """A collated batch column -> array to store (range-checked for int16)."""
    array = value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if dtype == np.int16 and array.size and (array.min() < -(2**15) or array.max() >= 2**15):
        raise ValueError(f"item value {key!r} has ids in [{array.min()}, {array.max()}]; the cache stores label maps "
                         f"as int16, accepted range [-32768, 32767]")
    return array.astype(dtype)


def _encode_batch(encode: Encoder, images: torch.Tensor) -> torch.Tensor:
    z = encode(images)
    if not isinstance(z, torch.Tensor):
        hint = " (call .mode() or .sample() on the posterior)" if hasattr(z, "mode") else ""
        raise TypeError(f"encode(images) must return a tensor of latents, got {type(z).__name__}{hint}")
    if z.shape[0] != images.shape[0] or not z.is_floating_point():
        raise ValueError(f"encode(images) returned {z.dtype} {tuple(z.shape)} for {images.shape[0]} images; "
                         f"expected float latents (B, ...) with B = {images.shape[0]}")
    return z.detach().float().cpu()


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return meta if meta.get("format") == FORMAT and meta.get("version") == VERSION else None


def _probe_matches(path: Path, dataset: Dataset, encode: Encoder, device: torch.device | None) -> bool:
    """Does re-encoding the first items reproduce the stored latents?"""
    k = min(PROBE_ITEMS, len(dataset))
    images = torch.stack([dataset[i]["image"] for i in range(k)])
    if device is not None:
        images = images.to(device)
    with torch.inference_mode():
        z = _encode_batch(encode, images)
    stored = torch.from_numpy(np.load(path / "latents.npy", mmap_mode="r")[:k].astype(np.float32))
    tol = 1e-2 if np.load(path / "latents.npy", mmap_mode="r").dtype == np.float16 else 1e-3
    return z.shape == stored.shape and torch.allclose(z, stored, rtol=tol, atol=tol * max(1.0, float(z.abs().max())))


def _process_group() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _everyone(flag: bool, world: int) -> bool:
    """``flag`` on every process (False if any process has it False)."""
    if world == 1:
        return flag
    nccl = torch.distributed.get_backend() == "nccl"  # it reduces CUDA tensors only
    t = torch.tensor([int(flag)], device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def shard_range(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) that process ``rank`` of ``world`` encodes: contiguous runs of whole batches, so every
    process encodes the batches one process would have (the same images side by side, the same latents)."""
    per = -(-(-(-n // batch_size)) // world) * batch_size
    return min(n, rank * per), min(n, (rank + 1) * per)


def _shard_dir(path: Path, rank: int) -> Path:
    return path / f".shard-{rank}"


def _encode_shard(dataset: Dataset, encode: Encoder, folder: Path, lo: int, hi: int, *, flip: bool, batch_size: int,
                  dtype: str, device: torch.device | None, num_workers: int, progress: bool) -> None:
    """Rows [lo, hi) of ``dataset`` encoded into ``folder``: latents.npy ((copies * (hi - lo), C, h, w): the
    images, then their flipped copies), one ``<key>.npy`` per numeric column, strings.json, columns.json."""
    first = dataset[0]
    if not isinstance(first, dict) or "image" not in first:
        found = list(first) if isinstance(first, dict) else type(first).__name__
        raise ValueError(f"build_latent_cache needs items that are dicts with an 'image' tensor; got {found}")
    kinds = {k: _column_dtype(k, v) for k, v in first.items() if k != "image"}  # from an item, not a batch
    folder.mkdir(parents=True, exist_ok=True)
    n, copies = hi - lo, 2 if flip else 1
    loader = DataLoader(torch.utils.data.Subset(dataset, range(lo, hi)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    strings: dict[str, list[str]] = {k: [] for k, kind in kinds.items() if kind == "str"}
    columns = {k: "str" if kind == "str" else np.dtype(kind).name for k, kind in kinds.items()}
    latents, arrays, start, latent_shape = None, {}, 0, None
    with tqdm(total=n, desc="encoding latents", unit="img", disable=not progress) as bar:
        for batch in loader:
            images = batch["image"]
            b = images.shape[0]
            x = images.to(device) if device is not None else images
            with torch.inference_mode():
                z = _encode_batch(encode, x)  # (b, C, h, w)
                z_flip = _encode_batch(encode, hflip(x)) if flip else None
            if latents is None:
                latent_shape = list(z.shape[1:])
                latents = np.lib.format.open_memmap(folder / "latents.npy", mode="w+", dtype=dtype,
                                                    shape=(copies * n, *z.shape[1:]))
                for key, kind in kinds.items():
                    if kind != "str":
                        shape = (n, *np.shape(_batch_values(key, batch[key], kind))[1:])
                        arrays[key] = np.lib.format.open_memmap(folder / f"{key}.npy", mode="w+", dtype=kind,
                                                                shape=shape)
            latents[start:start + b] = z.numpy()
            if flip:
                latents[n + start:n + start + b] = z_flip.numpy()
            for key in columns:
                if key not in batch:
                    raise ValueError(f"item {lo + start} lacks {key!r}, which earlier items have; every item needs "
                                     f"the same keys")
                if columns[key] == "str":
                    strings[key].extend(str(s) for s in batch[key])
                else:
                    arrays[key][start:start + b] = _batch_values(key, batch[key], arrays[key].dtype)
            start += b
            bar.update(b)
    for array in [latents, *arrays.values()] if latents is not None else []:
        array.flush()
    del latents, arrays  # close the memory maps
    (folder / "strings.json").write_text(json.dumps(strings))
    (folder / "columns.json").write_text(json.dumps({"columns": columns, "latent_shape": latent_shape}))


def _assemble(path: Path, world: int, n: int, copies: int, batch_size: int) -> dict:
    """The shards' files joined into the cache's (process order = row order); returns the columns and shape."""
    shards = [(_shard_dir(path, r), *shard_range(n, batch_size, r, world)) for r in range(world)]
    shards = [(folder, lo, hi) for folder, lo, hi in shards if hi > lo]
    info = json.loads((shards[0][0] / "columns.json").read_text())
    strings = {k: [] for k, kind in info["columns"].items() if kind == "str"}
    for folder, _, _ in shards:
        for key, values in json.loads((folder / "strings.json").read_text()).items():
            strings[key].extend(values)
    names = ["latents", *(k for k, kind in info["columns"].items() if kind != "str")]
    with contextlib.ExitStack() as stack:
        for name in names:
            tmp = stack.enter_context(atomic_path(path / f"{name}.npy"))
            if len(shards) == 1:  # one process: its file is the cache's
                (shards[0][0] / f"{name}.npy").replace(tmp)
                continue
            parts = [np.load(folder / f"{name}.npy", mmap_mode="r") for folder, _, _ in shards]
            rows = copies * n if name == "latents" else n
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=parts[0].dtype, shape=(rows, *parts[0].shape[1:]))
            for part, (_, lo, hi) in zip(parts, shards):
                k = hi - lo
                for c in range(copies if name == "latents" else 1):  # the images, then the flipped copies
                    out[c * n + lo:c * n + hi] = part[c * k:(c + 1) * k]
            out.flush()
            del out, parts
        with atomic_path(path / "strings.json") as tmp:
            tmp.write_text(json.dumps(strings))
    return info


def build_latent_cache(dataset: Dataset, encode: Encoder, path: str | Path, *, flip: bool = False,
                       batch_size: int = 64, dtype: str = "float32", device: str | torch.device | None = None,
                       num_workers: int = 0, encoder_fingerprint: str | None = None, rebuild: bool = False,
                       progress: bool = True) -> LatentCacheDataset:
    """Encode every item's "image" of ``dataset`` with ``encode(images (B, C, H, W)) -> latents (B, ...)`` into the
    cache folder ``path`` (format and fingerprint in the module doc), also encoding mirrored images when ``flip``,
    and return it as a :class:`LatentCacheDataset`. Every other item value (label, caption, mask, ...) is stored
    beside the latents. An existing cache with the same fingerprint is reused unless ``rebuild``. ``device``:
    where images are sent before ``encode``. Build from a deterministic dataset (centre crops, no random flips).

    Under a process group (``torchrun``) every process calls this: each encodes its share of whole batches
    (:func:`shard_range`) and the first joins them, so N processes write the cache one process would (with an
    encoder that draws randomness, such as a sampled posterior, each process draws its own)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if len(dataset) == 0:
        raise ValueError("build_latent_cache: the dataset is empty")
    path = Path(path)
    device = torch.device(device) if device is not None else None
    enc_fp = encoder_fingerprint if encoder_fingerprint is not None else fingerprint_encoder(encode)
    blob = json.dumps([FORMAT, VERSION, fingerprint_dataset(dataset), enc_fp, flip, dtype])
    fingerprint = hashlib.sha256(blob.encode()).hexdigest()
    rank, world = _process_group()

    meta = _read_meta(path)
    reuse = not rebuild and meta is not None and meta["fingerprint"] == fingerprint and meta["count"] == len(dataset)
    reuse = reuse and (enc_fp != "probe" or _probe_matches(path, dataset, encode, device))
    if _everyone(reuse, world):
        return LatentCacheDataset(LatentCacheConfig(path=str(path)))

    _barrier(world)  # every process has read meta.json before it goes
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (path / "meta.json").unlink()  # the cache is invalid from here until the new meta.json lands
    _barrier(world)
    n, copies = len(dataset), 2 if flip else 1
    lo, hi = shard_range(n, batch_size, rank, world)
    if hi > lo:
        shutil.rmtree(_shard_dir(path, rank), ignore_errors=True)  # a killed build's leftovers
        try:
            _encode_shard(dataset, encode, _shard_dir(path, rank), lo, hi, flip=flip, batch_size=batch_size,
                          dtype=dtype, device=device, num_workers=num_workers, progress=progress and rank == 0)
        except BaseException:
            shutil.rmtree(_shard_dir(path, rank), ignore_errors=True)
            raise
    _barrier(world)
    if rank == 0:
        info = _assemble(path, world, n, copies, batch_size)
        latents = np.load(path / "latents.npy", mmap_mode="r")
        sample = _sample_rows(latents[:n], 10000, None)  # the originals, as measure_scaling_factor samples them
        std = float(sample.std()) if sample.numel() > 1 else 0.0
        stats = {"mean": float(sample.mean()), "std": std,
                 "scaling_factor": 1.0 / std if std > 0 and math.isfinite(std) else None}
        del latents
        meta = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "encoder": enc_fp,
                "count": n, "flip": flip, "dtype": dtype, "latent_shape": info["latent_shape"],
                "columns": info["columns"], **stats}
        with atomic_path(path / "meta.json") as tmp:  # the commit marker, last
            tmp.write_text(json.dumps(meta, indent=1))
        for r in range(world):
            shutil.rmtree(_shard_dir(path, r), ignore_errors=True)
    _barrier(world)
    return LatentCacheDataset(LatentCacheConfig(path=str(path)))


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class LatentCacheConfig:
    """A cache folder written by :func:`build_latent_cache`. ``flip`` (used when the cache holds flipped copies):
    "random" (each access picks the original or the flipped copy, per seed, epoch and index), "both" (twice as many
    items: the flipped copies follow), or "none". ``scaling_factor``: multiply latents by it on reading (null: raw;
    the stored 1/std is ``dataset.meta["scaling_factor"]``)."""

    path: str
    flip: str = "random"
    scaling_factor: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.flip not in FLIP_MODES:
            raise ValueError(f"LatentCacheConfig.flip={self.flip!r}; choose one of: {', '.join(FLIP_MODES)}")


@DATASETS.register("latent_cache")
class LatentCacheDataset(Dataset):
    """Item: {"latent": float32 (C, h, w), and the source items' other values: "label", "caption", "mask" ...};
    a flipped copy comes with its spatial values (tensors of 2+ dims, e.g. masks) mirrored too (captions are not
    changed). Arrays are memory-mapped lazily, in each DataLoader worker."""

    config_class = LatentCacheConfig

    def __init__(self, config: LatentCacheConfig):
        self.config = config
        self.path = Path(config.path)
        meta = _read_meta(self.path)
        if meta is None:
            raise FileNotFoundError(f"{str(self.path)!r} is not a finished latent cache (no valid meta.json of "
                                    f"{FORMAT} v{VERSION}); build it with build_latent_cache")
        self.meta = meta
        self.count: int = meta["count"]
        self.has_flips: bool = meta["flip"]
        self.strings: dict[str, list[str]] = json.loads((self.path / "strings.json").read_text())
        self._arrays: dict[str, np.ndarray] | None = None
        self.epoch = 0

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            names = ["latents"] + [k for k, kind in self.meta["columns"].items() if kind != "str"]
            self._arrays = {k: np.load(self.path / f"{k}.npy", mmap_mode="r", allow_pickle=False) for k in names}
        return self._arrays

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = None  # each worker maps the files itself instead of copying them
        return state

    @property
    def latents(self) -> np.ndarray:
        """The memory-mapped (copies * N, C, h, w) latents (raw, unscaled)."""
        return self._open()["latents"]

    def __len__(self) -> int:
        return 2 * self.count if self.has_flips and self.config.flip == "both" else self.count

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose random original/flipped picks ``__getitem__`` draws."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cached latents")
        arrays = self._open()
        source, flipped = index % self.count, index >= self.count
        if self.has_flips and self.config.flip == "random":
            flipped = bool(torch.rand((), generator=item_generator(self.config.seed, self.epoch, index)) < 0.5)
        row = source + self.count if flipped else source
        latent = torch.from_numpy(np.array(arrays["latents"][row], dtype=np.float32))
        if self.config.scaling_factor is not None:
            latent = latent * self.config.scaling_factor
        sample: Sample = {"latent": latent}
        for key, kind in self.meta["columns"].items():
            if kind == "str":
                sample[key] = self.strings[key][source]
                continue
            value = np.array(arrays[key][source])
            if value.ndim == 0:
                sample[key] = value.item()
                continue
            t = torch.from_numpy(value)
            t = t.long() if kind == "int16" else t.float()
            sample[key] = hflip(t) if flipped and t.dim() >= 2 else t
        return sample
