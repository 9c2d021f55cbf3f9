"""LoRAs at generation time against diffusers (load_lora_weights + fuse_lora) on a tiny random-weight SD model: every
layout on UNet and text encoder, two weights, two LoRAs stacked; base tensors bit-identical afterwards; prompt tags
resolved in a LoRA folder; `openldm generate --lora` and the server's API."""
from __future__ import annotations

import hashlib
import re
import threading

import numpy as np
import pytest
import torch
from lora_testing import CALL, diffusers, diffusers_image, kohya_lora, peft_lora, save_kohya
from PIL import Image
from sd_testing import tiny_pipeline

from openldm.cli import main
from openldm.pipelines import read_png_params
from openldm.pipelines.common import GenerationParams
from openldm.pipelines.generate import GenerationRequest, RequestError
from openldm.pipelines.loras import available, extract_tags, request_loras, resolve_name
from openldm.pipelines.sources import load_generator

TOLERANCE = 2  # pixel values, out of 255


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, diffusers pipeline, LoRA folder with one file per layout)."""
    tmp = tmp_path_factory.mktemp("lora_sd")
    folder, _ = tiny_pipeline(tmp)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)  # as saved, eval mode
    loras = tmp / "loras"
    loras.mkdir()
    save_kohya(kohya_lora(pipe, rank=4, alpha=2.0, seed=1), loras / "kohya.safetensors")
    save_kohya(kohya_lora(pipe, rank=4, alpha=7.0, conv=True, te_prefix="lora_te1_", seed=2),
               loras / "locon.safetensors")
    save_kohya(kohya_lora(pipe, rank=2, alpha=None, unet=False, seed=3), loras / "text_only.safetensors")
    unet = {"r": 4, "lora_alpha": 6, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                                        "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]}
    text = {"r": 2, "lora_alpha": 5, "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
    peft_lora(pipe, loras / "peft.safetensors", unet=unet, text=text, seed=4)
    return folder, pipe, loras


@pytest.fixture(scope="module")
def generator(tiny):
    folder, _, loras = tiny
    return load_generator(folder, lora_dir=loras)


@pytest.fixture(scope="module")
def base_images(tiny, generator):
    """(diffusers' image, ours) without LoRAs."""
    return diffusers_image(tiny[1]), _ours(generator)


def _ours(generator, loras=(), **change) -> np.ndarray:
    request = GenerationRequest(sampler="euler", loras=list(loras), **{**CALL, **change})
    return np.asarray(generator.generate(request).images[0], dtype=np.int16)


def _state(generator) -> dict[str, torch.Tensor]:
    parts = generator.parts
    return {f"{name}.{k}": v.clone() for name in ("unet", "text_encoder", "vae")
            for k, v in getattr(parts, name).state_dict().items()}


def _assert_bit_identical(before: dict[str, torch.Tensor], generator) -> None:
    after = _state(generator)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]


def test_without_loras_the_images_agree(base_images):
    theirs, ours = base_images
    assert np.abs(ours - theirs).max() <= TOLERANCE


@pytest.mark.parametrize("name", ["kohya", "locon", "peft", "text_only"])
@pytest.mark.parametrize("weight", [0.7, -0.5])
def test_each_layout_matches_diffusers(tiny, generator, base_images, name, weight):
    path = tiny[2] / f"{name}.safetensors"
    before = _state(generator)
    theirs = diffusers_image(tiny[1], [(path, weight)])
    ours = _ours(generator, [(path, weight)])
    diff = int(np.abs(ours - theirs).max())
    print(f"{name} at {weight}: max pixel difference {diff}/255")
    assert diff <= TOLERANCE
    # diffusers' loader applied the file (and so did we): the image moved away from the base model's
    assert np.abs(theirs - base_images[0]).max() > 20 and np.abs(ours - base_images[1]).max() > 20
    _assert_bit_identical(before, generator)


