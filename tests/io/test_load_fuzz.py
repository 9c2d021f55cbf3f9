"""Malformed model files, fed to the CLI the way a user would (a run directory's UNet, ``--vae``, ``convert`` of an
SD single file or an openldm folder, ``.ckpt`` files): each is refused with exit code 2 and one line naming the file,
within seconds; a few run in a subprocess under an address-space limit to prove memory stays bounded. A good file
still loads bit-identically."""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_bytes

import openldm
from openldm.cli import main
from openldm.conditioning.compose import build_conditioning
from openldm.config import from_dict
from openldm.io import run_dir as runs
from openldm.io.components import StableDiffusionComponents
from openldm.io.native import load_model, save_model
from openldm.io.original import save_original
from openldm.io.sd import save_openldm
from openldm.io.tensor_files import read_header
from openldm.models.autoencoder import AutoencoderKL, tiny_autoencoder_kl
from openldm.models.text_encoder import CLIPTextEncoder, tiny_text_config
from openldm.models.unet import UNet, UNetConfig
from openldm.tokenizers.clip_bpe import CLIPTokenizer
from openldm.training.diffusion import DiffusionTrainConfig, build_unet_config

pytestmark = pytest.mark.usefixtures("one_thread")

SECONDS = 10  # a refusal takes well under a second; this bound is for a busy machine


# ---- good files ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A pixel-space unconditional run directory with a 10k-parameter UNet (8 x 8 images)."""
    out = tmp_path_factory.mktemp("run")
    cfg = from_dict(DiffusionTrainConfig, {
        "data": {"name": "shapes", "options": {"size": 8}}, "out_dir": str(out), "schedule": {"kind": "linear"},
        "unet": {"model_channels": 8, "channel_mult": [1], "attention_levels": [], "mid_attention": False,
                 "norm_groups": 4}})
    runs.write_config(cfg, out)
    torch.manual_seed(0)
    unet = UNet(build_unet_config(cfg, 3, build_conditioning(cfg.conditions)))
    save_model(unet, out / runs.UNET_EMA_FILE)  # no scale metadata: a pixel-space run (scale 1)
    runs.write_json(out / runs.DATA_FILE, runs.data_facts((3, 8, 8), (8, 8), 3, None, None))
    return out


@pytest.fixture(scope="module")
def good_unet(run) -> bytes:
    return (run / runs.UNET_EMA_FILE).read_bytes()


@pytest.fixture(scope="module")
def good_vae(tmp_path_factory) -> bytes:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    return save_model(AutoencoderKL(tiny_autoencoder_kl(channels=8, channel_mult=(1, 2))), path).read_bytes()


