"""The server's API on the bundled model and on a tiny random-weight SD model: every route, the 4xx errors, auth,
parity with `openldm generate`, PNG parameters, a bounded load test and interrupts."""
import base64
import hashlib
import io
import json
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sd_testing import diffusers_vae, save_compvis, tiny_pipeline

from openldm.cli import main
from openldm.pipelines.generate import GenerationRequest
from openldm.pipelines.sources import load_generator
from openldm.web.app import create_app


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def unb64(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text.split(",", 1)[-1])))


@pytest.fixture(scope="module")
def bundled():
    app = create_app()
    with TestClient(app) as client:
        yield client
    app.state.queue.close()


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd")
    folder, _ = tiny_pipeline(tmp)
    out = tmp / "tiny.safetensors"
    assert main(["convert", str(folder), str(out), "--to", "original"]) == 0
    return out


@pytest.fixture(scope="module")
def sd(sd_file):
    app = create_app([str(sd_file)], max_batch=4, max_pixels=64 * 64 * 4)
    with TestClient(app) as client:
        yield client
    app.state.queue.close()


def test_models_and_capabilities(bundled):
    listed = bundled.get("/openldm/models").json()
    assert listed["current"] == "fashion_mnist" and listed["models"][0]["name"] == "fashion_mnist"
    caps = bundled.get("/openldm/models/fashion_mnist").json()
    assert caps["class_names"][1] == "trouser" and caps["recommended"]["guidance_scale"] == 2.0
    assert caps["sampler_labels"]["euler_ancestral"] == "Euler a"
    assert bundled.get("/openldm/models/nope").status_code == 404


def test_txt2img_response_and_png_info_round_trip(bundled):
    r = bundled.post("/sdapi/v1/txt2img", json={"prompt": "a trouser", "seed": 5, "steps": 8, "batch_size": 2,
                                                  "sampler_name": "DPM++ 2M Karras", "unknown_field": 1})
    assert r.status_code == 200
    body = r.json()
    info = json.loads(body["info"])
    assert len(body["images"]) == 2 and info["all_seeds"] == [5, 5] and info["sampler_name"] == "DPM++ 2M"
    assert info["scheduler"] == "Karras" and body["parameters"]["prompt"] == "a trouser"
    image = unb64(body["images"][1])
    assert image.size == (28, 28) and "Batch pos: 1" in image.info["parameters"]
    parsed = bundled.post("/sdapi/v1/png-info", json={"image": body["images"][1]}).json()
    assert parsed["parameters"]["Prompt"] == "a trouser" and parsed["parameters"]["Seed"] == "5"
    native = bundled.post("/openldm/png-info", json={"image": "data:image/png;base64," + body["images"][1]}).json()
    assert native["params"]["sampler"] == "dpmpp_2m" and native["params"]["karras"] is True


def test_random_seed_is_reported(bundled):
    info = json.loads(bundled.post("/sdapi/v1/txt2img", json={"steps": 2}).json()["info"])
    assert info["seed"] >= 0 and info["all_seeds"] == [info["seed"]]


def test_native_job_with_a_class_label_and_progress(bundled):
    job = bundled.post("/openldm/jobs", json={"class_label": "trouser", "steps": 40, "sampler": "ddpm",
                                              "seed": 3}).json()
    seen = []
    while True:
        state = bundled.get(f"/openldm/jobs/{job['id']}").json()
        seen.append(state["progress"])
        if state["state"] in ("done", "failed", "interrupted"):
            break
        if state["step"] > 0:
            assert bundled.get(f"/openldm/jobs/{job['id']}/preview").headers["content-type"] == "image/png"
        time.sleep(0.02)
    assert state["state"] == "done" and "Class label: 1" in state["infotexts"][0]
    assert any(0 < p < 1 for p in seen), seen
    assert bundled.get("/openldm/queue").json() == {"running": None, "queued": []}


def _job_images(client, body: dict) -> list[np.ndarray]:
    job = client.post("/openldm/jobs", json=body).json()
    while (state := client.get(f"/openldm/jobs/{job['id']}").json())["state"] in ("queued", "running"):
        time.sleep(0.02)
    assert state["state"] == "done", state
    return [np.asarray(unb64(image)) for image in state["images"]]


