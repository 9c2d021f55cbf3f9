"""The small CLIP: shapes, unit-norm embeddings, the temperature and its cap, the caption vocabulary, the end-token
mask, the model file round trip and the configuration errors."""
import dataclasses
import math

import pytest
import torch

from openldm.config import ConfigError, from_dict, to_dict
from openldm.data.captions import all_captions
from openldm.io.native import load_model, save_model
from openldm.models.contrastive import (
    CLIP_VOCAB_SIZE,
    ContrastiveConfig,
    SmallCLIP,
    end_mask,
    prompt_vocabulary,
    tiny_contrastive_config,
)
from openldm.registry import MODELS

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a photo of a dark ankle boot", "a pair of trousers", "a light, wide pullover"]


@pytest.fixture
def model() -> SmallCLIP:
    torch.manual_seed(0)
    return SmallCLIP(dataclasses.replace(tiny_contrastive_config(), vocabulary=prompt_vocabulary(all_captions())))


def test_registered_and_shapes(model):
    assert MODELS.get("small_clip") is SmallCLIP and SmallCLIP.config_class is ContrastiveConfig
    images = torch.randn(4, 1, 32, 32)
    image_embeds, text_embeds = model.encode_image(images), model.encode_text(PROMPTS)
    assert image_embeds.shape == (4, 32) and text_embeds.shape == (3, 32)
    torch.testing.assert_close(image_embeds.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text_embeds.norm(dim=-1), torch.ones(3))
    logits_per_image, logits_per_text = model(images, PROMPTS)
    assert logits_per_image.shape == (4, 3) and torch.equal(logits_per_text, logits_per_image.T)
    torch.testing.assert_close(logits_per_image, (1 / 0.07) * image_embeds @ text_embeds.T, rtol=1e-4, atol=1e-4)
    hidden, mask = model.text_states(PROMPTS)
    assert hidden.shape == (3, 16, 32) and mask.dtype == torch.bool
    # start + tokens + end; "a photo of a dark ankle boot" is 7 BPE tokens
    assert mask.sum(1).tolist() == [len(model.tokenizer.encode(p)) + 2 for p in PROMPTS] and mask[0].sum() == 9


def test_latent_inputs_and_wrong_shapes():
    m = SmallCLIP(tiny_contrastive_config(image_shape=(4, 8, 8)))
    assert m.encode_image(torch.randn(2, 4, 8, 8)).shape == (2, 32)
    with pytest.raises(ValueError, match=r"\(2, 1, 32, 32\).*\(B, 4, 8, 8\)"):
        m.encode_image(torch.randn(2, 1, 32, 32))


def test_temperature_starts_at_1_over_0_07_and_is_capped_at_100(model):
    assert model.temperature().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.temperature().item() == pytest.approx(100.0, rel=1e-5)


def test_vocabulary_keeps_the_caption_tokens_and_maps_others_to_unknown(model):
    vocab = prompt_vocabulary(all_captions())
    assert vocab[-2:] == [CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1] and len(vocab) < 64
    assert model.config.text.vocab_size == len(vocab) + 1
    rows = model.tokenize(["a dark zebra"])[0]  # "zebra" is no caption word
    assert rows[0] == len(vocab) - 1 and rows[2] > 0 and rows[3] == 0 and rows[4] == len(vocab)  # start, dark, unk, end
    full = SmallCLIP(tiny_contrastive_config())
    assert full.config.text.vocab_size == CLIP_VOCAB_SIZE
    assert torch.equal(full.tokenize(["a dark zebra"]), full.tokenizer(["a dark zebra"]))


def test_end_mask_stops_at_the_first_end_token():
    ids = torch.tensor([[5, 1, 9, 9, 9], [5, 9, 9, 9, 9]])
    assert end_mask(ids).tolist() == [[True, True, True, False, False], [True, True, False, False, False]]


def test_model_file_round_trip(tmp_path, model):
    path = save_model(model, tmp_path / "clip.safetensors")
    loaded = load_model(path)
    assert isinstance(loaded, SmallCLIP) and loaded.config == model.config
    model.eval()
    images = torch.randn(2, 1, 32, 32)
    assert torch.equal(loaded.encode_image(images), model.encode_image(images))
    assert torch.equal(loaded.encode_text(PROMPTS), model.encode_text(PROMPTS))
    assert from_dict(ContrastiveConfig, to_dict(model.config)) == model.config


@pytest.mark.parametrize(("data", "message"), [
    ({"image_shape": [1, 32]}, "image_shape"),
    ({"channels": [12, 16]}, "norm_groups"),
    ({"stem_stride": 3}, "stem_stride"),
    ({"vocabulary": [5, 3, 49406, 49407]}, "sorted"),
    ({"vocabulary": [3, 5]}, "start and end"),
    ({"text": {"vocab_size": 1000}}, "49408"),
    ({"logit_scale_init": 5.0}, "logit_scale_max"),
    ({"text": {"max_position_embeddings": 2}}, "max_position_embeddings"),
])
def test_config_errors_name_the_bad_value(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ContrastiveConfig, data)
    assert math.isclose(ContrastiveConfig().logit_scale_max, math.log(100))
