"""Bad command lines, tried as a new user would: every one exits 2 with one stderr line that names the bad value,
never a traceback (issue 14). Most run in-process through ``openldm.cli.main``; a handful as real processes."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openldm.bundled import bundled_dir
from openldm.cli import build_parser, main
from openldm.pipelines import read_png_params
from openldm.pipelines.generate import GenerationRequest, RequestError
from openldm.pipelines.sources import load_generator

BUNDLED = bundled_dir()
NO_CUDA = not torch.cuda.is_available()

# (command line, a piece of text the one error line must contain). {tmp}: a folder holding notes.txt (not an
# image), img.png (an image without parameters), short.png (its pixels cut short), bomb.png (3.6 gigapixels),
# bad.yaml (a flow sequence opened on line 2 and never closed), indent.yaml (a mapping where none may be, line 2),
# binary.yaml (not text) and ok.yaml (steps: 2); {bundled}: the bundled model's folder.
BAD = [
    # generate: inputs and outputs, checked before sampling
    ("generate --from-png {tmp}/notes.txt", "not a readable image"),
    ("generate --from-png {tmp}/img.png", "no 'parameters'"),
    ("generate --from-png {tmp}/nothing.png", "nothing.png"),
    ("generate --init-image {tmp}/notes.txt --class-label 1", "notes.txt"),
    ("generate --init-image {tmp}/short.png --strength 0.5", "'{tmp}/short.png' is not a readable image"),
    ("generate --from-png {tmp}/short.png", "'{tmp}/short.png' is not a readable image"),
    ("generate --init-image {tmp}/bomb.png --strength 0.5", "'{tmp}/bomb.png' is too large to read"),
    ("generate --mask {tmp}/notes.txt", "notes.txt"),
    ("generate --low-res {tmp}/notes.txt", "notes.txt"),
    ("generate --out {tmp}", "is a directory"),
    ("generate --out {tmp}/missing/x.png", "'{tmp}/missing' does not exist"),
    ("generate --out {tmp}/x.jpg", "must end in .png"),
    ("generate --model {tmp}/nothing --out {tmp}/missing/x.png --clip-skip 9 --height 0", "'{tmp}/nothing'"),
    ("generate --vae {tmp}/notes.txt", "'{tmp}/notes.txt' is truncated or not a safetensors file"),
    ("generate --vae {tmp}", "'{tmp}' is a directory"),
    ("generate --vae {bundled}/unet_ema.safetensors", "not an autoencoder"),
    ("generate --vae {tmp}/nothing.safetensors", "nothing.safetensors"),
    # generate: values the model cannot take
    ("generate --height 100000 --width 100000", "100000x100000"),
    ("generate --num-images 100000000", "100000000 image(s)"),
    ("generate --width 67108864", "67108864x32"),
    ("generate --seed 18446744073709551616", "seed=18446744073709551616"),
    ("generate --seed -1", "seed=-1"),
    ("generate --guidance-scale inf", "guidance_scale=inf"),
    ("generate --guidance-scale -0.5", "guidance_scale=-0.5"),
    ("generate --guidance-rescale 2", "guidance_rescale=2"),
    ("generate --height 0", "height=0"),
    ("generate --height -16", "height=-16"),
    ("generate --steps -1", "steps=-1"),
    ("generate --steps x", "'x'"),
    ("generate --clip-skip 2", "clip_skip=2"),
    ("generate --chunked", "chunked"),
    ("generate --vae-tiling", "vae_tiling"),
    ("generate --hires-scale 2", "has no hires fix"),
    ("generate --hires-steps 3", "give hires_scale too"),
    ("generate --style ink", "--style needs --styles-file"),
    ("generate --styles-file {tmp}/nothing.csv --style ink", "styles file '{tmp}/nothing.csv' does not exist"),
    ("generate --styles-file {tmp}/notes.txt --style ink", "has no 'name' column"),
    ("serve --styles-file {tmp}/nothing.csv", "styles file '{tmp}/nothing.csv' does not exist"),
    ("generate --class-label -1", "-1"),
    ("generate --class-label 'fur hat'", "fur hat"),
    ("generate --strength 1.5 --init-image {tmp}/img.png", "strength=1.5"),
    ("generate --input =3", "'=3'"),
    ("generate --dtype float64", "float64"),
    ("generate --device tpu", "tpu"),
    ("generate --bogus-flag", "--bogus-flag"),
    ("generate steps=40", "steps=40"),
    # sample
    ("sample", "--model"),
    ("sample --model {tmp}/nothing --steps 0", "'{tmp}/nothing'"),
    ("sample --model fashion_mnist --out {tmp}", "is a directory"),
    ("sample --model fashion_mnist --steps 0", "steps=0"),
    ("sample --model fashion_mnist --prompt 'a bag' --num-images 0", "num_images=0"),
    # serve (refused before the server starts)
    ("serve --port 70000", "port 70000 must be in 0..65535"),
    ("serve --port http", "'http'"),
    ("serve --max-batch 0", "--max-batch"),
    ("serve --max-pixels -5", "--max-pixels"),
    ("serve --model {tmp}/nothing", "'{tmp}/nothing'"),
    ("serve --api-auth nocolon", "USER:PASS"),
    ("serve --dtype float64", "float64"),
    ("serve --vae-dir {tmp}/nothing", "--vae-dir '{tmp}/nothing' is not a folder"),
    ("serve --vae {tmp}/nothing.safetensors", "--vae '{tmp}/nothing.safetensors' does not exist"),
    ("serve --preview-vae {tmp}/nothing.pth", "--preview-vae '{tmp}/nothing.pth' does not exist"),
    # evaluate (refused before a classifier is trained or an image drawn)
    ("evaluate --num-samples 0", "num_samples=0"),
    ("evaluate --tasks bogus", "bogus"),
    ("evaluate --guidance-scale 1 nan", "nan"),
    ("evaluate --out {tmp}/missing/report.json", "'{tmp}/missing' does not exist"),
    ("evaluate --model {tmp}/nothing --out {tmp}/missing/r.json", "model '{tmp}/nothing' does not exist"),
    ("evaluate --steps 0", "--steps"),
    ("evaluate --seed -2", "seed=-2"),
    ("evaluate --sampler nope", "unknown sampler 'nope'"),
    # train: configs and overrides
    ("train --config {tmp}/bad.yaml", "'{tmp}/bad.yaml' is not valid YAML at line 3, column 1: expected ',' or ']'"),
    ("train --config {tmp}/indent.yaml", "'{tmp}/indent.yaml' is not valid YAML at line 2, column 6"),
    ("train --config {tmp}/binary.yaml", "'{tmp}/binary.yaml' is not UTF-8"),
    ("train --config {tmp}", "is a directory"),
    ("train --config {tmp}/none.yaml", "'{tmp}/none.yaml' does not exist"),
    ("train steps=-1", "steps=-1"),
    ("train --config {tmp}/ok.yaml save_every=0", "save_every=0"),
    ("train nonsense", "'nonsense'"),
    ("train bogus_key=1", "bogus_key"),
    ("train optim.lr=-1", "lr must be positive"),
    ("train batch_size=0", "batch_size=0"),
    ("train steps=2 --config {tmp} out_dir={tmp}/run", "is a directory"),
    ("train --bogus", "--bogus"),
    ("train device=gpu", "'gpu'"),
    ("train-autoencoder steps=-1", "steps (-1)"),
    ("train-autoencoder --config {tmp}/bad.yaml", "flow sequence at line 2"),
    ("train-autoencoder --config {tmp}/ok.yaml --resume out_dir={tmp}/nothing_to_resume", "nothing_to_resume"),
    ("train-clip steps=-1", "steps (-1)"),
    ("train-clip --config {tmp}", "is a directory"),
    ("train-embedding nope=1", "nope"),
    ("train-embedding --config {tmp}", "is a directory"),
    # data
    ("data nope", "'nope'"),
    ("data emoji --packages {tmp}/notes.txt --root {tmp}/emoji", "notes.txt' is not a folder"),
    # convert
    ("convert {tmp}/nothing {tmp}/dst --to diffusers", "'{tmp}/nothing'"),
    ("convert {tmp}/notes.txt {tmp}/dst --to diffusers", "notes.txt"),
    ("convert {tmp}/a {tmp}/b --to onnx", "'onnx'"),
    ("convert {tmp}/a --to original", "dst"),
    # the listing commands, demo and toy
    ("models --kind nope", "'nope'"),
    ("models extra", "extra"),
    ("samplers --bogus", "--bogus"),
    ("demo --steps 0", "--steps"),
    ("demo --seed -3", "seed=-3"),
    ("demo --guidance-scale -1", "-1"),
    ("demo --update-bundle", "--retrain"),
    ("toy --samples 0", "--samples"),
    ("toy --samples 100000000000", "100000000000 must be in 1..10,000,000"),
    ("toy --steps 10 0", "--steps"),
    ("toy --seed 18446744073709551616", "seed=18446744073709551616"),
    ("nosuchcommand", "'nosuchcommand'"),
]
SD_BAD = [  # on a tiny random-weight Stable Diffusion folder, {sd}
    ("generate --model {sd} --prompt 'a cat' --class-label 3", "is not class-conditional"),
    ("generate --model {sd} --prompt 'a cat' --clip-skip 3", "clip_skip=3 must be in 1..2"),
    ("generate --model {sd}", "--prompt is required"),
    ("generate --model {sd} --prompt 'a cat' --vae {tmp}/notes.txt", "a VAE file must end in"),
    ("generate --model {sd} --prompt 'a cat' --vae {tmp}/nothing.safetensors", "nothing.safetensors' does not exist"),
    ("generate --model {sd} --prompt 'a cat' --vae {tmp}", "has no config.json"),
    ("generate --model {sd} --prompt 'a cat' --vae {bundled}/unet_ema.safetensors", "holds a UNet, not a KL"),
    ("generate --model {sd} --prompt 'a cat' --height 31", "height=31"),
    ("generate --model {sd} --prompt 'a cat' --subseed-strength 0.5", "needs a subseed"),
    ("generate --model {sd} --prompt 'a cat' --subseed 3 --subseed-strength 2", "subseed_strength=2.0 must be in"),
    ("generate --model {sd} --prompt 'a cat' --seed-resize-from 512", "'512' is not WIDTHxHEIGHT"),
    ("generate --model {sd} --prompt 'a cat' --subseed -4 --subseed-strength 0.5", "seed=-4 must be"),
    ("generate --model {sd} --prompt 'a cat' --guidance-scale nan", "guidance_scale=nan"),
]
NEEDS_NO_CUDA = [  # valid where CUDA is
    ("generate --device cuda", "cuda"),
    ("serve --device cuda", "cuda"),
    ("train --config {tmp}/ok.yaml device=cuda out_dir={tmp}/run", "cuda"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "notes.txt").write_text("not an image")
    Image.new("L", (32, 32)).save(tmp / "img.png")
    (tmp / "bad.yaml").write_text("steps: 2\nsave_every: [1, 2\n")
    _write_png(tmp / "short.png", 32, b"\x00" * 10)  # valid checksums, too few pixels
    _write_png(tmp / "bomb.png", 60000, b"\x00" * 1000)  # claims 3.6 gigapixels
    (tmp / "indent.yaml").write_text("steps: 2\n  bad: 3\n")
    (tmp / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    (tmp / "ok.yaml").write_text("steps: 2\n")
    return tmp


def _write_png(path: Path, size: int, pixels: bytes) -> None:
    """A greyscale PNG whose header says ``size`` x ``size`` and whose one IDAT chunk holds ``pixels``."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixels))
                     + chunk(b"IEND", b""))


