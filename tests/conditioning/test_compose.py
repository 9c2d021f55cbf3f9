"""Composition of conditioners: slot merging, the UNet's dims, per-condition dropout (Ho & Salimans 2022) and the
fully-null condition classifier-free guidance uses."""
from __future__ import annotations

import math

import pytest
import torch

from openldm.conditioning import (
    ClassLabelConditioner,
    ClassLabelConfig,
    ComposedConditioner,
    ConditionConfig,
    LowResConditioner,
    LowResConfig,
    Resources,
    SlotDims,
    Slots,
    TextConditioner,
    TextConfig,
    build_conditioning,
    merge_slots,
)
from openldm.config import ConfigError
from openldm.registry import CONDITIONERS


def text_and_mask(drop_text: float = 0.1, drop_mask: float = 0.1) -> ComposedConditioner:
    return build_conditioning([
        ConditionConfig("text", {"backend": "transformer", "max_length": 10, "context_dim": 16,
                                 "transformer": {"width": 16, "depth": 1, "heads": 2}}, drop_prob=drop_text),
        ConditionConfig("segmentation", {"num_classes": 3, "channels": 2}, drop_prob=drop_mask, name="mask"),
    ])


def batch(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    captions = ["a red circle", "a blue square above a red circle", "", "a green triangle"]
    return {"caption": [captions[i % 4] for i in range(n)], "mask": torch.randint(0, 3, (n, 16, 16), generator=g)}


def test_every_conditioner_is_registered():
    assert CONDITIONERS.names() == ["brightness", "class_label", "inpaint", "low_res", "segmentation", "text"]


def test_text_plus_mask_fills_both_slots_and_reports_the_unet_dims():
    cond = text_and_mask().eval()
    s = cond(batch(4), latent_size=(4, 4))
    assert set(s.as_kwargs()) == {"context", "context_mask", "concat"}
    assert s.context.shape == (4, 10, 16) and s.context_mask.shape == (4, 10) and s.concat.shape == (4, 2, 4, 4)
    assert cond.slot_dims() == SlotDims(vector_dim=None, context_dim=16, concat_channels=2)
    parts = [c(batch(4), latent_size=(4, 4)) for c in cond.conditioners.values()]
    assert torch.equal(s.context, parts[0].context) and torch.equal(s.concat, parts[1].concat)


def test_vectors_are_concatenated_and_contexts_joined_along_the_sequence(counting_encoder, make_counting_encoder):
    cond = ComposedConditioner({
        "label": ClassLabelConditioner(ClassLabelConfig(num_classes=3, dim=8)),
        "low_res": LowResConditioner(LowResConfig(channels=1, embed_dim=6)),
        "a": TextConditioner(TextConfig(backend="external"), counting_encoder),
        "b": TextConditioner(TextConfig(backend="external"), make_counting_encoder(max_length=5)),
    }).eval()
    assert cond.slot_dims() == SlotDims(vector_dim=14, context_dim=16, concat_channels=1)
    b = {"label": [0, 2], "low_res": torch.zeros(2, 1, 3, 3), "caption": ["x", "yz"]}
    s = cond(b, generator=torch.Generator().manual_seed(0), latent_size=(6, 6))
    assert s.vector.shape == (2, 14) and s.context.shape == (2, 17, 16) and s.context_mask.shape == (2, 17)
    assert torch.equal(s.vector[:, :8], cond.conditioners["label"](b).vector)
    assert torch.equal(s.context[:, 12:], cond.conditioners["b"](b).context)


def test_merge_fills_missing_masks_and_rejects_mismatched_widths():
    a = Slots(context=torch.ones(2, 3, 4))
    b = Slots(context=torch.zeros(2, 2, 4), context_mask=torch.tensor([[True, False]] * 2))
    merged = merge_slots([a, b])
    assert merged.context_mask.tolist() == [[True, True, True, True, False]] * 2
    with pytest.raises(ValueError, match=r"widths \[4, 5\]"):
        merge_slots([a, Slots(context=torch.zeros(2, 1, 5))])
    with pytest.raises(ValueError, match="batch sizes"):
        merge_slots([a, Slots(vector=torch.zeros(3, 1))])


def test_dropout_frequency_within_binomial_tolerance_and_independent_per_condition():
    cond = ComposedConditioner({
        "label": ClassLabelConditioner(ClassLabelConfig(num_classes=2, dim=2)),
        "other": ClassLabelConditioner(ClassLabelConfig(num_classes=2, dim=2)),
    }, {"label": 0.1, "other": 0.3})
    n = 40000
    drops = cond.sample_drops(n, torch.Generator().manual_seed(0))
    for name, p in (("label", 0.1), ("other", 0.3)):
        assert abs(drops[name].float().mean() - p) < 4.5 * math.sqrt(p * (1 - p) / n)
    both = (drops["label"] & drops["other"]).float().mean()
    assert abs(both - 0.03) < 4.5 * math.sqrt(0.03 * 0.97 / n)  # P(both) = P(a) P(b)
    # and through forward, in training mode: dropped samples are exactly the null row, the rest untouched
    cond.train()
    labels = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(1))
    s = cond({"label": labels}, generator=torch.Generator().manual_seed(0))
    null_row = cond.conditioners["label"].embedding.weight[2]
    is_null = (s.vector[:, :2] == null_row).all(1)
    assert torch.equal(is_null, drops["label"])  # same generator seed -> the same drops


