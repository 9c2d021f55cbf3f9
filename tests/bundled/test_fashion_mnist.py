"""The bundled Fashion-MNIST model: it ships in the package, loads from there alone, and draws what it is asked for
(judged by a classifier trained here on real data, not by the model itself)."""
import os

import pytest
import torch
from PIL import Image

from openldm.bundled import BUNDLED, bundled_dir
from openldm.evaluation.classifier import classify, train_classifier
from openldm.pipelines.trained import load_run, sample_trained

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return load_run(bundled_dir())


@pytest.fixture(scope="module")
def judge():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    classifier, accuracy = train_classifier(limit=6000, epochs=1, progress=False)
    torch.set_num_threads(threads)
    assert accuracy > 0.7
    return classifier.eval()


def test_the_bundle_is_small_complete_and_self_describing(model):
    folder = bundled_dir()
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 20 * 2**20, f"the bundled model is {size / 2**20:.1f} MiB"
    kinds = sorted(type(c).__name__ for c in model.conditioner.conditioners.values())
    assert kinds == ["ClassLabelConditioner", "TextConditioner"]
    assert model.autoencoder is not None and model.crop_size == (28, 28) and model.class_names[9] == "ankle boot"
    assert BUNDLED == ("fashion_mnist", "emoji")
    with pytest.raises(ValueError, match="no bundled model"):
        bundled_dir("cifar")


@pytest.mark.parametrize("condition", ["class_label", "prompt"])
def test_samples_are_classified_as_the_class_asked_for(model, judge, condition):
    from openldm.data.captions import garment_phrase

    classes = [1, 5, 8, 9]  # trousers, sandal, bag, ankle boot: shapes a weak classifier tells apart
    asked = {"class_label": classes, "prompt": [garment_phrase(c, []) for c in classes]}[condition]
    images = sample_trained(model, **{condition: asked}, num_images=5, steps=20, guidance_scale=3.0, seed=3)
    assert images.shape == (20, 1, 28, 28)
    predicted, _ = classify(judge, images)
    wanted = torch.tensor(classes).repeat_interleave(5)
    assert (predicted == wanted).float().mean() >= 0.8


def test_generate_works_with_no_flags_beyond_the_prompt_or_label(tmp_path, monkeypatch):
    from openldm.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--prompt", "a pair of trousers", "--quiet"]) == 0
    assert Image.open(tmp_path / "out.png").size == (28, 28)
    assert main(["generate", "--class-label", "9", "--quiet", "--out", "boot.png"]) == 0
    assert os.path.getsize(tmp_path / "boot.png") > 0
    assert main(["generate", "--class-label", "12", "--quiet"]) == 2  # out of range: a one-line error
