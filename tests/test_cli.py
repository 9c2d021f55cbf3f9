import subprocess
import sys

import pytest

from openldm.cli import build_parser, main


def test_help_lists_every_command(capsys):
    parser = build_parser()
    text = parser.format_help()
    for name in ("models", "samplers", "demo", "toy", "generate", "evaluate"):
        assert name in text


def test_every_flag_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"openldm {name} {action.option_strings} has no help text"


def test_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "openldm.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "models" in out.stdout


def test_user_error_is_one_line_exit_2(capsys):
    assert main(["models", "--kind", "no_such_kind"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_kind" in err[0]


BAD_GENERATE = [  # (argv after "generate", a word the one-line error must name)
    (["--out", "{tmp}"], "is a directory"),
    (["--out", "{tmp}/missing/x.png"], "does not exist"),
    (["--out", "{tmp}/x.gif"], ".png"),
    (["--model", "{tmp}/nothing_here"], "nothing_here"),
    (["--from-png", "{tmp}/notes.txt"], "not a readable image"),
    (["--init-image", "{tmp}/notes.txt", "--prompt", "a bag"], "not a readable image"),
    (["--steps", "0"], "steps=0"),
    (["--steps", "5000"], "steps=5000"),
    (["--guidance-scale", "nan"], "guidance_scale=nan"),
    (["--guidance-scale", "-2"], "guidance_scale=-2"),
    (["--height", "0"], "height=0"),
    (["--width", "30"], "width=30"),
    (["--seed", "-5"], "seed=-5"),
    (["--seed", str(2**70)], "seed="),
    (["--sampler", "nope"], "nope"),
    (["--sampler", "ddim", "--karras"], "Karras"),
    (["--class-label", "42"], "42"),
    (["--class-label", "hat"], "hat"),
    (["--negative-prompt", "blurry"], "negative prompt"),
    (["--num-images", "0"], "num_images=0"),
    (["--strength", "0.5"], "strength=0.5"),
    (["--low-res", "{tmp}/img.png"], "low-res"),
    (["--input", "brightness=0.5"], "brightness"),
    (["--input", "nonsense"], "NAME=VALUE"),
    (["--mask", "{tmp}/img.png"], "init image"),
    (["--device", "cuda"], "cuda"),
]


@pytest.mark.parametrize("argv, named", BAD_GENERATE, ids=[" ".join(a) for a, _ in BAD_GENERATE])
def test_bad_generate_command_lines_are_one_line_and_exit_2(argv, named, tmp_path, capsys):
    if "--device" in argv:
        import torch
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA: --device cuda is valid here")
    (tmp_path / "notes.txt").write_text("not an image")
    from PIL import Image

    Image.new("L", (32, 32)).save(tmp_path / "img.png")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out.png")]
    assert main(["generate", *argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0] and named in err[0], err


def test_config_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert main(["train", "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not valid YAML" in err[0] and "is a directory" in err[1]


def test_dtype_auto_picks_what_the_cpu_computes_and_says_so(tmp_path, capsys):
    import re

    import numpy as np
    from PIL import Image

    flags = set(re.findall(r"\w+", open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0]))
    expected = "bfloat16" if flags & {"amx_bf16", "avx512_bf16"} else "float32"
    common = ["generate", "--class-label", "1", "--steps", "2", "--seed", "3"]
    assert main([*common, "--dtype", "auto", "--out", str(tmp_path / "auto.png")]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("--dtype auto")]
    assert said and said[0].startswith(f"--dtype auto: {expected} (")
    assert main([*common, "--dtype", expected, "--out", str(tmp_path / "named.png")]) == 0
    auto, named = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("auto", "named"))
    assert np.array_equal(auto, named)


def test_torchrun_shares_a_prompts_file_and_writes_every_image_once(tmp_path, capsys, one_thread):
    """2 processes split 5 prompts (rank 0: 0, 2, 4; rank 1: 1, 3) and write the images one process writes (one
    thread each, as torchrun sets them, so the sums are the same)."""
    import numpy as np
    from dist_testing import torchrun
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dress\n\na bag\nan ankle boot\na shirt\na sneaker\n", encoding="utf-8")
    common = ["generate", "--prompts-file", str(prompts), "--steps", "2", "--quiet"]
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    assert main([*common, "--out", str(tmp_path / "one" / "x.png")]) == 0
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one == [f"x-{i}.png" for i in range(5)]
    done = torchrun("-m", "openldm.cli", *common, "--out", str(tmp_path / "two" / "x.png"), nproc=2, timeout_s=180)
    assert done.returncode == 0, done.stdout[-3000:]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == one
    assert sum(line.endswith(".png") for line in done.stdout.splitlines()) == 5  # each written once
    for name in one:
        a, b = (np.asarray(Image.open(tmp_path / d / name)) for d in ("one", "two"))
        assert np.array_equal(a, b), name
    assert "Seed: 3" in Image.open(tmp_path / "one" / "x-3.png").text["parameters"]  # prompt i: seed 0 + i
    assert main([*common, "--prompt", "x", "--out", str(tmp_path / "y.png")]) == 2
    assert "--prompts-file gives the prompts" in capsys.readouterr().err
