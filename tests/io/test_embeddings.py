"""Textual-inversion embeddings: every layout read (A1111 .pt and .safetensors, diffusers learned_embeds), the
image equal to diffusers' ``load_textual_inversion`` for the same seed (single and multi-vector, in the prompt and
in the negative prompt), and refusals by name (wrong width, SDXL, pickled objects, duplicate names)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from openldm.cli import main
from openldm.io.embeddings import load_embeddings, read_embedding
from openldm.pipelines.generate import GenerationRequest
from openldm.pipelines.sd_generator import SDGenerator

pytest.importorskip("diffusers")
from sd_testing import tiny_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
WIDTH = 128  # tiny_pipeline's text encoder


# ---- files in the published layouts, written here without openldm ----------------------------------------------

def write_a1111_pt(path, vectors):
    """What A1111's Embedding.save writes (torch.save of a plain dict)."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem, "step": 500,
                "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "v1-5"}, path)


def write_a1111_safetensors(path, vectors):
    save_file({"emb_params": vectors.contiguous()}, str(path))


def write_diffusers(path, vectors, token):
    """diffusers' learned_embeds: {token: (D,)} for one vector, {token: (N, D)} for several."""
    save_file({token: (vectors[0] if vectors.shape[0] == 1 else vectors).contiguous()}, str(path))


LAYOUTS = {
    "a1111_pt": (lambda folder, v: write_a1111_pt(folder / "sksstyle.pt", v), "sksstyle"),
    "a1111_safetensors": (lambda folder, v: write_a1111_safetensors(folder / "sksstyle.safetensors", v), "sksstyle"),
    "diffusers": (lambda folder, v: write_diffusers(folder / "learned_embeds.safetensors", v, "<cat-toy>"),
                  "<cat-toy>"),
    "diffusers_bin": (lambda folder, v: torch.save({"<cat-toy>": v[0] if v.shape[0] == 1 else v},
                                                   folder / "learned_embeds.bin"), "<cat-toy>"),
}


def _vectors(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, WIDTH, generator=torch.Generator().manual_seed(seed)) * 0.5


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("count", [1, 3])
def test_every_layout_reads_name_and_vectors(tmp_path, layout, count):
    write, name = LAYOUTS[layout]
    vectors = _vectors(count, seed=count)
    write(tmp_path, vectors)
    (path,) = tmp_path.iterdir()
    got_name, got = read_embedding(path)
    assert got_name == name and got.dtype == torch.float32 and torch.equal(got, vectors)
    assert set(load_embeddings(tmp_path, width=WIDTH)) == {name}


def test_refusals_name_the_file_and_the_fix(tmp_path):
    write_a1111_pt(tmp_path / "narrow.pt", torch.randn(2, 64))
    with pytest.raises(ValueError, match="embedding 'narrow' has width 64, the text encoder 128"):
        load_embeddings(tmp_path, width=WIDTH)
    (tmp_path / "narrow.pt").unlink()
    save_file({"clip_g": torch.randn(2, 1280), "clip_l": torch.randn(2, 768)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(ValueError, match="SDXL embedding"):
        read_embedding(tmp_path / "xl.safetensors")
    save_file({"a": torch.randn(2, 8), "b": torch.randn(2, 8)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match=r"holds \['a', 'b'\]"):
        read_embedding(tmp_path / "two.safetensors")
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(1, 8))})},
               tmp_path / "old.pt")  # the original textual_inversion repository's files: module objects
    with pytest.raises(ValueError, match="only read by unpickling.*re-save its vectors as .safetensors"):
        read_embedding(tmp_path / "old.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_embedding(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_embeddings(tmp_path / "missing")
    dup = tmp_path / "dup"
    (dup / "sub").mkdir(parents=True)
    write_a1111_pt(dup / "style.pt", _vectors(1, 0))
    write_a1111_safetensors(dup / "sub" / "style.safetensors", _vectors(1, 1))
    with pytest.raises(ValueError, match="are both named 'style'; rename one"):
        load_embeddings(dup)


# ---- the same image as diffusers --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder, pipe = tiny_pipeline(tmp_path_factory.mktemp("sd"), scheduler="EulerDiscreteScheduler",
                                 timestep_spacing="leading")
    pipe.set_progress_bar_config(disable=True)
    return folder, pipe


SETTINGS = dict(steps=4, guidance_scale=6.0, height=32, width=32, seed=3)


def _ours(folder, embeddings_dir, prompt, negative):
    generator = SDGenerator.load(folder, embeddings_dir=embeddings_dir)
    request = GenerationRequest(prompt=prompt, negative_prompt=negative, sampler="euler", **SETTINGS)
    return np.asarray(generator.generate(request).images[0], dtype=np.int16)


def _theirs(pipe, file, token, prompt, negative):
    pipe.load_textual_inversion(str(file), token=token)
    try:
        image = pipe(prompt, negative_prompt=negative, num_inference_steps=SETTINGS["steps"],
                     guidance_scale=SETTINGS["guidance_scale"], height=SETTINGS["height"], width=SETTINGS["width"],
                     generator=torch.Generator("cpu").manual_seed(SETTINGS["seed"])).images[0]
    finally:
        pipe.unload_textual_inversion()
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("layout,count,where", [
    ("a1111_pt", 1, "prompt"), ("a1111_pt", 3, "prompt"), ("a1111_safetensors", 2, "prompt"),
    ("diffusers", 1, "prompt"), ("diffusers", 4, "prompt"), ("diffusers_bin", 2, "prompt"),
    ("a1111_pt", 2, "negative"),
])
def test_image_equals_diffusers_load_textual_inversion(tiny, tmp_path, layout, count, where):
    folder, pipe = tiny
    write, name = LAYOUTS[layout]
    write(tmp_path, _vectors(count, seed=10 + count))
    (file,) = tmp_path.iterdir()
    prompt, negative = (f"a photo of {name} on a hill", "blurry") if where == "prompt" else \
        ("a photo of a dog", f"ugly, {name}")
    ours = _ours(folder, tmp_path, prompt, negative)
    theirs = _theirs(pipe, file, name, prompt, negative)
    without = _ours(folder, None, prompt, negative)  # the name read as ordinary words
    diff = int(np.abs(ours - theirs).max())
    print(f"{layout} x{count} in the {where}: max pixel difference {diff}/255")
    assert diff <= 2
    assert np.abs(ours - without).mean() > 5  # the embedding changes the image


def test_cli_embeddings_dir_and_width_refusal(tiny, tmp_path, capsys):
    folder, _ = tiny
    emb = tmp_path / "emb"
    emb.mkdir()
    write_a1111_pt(emb / "sksstyle.pt", _vectors(2, 5))
    out = tmp_path / "out.png"
    args = ["generate", "--model", str(folder), "--prompt", "sksstyle, a house", "--steps", "2", "--height", "32",
            "--width", "32", "--out", str(out), "--quiet"]
    assert main(args + ["--embeddings-dir", str(emb)]) == 0 and out.is_file()
    write_a1111_pt(emb / "narrow.pt", torch.randn(1, 64))
    capsys.readouterr()
    assert main(args + ["--embeddings-dir", str(emb)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["openldm generate: error: embedding 'narrow' has width 64, the text encoder 128: it was trained "
                   "for another model"]
