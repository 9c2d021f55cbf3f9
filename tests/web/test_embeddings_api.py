"""The server with --embeddings-dir: /sdapi/v1/embeddings lists them, A1111's txt2img reads prompts in A1111's
syntax with the embeddings (the same PNG as `openldm generate --prompt-weighting a1111 --embeddings-dir`), and the
native job route takes prompt_weighting."""
import base64
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from sd_testing import tiny_pipeline

from openldm.cli import main
from openldm.web.app import create_app


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd")
    folder, _ = tiny_pipeline(tmp)
    emb = tmp / "embeddings"
    emb.mkdir()
    vectors = torch.randn(2, 128, generator=torch.Generator().manual_seed(0))
    torch.save({"string_to_param": {"*": vectors}, "name": "sksstyle", "step": 10}, emb / "sksstyle.pt")
    app = create_app([str(folder)], embeddings_dir=emb)
    with TestClient(app) as client:
        yield client, folder, emb
    app.state.queue.close()


def test_embeddings_are_listed(served):
    client, _, _ = served
    loaded = client.get("/sdapi/v1/embeddings").json()
    assert loaded["skipped"] == {} and loaded["loaded"]["sksstyle"]["vectors"] == 2
    assert loaded["loaded"]["sksstyle"]["shape"] == 128


def test_txt2img_uses_a1111_syntax_and_embeddings(served, tmp_path):
    client, folder, emb = served
    prompt = "a (sksstyle:1.2) house, [red]"
    r = client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "negative_prompt": "(blurry)", "seed": 4,
                                               "steps": 2, "width": 32, "height": 32, "sampler_name": "Euler"})
    assert r.status_code == 200, r.text
    served_image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert "Prompt weighting: a1111" in json.loads(r.json()["info"])["infotexts"][0]
    out = tmp_path / "cli.png"
    args = ["generate", "--model", str(folder), "--prompt", prompt, "--negative-prompt", "(blurry)", "--seed", "4",
            "--steps", "2", "--width", "32", "--height", "32", "--sampler", "euler", "--out", str(out), "--quiet"]
    assert main(args + ["--prompt-weighting", "a1111", "--embeddings-dir", str(emb)]) == 0
    assert np.array_equal(np.asarray(served_image), np.asarray(Image.open(out)))
    assert main(args + ["--prompt-weighting", "a1111"]) == 0  # without the embedding: another image
    assert not np.array_equal(np.asarray(served_image), np.asarray(Image.open(out)))


def test_native_jobs_take_prompt_weighting(served):
    client, _, _ = served
    r = client.post("/openldm/jobs", json={"prompt": "a (house)", "prompt_weighting": "compel", "steps": 2,
                                           "width": 32, "height": 32})
    assert r.status_code == 422 and r.json()["field"] == "prompt_weighting"
    r = client.post("/openldm/jobs", json={"prompt": "a (house)", "prompt_weighting": "a1111", "steps": 2,
                                           "width": 32, "height": 32})
    assert r.status_code == 200, r.text