def test_native_job_takes_the_step_cutters_as_the_python_api_does(bundled):
    cut = {"guidance_interval": [0.5, 20.0], "deepcache_interval": 2, "token_merging_ratio": 0.5}
    body = {"prompt": "a dark trouser", "seed": 7, "steps": 12, "guidance_scale": 3.0}
    served = _job_images(bundled, {**body, **cut})
    plain = _job_images(bundled, body)
    request = GenerationRequest(**body, **{**cut, "guidance_interval": (0.5, 20.0)})
    direct = np.asarray(load_generator().generate(request).images[0])
    assert np.array_equal(served[0], direct)
    assert np.abs(served[0].astype(int) - plain[0].astype(int)).max() > 0  # the cutters changed the image
    bad = bundled.post("/openldm/jobs", json={**body, "deepcache_interval": 0})
    assert bad.status_code == 422 and bad.json()["field"] == "deepcache_interval"


def test_a1111_bookkeeping_routes(bundled):
    names = [s["name"] for s in bundled.get("/sdapi/v1/samplers").json()]
    assert {"Euler", "Euler a", "Heun", "DDIM", "DPM++ 2M", "DPM++ 2M SDE", "DDPM"} <= set(names)
    assert [s["label"] for s in bundled.get("/sdapi/v1/schedulers").json()] == ["Automatic", "Karras"]
    assert bundled.get("/sdapi/v1/sd-models").json()[0]["title"] == "fashion_mnist"
    assert bundled.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "fashion_mnist"
    assert bundled.post("/sdapi/v1/options", json={"sd_model_checkpoint": "fashion_mnist"}).status_code == 200
    assert bundled.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}).status_code == 422
    assert bundled.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    idle = bundled.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    assert bundled.post("/sdapi/v1/interrupt").status_code == 200 and bundled.post("/sdapi/v1/skip").status_code == 200


RED = b64(Image.new("RGB", (32, 32), (200, 30, 30)))


@pytest.mark.parametrize("route, body, field", [
    ("txt2img", {"sampler_name": "UniPC"}, "sampler_name"),
    ("txt2img", {"scheduler": "exponential"}, "scheduler"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "nope"}}, "override_settings.sd_model_checkpoint"),
    ("txt2img", {"width": 33, "height": 32}, "width"),
    ("txt2img", {"width": 128, "height": 96, "batch_size": 2}, "width"),  # over --max-pixels
    ("txt2img", {"batch_size": 5}, "batch_size"),  # over --max-batch
    ("txt2img", {"steps": 0}, "steps"),
    ("txt2img", {"steps": 5000}, "steps"),
    ("txt2img", {"steps": "many"}, "steps"),
    ("txt2img", {"cfg_scale": -1}, "guidance_scale"),
    ("txt2img", {"cfg_scale": "NaN"}, "guidance_scale"),
    ("txt2img", {"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hires_upscaler"),
    ("txt2img", {"enable_hr": True, "hr_scale": 8}, "hires_scale"),
    ("txt2img", {"enable_hr": True, "hr_prompt": "another prompt"}, "hr_prompt"),
    ("txt2img", {"enable_hr": True, "hr_resize_x": 64, "hr_resize_y": 40}, "hr_resize_x"),
    ("txt2img", {"enable_hr": True, "hr_scale": 4, "width": 64, "height": 64}, "width"),  # 256x256: over --max-pixels
    ("img2img", {"init_images": [RED], "enable_hr": True}, "enable_hr"),
    ("img2img", {"init_images": ["not an image"]}, "init_images"),
    ("img2img", {}, "init_images"),
    ("img2img", {"init_images": [RED], "mask": b64(Image.new("L", (16, 16), 255))}, "mask"),
    ("img2img", {"init_images": [RED], "denoising_strength": 2}, "strength"),
])
def test_bad_requests_are_4xx_naming_the_field(sd, route, body, field):
    r = sd.post(f"/sdapi/v1/{route}", json={"prompt": "x", "steps": 2, "width": 32, "height": 32, **body})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and r.json()["error"]


