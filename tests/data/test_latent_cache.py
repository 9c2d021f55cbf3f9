"""Latent cache: round trip, flipped copies, reuse by fingerprint, atomic writes, and the 1/std scale factor."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from openldm.data import build_dataset
from openldm.data.latent_cache import (
    LatentCacheConfig,
    LatentCacheDataset,
    autoencoder_encoder,
    build_latent_cache,
    fingerprint_encoder,
    measure_scaling_factor,
    shard_range,
)
from openldm.data.shapes import ShapesConfig, ShapesDataset
from openldm.registry import DATASETS

N = 11  # not a multiple of the batch size: the last batch is short


def pool(images: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in encoder: (B, 3, 32, 32) -> (B, 3, 8, 8)."""
    return F.avg_pool2d(images, 4)


class CountingEncoder:
    """Counts the images it encodes; optionally raises on a given call."""

    def __init__(self, fail_on_call: int | None = None, scale: float = 1.0):
        self.calls = self.images = 0
        self.fail_on_call, self.scale = fail_on_call, scale

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += len(images)
        if self.calls == self.fail_on_call:
            raise RuntimeError("encoder exploded")
        return pool(images) * self.scale


@pytest.fixture
def shapes() -> ShapesDataset:
    return ShapesDataset(ShapesConfig(num_samples=N))


def images_of(ds) -> torch.Tensor:
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


def test_round_trip_with_labels_captions_and_masks(tmp_path: Path, shapes: ShapesDataset):
    cache = build_latent_cache(shapes, pool, tmp_path / "cache", batch_size=4, progress=False)
    assert isinstance(cache, LatentCacheDataset) and len(cache) == N
    assert torch.equal(torch.from_numpy(np.array(cache.latents)), pool(images_of(shapes)))
    assert isinstance(cache.latents, np.memmap)
    for i in (0, 5, N - 1):
        item, source = cache[i], shapes[i]
        assert set(item) == {"latent", "caption", "label", "color_label", "shape_label", "mask"}
        assert item["latent"].shape == (3, 8, 8) and item["latent"].dtype == torch.float32
        assert item["caption"] == source["caption"] and item["label"] == source["label"]
        assert item["shape_label"] == source["shape_label"]
        assert torch.equal(item["mask"], source["mask"]) and item["mask"].dtype == torch.long
    # only .npy and JSON, all readable without pickle
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == ["color_label.npy", "label.npy", "latents.npy", "mask.npy", "meta.json", "shape_label.npy",
                     "strings.json"]
    for name in files:
        if name.endswith(".npy"):
            np.load(tmp_path / "cache" / name, allow_pickle=False)
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["count"] == N and meta["latent_shape"] == [3, 8, 8] and meta["columns"]["caption"] == "str"
    assert np.load(tmp_path / "cache" / "mask.npy").dtype == np.int16
    # registered and buildable from a plain dict; scaling_factor multiplies on reading
    again = build_dataset("latent_cache", {"path": str(tmp_path / "cache"), "scaling_factor": 2.0})
    assert DATASETS.get("latent_cache") is LatentCacheDataset
    assert torch.equal(again[3]["latent"], 2 * cache[3]["latent"])
    loader = torch.utils.data.DataLoader(cache, batch_size=4)
    batch = next(iter(loader))
    assert batch["latent"].shape == (4, 3, 8, 8) and len(batch["caption"]) == 4


def test_flipped_copies(tmp_path: Path, shapes: ShapesDataset):
    build_latent_cache(shapes, pool, tmp_path / "c", flip=True, batch_size=4, progress=False)
    images = images_of(shapes)
    both = LatentCacheDataset(LatentCacheConfig(path=str(tmp_path / "c"), flip="both"))
    assert len(both) == 2 * N and both.latents.shape == (2 * N, 3, 8, 8)
    for i in (0, 4, N - 1):
        assert torch.equal(both[i]["latent"], pool(images[i:i + 1])[0])
        flipped = both[N + i]
        assert torch.equal(flipped["latent"], pool(images[i:i + 1].flip(-1))[0])  # the encoded mirror image
        assert torch.equal(flipped["mask"], shapes[i]["mask"].flip(-1))
        assert flipped["caption"] == shapes[i]["caption"] and flipped["label"] == shapes[i]["label"]
    none = LatentCacheDataset(LatentCacheConfig(path=str(tmp_path / "c"), flip="none"))
    assert len(none) == N and torch.equal(none[2]["latent"], both[2]["latent"])
    rand = LatentCacheDataset(LatentCacheConfig(path=str(tmp_path / "c"), flip="random"))
    assert len(rand) == N
    picks = []
    for epoch in range(10):
        rand.set_epoch(epoch)
        item = rand[2]
        is_flipped = torch.equal(item["latent"], both[N + 2]["latent"])
        assert is_flipped or torch.equal(item["latent"], both[2]["latent"])
        assert torch.equal(item["mask"], both[N + 2]["mask"] if is_flipped else both[2]["mask"])
        assert torch.equal(rand[2]["latent"], item["latent"])  # same (seed, epoch, index) -> same pick
        picks.append(is_flipped)
    assert 0 < sum(picks) < 10