@pytest.fixture(scope="module")
def sd_parts(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny SD v1 model as an original-layout single file and as an openldm folder (widths of 32: diffusers
    folders need multiples of 32)."""
    torch.manual_seed(2)
    unet = UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                           num_heads=2, context_dim=32, norm_groups=8))
    vae = AutoencoderKL(tiny_autoencoder_kl(channels=32, channel_mult=(1, 2)))
    sd = StableDiffusionComponents(unet=unet.eval(), vae=vae.eval(), text_encoder=CLIPTextEncoder(tiny_text_config()),
                                   tokenizer=CLIPTokenizer.from_bpe_file())
    tmp = tmp_path_factory.mktemp("sd")
    return save_original(sd, tmp / "sd.safetensors"), save_openldm(sd, tmp / "sd_folder")


# ---- building bad files ----------------------------------------------------------------------------------------

def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def pack(header: object, body: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def edit_header(data: bytes, edit) -> bytes:
    """``data`` with ``edit(header)`` applied to its (mutable) JSON header."""
    header, body = split(data)
    edit(header)
    return pack(header, body)


def first(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def second(header: dict) -> str:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[1]


def set_entry(name_of, field: str, value) -> callable:
    return lambda h: h[name_of(h)].__setitem__(field, value)


def set_meta(key: str, value: str):
    return lambda h: h["__metadata__"].__setitem__(key, value)


def with_config(**changes):
    def edit(h: dict) -> None:
        cfg = json.loads(h["__metadata__"]["openldm.config"])
        cfg.update(changes)
        h["__metadata__"]["openldm.config"] = json.dumps(cfg)
    return edit


def retensor(data: bytes, edit) -> bytes:
    """``data`` rewritten with ``edit(state)`` applied to its tensors (metadata kept)."""
    header, _ = split(data)
    from safetensors.torch import load as load_bytes

    state = load_bytes(data)
    edit(state)
    return save_bytes(state, metadata=header.get("__metadata__"))


def biggest(state: dict) -> str:
    return max((k for k in state if state[k].is_floating_point()), key=lambda k: state[k].numel())


def poison(value: float):
    def edit(state: dict) -> None:
        k = biggest(state)
        state[k] = state[k].clone()
        state[k].view(-1)[3] = value
    return edit


def overlap(h: dict) -> None:
    a, b = first(h), second(h)
    begin, end = h[b]["data_offsets"]
    start = h[a]["data_offsets"][0] + 4  # inside a
    h[b]["data_offsets"] = [start, start + end - begin]


def swap_kind(kind: str):
    return set_meta("openldm.kind", kind)


# Each case: (what it does to a good file, a pattern the one-line error must match). Applied to the run's UNet.
SAFETENSORS_CASES: dict[str, tuple] = {
    "zero_length": (lambda d: b"", r"0 bytes"),
    "four_bytes": (lambda d: d[:4], r"4 bytes, less than the 8-byte"),
    "random_bytes": (lambda d: b"\xff" + os.urandom(999), r"header length \d+ is past the end"),
    "random_bytes_small_length": (lambda d: struct.pack("<Q", 200) + os.urandom(1000), r"not valid JSON"),
    "header_length_2_62": (lambda d: struct.pack("<Q", 2**62) + d[8:], r"header length 4611686018427387904 is past"),
    "header_length_max": (lambda d: struct.pack("<Q", 2**64 - 1) + d[8:], r"is past the end"),
    "header_length_past_eof": (lambda d: struct.pack("<Q", len(d)) + d[8:], r"is past the end"),
    "header_length_short": (lambda d: struct.pack("<Q", struct.unpack("<Q", d[:8])[0] - 40) + d[8:], r"not valid JSON"),
    "truncated_half": (lambda d: d[: len(d) // 2], r"truncated or corrupt"),
    "truncated_one_byte": (lambda d: d[:-1], r"truncated or corrupt"),
    "trailing_bytes": (lambda d: d + b"\0" * 16, r"describes \d+ bytes of tensor data but the file holds"),
    "header_not_utf8": (lambda d: d[:9] + b"\xff" + d[10:], r"not valid JSON"),
    "header_bad_json": (lambda d: pack(b"{\"a\": ", split(d)[1]), r"not valid JSON"),
    "header_is_list": (lambda d: pack([1, 2], split(d)[1]), r"header is a JSON list, not an object"),
    "header_is_string": (lambda d: pack("x", split(d)[1]), r"JSON str, not an object"),
    "header_is_null": (lambda d: pack(None, split(d)[1]), r"JSON NoneType, not an object"),
    "header_deeply_nested": (lambda d: pack(b"[" * 200_000 + b"]" * 200_000, b""), r"not valid JSON"),
    "header_duplicate_name": (lambda d: pack(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                             b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8),
                              r"appears twice"),
    "dtype_unknown": (lambda d: edit_header(d, set_entry(first, "dtype", "Q4")), r"dtype 'Q4'; supported"),
    "dtype_not_a_string": (lambda d: edit_header(d, set_entry(first, "dtype", 7)), r"dtype 7; supported"),
    "entry_not_an_object": (lambda d: edit_header(d, lambda h: h.__setitem__(first(h), [0, 4])),
                            r"must be an object with exactly dtype, shape and data_offsets"),
    "entry_extra_field": (lambda d: edit_header(d, set_entry(first, "stride", [1])), r"must be an object with exactly"),
    "shape_negative": (lambda d: edit_header(d, set_entry(first, "shape", [-1, 8])), r"shape \[-1, 8\]"),
    "shape_float": (lambda d: edit_header(d, set_entry(first, "shape", [2.5])), r"shape \[2.5\]"),
    "shape_huge": (lambda d: edit_header(d, set_entry(first, "shape", [2**40, 2**40])), r"span"),
    "offsets_negative": (lambda d: edit_header(d, set_entry(first, "data_offsets", [-4, 0])), r"data_offsets \[-4, 0\]"),
    "offsets_reversed": (lambda d: edit_header(d, lambda h: h[first(h)].__setitem__(
        "data_offsets", h[first(h)]["data_offsets"][::-1])), r"0 <= begin <= end"),
    "offsets_three": (lambda d: edit_header(d, set_entry(first, "data_offsets", [0, 4, 8])), r"data_offsets \[0, 4, 8\]"),
    "offsets_past_end": (lambda d: edit_header(d, lambda h: h[first(h)].__setitem__(
        "data_offsets", [len(d), len(d) + 4 * math.prod(h[first(h)]["shape"])])), r"gap|overlaps|holds"),
    "offsets_overlap": (lambda d: edit_header(d, overlap), r"overlaps tensor"),
    "offsets_gap": (lambda d: edit_header(d, lambda h: h[first(h)].__setitem__(
        "data_offsets", [4, h[first(h)]["data_offsets"][1] + 4])), r"gap of 4 bytes|overlaps"),
    "metadata_not_object": (lambda d: edit_header(d, lambda h: h.__setitem__("__metadata__", [1])),
                            r"__metadata__ must map names to strings"),
    "metadata_not_strings": (lambda d: edit_header(d, set_meta("openldm.kind", 5)), r"__metadata__ must map"),
    "no_kind": (lambda d: edit_header(d, lambda h: h["__metadata__"].pop("openldm.kind")), r"not an openldm model file"),
    "kind_unknown": (lambda d: edit_header(d, swap_kind("bogus")), r"openldm.kind 'bogus' is not a registered model"),
    "kind_of_another_model": (lambda d: edit_header(d, swap_kind("clip_text")), r"does not describe a CLIPTextConfig"),
    "config_missing": (lambda d: edit_header(d, lambda h: h["__metadata__"].pop("openldm.config")),
                       r"has no openldm.config metadata"),
    "config_not_json": (lambda d: edit_header(d, set_meta("openldm.config", "{nope")), r"not valid JSON"),
    "config_is_list": (lambda d: edit_header(d, set_meta("openldm.config", "[1, 2]")), r"must be a JSON object"),
    "config_is_number": (lambda d: edit_header(d, set_meta("openldm.config", "42")), r"not a int"),
    "config_unknown_key": (lambda d: edit_header(d, with_config(colour="red")), r"unknown config key 'colour'"),
    "config_wrong_type": (lambda d: edit_header(d, with_config(model_channels="wide")), r"expected an integer"),
    "config_num_res_blocks_100000": (lambda d: edit_header(d, with_config(num_res_blocks=100_000)), r"bigger UNet"),
    "config_channels_1e9": (lambda d: edit_header(d, with_config(model_channels=10**9)),
                            r"bigger UNet|cannot build a UNet: RuntimeError: Storage size calculation overflowed"),
    "config_channels_1e6": (lambda d: edit_header(d, with_config(model_channels=10**6)), r"bigger UNet"),
    "config_depth_1e6": (lambda d: edit_header(d, with_config(attention_levels=[0], num_heads=2,
                                                               transformer_depth=10**6)), r"bigger UNet"),
    "config_levels_1e5": (lambda d: edit_header(d, with_config(channel_mult=[1] * 100_000)), r"bigger UNet"),
    "config_channels_1e100": (lambda d: edit_header(d, with_config(model_channels=10**100)), r"UNet"),
    "config_channels_negative": (lambda d: edit_header(d, with_config(model_channels=-8)), r"cannot build a UNet"),
    "config_heads_zero": (lambda d: edit_header(d, with_config(attention_levels=[0], num_heads=0)), r"UNet"),
    "config_smaller_than_file": (lambda d: edit_header(d, with_config(model_channels=4, norm_groups=2)),
                                 r"wrong shapes: .*expected"),
    "tensor_missing": (lambda d: retensor(d, lambda s: s.pop(biggest(s))), r"1 missing tensors"),
    "tensor_extra": (lambda d: retensor(d, lambda s: s.__setitem__("stowaway", torch.zeros(3))),
                     r"1 unexpected tensors: stowaway"),
    "tensor_wrong_shape": (lambda d: retensor(d, lambda s: s.__setitem__(biggest(s), s[biggest(s)][:1].clone())),
                           r"wrong shapes"),
    "tensor_wrong_dtype": (lambda d: retensor(d, lambda s: s.__setitem__(biggest(s), s[biggest(s)].to(torch.int32))),
                           r"wrong dtypes: .*int32 \(expected float32\)"),
    "tensor_nan": (lambda d: retensor(d, poison(float("nan"))), r"holds 1 non-finite values"),
    "tensor_inf": (lambda d: retensor(d, poison(float("-inf"))), r"holds 1 non-finite values"),
}


def assert_refused(argv: list[str], bad: Path, capsys, match: str) -> str:
    """``openldm ARGV`` exits 2 within SECONDS with one stderr line that names ``bad`` and matches ``match``."""
    start = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"openldm {argv[0]}: error: ") and str(bad) in lines[0], lines[0]
    assert re.search(match, lines[0]), lines[0]
    assert elapsed < SECONDS, f"{elapsed:.1f} s"
    return lines[0]


def copy_run(run: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in (runs.CONFIG_FILE, runs.DATA_FILE):
        shutil.copy(run / name, dst / name)
    return dst


def generate(model: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--steps", "1", "--out", str(out), "--quiet", *extra]


# ---- the cases --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_a_malformed_unet_in_a_run_directory_is_one_line(case, run, good_unet, tmp_path, capsys):
    make, match = SAFETENSORS_CASES[case]
    bad_run = copy_run(run, tmp_path / "run")
    bad = bad_run / runs.UNET_EMA_FILE
    bad.write_bytes(make(good_unet))
    assert_refused(generate(bad_run, tmp_path / "x.png"), bad, capsys, match)
    assert not (tmp_path / "x.png").exists()


VAE_CASES = {
    "truncated": (lambda d: d[: len(d) - 100], r"truncated or corrupt"),
    "num_res_blocks_100000": (lambda d: edit_header(d, with_config(num_res_blocks=100_000)), r"bigger AutoencoderKL"),
    "channels_1e9": (lambda d: edit_header(d, with_config(channels=10**9)), r"bigger AutoencoderKL"),
    "nan": (lambda d: retensor(d, poison(float("nan"))), r"non-finite"),
    "kind_unet": (lambda d: edit_header(d, swap_kind("unet")), r"does not describe a UNetConfig"),
    "kind_vq_same_config": (lambda d: edit_header(d, swap_kind("vq_autoencoder")), r"VQModelConfig|do not fit"),
}


@pytest.mark.parametrize("case", sorted(VAE_CASES))
def test_a_malformed_vae_flag_file_is_one_line(case, run, good_vae, tmp_path, capsys):
    make, match = VAE_CASES[case]
    bad = tmp_path / "vae.safetensors"
    bad.write_bytes(make(good_vae))
    assert_refused(generate(run, tmp_path / "x.png", "--vae", str(bad)), bad, capsys, match)


def poison_prefix(prefix: str, value: float):
    def edit(state: dict) -> None:
        k = max((k for k in state if k.startswith(prefix)), key=lambda k: state[k].numel())
        state[k] = state[k].clone()
        state[k].view(-1)[0] = value
    return edit


def sd_cfg(key: str, **changes):
    def edit(h: dict) -> None:
        cfg = json.loads(h["__metadata__"][key])
        cfg.update(changes)
        h["__metadata__"][key] = json.dumps(cfg)
    return edit


SD_FILE_CASES = {
    "truncated": (lambda d: d[:-7], r"truncated or corrupt"),
    "header_length_2_62": (lambda d: struct.pack("<Q", 2**62) + d[8:], r"is past the end"),
    "dtype_unknown": (lambda d: edit_header(d, set_entry(first, "dtype", "F4")), r"dtype 'F4'"),
    "unet_num_res_blocks_100000": (lambda d: edit_header(d, sd_cfg("openldm.unet", num_res_blocks=100_000)),
                                   r"UNet checkpoint: its config describes a bigger UNet"),
    "text_layers_1e6": (lambda d: edit_header(d, sd_cfg("openldm.text_encoder", num_hidden_layers=10**6)),
                        r"text encoder: its config describes a bigger CLIPTextEncoder"),
    "unet_nan": (lambda d: retensor(d, poison_prefix("model.diffusion_model.", float("nan"))),
                 r"UNet: tensor '[\w.]+' holds 1 non-finite"),
    "vae_inf": (lambda d: retensor(d, poison_prefix("first_stage_model.", float("inf"))),
                r"VAE: tensor '[\w.]+' holds 1 non-finite"),
}


@pytest.mark.parametrize("case", sorted(SD_FILE_CASES))
def test_a_malformed_sd_single_file_is_one_line(case, sd_parts, tmp_path, capsys):
    make, match = SD_FILE_CASES[case]
    bad = tmp_path / "sd.safetensors"
    bad.write_bytes(make(sd_parts[0].read_bytes()))
    assert_refused(["convert", str(bad), str(tmp_path / "out"), "--to", "openldm"], bad, capsys, match)
    assert not (tmp_path / "out").exists()


FOLDER_CASES = {"zero_length": r"0 bytes", "tensor_nan": r"non-finite", "kind_unknown": r"not a registered model",
                "config_num_res_blocks_100000": r"bigger AutoencoderKL"}


@pytest.mark.parametrize("case", sorted(FOLDER_CASES))
def test_a_malformed_file_in_an_openldm_folder_is_one_line(case, sd_parts, tmp_path, capsys):
    folder = tmp_path / "sd_folder"
    shutil.copytree(sd_parts[1], folder)
    bad = folder / "vae.safetensors"
    bad.write_bytes(SAFETENSORS_CASES[case][0](bad.read_bytes()))
    assert_refused(["convert", str(folder), str(tmp_path / "out"), "--to", "diffusers"], bad, capsys,
                   FOLDER_CASES[case])


DIFFUSERS_CASES = {  # component/config.json key -> absurd value, and who must say so
    ("unet", "layers_per_block", 100_000): r"diffusers UNet state dict: its config describes a bigger UNet",
    ("vae", "layers_per_block", 100_000): r"diffusers autoencoder state dict: its config describes a bigger",
    ("text_encoder", "num_hidden_layers", 10**6): r"text_encoder: its config describes a bigger CLIPTextEncoder",
}


@pytest.mark.parametrize("case", sorted(DIFFUSERS_CASES), ids=lambda c: f"{c[0]}-{c[1]}")
def test_an_absurd_diffusers_config_is_one_line(case, sd_parts, tmp_path, capsys):
    component, key, value = case
    folder = tmp_path / "diffusers"
    assert main(["convert", str(sd_parts[0]), str(folder), "--to", "diffusers"]) == 0
    config = folder / component / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), key: value}))
    assert_refused(["convert", str(folder), str(tmp_path / "out"), "--to", "openldm"], folder, capsys,
                   DIFFUSERS_CASES[case])


class Trainer:  # a class inside a pickle: only full unpickling rebuilds it
    pass


def ckpt_bytes(tmp_path: Path, obj) -> bytes:
    torch.save(obj, tmp_path / "tmp.ckpt")
    return (tmp_path / "tmp.ckpt").read_bytes()


CKPT_CASES = {
    "random_bytes": (lambda t: os.urandom(4096), [], r"unreadable: not a PyTorch checkpoint"),
    "random_bytes_unsafe": (lambda t: os.urandom(4096), ["--unsafe-load"], r"unreadable: not a PyTorch checkpoint"),
    "zero_length": (lambda t: b"", [], r"unreadable: it is empty \(0 bytes\)"),
    "zero_length_unsafe": (lambda t: b"", ["--unsafe-load"], r"unreadable: it is empty"),
    "plain_pickle": (lambda t: __import__("pickle").dumps({"a": 1}), ["--unsafe-load"], r"not a PyTorch checkpoint"),
    "truncated_zip": (lambda t: ckpt_bytes(t, {"state_dict": {"a": torch.ones(64)}})[:300], [],
                      r"unreadable: a damaged torch checkpoint"),
    "damaged_pickle": (lambda t: ckpt_bytes(t, {"a": torch.ones(4)}).replace(b"ctorch._utils", b"ctorch.x_utils"),
                       [], r"unreadable|cannot be unpickled|needs full unpickling \(GLOBAL torch.x_utils"),
    "needs_unpickling": (lambda t: ckpt_bytes(t, {"state_dict": {"a": torch.ones(2)}, "trainer": Trainer()}), [],
                         r"needs full unpickling \(GLOBAL [\w.]*Trainer\).*pass --unsafe-load"),
    "not_a_state_dict": (lambda t: ckpt_bytes(t, torch.ones(3)), [], r"holds a Tensor, not a state dict"),
    "no_sd_weights": (lambda t: ckpt_bytes(t, {"state_dict": {"a": torch.ones(2)}, "trainer": Trainer()}),
                      ["--unsafe-load"], r"not a Stable Diffusion single file"),
}


@pytest.mark.parametrize("case", sorted(CKPT_CASES))
def test_a_malformed_ckpt_is_one_line(case, tmp_path, capsys):
    make, flags, match = CKPT_CASES[case]
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(make(tmp_path))
    line = assert_refused(generate(bad, tmp_path / "x.png", "--prompt", "a cat", *flags), bad, capsys, match)
    if "--unsafe-load" in flags:
        assert "pass --unsafe-load" not in line


def test_unsafe_load_loads_what_needs_full_unpickling(tmp_path):
    from openldm.io.components import read_tensors

    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4.0)}, "trainer": Trainer()}, path)
    with pytest.raises(ValueError, match="needs full unpickling"):
        read_tensors(path)
    tensors, _ = read_tensors(path, unsafe_load=True)
    assert torch.equal(tensors["w"], torch.arange(4.0))


def test_the_fuzz_covers_forty_malformed_files():
    assert len(SAFETENSORS_CASES) + len(VAE_CASES) + len(SD_FILE_CASES) + len(CKPT_CASES) >= 40


def test_the_finite_check_is_exact():
    """A fast sum decides most tensors; a non-finite sum of finite values (float16 overflow) is not refused, and
    the exact count names how many values are bad, in every floating dtype."""
    from openldm.io.tensor_files import check_finite

    check_finite(torch.full((1000,), 60000.0).half(), "big", "f")  # the sum overflows; every value is finite
    check_finite(torch.zeros(4, dtype=torch.float8_e4m3fn), "f8", "f")
    check_finite(torch.tensor([1, 2]), "ints", "f")
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e5m2):
        x = torch.zeros(3 * (1 << 22) + 5).to(dtype)  # several chunks
        x[-1], x[1 << 22] = float("nan"), float("-inf")
        with pytest.raises(ValueError, match=r"f: tensor 'w' holds 2 non-finite values \(NaN or inf\)"):
            check_finite(x, "w", "f")


def test_a_directory_or_a_missing_path_is_named(tmp_path, run, capsys):
    bad_run = copy_run(run, tmp_path / "run")
    (bad_run / runs.UNET_EMA_FILE).mkdir()
    with pytest.raises(ValueError, match="is a directory, not a model file"):
        load_model(bad_run / runs.UNET_EMA_FILE)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")


# ---- bounded memory and time -----------------------------------------------------------------------------------

CHILD = """
import resource, sys
import torch, safetensors.torch, openldm.cli, openldm.pipelines.generate, openldm.pipelines.trained_generator
def vm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1])
limit = (vm_kib() + {headroom_mib} * 1024) * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.exit(openldm.cli.main({argv!r}))
"""


@pytest.mark.parametrize("case", ["config_num_res_blocks_100000", "config_channels_1e6", "header_length_2_62",
                                  "tensor_nan"])
def test_refusal_is_bounded_in_memory_and_time(case, run, good_unet, tmp_path):
    """In a fresh process whose address space may grow only 512 MiB past what importing openldm took, with a
    60 s timeout (interpreter start and imports included): exit 2, one line, no traceback."""
    bad_run = copy_run(run, tmp_path / "run")
    bad = bad_run / runs.UNET_EMA_FILE
    bad.write_bytes(SAFETENSORS_CASES[case][0](good_unet))
    root = str(Path(openldm.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    code = CHILD.format(headroom_mib=512, argv=generate(bad_run, tmp_path / "x.png"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, check=False,
                          cwd=root)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_the_memory_limit_is_real(tmp_path):
    """The child's limit does stop a process that allocates past it (so the test above proves something)."""
    root = str(Path(openldm.__file__).resolve().parents[1])
    code = CHILD.replace("sys.exit(openldm.cli.main({argv!r}))", "import torch; torch.ones(2**30)").format(
        headroom_mib=512)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and "memory" in done.stderr.lower(), done.stderr[-2000:]