def test_txt2img_equals_openldm_generate(sd, sd_file, tmp_path):
    r = sd.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "negative_prompt": "blue", "seed": 11,
                                           "steps": 3, "cfg_scale": 6, "width": 32, "height": 48,
                                           "sampler_name": "Euler a"})
    served = unb64(r.json()["images"][0])
    out = tmp_path / "cli.png"
    assert main(["generate", "--model", str(sd_file), "--prompt", "a red circle", "--negative-prompt", "blue",
                 "--seed", "11", "--steps", "3", "--guidance-scale", "6", "--width", "32", "--height", "48",
                 "--sampler", "euler_ancestral", "--prompt-weighting", "a1111", "--out", str(out), "--quiet"]) == 0
    assert np.array_equal(np.asarray(served), np.asarray(Image.open(out)))
    served_file = tmp_path / "served.png"
    served.save(served_file, pnginfo=_text(served))
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(served_file), "--model", str(sd_file), "--out", str(again),
                 "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(served))


def test_txt2img_hires_fix_equals_openldm_generate_hires(sd, sd_file, tmp_path):
    body = {"prompt": "a red circle", "negative_prompt": "blue", "seed": 5, "steps": 3, "cfg_scale": 6, "width": 32,
            "height": 32, "sampler_name": "Euler", "enable_hr": True, "hr_upscaler": "Latent (bicubic)",
            "hr_second_pass_steps": 4, "denoising_strength": 0.5}
    r = sd.post("/sdapi/v1/txt2img", json={**body, "hr_scale": 1.5})
    assert r.status_code == 200, r.text
    served = unb64(r.json()["images"][0])
    assert served.size == (48, 48)
    assert "Hires upscale: 1.5, Hires upscaler: Latent (bicubic), Hires steps: 4" in served.info["parameters"]
    out = tmp_path / "cli.png"
    assert main(["generate", "--model", str(sd_file), "--prompt", "a red circle", "--negative-prompt", "blue",
                 "--seed", "5", "--steps", "3", "--guidance-scale", "6", "--width", "32", "--height", "32",
                 "--sampler", "euler", "--prompt-weighting", "a1111", "--hires-scale", "1.5", "--hires-upscaler",
                 "Latent (bicubic)", "--hires-steps", "4", "--strength", "0.5", "--out", str(out), "--quiet"]) == 0
    assert np.array_equal(np.asarray(served), np.asarray(Image.open(out)))
    resized = sd.post("/sdapi/v1/txt2img", json={**body, "hr_resize_x": 48})  # the same size asked another way
    assert np.array_equal(np.asarray(unb64(resized.json()["images"][0])), np.asarray(served))
    plain = sd.post("/sdapi/v1/txt2img", json={**body, "enable_hr": False})  # hr_* and strength then ignored
    assert unb64(plain.json()["images"][0]).size == (32, 32)
    names = [u["name"] for u in sd.get("/sdapi/v1/upscalers").json()]
    modes = [m["name"] for m in sd.get("/sdapi/v1/latent-upscale-modes").json()]
    assert names == ["None", "Lanczos", "Nearest"] and modes[0] == "Latent" and "Latent (bicubic)" in modes