def _argv(line: str, tmp: Path) -> list[str]:
    import shlex

    argv = shlex.split(line.replace("{tmp}", str(tmp)).replace("{bundled}", str(BUNDLED)))
    if argv[0] in ("generate", "sample", "demo", "evaluate") and "--quiet" not in argv:
        argv.append("--quiet")
    if argv[0] in ("generate", "sample", "demo") and "--out" not in argv:
        argv += ["--out", str(tmp / "out.png")]
    if argv[0].startswith("train") and not any(a.startswith("out_dir=") for a in argv):
        argv += ["--quiet", f"out_dir={tmp}/run"]
    return argv


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    from sd_testing import tiny_pipeline

    folder, _ = tiny_pipeline(tmp_path_factory.mktemp("sd"))
    return folder


_LOADED: dict = {}


def _no_work(monkeypatch) -> None:
    """Sampling, training, evaluating and serving raise: a bad command line must be refused before any of them.
    The bundled model, loaded as the CLI loads it, is loaded once for the table (loading is tested elsewhere)."""
    import uvicorn

    from openldm.pipelines import sources

    real = sources.load_generator

    def load_once(source=None, **options):
        if source not in (None, "fashion_mnist") or options.get("vae") is not None:
            return real(source, **options)
        key = (source, *sorted(options.items()))
        if key not in _LOADED:
            _LOADED[key] = real(source, **options)
        return _LOADED[key]

    monkeypatch.setattr(sources, "load_generator", load_once)

    import openldm.evaluation.classifier
    import openldm.pipelines.demo
    import openldm.pipelines.sd_generator
    import openldm.pipelines.trained_generator
    import openldm.training.clip
    import openldm.training.diffusion

    def started(*args, **kwargs):
        raise AssertionError("work started: the bad command line was accepted")

    for module, name in ((uvicorn, "run"), (openldm.pipelines.trained_generator, "sample_trained"),
                         (openldm.pipelines.sd_generator, "text_to_image"), (openldm.pipelines.demo, "demo_grids"),
                         (openldm.training.diffusion, "train_diffusion"), (openldm.training.clip, "train_clip"),
                         (openldm.evaluation.classifier, "load_classifier")):
        monkeypatch.setattr(module, name, started)


