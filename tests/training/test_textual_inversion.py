"""Training a textual-inversion embedding on a tiny random-weight SD model: the objective (Gal et al. 2022, eq. 2,
computed here on fixed noise) falls, the file is A1111's layout and diffusers' load_textual_inversion reads it
(the same image as ours), and `openldm train-embedding` runs and refuses overwriting."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sd_testing import tiny_pipeline
from torch.nn import functional as F

from openldm.cli import main
from openldm.diffusion.schedules import make_alphas_cumprod, q_sample
from openldm.io.embeddings import read_embedding
from openldm.io.sd import load_sd
from openldm.models.autoencoder import LatentCodec
from openldm.models.text_encoder import encode_prompts
from openldm.pipelines.generate import GenerationRequest
from openldm.pipelines.sd_generator import SDGenerator
from openldm.training.textual_inversion import TextualInversionConfig, initial_vectors, train_embedding

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti")
    folder, pipe = tiny_pipeline(root, scheduler="EulerDiscreteScheduler", timestep_spacing="leading")
    pipe.set_progress_bar_config(disable=True)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        pixels = np.full((16, 16, 3), 240, np.uint8)
        top, left = rng.integers(0, 8, 2)
        pixels[top: top + 8, left: left + 8] = (220, 30, 30)
        Image.fromarray(pixels).save(images / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "caption": "a square"}))
    (images / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder, pipe, images


@torch.no_grad()
def _objective(folder, images_dir, name, vectors) -> float:
    """E ||eps - eps_theta(x_t, t, c(y(v)))||^2 over the four images at fixed timesteps and noise."""
    sd = load_sd(folder)
    codec = LatentCodec(sd.vae, sd.vae.config.scaling_factor)
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(images_dir / f"{i}.png"), np.float32))
                          .permute(2, 0, 1) / 127.5 - 1 for i in range(4)])
    x0 = codec.encode(pixels, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(123)
    total = 0.0
    alphas_cumprod = make_alphas_cumprod(sd.schedule)
    for t_value in (100, 400, 700):
        t = torch.full((4,), t_value)
        eps = torch.randn(x0.shape, generator=g)
        context = encode_prompts(sd.tokenizer, sd.text_encoder, [f"a photo of {name}, a square"] * 4,
                                 embeddings={name: vectors})
        total += F.mse_loss(sd.unet(q_sample(x0, t, alphas_cumprod, eps), t.float(), context=context), eps).item()
    return total / 3


def test_training_lowers_the_objective_and_diffusers_reads_the_file(tiny, tmp_path):
    folder, pipe, images = tiny
    cfg = TextualInversionConfig(base_model=str(folder), data=str(images), name="sksred",
                                 out=str(tmp_path / "sksred.pt"), num_vectors=2, size=16, steps=60, batch_size=4,
                                 lr=0.05)
    result = train_embedding(cfg, progress=False)
    sd = load_sd(folder)
    start = initial_vectors(sd.tokenizer, sd.text_encoder, "*", 2)
    before, after = (_objective(folder, images, "sksred", v) for v in (start, result["vectors"]))
    print(f"objective {before:.4f} -> {after:.4f}")
    assert after < 0.95 * before
    data = torch.load(tmp_path / "sksred.pt", weights_only=True)  # A1111's layout
    assert set(data) >= {"string_to_token", "string_to_param", "name", "step"} and data["step"] == 60
    name, vectors = read_embedding(tmp_path / "sksred.pt")
    assert name == "sksred" and torch.equal(vectors, result["vectors"])
    # diffusers reads it and draws the same image as we do with it
    prompt, settings = "a photo of sksred", dict(steps=3, guidance_scale=5.0, height=32, width=32, seed=2)
    ours = SDGenerator.load(folder, embeddings_dir=tmp_path).generate(
        GenerationRequest(prompt=prompt, sampler="euler", **settings)).images[0]
    pipe.load_textual_inversion(str(tmp_path / "sksred.pt"), token="sksred")
    try:
        theirs = pipe(prompt, num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                      generator=torch.Generator("cpu").manual_seed(2)).images[0]
    finally:
        pipe.unload_textual_inversion()
    diff = np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16)).max()
    print(f"trained embedding, ours vs diffusers: max pixel difference {diff}/255")
    assert diff <= 2


def test_cli_train_embedding(tiny, tmp_path, capsys):
    folder, _, images = tiny
    out = tmp_path / "style.safetensors"
    args = ["train-embedding", f"base_model={folder}", f"data={images}", "name=style", f"out={out}", "size=16",
            "steps=3", "num_vectors=3", "--quiet"]
    assert main(args) == 0
    assert "embedding 'style' saved as" in capsys.readouterr().out
    name, vectors = read_embedding(out)
    assert name == "style" and vectors.shape == (3, 128)
    assert main(args) == 2
    assert "exists; set overwrite=true" in capsys.readouterr().err
    assert main(args[:-1] + ["template=a photo", "--quiet"]) == 2
    assert "must contain [name]" in capsys.readouterr().err


def test_openldm_train_with_a_textual_inversion_section_learns_the_same_embedding(tiny, tmp_path, capsys):
    """`openldm train --config C` where C holds a textual_inversion section = `openldm train-embedding` with the
    same settings, tensor for tensor; the section stands alone."""
    import yaml

    folder, _, images = tiny
    settings = {"base_model": str(folder), "data": str(images), "name": "style", "size": 16, "steps": 3}
    config = tmp_path / "ti.yaml"
    config.write_text(yaml.safe_dump({"textual_inversion": {**settings, "out": str(tmp_path / "a" / "style.pt")}}))
    assert main(["train", "--config", str(config), "--quiet"]) == 0
    assert main(["train-embedding", *(f"{k}={v}" for k, v in settings.items()), f"out={tmp_path / 'b' / 'style.pt'}",
                 "--quiet"]) == 0
    (name_a, a), (name_b, b) = (read_embedding(tmp_path / d / "style.pt") for d in "ab")
    assert name_a == name_b == "style" and torch.equal(a, b)
    capsys.readouterr()
    config.write_text(yaml.safe_dump({"textual_inversion": {**settings, "out": str(tmp_path / "c.pt")}, "steps": 4}))
    assert main(["train", "--config", str(config)]) == 2
    assert "holds nothing else; also found ['steps']" in capsys.readouterr().err