def test_default_drop_probability_is_one_tenth():
    cond = build_conditioning([ConditionConfig("class_label")])
    assert cond.drop_probs == {"class_label": 0.1}


def test_dropped_samples_equal_the_null_condition_exactly():
    cond = text_and_mask(0.5, 0.5).train()
    b = batch(8)
    g = torch.Generator().manual_seed(5)
    s = cond(b, generator=g, latent_size=(4, 4))
    drops = cond.sample_drops(8, torch.Generator().manual_seed(5))
    assert drops["text"].any() and (~drops["text"]).any() and drops["mask"].any()
    null = cond.null(8, latent_size=(4, 4))
    full = cond(b, latent_size=(4, 4), drop={})  # nothing dropped
    for i in range(8):
        t_ref = null if drops["text"][i] else full
        m_ref = null if drops["mask"][i] else full
        assert torch.equal(s.context[i], t_ref.context[i]) and torch.equal(s.context_mask[i], t_ref.context_mask[i])
        assert torch.equal(s.concat[i], m_ref.concat[i])
    assert not torch.equal(null.context[0], full.context[0])  # "a red circle" is not the empty prompt


def test_eval_mode_never_drops_and_explicit_drops_are_honoured():
    cond = text_and_mask(1.0, 1.0).eval()
    b = batch(4)
    s = cond(b, latent_size=(4, 4))
    parts = [c(b, latent_size=(4, 4)) for c in cond.conditioners.values()]
    assert torch.equal(s.context, parts[0].context) and torch.equal(s.concat, parts[1].concat)
    only_text = cond(b, latent_size=(4, 4), drop={"text": torch.ones(4, dtype=torch.bool)})
    assert torch.equal(only_text.context, cond.null(4, latent_size=(4, 4)).context)
    assert torch.equal(only_text.concat, parts[1].concat)
    with pytest.raises(KeyError, match="'nope'"):
        cond(b, latent_size=(4, 4), drop={"nope": torch.ones(4, dtype=torch.bool)})


def test_null_batches_with_the_condition_for_guidance():
    cond = text_and_mask().eval()
    s = cond(batch(3), latent_size=(4, 4))
    null = cond.null(3, latent_size=(4, 4))
    both = Slots.cat([s, null])  # the CFG wrapper's single network call
    assert both.context.shape == (6, 10, 16) and both.concat.shape == (6, 2, 4, 4)
    assert null.context_mask.sum(1).tolist() == [2, 2, 2]  # BOS, EOS of the empty prompt
    assert torch.equal(null.concat, cond.conditioners["mask"].conv.bias.view(1, 2, 1, 1).expand(3, 2, 4, 4))


def test_unconditional_composition_is_empty():
    cond = build_conditioning([])
    assert cond({"image": torch.zeros(1)}) == Slots() and cond.null(2) == Slots()
    assert cond.slot_dims() == SlotDims(None, None, 0)


def test_build_is_strict_and_names_bad_keys_and_kinds(counting_encoder):
    with pytest.raises(ConfigError, match=r"conditions\[0\]\.options\.num_clases.*did you mean 'num_classes'"):
        build_conditioning([ConditionConfig("class_label", {"num_clases": 3})])
    with pytest.raises(KeyError, match="unknown conditioner 'colour'.*class_label"):
        build_conditioning([ConditionConfig("colour")])
    with pytest.raises(ValueError, match="'class_label' is used twice"):
        build_conditioning([ConditionConfig("class_label"), ConditionConfig("class_label")])
    with pytest.raises(ValueError, match=r"drop_prob=1.5"):
        ConditionConfig("class_label", drop_prob=1.5)
    with pytest.raises(ValueError, match=r"context widths \[8, 16\]"):
        build_conditioning([ConditionConfig("text", {"backend": "external"}),
                            ConditionConfig("text", {"backend": "external", "context_dim": 8}, name="text2")],
                           Resources(prompt_encoder=counting_encoder))


def test_generator_makes_training_conditions_reproducible():
    cond = build_conditioning([ConditionConfig("low_res", {"channels": 1, "embed_dim": 4}, drop_prob=0.5),
                               ConditionConfig("inpaint", {"latent_channels": 1})]).train()
    b = {"low_res": torch.rand(6, 1, 4, 4), "image": torch.rand(6, 1, 8, 8)}
    run = lambda seed: cond(b, generator=torch.Generator().manual_seed(seed), latent_size=(8, 8))  # noqa: E731
    a, again, other = run(0), run(0), run(1)
    assert torch.equal(a.vector, again.vector) and torch.equal(a.concat, again.concat)
    assert not torch.equal(a.concat, other.concat)
    assert cond.slot_dims() == SlotDims(vector_dim=4, context_dim=None, concat_channels=3)