@pytest.mark.parametrize("line, named", BAD + (NEEDS_NO_CUDA if NO_CUDA else []),
                         ids=[line for line, _ in BAD + (NEEDS_NO_CUDA if NO_CUDA else [])])
def test_a_bad_command_line_is_one_line_naming_it_and_exit_2(line, named, files, capsys, monkeypatch):
    _check_refused(_argv(line, files), named.replace("{tmp}", str(files)), files, capsys, monkeypatch)


@pytest.mark.parametrize("line, named", SD_BAD, ids=[line for line, _ in SD_BAD])
def test_a_bad_command_line_for_stable_diffusion_weights_is_one_line_and_exit_2(line, named, files, sd, capsys,
                                                                                 monkeypatch):
    _check_refused(_argv(line.replace("{sd}", str(sd)), files), named, files, capsys, monkeypatch)


def _check_refused(argv: list[str], named: str, files: Path, capsys, monkeypatch) -> None:
    _no_work(monkeypatch)
    monkeypatch.chdir(files)  # nothing the commands write lands in the checkout
    line = " ".join(argv)
    assert main(argv) == 2, line
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, err
    command = "" if argv[0] == "nosuchcommand" else argv[0]
    assert err[0].startswith(f"openldm {command}".rstrip() + ": error: "), err
    assert "Traceback" not in captured.err and named in err[0], err
    assert not (files / "out.png").exists()