def test_txt2img_styles_apply_as_a1111_and_equal_the_prompt_written_out(sd_file, tmp_path):
    styles = tmp_path / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nink,"ink drawing of {prompt}",blurry\nframe,in a frame,\n')
    app = create_app([str(sd_file)], styles_file=styles)
    body = {"prompt": "a red circle", "negative_prompt": "blue", "seed": 3, "steps": 2, "width": 32, "height": 32,
            "sampler_name": "Euler"}
    try:
        with TestClient(app) as client:
            assert client.get("/sdapi/v1/prompt-styles").json() == [
                {"name": "ink", "prompt": "ink drawing of {prompt}", "negative_prompt": "blurry"},
                {"name": "frame", "prompt": "in a frame", "negative_prompt": ""}]
            styled = client.post("/sdapi/v1/txt2img", json={**body, "styles": ["ink", "frame"]})
            assert styled.status_code == 200, styled.text
            written = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "ink drawing of a red circle, in a frame",
                                                             "negative_prompt": "blue, blurry"})
            image = unb64(styled.json()["images"][0])
            assert np.array_equal(np.asarray(image), np.asarray(unb64(written.json()["images"][0])))
            assert image.info["parameters"].startswith("ink drawing of a red circle, in a frame\n"
                                                       "Negative prompt: blue, blurry\n")
            unknown = client.post("/sdapi/v1/txt2img", json={**body, "styles": ["sepia"]})
            assert unknown.status_code == 422 and unknown.json()["field"] == "styles"
            assert "no style 'sepia'" in unknown.json()["error"]
    finally:
        app.state.queue.close()
    out = tmp_path / "cli.png"
    assert main(["generate", "--model", str(sd_file), "--prompt", "a red circle", "--negative-prompt", "blue",
                 "--seed", "3", "--steps", "2", "--width", "32", "--height", "32", "--sampler", "euler",
                 "--prompt-weighting", "a1111", "--styles-file", str(styles), "--style", "ink", "--style", "frame",
                 "--out", str(out), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(image))


def test_txt2img_tiling_equals_openldm_generate_tiling(sd, sd_file, tmp_path):
    body = {"prompt": "a red circle", "seed": 8, "steps": 2, "width": 32, "height": 32, "sampler_name": "Euler"}
    tiled, plain = (sd.post("/sdapi/v1/txt2img", json={**body, "tiling": t}) for t in (True, False))
    image = unb64(tiled.json()["images"][0])
    assert "Tiling: True" in image.info["parameters"]
    assert not np.array_equal(np.asarray(image), np.asarray(unb64(plain.json()["images"][0])))
    out = tmp_path / "cli.png"
    assert main(["generate", "--model", str(sd_file), "--prompt", "a red circle", "--seed", "8", "--steps", "2",
                 "--width", "32", "--height", "32", "--sampler", "euler", "--prompt-weighting", "a1111", "--tiling",
                 "--out", str(out), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(image))


def test_sd_vae_from_the_vae_folder_equals_openldm_generate_vae(sd_file, tmp_path):
    """A1111's VAE choice: /sdapi/v1/sd-vae lists --vae-dir, override_settings.sd_vae and the sd_vae option pick one
    (Automatic / None: the model's own), each image the same as `openldm generate --vae FILE`; the native job too."""
    vae_dir = tmp_path / "VAE"
    vae_dir.mkdir()
    save_compvis(diffusers_vae(31), vae_dir / "ft-tiny.safetensors")
    body = {"prompt": "a red circle", "seed": 6, "steps": 2, "width": 32, "height": 32, "sampler_name": "Euler"}
    app = create_app([str(sd_file)], vae_dir=vae_dir)
    try:
        with TestClient(app) as client:
            assert client.get("/sdapi/v1/sd-vae").json() == [
                {"model_name": "ft-tiny.safetensors", "filename": str((vae_dir / "ft-tiny.safetensors").resolve())}]
            assert client.post("/sdapi/v1/refresh-vae").status_code == 200
            chosen = client.post("/sdapi/v1/txt2img",
                                 json={**body, "override_settings": {"sd_vae": "ft-tiny.safetensors"}})
            assert chosen.status_code == 200, chosen.text
            image = unb64(chosen.json()["images"][0])
            assert "VAE: ft-tiny.safetensors" in image.info["parameters"]
            assert json.loads(chosen.json()["info"])["sd_vae_name"] == "ft-tiny.safetensors"
            own = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": "Automatic"}})
            own_image = unb64(own.json()["images"][0])
            assert "VAE:" not in own_image.info["parameters"]
            assert not np.array_equal(np.asarray(own_image), np.asarray(image))
            assert client.get("/sdapi/v1/options").json()["sd_vae"] == "Automatic"
            assert client.post("/sdapi/v1/options", json={"sd_vae": "ft-tiny.safetensors"}).status_code == 200
            assert client.get("/sdapi/v1/options").json()["sd_vae"] == "ft-tiny.safetensors"
            by_option = client.post("/sdapi/v1/txt2img", json=body)
            assert np.array_equal(np.asarray(unb64(by_option.json()["images"][0])), np.asarray(image))
            none = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": "None"}})
            assert np.array_equal(np.asarray(unb64(none.json()["images"][0])), np.asarray(own_image))
            bad = client.post("/sdapi/v1/options", json={"sd_vae": "missing.pt"})
            assert bad.status_code == 422 and bad.json()["field"] == "sd_vae" and "ft-tiny" in bad.json()["error"]
            unknown = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": "missing.pt"}})
            assert unknown.status_code == 422 and unknown.json()["field"] == "vae"
            native = _job_images(client, {"prompt": "a red circle", "seed": 6, "steps": 2, "width": 32, "height": 32,
                                          "sampler": "euler", "prompt_weighting": "a1111",
                                          "vae": "ft-tiny.safetensors"})
            assert np.array_equal(native[0], np.asarray(image))
    finally:
        app.state.queue.close()
    out = tmp_path / "cli.png"
    assert main(["generate", "--model", str(sd_file), "--prompt", "a red circle", "--seed", "6", "--steps", "2",
                 "--width", "32", "--height", "32", "--sampler", "euler", "--prompt-weighting", "a1111", "--vae",
                 str(vae_dir / "ft-tiny.safetensors"), "--out", str(out), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(image))


def test_txt2img_variation_seeds_count_as_a1111s_and_equal_openldm_generate(sd, sd_file, tmp_path):
    body = {"prompt": "a red circle", "seed": 7, "subseed": 4, "subseed_strength": 0.3, "steps": 2, "width": 32,
            "height": 32, "sampler_name": "Euler", "batch_size": 2, "n_iter": 2, "seed_resize_from_w": 48,
            "seed_resize_from_h": 40}
    r = sd.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [7, 7, 7, 7] and info["all_subseeds"] == [4, 5, 6, 7]
    assert (info["subseed"], info["subseed_strength"]) == (4, 0.3)
    assert (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (48, 40)
    short = hashlib.sha256(sd_file.read_bytes()).hexdigest()[:10]
    assert info["sd_model_hash"] == short and f"Model hash: {short}, Model: " in info["infotexts"][0]
    listed = sd.get("/sdapi/v1/sd-models").json()[0]
    assert listed["hash"] == short and listed["title"].endswith(f" [{short}]")
    images = [unb64(image) for image in r.json()["images"]]
    assert "Variation seed: 6, Variation seed strength: 0.3, Seed resize from: 48x40" in images[2].info["parameters"]
    out = tmp_path / "cli.png"
    assert main(["generate", "--model", str(sd_file), "--prompt", "a red circle", "--seed", "7", "--subseed", "6",
                 "--subseed-strength", "0.3", "--seed-resize-from", "48x40", "--steps", "2", "--width", "32",
                 "--height", "32", "--sampler", "euler", "--prompt-weighting", "a1111", "--out", str(out),
                 "--quiet"]) == 0  # the second iteration's first image
    assert np.abs(np.asarray(Image.open(out), dtype=np.int16) - np.asarray(images[2], dtype=np.int16)).max() <= 1
    drawn = sd.post("/sdapi/v1/txt2img", json={**body, "subseed": -1, "n_iter": 1, "batch_size": 1})
    assert json.loads(drawn.json()["info"])["subseed"] >= 0
    off = sd.post("/sdapi/v1/txt2img", json={**body, "subseed_strength": 0, "n_iter": 1, "batch_size": 1})
    assert json.loads(off.json()["info"])["all_subseeds"] == [-1]


def test_styles_need_a_styles_file(sd):
    r = sd.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 32, "height": 32, "styles": ["ink"]})
    assert r.status_code == 422 and r.json()["field"] == "styles" and "--styles-file" in r.json()["error"]
    assert sd.get("/sdapi/v1/prompt-styles").json() == []


def _text(image):
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", image.info["parameters"])
    return info


def test_img2img_and_inpaint_keep_the_unmasked_pixels(sd):
    r = sd.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 4, "init_images": [RED], "seed": 2,
                                           "denoising_strength": 0.5})
    assert r.status_code == 200 and unb64(r.json()["images"][0]).size == (32, 32)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    r = sd.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 4, "init_images": ["data:image/png;base64," + RED],
                                           "mask": b64(mask), "mask_blur": 0, "inpainting_fill": 1,
                                           "inpaint_full_res": False, "seed": 2})
    out = np.asarray(unb64(r.json()["images"][0]).convert("RGB"))
    assert np.array_equal(out[np.asarray(mask) == 0], np.asarray(Image.open(io.BytesIO(base64.b64decode(RED))))[
        np.asarray(mask) == 0])
    assert not np.array_equal(out[12:20, 12:20], np.full((8, 8, 3), (200, 30, 30)))
    inverted = sd.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 4, "init_images": [RED], "mask": b64(mask),
                                                  "mask_blur": 0, "inpainting_mask_invert": 1, "seed": 2})
    inv = np.asarray(unb64(inverted.json()["images"][0]).convert("RGB"))
    assert np.array_equal(inv[12:20, 12:20], np.full((8, 8, 3), (200, 30, 30), dtype=np.uint8))


