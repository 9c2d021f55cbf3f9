"""`openldm evaluate` end to end on a tiny Fashion-MNIST run: every task a model's conditions allow is measured,
the real row is the ceiling, a perfect 'generator' (real images) scores like the real row."""
import json

import pytest
import torch

from openldm.config import from_dict
from openldm.evaluation.classifier import train_classifier
from openldm.io.native import save_model
from openldm.pipelines.evaluate import EvalSettings, HeldOutData, _distribution_row, evaluate_model, format_table
from openldm.pipelines.trained import load_run
from openldm.training.diffusion import DiffusionTrainConfig, train_diffusion

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, _ = train_classifier(limit=2000, epochs=1, progress=False)
    torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("clf") / "clf.safetensors"
    save_model(model, path)
    return model.eval(), path


def _run(out_dir, conditions, **over):
    cfg = {"data": {"name": "fashion_mnist", "options": {"size": 32, "limit": 64, "silhouette_threshold": 0.1}},
           "unet_preset": "tiny-unet", "unet": {"model_channels": 16, "norm_groups": 4},
           "conditions": conditions, "batch_size": 8, "steps": 2, "log_every": 100, "out_dir": str(out_dir),
           "schedule": {"kind": "linear"}, **over}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train_diffusion(from_dict(DiffusionTrainConfig, cfg), progress=False)
    torch.set_num_threads(threads)
    return load_run(out_dir)


def test_class_and_mask_tasks_are_measured_beside_the_real_row(classifier, tmp_path):
    model = _run(tmp_path / "run", [{"kind": "class_label", "options": {"num_classes": 10, "dim": 8}},
                                    {"kind": "segmentation", "options": {"num_classes": 2, "key": "mask"}}])
    settings = EvalSettings(num_samples=20, steps=2, guidance_scales=[1.0, 2.0], batch_size=10)
    report = evaluate_model(model, classifier[0], settings)
    rows = {(r["task"], r["guidance"]): r for r in report["rows"]}
    assert set(rows) == {("real", None), ("class", 1.0), ("class", 2.0), ("mask", 1.0), ("mask", 2.0)}
    real = rows[("real", None)]
    assert real["accuracy"] > 0.5 and real["fid"] < rows[("class", 1.0)]["fid"]  # an untrained model is far off
    assert 0.0 <= rows[("mask", 1.0)]["iou"] <= 1.0
    table = format_table(report["rows"])
    assert "| real |" in table and "IoU" in table and "class acc." in table
    json.dumps(report)  # serialisable as the CLI writes it


def test_an_unconditional_model_is_scored_on_all_n_samples(classifier, tmp_path, monkeypatch):
    import openldm.pipelines.evaluate as evaluate

    model = _run(tmp_path / "uncond", [])
    scored = []
    row = evaluate._distribution_row
    monkeypatch.setattr(evaluate, "_distribution_row", lambda c, images, *a: scored.append(len(images)) or row(c, images, *a))
    report = evaluate_model(model, classifier[0], EvalSettings(num_samples=12, steps=2, batch_size=5))
    assert [r["task"] for r in report["rows"]] == ["real", "unconditional"]
    assert scored == [12, 12]  # the real row and 12 generated images (batches of 5, 5, 2), not one per batch
    with pytest.raises(RuntimeError, match="asked for 5 images, the sampler gave 1"):
        evaluate.in_batches(10, 5, lambda p: torch.zeros(1, 1, 28, 28))


def test_super_resolution_and_inpainting_report_psnr_beside_their_baselines(classifier, tmp_path):
    model = _run(tmp_path / "sr", [{"kind": "low_res", "options": {"channels": 1, "factor": 4}}],
                 unet={"model_channels": 16, "norm_groups": 4, "in_channels": 1, "out_channels": 1})
    report = evaluate_model(model, classifier[0], EvalSettings(num_samples=8, steps=2, guidance_scales=[2.0]))
    sr = report["rows"][1]
    assert sr["task"] == "super_resolution" and sr["guidance"] == 1.0 and sr["factor"] == 4
    assert sr["baseline_psnr"] > 10 and "psnr" in sr and "ssim" in sr


def test_real_images_as_the_generator_score_like_the_real_row(classifier, tmp_path):
    model = _run(tmp_path / "run2", [{"kind": "class_label", "options": {"num_classes": 10, "dim": 8}}])
    data = HeldOutData.load(model)
    from openldm.evaluation.classifier import classify

    _, reference = classify(classifier[0], data.originals[5000:])
    same = _distribution_row(classifier[0], data.originals[:200], reference, data.labels[:200])
    other = _distribution_row(classifier[0], data.originals[200:400], reference, data.labels[200:400])
    noise = _distribution_row(classifier[0], torch.rand(200, 1, 28, 28) * 2 - 1, reference, None)
    assert abs(same["fid"] - other["fid"]) < 0.5 * same["fid"] + 1  # two real samples of one size agree
    assert noise["fid"] > 10 * same["fid"]


def test_cli_evaluate_writes_a_table_and_json(classifier, tmp_path, capsys):
    from openldm.cli import main

    _run(tmp_path / "run3", [{"kind": "class_label", "options": {"num_classes": 10, "dim": 8}}])
    out = tmp_path / "report.json"
    assert main(["evaluate", "--model", str(tmp_path / "run3"), "--num-samples", "10", "--steps", "2",
                 "--guidance-scale", "2", "--classifier", str(classifier[1]), "--out", str(out), "--quiet"]) == 0
    assert "| class | 2.0 |" in capsys.readouterr().out
    assert json.loads(out.read_text())["rows"][1]["task"] == "class"
    assert main(["evaluate", "--model", str(tmp_path / "run3"), "--tasks", "poetry", "--quiet"]) == 2