def test_the_table_covers_every_command_and_fifty_lines():
    commands = {line.split()[0] for line, _ in BAD}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) <= commands and len(BAD) >= 50


def test_bad_command_lines_in_a_real_process_are_one_line_without_traceback(files):
    lines = ["generate --height 0", "train --config {tmp}/bad.yaml", "serve --port 70000",
             "convert {tmp}/nothing {tmp}/dst --to diffusers", "generate --from-png {tmp}/notes.txt"]
    procs = [subprocess.Popen([sys.executable, "-m", "openldm.cli", *_argv(line, files)], cwd=Path(__file__).parents[1],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for line in lines]
    for line, proc in zip(lines, procs):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (line, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (line, err)


def test_help_shows_every_default():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.dest == "help" or action.required:
                continue
            text = formatter._expand_help(action)
            assert "default" in text, f"openldm {name} {action.option_strings or action.dest}: {text!r}"
        help_text = parser.format_help()
        assert "(default: " in help_text or name in ("models", "samplers"), name
    generate = sub.choices["generate"].format_help()
    assert "(default: 0)" in generate and "(default: out.png)" in generate and "(default: off)" in generate


def test_from_png_regenerates_a_bundled_image_pixel_for_pixel_however_the_model_was_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "boot.png"
    assert main(["generate", "--model", str(BUNDLED), "--class-label", "ankle boot", "--prompt", "a dark ankle boot",
                 "--steps", "2", "--num-images", "2", "--seed", "11", "--out", str(out), "--quiet"]) == 0
    made = tmp_path / "boot-1.png"
    assert read_png_params(made).model == "fashion_mnist"  # portable: names the bundle, not this checkout's path
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(made), "--out", str(again), "--quiet"]) == 0
    first, second = np.asarray(Image.open(made)), np.asarray(Image.open(again))
    assert first.shape == (28, 28) and np.array_equal(first, second)
    other = np.asarray(Image.open(tmp_path / "boot-0.png"))
    assert not np.array_equal(other, first)  # a different image of the batch: the batch index was honoured