def test_two_loras_stacked_match_diffusers(tiny, generator, base_images):
    loras = [(tiny[2] / "locon.safetensors", 0.7), (tiny[2] / "peft.safetensors", -0.5)]
    before = _state(generator)
    theirs = diffusers_image(tiny[1], loras)
    ours = _ours(generator, loras)
    diff = int(np.abs(ours - theirs).max())
    print(f"locon 0.7 + peft -0.5: max pixel difference {diff}/255")
    assert diff <= TOLERANCE
    alone = [_ours(generator, [lora]) for lora in loras]
    assert all(np.abs(ours - a).max() > 20 for a in alone)  # both took part
    _assert_bit_identical(before, generator)


def test_weights_are_restored_after_a_failed_request(tiny, generator):
    before = _state(generator)

    def fail(progress):
        raise RuntimeError("stop here")

    request = GenerationRequest(sampler="euler", loras=[(tiny[2] / "locon.safetensors", 1.0)], **CALL)
    with pytest.raises(RuntimeError, match="stop here"):
        generator.generate(request, on_progress=fail)
    _assert_bit_identical(before, generator)


def test_bfloat16_weights_take_loras_and_come_back_bit_identical(tiny):
    folder, _, loras = tiny
    gen = load_generator(folder, dtype="bfloat16", lora_dir=loras)
    before = _state(gen)
    plain = _ours(gen)
    changed = _ours(gen, [(loras / "locon.safetensors", 0.7), (loras / "peft.safetensors", -0.5)])
    assert np.abs(changed - plain).max() > 20
    _assert_bit_identical(before, gen)
    assert np.array_equal(_ours(gen), plain)


def test_a_prompt_tag_equals_the_explicit_lora(tiny, generator):
    explicit = _ours(generator, [(tiny[2] / "peft.safetensors", 0.8)])
    assert np.array_equal(explicit, _ours(generator, prompt="a red <lora:peft:0.8>circle"))
    assert np.array_equal(explicit, _ours(generator, negative_prompt="blue <lora:peft:0.8>"))
    # the parameters (the PNG's) keep the prompt as written, tag included, so the image can be regenerated
    result = generator.generate(GenerationRequest(sampler="euler", **{**CALL, "prompt": "a red <lora:peft:0.8>circle"}))
    assert result.params[0].prompt == "a red <lora:peft:0.8>circle"
    raw = (tiny[2] / "peft.safetensors").read_bytes()  # A1111's LoRA hash: the bytes after the safetensors header
    digest = hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()[:12]
    text = result.params[0].to_text()
    assert f'Lora hashes: "peft: {digest}"' in text
    assert GenerationParams.from_text(text).lora_hashes == f"peft: {digest}"
    assert generator.generate(GenerationRequest(sampler="euler", **CALL)).params[0].lora_hashes is None


def test_tags_are_parsed_and_removed():
    text, tags = extract_tags("a <lora:one:0.5> cat, <lora:two> <lora:sub/three:-1.25>")
    assert text == "a  cat,  " and tags == [("one", 0.5), ("two", 1.0), ("sub/three", -1.25)]
    assert extract_tags("no tags (here:1.2)") == ("no tags (here:1.2)", [])
    for bad, says in (("<lora::1>", "names no LoRA"), ("<lora:x:heavy>", "not a number"),
                      ("<lora:x:0.5:0.3>", "not a number")):
        with pytest.raises(ValueError, match=says):
            extract_tags(bad)


def test_names_resolve_in_the_folder_and_errors_name_the_problem(tiny, tmp_path):
    loras = tiny[2]
    assert resolve_name("peft", loras) == (loras / "peft.safetensors").resolve()
    (tmp_path / "styles").mkdir()
    (tmp_path / "styles" / "ink.safetensors").write_bytes((loras / "kohya.safetensors").read_bytes())
    assert resolve_name("ink", tmp_path) == (tmp_path / "styles" / "ink.safetensors").resolve()
    assert resolve_name("styles/ink", tmp_path) == (tmp_path / "styles" / "ink.safetensors").resolve()
    with pytest.raises(FileNotFoundError, match=r"no LoRA 'nope'.*'kohya'"):
        resolve_name("nope", loras)
    with pytest.raises(ValueError, match="no LoRA folder"):
        resolve_name("peft", None)
    with pytest.raises(ValueError, match="outside the LoRA folder"):
        resolve_name("../loras/peft", tmp_path)
    _, chosen = request_loras(["x <lora:peft:0.3>", ""], [(loras / "kohya.safetensors", 2)], loras)
    assert chosen == [(loras / "kohya.safetensors", 2.0), ((loras / "peft.safetensors").resolve(), 0.3)]