def test_reuse_with_an_explicit_encoder_fingerprint(tmp_path: Path, shapes: ShapesDataset):
    enc = CountingEncoder()
    build_latent_cache(shapes, enc, tmp_path / "c", encoder_fingerprint="pool-v1", batch_size=4, progress=False)
    assert enc.images == N
    mtime = (tmp_path / "c" / "latents.npy").stat().st_mtime_ns
    enc2 = CountingEncoder()
    cache = build_latent_cache(shapes, enc2, tmp_path / "c", encoder_fingerprint="pool-v1", progress=False)
    assert enc2.calls == 0 and len(cache) == N and (tmp_path / "c" / "latents.npy").stat().st_mtime_ns == mtime
    # another encoder id, dataset, flip setting or rebuild=True: encoded again
    for kwargs, ds in [({"encoder_fingerprint": "pool-v2"}, shapes),
                       ({"encoder_fingerprint": "pool-v2"}, ShapesDataset(ShapesConfig(num_samples=N, seed=5))),
                       ({"encoder_fingerprint": "pool-v2", "flip": True}, shapes),
                       ({"encoder_fingerprint": "pool-v2", "flip": True, "rebuild": True}, shapes)]:
        enc3 = CountingEncoder()
        build_latent_cache(ds, enc3, tmp_path / "c", progress=False, **kwargs)
        assert enc3.images == N * (2 if kwargs.get("flip") else 1), kwargs


def test_reuse_by_probe_for_plain_functions(tmp_path: Path, shapes: ShapesDataset):
    assert fingerprint_encoder(pool) == "probe"
    build_latent_cache(shapes, CountingEncoder(), tmp_path / "c", progress=False)
    same = CountingEncoder()
    build_latent_cache(shapes, same, tmp_path / "c", progress=False)
    assert same.calls == 1 and same.images == 4  # only the probe batch
    changed = CountingEncoder(scale=2.0)  # same code path, different outputs: caught by the probe
    cache = build_latent_cache(shapes, changed, tmp_path / "c", progress=False)
    assert changed.images == 4 + N
    assert torch.equal(cache[0]["latent"], 2 * pool(shapes[0]["image"][None])[0])


def test_module_encoders_are_fingerprinted_by_their_weights(tmp_path: Path, shapes: ShapesDataset):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 4, stride=4)
    fp = fingerprint_encoder(conv)
    assert fp == fingerprint_encoder(conv) and fp != "probe"
    build_latent_cache(shapes, conv, tmp_path / "c", progress=False)
    with torch.no_grad():
        conv.weight.add_(0.01)
    assert fingerprint_encoder(conv) != fp
    cache = build_latent_cache(shapes, conv, tmp_path / "c", progress=False)
    with torch.no_grad():
        assert torch.allclose(cache[1]["latent"], conv(shapes[1]["image"][None])[0], atol=1e-6)


class FakePosterior:
    def __init__(self, mean: torch.Tensor):
        self.mean = mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean + torch.randn(self.mean.shape, generator=generator)


class FakeAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 2, 1)

    def encode(self, x: torch.Tensor) -> FakePosterior:
        return FakePosterior(self.proj(F.avg_pool2d(x, 4)))


