"""The emoji judges against oracles: the style judge learns styles that are separable, retrieval of an image's own
prompt is closed-form on text embeddings, and a perfect generator (the real images) scores like the real row."""
import pytest
import torch
from emoji_testing import make_packages

from openldm.data.emoji import ART, build_emoji
from openldm.evaluation.emoji import (
    EmojiJudges,
    EmojiSplit,
    agreement,
    clip_embeddings,
    load_judge_clip,
    load_style_judge,
    train_style_judge,
)
from openldm.io.native import save_model
from openldm.models.contrastive import SmallCLIP, tiny_contrastive_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _styled(n: int, seed: int) -> EmojiSplit:
    """Noisy 32 px images whose style is their dominant colour channel (red, green, blue in ART's order)."""
    g = torch.Generator().manual_seed(seed)
    styles = torch.arange(n) % len(ART)
    images = 0.6 * torch.rand(n, 3, 32, 32, generator=g) - 0.8
    images[torch.arange(n), styles] += 1.0
    return EmojiSplit(images.clamp(-1, 1), styles, [f"thing {i}, {list(ART)[s]} emoji style"
                                                    for i, s in enumerate(styles.tolist())])


def test_style_judge_learns_separable_styles_and_a_seed_fixes_it():
    judge = train_style_judge(_styled(192, 0), epochs=2)
    test = _styled(60, 1)
    assert (judge(test.images).argmax(dim=1) == test.styles).float().mean() > 0.95
    again = train_style_judge(_styled(192, 0), epochs=2)
    assert torch.equal(judge(test.images), again(test.images))


def test_agreement_is_closed_form_on_text_embeddings():
    clip = SmallCLIP(tiny_contrastive_config((3, 32, 32))).eval()
    prompts = ["a red apple", "a cat face", "a sun", "a red apple"]
    own = clip.encode_text(prompts)  # unit vectors: each "image" is its own prompt's embedding
    top1, cosine = agreement(clip, own, prompts)
    assert top1 == 1.0 and cosine == pytest.approx(1.0, abs=1e-5)
    swapped = own[[1, 2, 0, 1]]  # each image has another distinct prompt's embedding
    top1, cosine = agreement(clip, swapped, prompts)
    assert top1 == 0.0 and cosine < 1.0 - 1e-3


def test_real_images_as_samples_score_like_the_real_row(tmp_path):
    split = _styled(30, 2)
    judges = EmojiJudges(style=train_style_judge(_styled(96, 3), epochs=1),
                         clip=SmallCLIP(tiny_contrastive_config((3, 32, 32))).eval())
    real_embeds = clip_embeddings(judges.clip, split.images)
    perfect = judges.score(split.images, split, real_embeds)
    assert perfect["fid"] == pytest.approx(0.0, abs=1e-4) and perfect["chance"] == pytest.approx(1 / 30)
    noise = judges.score(torch.rand_like(split.images) * 2 - 1, split, real_embeds)
    assert noise["fid"] > perfect["fid"] + 1e-3
    other = judges.score(split.images, split, real_embeds, distribution=_styled(30, 4).images)
    assert other["top1"] == perfect["top1"] and other["fid"] > perfect["fid"]
    with pytest.raises(ValueError, match="3 images for 30 prompts"):
        judges.score(split.images[:3], split, real_embeds)


def test_style_judge_is_cached_per_build_and_size(tmp_path, monkeypatch):
    (tmp_path / "packages").mkdir()
    make_packages(tmp_path / "packages")
    root = build_emoji(tmp_path / "emoji", packages=tmp_path / "packages", npm="no-such-npm", progress=False)
    monkeypatch.setenv("OPENLDM_CACHE", str(tmp_path / "cache"))
    judge = load_style_judge(root=str(root), size=32)
    cached = list((tmp_path / "cache").glob("emoji_style_judge-*.safetensors"))
    assert len(cached) == 1 and judge.config.image_size == 32
    x = EmojiSplit.load("heldout_images", 32, str(root)).images
    assert torch.equal(load_style_judge(root=str(root), size=32)(x), judge(x))  # read back, not retrained
    with pytest.raises(ValueError, match="judges 32 px images"):
        load_style_judge(cached[0], size=64)
    save_model(judge, tmp_path / "not_a_clip.safetensors")
    with pytest.raises(ValueError, match="not a CLIP"):
        load_judge_clip(tmp_path / "not_a_clip.safetensors")
