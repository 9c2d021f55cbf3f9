"""Contrastive training of the small CLIP on captioned Fashion-MNIST: the multi-positive InfoNCE loss, learning
(loss falls, zero-shot beats chance), the retrieval report, resume and the run directory."""
import json

import pytest
import torch
from torch.nn import functional as F

from openldm.config import ConfigError, from_dict
from openldm.data import build_dataset
from openldm.io.native import load_model
from openldm.models.contrastive import SmallCLIP
from openldm.training.clip import (
    CLIPTrainConfig,
    caption_positives,
    multi_positive_infonce,
    retrieval_report,
    train_clip,
)
from openldm.training.common import TrainingDiverged

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(out_dir, **over) -> CLIPTrainConfig:
    data = {
        "data": {"name": "fashion_mnist", "options": {"split": "train", "size": 32, "captions": True, "limit": 512}},
        "eval_data": {"split": "test", "limit": 300},
        "model": {"channels": [8, 16], "stem_stride": 2, "norm_groups": 4, "embed_dim": 32,
                  "text": {"max_position_embeddings": 16, "hidden_size": 32, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "intermediate_size": 64}},
        "optim": {"lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.01},
        "batch_size": 64, "steps": 6, "log_every": 1, "save_every": 3, "eval_pairs": 200, "out_dir": str(out_dir),
    }
    data.update(over)
    return from_dict(CLIPTrainConfig, data)


def test_caption_positives_and_the_loss_reduce_to_clip_without_duplicates():
    distinct, index, positives = caption_positives(["a", "b", "a", "c"])
    assert distinct == ["a", "b", "c"] and index.tolist() == [0, 1, 0, 2]
    assert positives.tolist()[0] == [True, False, True, False] and positives.diagonal().all()
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    loss, _ = multi_positive_infonce(logits, torch.eye(4, dtype=torch.bool))
    labels = torch.arange(4)
    torch.testing.assert_close(loss, (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
    # duplicates: image 0's target is split between texts 0 and 2
    loss_dup, terms = multi_positive_infonce(logits, positives)
    expected = -(logits.log_softmax(1)[0, [0, 2]]).mean()
    row0 = F.cross_entropy(logits[:1], torch.tensor([[0.5, 0, 0.5, 0]]))
    torch.testing.assert_close(row0, expected)
    assert set(terms) == {"loss_i2t", "loss_t2i", "batch_acc"} and torch.isfinite(loss_dup)


def test_training_lowers_the_loss_and_beats_chance(tmp_path):
    cfg = tiny(tmp_path / "run", steps=40, log_every=5, save_every=1000)
    out = train_clip(cfg, progress=False)
    losses = [r["loss"] for r in out["history"]]
    report = out["retrieval"]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f};", {k: v for k, v in report.items() if isinstance(v, float)})
    assert sum(losses[-3:]) / 3 < 0.75 * losses[0]  # the last three logged (single-batch) losses: less noise
    assert report["zero_shot_accuracy"] > 0.25  # chance: 0.1
    assert report["text_to_image_precision"] > 0.2
    run = tmp_path / "run"
    saved = json.loads((run / "retrieval.json").read_text())
    assert saved["step"] == 40 and saved["zero_shot_accuracy"] == report["zero_shot_accuracy"]
    assert isinstance(load_model(run / "clip.safetensors"), SmallCLIP)
    assert {"loss", "loss_i2t", "loss_t2i", "batch_acc", "temperature", "lr", "grad_norm"} <= set(out["history"][-1])


def test_retrieval_report_fields_and_chance_levels(tmp_path):
    torch.manual_seed(0)
    cfg = tiny(tmp_path)
    from openldm.training.clip import build_clip

    dataset = build_dataset("fashion_mnist", {"split": "test", "size": 32, "captions": True, "limit": 64})
    model = build_clip(cfg, (1, 32, 32), dataset)
    report = retrieval_report(model, dataset, num_pairs=32, batch_size=20)
    assert report["num_images"] == 64 and report["num_pairs"] == 32 and report["top_k"] == 10
    for key in ("zero_shot_accuracy", "text_to_image_precision", "tone_accuracy", "width_accuracy",
                "image_to_text_recall_at_1", "image_to_text_recall_at_5", "text_to_image_recall_at_1",
                "text_to_image_recall_at_5"):
        assert 0.0 <= report[key] <= 1.0 and key in report["chance"]
    assert len(report["text_to_image_precision_per_class"]) == 10
    for way in ("image_to_text", "text_to_image"):
        assert report[f"{way}_recall_at_1"] <= report[f"{way}_recall_at_5"]
        assert report["chance"][f"{way}_recall_at_1"] < report["chance"][f"{way}_recall_at_5"] <= 1.0
    no_captions = build_dataset("fashion_mnist", {"split": "test", "size": 32, "limit": 8})
    with pytest.raises(ValueError, match="caption"):
        retrieval_report(model, no_captions)


def test_resume_follows_the_uninterrupted_run(tmp_path):
    full = train_clip(tiny(tmp_path / "full"), progress=False)
    first = train_clip(tiny(tmp_path / "split", steps=3), progress=False)
    assert first["step"] == 3
    rest = train_clip(tiny(tmp_path / "split"), resume=True, progress=False)
    assert rest["step"] == 6
    assert [r["loss"] for r in first["history"] + rest["history"]] == [r["loss"] for r in full["history"]]
    a, b = load_model(tmp_path / "full" / "clip.safetensors"), load_model(tmp_path / "split" / "clip.safetensors")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="vocabulary"):
        tiny(tmp_path, vocabulary="words")
    with pytest.raises(ConfigError, match="batch_size"):
        tiny(tmp_path, batch_size=1)
    no_captions = {"name": "fashion_mnist", "options": {"split": "train", "size": 32, "limit": 64}}
    with pytest.raises(ValueError, match="caption"):
        train_clip(tiny(tmp_path / "x", data=no_captions), progress=False)
    with pytest.raises(TrainingDiverged, match="step 2"):
        train_clip(tiny(tmp_path / "nan"), progress=False, fail_at_step=1)


def test_trains_on_any_captioned_set_with_the_generic_report(tmp_path):
    """Emoji (the fake packages of emoji_testing): the vocabulary comes from the set's caption_texts(), the report
    holds the two recalls and no Fashion-MNIST probes, and the summary line reads it."""
    from emoji_testing import make_packages

    from openldm.data.emoji import build_emoji
    from openldm.training.clip import summary

    (tmp_path / "packages").mkdir()
    make_packages(tmp_path / "packages")
    root = build_emoji(tmp_path / "emoji", packages=tmp_path / "packages", npm="no-such-npm", progress=False)
    data = {"name": "emoji", "options": {"root": str(root), "size": 32, "skin_tone_fraction": 1.0}}
    out = train_clip(tiny(tmp_path / "run", data=data, eval_data={"split": "heldout_emoji", "empty_caption": 0.0},
                          batch_size=32), progress=False)
    report = out["retrieval"]
    assert report["num_images"] == len(build_dataset("emoji", {**data["options"], "split": "heldout_emoji"}))
    assert "zero_shot_accuracy" not in report and set(report["chance"]) == {
        f"{way}_recall_at_{r}" for way in ("image_to_text", "text_to_image") for r in (1, 5)}
    assert "text->image R@1" in summary(report) and "zero-shot" not in summary(report)
    model = load_model(tmp_path / "run" / "clip.safetensors")
    assert len(model.config.vocabulary) < 200  # the captions' tokens, not CLIP's 49,408