def test_autoencoder_encoder_and_posterior_errors(tmp_path: Path, shapes: ShapesDataset):
    ae = FakeAutoencoder()
    with pytest.raises(TypeError, match=r"\.mode\(\) or \.sample\(\)"):
        build_latent_cache(shapes, ae.encode, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad" / "meta.json").exists()
    cache = build_latent_cache(shapes, autoencoder_encoder(ae), tmp_path / "c", progress=False)
    with torch.no_grad():
        assert torch.allclose(cache[0]["latent"], ae.encode(shapes[0]["image"][None]).mode()[0], atol=1e-6)
    a = autoencoder_encoder(ae, sample=True, seed=3)(images_of(shapes))
    b = autoencoder_encoder(ae, sample=True, seed=3)(images_of(shapes))
    assert torch.equal(a, b)
    assert autoencoder_encoder(ae).fingerprint() != autoencoder_encoder(ae, sample=True).fingerprint()


def test_no_final_files_when_encoding_raises(tmp_path: Path, shapes: ShapesDataset):
    with pytest.raises(RuntimeError, match="exploded"):
        build_latent_cache(shapes, CountingEncoder(fail_on_call=2), tmp_path / "c", batch_size=4, progress=False)
    assert list((tmp_path / "c").iterdir()) == []  # no cache files, no temporaries
    with pytest.raises(FileNotFoundError, match="not a finished latent cache"):
        LatentCacheDataset(LatentCacheConfig(path=str(tmp_path / "c")))
    # a failed rebuild over a finished cache leaves no cache that passes for finished
    build_latent_cache(shapes, pool, tmp_path / "d", progress=False)
    with pytest.raises(RuntimeError, match="exploded"):
        build_latent_cache(shapes, CountingEncoder(fail_on_call=3), tmp_path / "d", batch_size=4, rebuild=True,
                           progress=False)
    assert not (tmp_path / "d" / "meta.json").exists()
    assert not [p for p in (tmp_path / "d").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(FileNotFoundError):
        LatentCacheDataset(LatentCacheConfig(path=str(tmp_path / "d")))


def test_float16_storage_and_pickling_for_workers(tmp_path: Path, shapes: ShapesDataset):
    cache = build_latent_cache(shapes, pool, tmp_path / "c", dtype="float16", progress=False)
    assert cache.latents.dtype == np.float16 and cache[0]["latent"].dtype == torch.float32
    assert torch.allclose(cache[0]["latent"], pool(shapes[0]["image"][None])[0], atol=1e-3)
    blob = pickle.dumps(cache)  # what a DataLoader worker receives: the path, not the arrays
    assert len(blob) < 20000
    assert torch.equal(pickle.loads(blob)[4]["latent"], cache[4]["latent"])


def test_scaling_factor_is_one_over_std():
    g = torch.Generator().manual_seed(0)
    latents = 0.5 * torch.randn(4000, 4, 8, 8, generator=g) + 0.3  # std 0.5 -> factor 2
    assert measure_scaling_factor(latents) == pytest.approx(2.0, rel=0.01)
    small = torch.randn(50, 4, 4, 4, generator=g)
    assert measure_scaling_factor(small) == pytest.approx(1.0 / small.double().std().item(), rel=1e-12)
    # a sample of rows when there are more than max_items; deterministic, and near the full value
    sampled = measure_scaling_factor(latents, max_items=500)
    assert sampled == measure_scaling_factor(latents, max_items=500) and sampled == pytest.approx(2.0, rel=0.03)
    assert measure_scaling_factor(latents.numpy()) == pytest.approx(measure_scaling_factor(latents), rel=1e-9)
    with pytest.raises(ValueError, match="std 0"):
        measure_scaling_factor(torch.ones(10, 4))
    with pytest.raises(ValueError, match="empty"):
        measure_scaling_factor(torch.ones(0, 4))


def test_cache_stores_the_scaling_factor_of_its_latents(tmp_path: Path, shapes: ShapesDataset):
    cache = build_latent_cache(shapes, pool, tmp_path / "c", flip=True, progress=False)
    originals = np.array(cache.latents[:N])
    assert cache.meta["scaling_factor"] == pytest.approx(measure_scaling_factor(originals), rel=1e-9)
    assert cache.meta["std"] == pytest.approx(float(originals.astype(np.float64).std(ddof=1)), rel=1e-9)


def test_autoencoder_encoder_takes_vq_latents_as_they_are():
    from openldm.data.latent_cache import autoencoder_encoder
    from openldm.models.autoencoder import VQAutoencoder, tiny_vq

    vq = VQAutoencoder(tiny_vq()).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(autoencoder_encoder(vq)(x), vq.encode(x))


def test_shards_are_whole_batches_covering_every_row():
    for n, batch, world in [(22, 4, 2), (22, 4, 3), (5, 4, 4), (64, 64, 2), (1, 1, 1)]:
        ranges = [shard_range(n, batch, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in rank order
        assert all(lo % batch == 0 or lo == hi == n for lo, hi in ranges)  # empty shards at the end


def test_two_processes_build_the_cache_one_process_builds(tmp_path: Path):
    """torchrun, 2 gloo processes: each encodes its share (rows 0-11 and 12-21) and rank 0 joins them; every file
    equals a one-process build's, flipped copies included, and no shard folder is left."""
    from dist_testing import torchrun

    dataset = ShapesDataset(ShapesConfig(size=16, num_samples=22, seed=5))
    one = tmp_path / "one"
    build_latent_cache(dataset, pool, one, flip=True, batch_size=4, encoder_fingerprint="pool", progress=False)
    done = torchrun(Path(__file__).with_name("_cache_worker.py"), str(tmp_path / "two"), nproc=2)
    assert done.returncode == 0 and "rank 0 built" in done.stdout and "rank 1 built" in done.stdout, done.stdout[-3000:]
    two = tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for name in (p.name for p in one.iterdir()):
        if name.endswith(".npy"):
            a, b = np.load(one / name), np.load(two / name)
            assert a.dtype == b.dtype and np.array_equal(a, b), name
        else:
            assert json.loads((one / name).read_text()) == json.loads((two / name).read_text()), name
    # and a second torchrun reuses it (every process agrees the cache is current)
    stamp = (two / "latents.npy").stat().st_mtime_ns
    assert torchrun(Path(__file__).with_name("_cache_worker.py"), str(two), nproc=2).returncode == 0
    assert (two / "latents.npy").stat().st_mtime_ns == stamp