def test_basic_auth_on_every_route_and_no_echo(sd_file):
    app = create_app([str(sd_file)], api_auth="alice:s3cret")
    with TestClient(app) as client:
        for path in ("/", "/sdapi/v1/samplers", "/openldm/models", "/sdapi/v1/options"):
            r = client.get(path)
            assert r.status_code == 401 and "s3cret" not in r.text and "alice" not in r.text
        assert client.get("/sdapi/v1/samplers", auth=("alice", "wrong")).status_code == 401
        assert client.get("/sdapi/v1/samplers", auth=("alice", "s3cret")).status_code == 200
    app.state.queue.close()


def test_load_16_requests_from_8_threads_and_interrupt():
    """16 requests with distinct seeds from 8 client threads all complete, each equal to its one-at-a-time
    result; then an interrupt mid-job returns promptly and the next job runs."""
    import resource

    app = create_app()
    with TestClient(app) as client:
        generator = app.state.pool.get()
        expected = {s: np.asarray(generator.generate(GenerationRequest(class_label=s % 10, seed=s, steps=10))
                                  .images[0]) for s in range(16)}
        results, errors = {}, []

        def worker(seeds):
            for s in seeds:
                try:
                    job = client.post("/openldm/jobs", json={"class_label": s % 10, "seed": s, "steps": 10}).json()
                    while (state := client.get(f"/openldm/jobs/{job['id']}").json())["state"] in ("queued", "running"):
                        time.sleep(0.01)
                    results[s] = np.asarray(unb64(state["images"][0]))
                except Exception as e:  # reported below
                    errors.append(repr(e))

        threads = [threading.Thread(target=worker, args=([2 * i, 2 * i + 1],)) for i in range(8)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        elapsed = time.perf_counter() - start
        assert not errors and sorted(results) == list(range(16))
        assert all(np.array_equal(results[s], expected[s]) for s in range(16))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"\nload: 16 requests / 8 threads in {elapsed:.1f} s, peak RSS {peak:.0f} MiB")

        long = client.post("/openldm/jobs", json={"class_label": 0, "steps": 1000, "sampler": "ddpm"}).json()
        while client.get(f"/openldm/jobs/{long['id']}").json()["step"] < 2:
            time.sleep(0.01)
        t0 = time.perf_counter()
        assert client.post(f"/openldm/jobs/{long['id']}/interrupt").json() == {"ok": True}
        while (state := client.get(f"/openldm/jobs/{long['id']}").json())["state"] == "running":
            time.sleep(0.01)
        stopped = time.perf_counter() - t0
        assert state["state"] == "interrupted" and state["step"] < 1000 and len(state["images"]) == 1
        print(f"interrupt: stopped at step {state['step']} / 1000, {stopped * 1000:.0f} ms after the request")
        after = client.post("/sdapi/v1/txt2img", json={"steps": 3, "seed": 1})
        assert after.status_code == 200 and len(after.json()["images"]) == 1
    app.state.queue.close()
