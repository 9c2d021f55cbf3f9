"""Class-label conditioner: a learned embedding per class plus a learned null class (Ho & Salimans 2022)."""
from __future__ import annotations

import pytest
import torch

from openldm.conditioning.class_label import ClassLabelConditioner, ClassLabelConfig
from openldm.registry import CONDITIONERS


def test_registered_with_its_config_class():
    assert CONDITIONERS.get("class_label") is ClassLabelConditioner
    assert ClassLabelConditioner.config_class is ClassLabelConfig


def test_vector_slot_shape_and_values():
    c = ClassLabelConditioner(ClassLabelConfig(num_classes=10, dim=32))
    labels = torch.tensor([0, 3, 9, 3])
    slots = c({"label": labels})
    assert set(slots.as_kwargs()) == {"vector"} and slots.vector.shape == (4, 32)
    assert torch.equal(slots.vector, c.embedding.weight[labels])
    assert torch.equal(slots.vector[1], slots.vector[3])
    assert c.slot_dims().vector_dim == 32 and c.slot_dims().concat_channels == 0


def test_null_is_the_extra_learned_row_and_label_num_classes_means_null():
    c = ClassLabelConditioner(ClassLabelConfig(num_classes=10, dim=8))
    null = c.null(3)
    assert c.embedding.num_embeddings == 11
    assert torch.equal(null.vector, c.embedding.weight[10].expand(3, 8))
    assert torch.equal(c({"label": [10, 10, 10]}).vector, null.vector)
    null.vector.sum().backward()  # the null row is trained like any other
    assert c.embedding.weight.grad[10].abs().sum() > 0 and c.embedding.weight.grad[:10].abs().sum() == 0


@pytest.mark.parametrize("labels, words", [
    ([0, 11], ["11", "0..9", "10"]),
    ([-1], ["-1", "0..9"]),
    ([[1, 2]], ["(B,)", "(1, 2)"]),
    ([0.5], ["integer", "float"]),
])
def test_bad_labels_name_the_value_and_what_is_accepted(labels, words):
    c = ClassLabelConditioner(ClassLabelConfig(num_classes=10, dim=8))
    with pytest.raises(ValueError) as e:
        c({"label": torch.tensor(labels)})
    assert all(w in str(e.value) for w in words), str(e.value)


def test_missing_key_names_the_key_and_the_batch_keys():
    c = ClassLabelConditioner(ClassLabelConfig())
    with pytest.raises(KeyError) as e:
        c({"image": torch.zeros(1)})
    assert "'label'" in str(e.value) and "'image'" in str(e.value)
