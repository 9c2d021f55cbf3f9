import pytest
import torch

import openldm.evaluation.classifier as classifier_module
from openldm.evaluation.classifier import (
    ACCURACY_KEY,
    ClassifierConfig,
    ImageClassifier,
    _augment,
    classifier_accuracy,
    classify,
    default_classifier_path,
    load_classifier,
    train_classifier,
)
from openldm.io.native import load_model, read_metadata, save_model
from openldm.registry import MODELS

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> ImageClassifier:
    torch.manual_seed(seed)
    return ImageClassifier(ClassifierConfig()).eval()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_shapes_and_features_feed_the_head():
    model = _model()
    x = _images(5)
    logits, features = model(x), model.features(x)
    assert logits.shape == (5, 10) and features.shape == (5, 128)
    assert (features >= 0).all()  # ReLU activations
    torch.testing.assert_close(model.head(features), logits)


def test_bad_inputs_and_configs_are_rejected():
    model = _model()
    with pytest.raises(ValueError, match=r"\(2, 3, 28, 28\); expected \(B, 1, 28, 28\)"):
        model(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"expected \(B, 1, 28, 28\)"):
        model.features(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expected \(B, 1, 28, 28\)"):
        model(torch.zeros(1, 28, 28))
    with pytest.raises(ValueError, match="image_size=30 is not divisible by 4"):
        ClassifierConfig(image_size=30)
    with pytest.raises(ValueError, match="channels"):
        ClassifierConfig(channels=[])
    with pytest.raises(ValueError, match="feature_dim=0"):
        ClassifierConfig(feature_dim=0)


def test_classify_batches_like_one_pass():
    model = _model()
    x = _images(23)
    labels, features = classify(model, x, batch_size=5)
    with torch.no_grad():
        full = model.features(x)
    assert labels.shape == (23,) and labels.dtype == torch.long
    torch.testing.assert_close(features, full)
    torch.testing.assert_close(labels, model.head(full).argmax(1))
    with pytest.raises(ValueError, match="batch_size=0"):
        classify(model, x, batch_size=0)


def test_registered_and_round_trips_through_load_model(tmp_path):
    assert MODELS.get("image_classifier") is ImageClassifier
    model = _model(3)
    model.train()
    model(_images(8))  # move the BatchNorm running statistics off their initial values
    model.eval()
    path = save_model(model, tmp_path / "classifier.safetensors", extra={ACCURACY_KEY: "0.5"})
    loaded = load_model(path)
    assert isinstance(loaded, ImageClassifier) and not loaded.training
    assert loaded.config == model.config
    x = _images(4, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert classifier_accuracy(path) == 0.5


def test_augment_shifts_within_two_pixels():
    x = torch.full((3, 1, 28, 28), -1.0)
    x[:, :, 14, 14] = 1.0  # one bright pixel
    out = _augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for image in out[:, 0]:
        (r, c), = (image == 1.0).nonzero().tolist()
        assert abs(r - 14) <= 2 and abs(c - 14) <= 2


def test_short_training_is_well_above_chance_and_deterministic():
    model, acc = train_classifier(limit=3000, epochs=1, batch_size=64, seed=0, progress=False)
    assert acc > 0.6, acc  # chance is 0.1; the full training reaches about 0.9
    assert not model.training
    again, _ = train_classifier(limit=500, epochs=1, batch_size=64, seed=0, progress=False)
    other, _ = train_classifier(limit=500, epochs=1, batch_size=64, seed=0, progress=False)
    for a, b in zip(again.state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_classifier_trains_once_then_uses_the_cache(tmp_path, monkeypatch):
    calls = []

    def tiny_training(**kwargs):
        calls.append(kwargs)
        return _model(5), 0.875

    monkeypatch.setattr(classifier_module, "train_classifier", tiny_training)
    path = tmp_path / "cache" / "clf.safetensors"
    model = load_classifier(path, progress=False)
    assert len(calls) == 1 and path.is_file()
    assert read_metadata(path)[ACCURACY_KEY] == "0.875000"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    mtime = path.stat().st_mtime_ns

    def must_not_train(**kwargs):
        raise AssertionError("retrained although the file is cached")

    monkeypatch.setattr(classifier_module, "train_classifier", must_not_train)
    again = load_classifier(path, progress=False)
    assert path.stat().st_mtime_ns == mtime
    x = _images(3)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    assert [p.name for p in path.parent.iterdir()] == ["clf.safetensors"]  # no temporary files left


def test_load_classifier_default_path_and_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENLDM_CACHE", str(tmp_path))
    assert default_classifier_path() == tmp_path / "fmnist_classifier.safetensors"
    with pytest.raises(FileNotFoundError, match="train_if_missing"):
        load_classifier(train_if_missing=False)
    monkeypatch.delenv("OPENLDM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_classifier_path() == tmp_path / "home" / ".cache" / "openldm" / "fmnist_classifier.safetensors"


def test_load_classifier_rejects_other_models(tmp_path):
    from openldm.models.discriminator import DiscriminatorConfig, PatchGANDiscriminator

    path = save_model(PatchGANDiscriminator(DiscriminatorConfig(in_channels=1, ndf=8, n_layers=1)), tmp_path / "d.safetensors")
    with pytest.raises(TypeError, match="not an image_classifier"):
        load_classifier(path)
