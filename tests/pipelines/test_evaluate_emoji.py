"""`openldm evaluate` on an emoji text-to-image run (a tiny one on the fake packages of emoji_testing): per
held-out split a real row and a row per guidance scale, judged by a style judge and a CLIP that is not the model's
own text encoder; the mistakes a user can make are one line and exit code 2."""
import json

import pytest
import torch
from emoji_testing import make_packages

from openldm.cli import main
from openldm.config import from_dict
from openldm.data import build_dataset
from openldm.data.emoji import build_emoji
from openldm.evaluation.emoji import HELD_OUT, EmojiJudges, load_judge_clip, load_style_judge
from openldm.io.native import save_model
from openldm.models.autoencoder import AutoencoderKL, tiny_autoencoder_kl
from openldm.models.contrastive import SmallCLIP, tiny_contrastive_config
from openldm.pipelines.evaluate import EvalSettings, format_table
from openldm.pipelines.evaluate_emoji import evaluate_emoji
from openldm.pipelines.trained import export_run, load_run
from openldm.training.diffusion import DiffusionTrainConfig, train_diffusion

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(the run directory, its conditioning CLIP file, a judge CLIP file, the data root)."""
    tmp = tmp_path_factory.mktemp("emoji_eval")
    (tmp / "packages").mkdir()
    make_packages(tmp / "packages")
    root = build_emoji(tmp / "emoji", packages=tmp / "packages", npm="no-such-npm", progress=False)
    clips = []
    for seed, name in ((0, "own"), (1, "judge")):
        torch.manual_seed(seed)
        clips.append(save_model(SmallCLIP(tiny_contrastive_config((3, 32, 32))), tmp / f"{name}.safetensors"))
    save_model(AutoencoderKL(tiny_autoencoder_kl(in_channels=3, out_channels=3)), tmp / "ae.safetensors")
    cfg = {"data": {"name": "emoji", "options": {"root": str(root), "size": 32}},
           "autoencoder": str(tmp / "ae.safetensors"),
           "unet_preset": "tiny-unet", "unet": {"model_channels": 16, "norm_groups": 4},
           "conditions": [{"kind": "text", "options": {"backend": "clip", "path": str(clips[0])}, "drop_prob": 0.1}],
           "batch_size": 8, "steps": 2, "log_every": 100, "out_dir": str(tmp / "run"), "schedule": {"kind": "linear"}}
    train_diffusion(from_dict(DiffusionTrainConfig, cfg), progress=False)
    return tmp / "run", clips[0], clips[1], root


def test_each_split_has_its_real_row_and_a_row_per_guidance_scale(setup, tmp_path, monkeypatch):
    run, _, judge_clip, root = setup
    monkeypatch.setenv("OPENLDM_CACHE", str(tmp_path / "cache"))
    model = load_run(run)
    judges = EmojiJudges(style=load_style_judge(root=str(root), size=32), clip=load_judge_clip(judge_clip))
    report = evaluate_emoji(model, judges, EvalSettings(num_samples=5, steps=2, guidance_scales=[1.0, 3.0],
                                                        batch_size=3))
    rows = report["rows"]
    assert [(r["split"], r["task"], r["guidance"]) for r in rows] == [
        (s, t, g) for s in HELD_OUT
        for t, g in (("real", None), ("reconstructed", None), ("text", 1.0), ("text", 3.0))]
    for r in rows:
        size = len(build_dataset("emoji", {"root": str(root), "split": r["split"]}))
        assert r["n"] == min(5, size)
        assert 0.0 <= r["style_accuracy"] <= 1.0 and 0.0 <= r["top1"] <= 1.0 and r["fid"] >= 0.0
        assert r["chance"] >= 1 / r["n"]
    # an untrained autoencoder's round trip and an untrained model's samples are further from the real images
    # than other real images are
    assert all(rows[i]["fid"] < min(rows[i + 1]["fid"], rows[i + 2]["fid"]) for i in (0, 4))
    table = format_table(rows)
    assert "style acc." in table and "top-1 retrieval" in table and table.count("heldout_emoji") == 4
    with pytest.raises(ValueError, match="tasks: text"):
        evaluate_emoji(model, judges, EvalSettings(num_samples=5, tasks=["class"]))
    with pytest.raises(ValueError, match="not held out"):
        evaluate_emoji(model, judges, EvalSettings(num_samples=5), splits=("train",))


def test_cli_writes_the_report_and_refuses_the_models_own_encoder(setup, tmp_path, monkeypatch, capsys):
    run, own_clip, judge_clip, _ = setup
    monkeypatch.setenv("OPENLDM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report.json"
    assert main(["evaluate", "--model", str(run), "--clip", str(judge_clip), "--num-samples", "4", "--steps", "2",
                 "--guidance-scale", "2", "--quiet", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["task"] for r in report["rows"]] == ["real", "reconstructed", "text"] * 2
    printed = capsys.readouterr().out
    assert "| heldout_emoji | text | 2.0 | 4 |" in printed, printed
    exported = export_run(run, tmp_path / "exported")  # its encoder is a copy named relative to the run
    for argv, words in ((["--model", str(run)], "pass --clip runs/emoji_clip/clip.safetensors"),
                        (["--model", str(run), "--clip", str(own_clip)], "is the text encoder this model conditions on"),
                        (["--model", str(exported), "--clip", str(exported / "text_encoder.safetensors")],
                         "is the text encoder this model conditions on"),
                        (["--model", str(run), "--clip", str(tmp_path / "none.safetensors")], "does not exist"),
                        (["--clip", str(judge_clip)], "--clip judges emoji models")):
        assert main(["evaluate", *argv, "--num-samples", "4", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