# ---- good files are untouched -----------------------------------------------------------------------------------

def test_a_good_file_loads_bit_identically_and_generates(run, tmp_path, capsys):
    from safetensors.torch import load_file

    path = run / runs.UNET_EMA_FILE
    stored = load_file(str(path))
    module = load_model(path)
    loaded = module.state_dict()
    assert loaded.keys() == stored.keys()
    assert all(loaded[k].dtype == stored[k].dtype and torch.equal(loaded[k], stored[k]) for k in stored)
    header = read_header(path)
    assert {k: (t.dtype, t.shape) for k, t in header.tensors.items()} == \
        {k: (v.dtype, tuple(v.shape)) for k, v in stored.items()}
    assert header.metadata["openldm.kind"] == "unet"
    assert main(generate(run, tmp_path / "a.png")) == 0
    assert main(generate(run, tmp_path / "b.png")) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_a_good_sd_file_converts_bit_identically(sd_parts, tmp_path):
    from openldm.io.components import read_tensors

    single, _ = sd_parts
    assert main(["convert", str(single), str(tmp_path / "folder"), "--to", "openldm"]) == 0
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "back.safetensors"), "--to", "original"]) == 0
    a, meta_a = read_tensors(single)
    b, meta_b = read_tensors(tmp_path / "back.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a == meta_b



CONDITIONER_CASES = {
    "truncated": (lambda d: d[: len(d) - 100], r"truncated|corrupt"),
    "random_bytes": (lambda d: random.Random(0).randbytes(4096), r"safetensors"),
    "nan": (lambda d: retensor(d, poison(float("nan"))), r"non-finite"),
}


@pytest.mark.parametrize("case", sorted(CONDITIONER_CASES))
def test_a_malformed_conditioner_in_a_run_is_one_line(case, tmp_path, capsys):
    """The bundled model (class label + caption) with its conditioner.safetensors damaged."""
    from openldm.bundled import bundled_dir

    make, match = CONDITIONER_CASES[case]
    model = tmp_path / "model"
    shutil.copytree(bundled_dir(), model)
    bad = model / runs.CONDITIONER_FILE
    bad.write_bytes(make(bad.read_bytes()))
    assert_refused(generate(model, tmp_path / "x.png", "--class-label", "1"), bad, capsys, match)