def test_a_prompt_and_a_class_label_together_condition_the_bundled_model_on_both():
    gen = load_generator(None)
    base = {"steps": 2, "seed": 3, "guidance_scale": 2.0}
    both = gen.generate(GenerationRequest(class_label=9, prompt="a dark ankle boot", **base)).images[0]
    label = gen.generate(GenerationRequest(class_label=9, **base)).images[0]
    prompt = gen.generate(GenerationRequest(prompt="a dark ankle boot", **base)).images[0]
    arrays = [np.asarray(im, dtype=np.int16) for im in (both, label, prompt)]
    assert not np.array_equal(arrays[0], arrays[1]) and not np.array_equal(arrays[0], arrays[2])


def test_memory_estimate_refuses_what_cannot_fit_and_passes_what_can(monkeypatch):
    from openldm.pipelines import generate

    caps = load_generator(None).capabilities
    assert 0 < caps.sample_bytes_per_pixel and 0 < caps.decode_bytes_per_pixel
    monkeypatch.setattr(generate, "free_memory", lambda device: 2**30)  # a 1 GiB machine
    GenerationRequest(width=512, height=512, num_images=2).resolve(caps)  # about 200 MiB at least: accepted
    with pytest.raises(RequestError) as info:
        GenerationRequest(width=4096, height=4096, num_images=2).resolve(caps)
    assert info.value.field == "num_images" and "4096x4096" in str(info.value) and "1.0 GiB free" in str(info.value)
    with pytest.raises(RequestError) as info:  # no size given: the init image's
        GenerationRequest(init_image=Image.new("L", (8192, 4096)), strength=0.5).resolve(caps)
    assert info.value.field == "init_image" and "8192x4096" in str(info.value)
    assert generate.free_memory("cpu") > 0


def test_training_overrides_may_come_anywhere_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text("steps: 2\nbatch_size: 4\nlog_every: 1\n")
    run = tmp_path / "run"
    assert main(["train", f"out_dir={run}", "--config", str(config), "--quiet"]) == 0
    assert main(["train", "--config", str(config), "steps=3", "--resume", f"out_dir={run}", "--quiet"]) == 0
    steps = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 3


def test_flags_given_beside_from_png_replace_the_stored_values(tmp_path):
    made = tmp_path / "made.png"
    assert main(["generate", "--class-label", "3", "--seed", "5", "--steps", "2", "--out", str(made), "--quiet"]) == 0
    again = tmp_path / "again.png"  # --seed 0 is the flag's default, and still replaces the stored seed 5
    assert main(["generate", "--from-png", str(made), "--steps", "3", "--seed", "0", "--out", str(again),
                 "--quiet"]) == 0
    params = read_png_params(again)
    assert (params.steps, params.seed, params.class_label) == (3, 0, "3")
    direct = tmp_path / "direct.png"
    assert main(["generate", "--class-label", "3", "--seed", "0", "--steps", "3", "--out", str(direct), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(direct)))
    assert not np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(made)))