def _with_metadata(source, target, **metadata):
    """A copy of the LoRA file ``source`` at ``target`` with ``metadata`` added to its own."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(source), "pt") as f:
        kept = f.metadata() or {}
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(source)), str(target), metadata={**kept, **metadata})
    return target


def test_every_listed_name_resolves_to_its_file_and_trainer_aliases_resolve_as_in_a1111(tiny, tmp_path):
    kohya = tiny[2] / "kohya.safetensors"
    _with_metadata(kohya, tmp_path / "ink.safetensors")
    _with_metadata(kohya, tmp_path / "styles" / "ink.safetensors")  # a shared stem: named by its path
    _with_metadata(kohya, tmp_path / "styles" / "wash.safetensors", ss_output_name="watercolour_v2")
    _with_metadata(kohya, tmp_path / "a" / "one.safetensors", ss_output_name="twin")
    _with_metadata(kohya, tmp_path / "b" / "two.safetensors", ss_output_name="twin")
    _with_metadata(kohya, tmp_path / "decoy.safetensors", ss_output_name="ink")  # a file name beats an alias
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    named = available(tmp_path)
    assert list(named) == ["broken", "decoy", "ink", "one", "styles/ink", "two", "wash"]
    for name, path in named.items():
        assert resolve_name(name, tmp_path) == path, name
    assert resolve_name("watercolour_v2", tmp_path) == tmp_path.resolve() / "styles" / "wash.safetensors"
    assert resolve_name("ink", tmp_path) == tmp_path.resolve() / "ink.safetensors"
    with pytest.raises(ValueError, match="'twin' is ambiguous"):
        resolve_name("twin", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no LoRA 'nope'.*'styles/ink'"):
        resolve_name("nope", tmp_path)


def test_bad_loras_are_request_errors(tiny, generator):
    with pytest.raises(RequestError) as info:
        generator.generate(GenerationRequest(**{**CALL, "prompt": "<lora:missing:1>"}))
    assert info.value.field == "prompt" and "missing" in str(info.value)
    with pytest.raises(RequestError) as info:
        generator.generate(GenerationRequest(loras=[(tiny[2] / "missing.safetensors", 1.0)], **CALL))
    assert info.value.field == "loras"
    with pytest.raises(RequestError) as info:
        generator.generate(GenerationRequest(loras=[(tiny[2] / "peft.safetensors", float("nan"))], **CALL))
    assert info.value.field == "loras"
    bundled = load_generator()
    with pytest.raises(RequestError) as info:
        bundled.generate(GenerationRequest(prompt="a shoe", loras=[(tiny[2] / "peft.safetensors", 1.0)]))
    assert info.value.field == "loras"


def test_concurrent_requests_with_different_loras_get_their_own_images(tiny, generator):
    kinds = [[], [(tiny[2] / "kohya.safetensors", 0.7)], [(tiny[2] / "peft.safetensors", -0.5)]] * 2
    alone = [_ours(generator, loras) for loras in kinds]
    together: list = [None] * len(kinds)

    def run(i):
        together[i] = _ours(generator, kinds[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(kinds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))


def test_cli_generate_with_lora_files_and_tags(tiny, generator, tmp_path, capsys):
    folder, _, loras = tiny
    args = ["generate", "--model", str(folder), "--negative-prompt", CALL["negative_prompt"], "--steps", "4",
            "--width", "32", "--height", "32", "--seed", "4", "--sampler", "euler", "--quiet"]
    out = tmp_path / "file.png"
    capsys.readouterr()
    assert main([*args[:-1], "--prompt", CALL["prompt"], "--lora", f"{loras / 'locon.safetensors'}:-0.5",
                 "--lora", str(loras / "peft.safetensors"), "--out", str(out)]) == 0
    expect = _ours(generator, [(loras / "locon.safetensors", -0.5), (loras / "peft.safetensors", 1.0)])
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB"), dtype=np.int16), expect)
    said = capsys.readouterr().err  # without --quiet: what each file touched
    for name, weight in (("locon", "-0.5"), ("peft", "1")):
        lora = generator.loras.read(loras / f"{name}.safetensors")
        assert f"LoRA {lora.summary()}; weight {weight}" in said
    assert "locon.safetensors: kohya layout, 79 unet modules, 12 text-encoder modules" in said
    tagged = tmp_path / "tag.png"
    assert main([*args, "--prompt", "a red circle <lora:kohya:0.8>", "--lora-dir", str(loras), "--out",
                 str(tagged)]) == 0
    file_arg = tmp_path / "arg.png"
    assert main([*args, "--prompt", CALL["prompt"], "--lora", f"{loras / 'kohya.safetensors'}:0.8", "--out",
                 str(file_arg)]) == 0
    assert np.array_equal(np.asarray(Image.open(tagged)), np.asarray(Image.open(file_arg)))
    assert read_png_params(tagged).prompt == "a red circle <lora:kohya:0.8>"
    capsys.readouterr()
    assert main([*args, "--prompt", "x", "--lora", str(loras / "nope.safetensors"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("openldm generate: error: --lora") and "nope.safetensors" in err and "\n" not in err
    assert main([*args, "--prompt", "x <lora:nope:1>", "--lora-dir", str(loras), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("openldm generate: error: no LoRA 'nope'") and "\n" not in err


def test_the_server_accepts_tags_in_prompts(tiny, generator):
    import base64
    import io
    import time

    from fastapi.testclient import TestClient

    from openldm.web.app import create_app

    folder, _, loras = tiny
    expect = _ours(generator, [(loras / "peft.safetensors", 0.8)])

    def pixels(text: str) -> np.ndarray:
        image = Image.open(io.BytesIO(base64.b64decode(text.split(",", 1)[-1])))
        return np.asarray(image.convert("RGB"), dtype=np.int16)

    app = create_app([str(folder)], lora_dir=loras)
    try:
        with TestClient(app) as client:
            body = {"prompt": "a red circle <lora:peft:0.8>", "negative_prompt": CALL["negative_prompt"],
                    "steps": 4, "width": 32, "height": 32, "seed": 4, "sampler_name": "Euler", "cfg_scale": 7.5}
            r = client.post("/sdapi/v1/txt2img", json=body)
            assert r.status_code == 200, r.text
            assert np.array_equal(pixels(r.json()["images"][0]), expect)
            # the page's route, the same way
            job = client.post("/openldm/jobs", json={"prompt": "a red circle <lora:peft:0.8>", "sampler": "euler",
                                                     **{k: CALL[k] for k in ("negative_prompt", "steps", "width",
                                                                             "height", "seed", "guidance_scale")}})
            assert job.status_code == 200, job.text
            deadline = time.time() + 120
            while (state := client.get(f"/openldm/jobs/{job.json()['id']}").json())["state"] in ("queued", "running"):
                assert time.time() < deadline
                time.sleep(0.1)
            assert state["state"] == "done" and np.array_equal(pixels(state["images"][0]), expect)
            missing = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "<lora:nope:1>"})
            assert missing.status_code == 422 and missing.json()["field"] == "prompt", missing.text
            assert missing.json()["error"].startswith("no LoRA 'nope'")
    finally:
        app.state.queue.close()


def test_the_a1111_lora_routes_list_the_folder_and_an_alias_tag_gives_the_files_image(tiny, generator, tmp_path):
    import base64
    import io

    from fastapi.testclient import TestClient

    from openldm.web.app import create_app

    folder, _, loras = tiny
    tags = '{"img": {"red circle": 3}}'
    copy = _with_metadata(loras / "peft.safetensors", tmp_path / "lora" / "peft_v1.safetensors",
                          ss_output_name="circles", ss_tag_frequency=tags)
    _with_metadata(loras / "kohya.safetensors", tmp_path / "lora" / "sub" / "plain.safetensors")
    expect = _ours(generator, [(loras / "peft.safetensors", 0.8)])
    app = create_app([str(folder)], lora_dir=copy.parent)
    try:
        with TestClient(app) as client:
            listed = client.get("/sdapi/v1/loras").json()
            assert [(e["name"], e["alias"], e["path"]) for e in listed] == [
                ("peft_v1", "circles", str(copy.resolve())),
                ("plain", "plain", str((copy.parent / "sub" / "plain.safetensors").resolve()))]
            assert listed[0]["metadata"]["ss_tag_frequency"] == {"img": {"red circle": 3}}  # decoded, as A1111 does
            assert listed[0]["metadata"]["ss_output_name"] == "circles"
            assert client.post("/sdapi/v1/refresh-loras").status_code == 200
            assert client.get("/internal/ping").json() == {}
            body = {"prompt": "a red circle <lora:circles:0.8>", "negative_prompt": CALL["negative_prompt"],
                    "steps": 4, "width": 32, "height": 32, "seed": 4, "sampler_name": "Euler", "cfg_scale": 7.5}
            r = client.post("/sdapi/v1/txt2img", json=body)
            assert r.status_code == 200, r.text
            image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
            assert np.array_equal(np.asarray(image.convert("RGB"), dtype=np.int16), expect)
    finally:
        app.state.queue.close()
    bare = create_app([str(folder)])
    try:
        with TestClient(bare) as client:
            assert client.get("/sdapi/v1/loras").json() == []
    finally:
        bare.state.queue.close()


def test_compiled_models_give_eager_images_and_see_loras_fused_between_requests(tiny, generator, tmp_path, capsys):
    """compile=True (--compile): the torch.compile'd UNet (the decoder stays eager on a CPU) gives the eager images.
    With a LoRA directory the weights stay live, so LoRAs fused per request reach the graphs, also after the LoRA is
    taken out again; without one they are frozen into the graphs, and the first request with a LoRA recompiles the
    UNet live (a frozen graph would give the image without the LoRA); generate --compile says how long compiling
    took and which it did."""
    from openldm.pipelines.common import compile_seconds

    folder, _, loras = tiny
    lora = [(loras / "locon.safetensors", 0.7)]
    before = compile_seconds()
    frozen = load_generator(folder, compile=True)
    assert frozen.compiled == "frozen weights"
    assert np.abs(_ours(frozen) - _ours(generator)).max() <= 1
    assert compile_seconds() > before  # the graphs were compiled, and the time is counted
    with_lora = _ours(generator, lora)
    assert np.abs(with_lora - _ours(generator)).max() > 8, "the LoRA changes the image"
    assert np.abs(_ours(frozen, lora) - with_lora).max() <= 1 and frozen.compiled == "live weights"
    compiled = load_generator(folder, lora_dir=loras, compile=True)
    assert compiled.compiled == "live weights"
    for chosen in ((), lora, ()):
        assert np.abs(_ours(compiled, chosen) - _ours(generator, chosen)).max() <= 1, chosen
    out = tmp_path / "compiled.png"
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--prompt", CALL["prompt"], "--negative-prompt",
                 CALL["negative_prompt"], "--steps", "4", "--width", "32", "--height", "32", "--seed", "4",
                 "--sampler", "euler", "--compile", "--quiet", "--out", str(out)]) == 0
    assert np.abs(np.asarray(Image.open(out).convert("RGB"), dtype=np.int16) - _ours(generator)).max() <= 1
    assert re.search(r"--compile: \d+\.\d s of this run compiled the networks \(frozen weights\)",
                     capsys.readouterr().err)