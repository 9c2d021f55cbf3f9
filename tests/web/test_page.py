"""The served page in a real browser (Debian's Chromium driven by Playwright) against a real server with the
bundled Fashion-MNIST model: the model's capabilities shape the form, a class-conditional job shows progress and a
live preview and lands in the gallery as a PNG carrying its parameters, errors name their field, the inpainting
mask painter sends a mask of the image's size, and PNG parameters (file input and a real drop) fill the form; with
a tiny Stable Diffusion model, the hires fix controls. Writes docs/serve-page.png."""
from __future__ import annotations

import base64
import io
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image, PngImagePlugin

from openldm.web.app import create_app

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "serve-page.png"
TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url():
    yield from _serve(create_app())


def _serve(app):
    """Serve ``app`` on a free local port in a thread; yields its URL, then stops it."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{url}/openldm/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not answer within 30 s"
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(timeout=10)
    app.state.queue.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"the page test drives the system Chromium at {CHROMIUM}, which is missing: "
                    "apt-get install chromium (or make test)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server_url):
    yield from _open(browser, server_url, "document.querySelectorAll('#class-label option').length > 1")


def _open(browser, url: str, ready: str):
    """A page at ``url`` once the JavaScript condition ``ready`` holds; no JavaScript errors by the end."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function(ready, timeout=TIMEOUT_S * 1000)
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def decode_data_url(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,"), url[:40]
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    image.load()
    return image


def png_with_parameters(path: Path, text: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("L", (28, 28), 0).save(path, pnginfo=info)
    return path


def gallery_count(page) -> int:
    return page.locator("#gallery img.result-image").count()


def generate_and_watch(page, before: int) -> list[dict]:
    """Click Generate and sample the progress bar, preview and gallery until new results appear."""
    page.click("#generate")
    samples = []
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        samples.append(page.evaluate("""() => ({
            progress: document.getElementById('progress').value,
            preview: !document.getElementById('preview').hidden && document.getElementById('preview').src !== '',
            eta: document.getElementById('eta').textContent,
            results: document.querySelectorAll('#gallery img.result-image').length,
            error: document.getElementById('error').hidden ? null : document.getElementById('error').textContent})"""))
        assert samples[-1]["error"] is None, samples[-1]["error"]
        if samples[-1]["results"] > before:
            return samples
        assert time.monotonic() < deadline, f"no result within {TIMEOUT_S} s; last state {samples[-1]}"
        time.sleep(0.03)


def test_class_job_progress_gallery_and_screenshot(page):
    # the model's capabilities shape the form
    assert page.locator("#model option").all_inner_texts() == ["fashion_mnist", "emoji"]  # every bundled model
    assert "trouser" in " ".join(page.locator("#class-label option").all_inner_texts())
    assert page.is_hidden("#negative-prompt-row")  # the bundled model guides against its null condition
    assert page.is_visible("#tab-img2img") and page.is_visible("#tab-inpaint") and page.is_visible("#tab-conditions")
    assert page.input_value("#sampler") == "ddim" and page.input_value("#steps") == "50"
    assert page.input_value("#guidance") == "2" and page.input_value("#width") == "32"
    assert page.locator("#sampler option[value=euler_ancestral]").inner_text() == "Euler a"

    page.click("#tab-conditions")
    page.select_option("#class-label", "1")
    assert "trouser" in page.inner_text("#conditions-summary")
    page.fill("#steps", "30")
    page.fill("#seed", "42")
    page.fill("#num-images", "4")
    samples = generate_and_watch(page, before=0)
    running = [s for s in samples if s["results"] == 0]
    assert any(0 < s["progress"] < 1 for s in running), f"the progress bar never moved: {running}"
    assert any(s["preview"] for s in running), "no live preview was shown while the job ran"
    assert any("step" in s["eta"] and "ETA" in s["eta"] for s in running), running[-1]
    page.wait_for_function("document.getElementById('progress').value === 1")

    images = page.locator("#gallery img.result-image")
    assert images.count() == 4
    for i in range(4):
        image = decode_data_url(images.nth(i).get_attribute("src"))
        assert image.size == (28, 28) and image.mode == "L"
        parameters = image.info["parameters"]
        assert "Class label: 1" in parameters and "Steps: 30" in parameters and "Seed: 42" in parameters
        assert f"Batch pos: {i}" in parameters
        assert page.locator("#gallery .result").nth(i).locator(".infotext").inner_text() == parameters.strip()
        assert page.locator("#gallery a.download").nth(i).get_attribute("download") == f"openldm-42-{i}.png"
    # shown scaled up, pixelated
    assert images.first.bounding_box()["width"] >= 150
    assert images.first.evaluate("e => getComputedStyle(e).imageRendering") == "pixelated"

    # seed buttons
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    page.click("#seed-reuse")
    assert page.input_value("#seed") == "42"

    # a second batch (another class) for a fuller screenshot
    page.select_option("#class-label", "7")
    page.fill("#seed", "7")
    page.fill("#steps", "20")
    generate_and_watch(page, before=4)
    assert gallery_count(page) == 8
    newest = decode_data_url(images.first.get_attribute("src")).info["parameters"]
    assert "Class label: 7" in newest and "Seed: 7," in newest
    page.click("#tab-conditions")
    page.evaluate("document.activeElement.blur()")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))


def test_bad_request_shows_the_error_and_its_field(page):
    page.fill("#width", "30")  # not a multiple of 16
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])", timeout=TIMEOUT_S * 1000)
    assert "width" in page.inner_text("#error") and "16" in page.inner_text("#error")
    assert "invalid" in page.get_attribute("#width", "class")
    assert page.is_enabled("#generate")  # ready for the next try
    page.fill("#width", "32")  # editing the field clears the error
    assert page.is_hidden("#error")


def test_interrupt_keeps_the_current_estimate(page):
    page.select_option("#sampler", "ddpm")
    page.fill("#steps", "1000")  # minutes on a CPU: only an interrupt ends it in time
    page.click("#generate")
    page.wait_for_function("document.getElementById('progress').value > 0", timeout=TIMEOUT_S * 1000)
    assert page.is_disabled("#generate") and page.is_enabled("#interrupt")
    page.click("#interrupt")
    page.wait_for_selector("#gallery .result.interrupted", timeout=TIMEOUT_S * 1000)
    assert page.inner_text("#eta").startswith("interrupted")
    image = decode_data_url(page.locator("#gallery img.result-image").first.get_attribute("src"))
    assert image.size == (28, 28) and "Steps: 1000" in image.info["parameters"]
    assert page.is_enabled("#generate") and page.is_disabled("#interrupt")


MASK_PIXELS = """() => {
    const c = document.getElementById('mask-canvas');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i] > 127) n++;
    return [n, c.width, c.height];
}"""


def test_inpainting_mask_painter_and_paste_back(page, tmp_path):
    # a 28x28 greyscale picture: a bright garment-like block on black
    picture = np.zeros((28, 28), np.uint8)
    picture[4:24, 7:21] = 180
    picture[4:24, 13:15] = 90
    path = tmp_path / "init.png"
    Image.fromarray(picture, "L").save(path)

    page.click("#tab-inpaint")
    page.set_input_files("#inpaint-image", str(path))
    page.wait_for_selector("#mask-stage:not([hidden])")
    assert page.evaluate(MASK_PIXELS) == [0, 28, 28]
    assert page.is_disabled("#width")  # the result has the image's size

    box = page.locator("#mask-view").bounding_box()
    assert box["width"] > 200  # shown scaled up to paint on
    page.fill("#brush-size", "4")
    page.dispatch_event("#brush-size", "input")
    y = box["y"] + box["height"] * 0.5
    page.mouse.move(box["x"] + box["width"] * 0.3, y)
    page.mouse.down()
    for k in range(1, 11):
        page.mouse.move(box["x"] + box["width"] * (0.3 + 0.04 * k), y)
    page.mouse.up()
    painted, width, height = page.evaluate(MASK_PIXELS)
    assert 20 < painted < width * height // 2, painted

    # invert twice is the identity; the eraser takes pixels away
    page.click("#mask-invert")
    assert page.evaluate(MASK_PIXELS)[0] == width * height - painted
    page.click("#mask-invert")
    assert page.evaluate(MASK_PIXELS)[0] == painted
    page.check("#eraser")
    page.mouse.move(box["x"] + box["width"] * 0.7, y)
    page.mouse.down()
    page.mouse.up()
    page.uncheck("#eraser")
    erased = page.evaluate(MASK_PIXELS)[0]
    assert 0 < erased < painted

    mask = np.array(decode_data_url(page.evaluate("document.getElementById('mask-canvas').toDataURL('image/png')"))
                    .convert("L"))
    assert mask.shape == (28, 28)
    assert page.is_checked("#paste-back")
    page.click("#tab-conditions")
    page.select_option("#class-label", "0")
    page.click("#tab-inpaint")
    page.fill("#steps", "10")
    before = gallery_count(page)
    with page.expect_request(lambda r: r.url.endswith("/openldm/jobs") and r.method == "POST") as sent:
        generate_and_watch(page, before)
    body = sent.value.post_data_json
    assert body["paste_back"] is True and body["strength"] == 1 and body["class_label"] == 0
    assert body["width"] is None and body["height"] is None  # the image's size
    assert np.array_equal(np.array(decode_data_url(body["init_image"]).convert("L")), picture)
    sent_mask = np.array(decode_data_url(body["mask"]).convert("RGB")).astype(int)  # white on black, image's size
    assert sent_mask.shape == (28, 28, 3) and (sent_mask == sent_mask[..., :1]).all()
    assert np.array_equal(sent_mask[..., 0], mask) and mask.min() == 0 and mask.max() == 255
    result = decode_data_url(page.locator("#gallery img.result-image").first.get_attribute("src"))
    assert result.size == (28, 28) and result.mode == "L"
    assert "Paste back: True" in result.info["parameters"] and "Class label: 0" in result.info["parameters"]
    out = np.array(result).astype(int)
    redraw = mask >= 128  # the server binarises the mask at 0.5
    assert np.abs(out - picture)[redraw].mean() > 5, "nothing was redrawn inside the mask"


DROP = """async ([url, name]) => {
    const blob = await (await fetch(url)).blob();
    const transfer = new DataTransfer();
    transfer.items.add(new File([blob], name, {type: 'image/png'}));
    return transfer;
}"""


def test_png_parameters_from_file_input_and_drop(page, tmp_path):
    text = "\nSteps: 17, Sampler: Euler a, Schedule type: Automatic, CFG scale: 2.5, Seed: 1234, Size: 32x32, Class label: 8"
    page.set_input_files("#png-file", str(png_with_parameters(tmp_path / "params.png", text)))
    page.wait_for_function("document.getElementById('steps').value === '17'", timeout=TIMEOUT_S * 1000)
    assert page.input_value("#sampler") == "euler_ancestral"
    assert page.input_value("#seed") == "1234" and page.input_value("#guidance") == "2.5"
    assert page.input_value("#class-label") == "8"
    assert "bag" in page.locator("#class-label option:checked").inner_text()
    assert not page.is_checked("#karras")
    assert "Seed: 1234" in page.inner_text("#png-info")

    # a real drop of a PNG file on the page
    text = "\nSteps: 23, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 3, Seed: 99, Size: 32x32, Class label: 3"
    data = base64.b64encode(png_with_parameters(tmp_path / "drop.png", text).read_bytes()).decode()
    transfer = page.evaluate_handle(DROP, [f"data:image/png;base64,{data}", "drop.png"])
    page.dispatch_event("body", "dragenter", {"dataTransfer": transfer})
    assert page.is_visible("#drop-overlay")
    page.dispatch_event("body", "drop", {"dataTransfer": transfer})
    page.wait_for_function("document.getElementById('steps').value === '23'", timeout=TIMEOUT_S * 1000)
    assert page.is_hidden("#drop-overlay")
    assert page.input_value("#sampler") == "dpmpp_2m" and page.is_checked("#karras")
    assert page.input_value("#seed") == "99" and page.input_value("#class-label") == "3"
    assert "dress" in page.locator("#class-label option:checked").inner_text()

    # a PNG without parameters is an error naming the image
    Image.new("L", (8, 8)).save(tmp_path / "plain.png")
    page.set_input_files("#png-file", str(tmp_path / "plain.png"))
    page.wait_for_selector("#error:not([hidden])", timeout=TIMEOUT_S * 1000)
    assert "parameters" in page.inner_text("#error")


@pytest.fixture(scope="module")
def sd_url(tmp_path_factory):
    from sd_testing import diffusers_vae, save_compvis, tiny_pipeline

    from openldm.cli import main

    tmp = tmp_path_factory.mktemp("page_sd")
    folder, _ = tiny_pipeline(tmp)
    assert main(["convert", str(folder), str(tmp / "tiny.safetensors"), "--to", "original"]) == 0
    (tmp / "VAE").mkdir()
    save_compvis(diffusers_vae(41), tmp / "VAE" / "ft-tiny.safetensors")
    yield from _serve(create_app([str(tmp / "tiny.safetensors")], vae_dir=tmp / "VAE"))


def test_the_hires_tiling_vae_and_variation_controls_make_their_image_and_come_back_from_its_png(browser, sd_url,
                                                                                                  page, tmp_path):
    assert page.is_hidden("#hires-row") and page.is_hidden("#tiling-row")  # the bundled model has neither
    assert page.is_hidden("#vae-row")
    for sd in _open(browser, sd_url, "document.querySelectorAll('#hires-upscaler option').length > 1"):
        assert sd.is_visible("#hires-row") and sd.input_value("#hires-upscaler") == "Latent"
        sd.fill("#prompt", "a red circle")
        for field, value in (("#steps", "2"), ("#width", "32"), ("#height", "32"), ("#seed", "3"),
                             ("#hires-scale", "2"), ("#hires-steps", "3")):
            sd.fill(field, value)
        sd.check("#hires")
        sd.check("#tiling")
        assert sd.is_visible("#vae-row") and sd.input_value("#vae") == ""
        sd.select_option("#vae", "ft-tiny.safetensors")
        sd.fill("#subseed", "5")
        sd.fill("#subseed-strength", "0.4")
        sd.select_option("#hires-upscaler", "Latent (nearest)")
        sd.fill("#hires-strength", "0.5")
        generate_and_watch(sd, before=0)
        image = decode_data_url(sd.locator("#gallery img.result-image").first.get_attribute("src"))
        assert image.size == (64, 64)
        parameters = image.info["parameters"]
        assert "Size: 32x32" in parameters and "Denoising strength: 0.5" in parameters
        assert "Hires upscale: 2, Hires upscaler: Latent (nearest), Hires steps: 3" in parameters
        assert "Tiling: True" in parameters and "VAE: ft-tiny.safetensors" in parameters
        assert "Variation seed: 5, Variation seed strength: 0.4" in parameters

        sd.uncheck("#hires")
        sd.uncheck("#tiling")
        sd.select_option("#vae", "")
        sd.fill("#subseed-strength", "0")
        sd.fill("#subseed", "-1")
        sd.select_option("#hires-upscaler", "Lanczos")
        path = tmp_path / "hires.png"
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        image.save(path, pnginfo=info)
        sd.set_input_files("#png-file", str(path))
        sd.wait_for_function("document.getElementById('hires').checked", timeout=TIMEOUT_S * 1000)
        assert sd.input_value("#hires-upscaler") == "Latent (nearest)" and sd.input_value("#hires-steps") == "3"
        assert sd.input_value("#hires-strength") == "0.5" and sd.input_value("#hires-scale") == "2"
        assert sd.is_checked("#tiling") and sd.input_value("#vae") == "ft-tiny.safetensors"
        assert sd.input_value("#subseed") == "5" and sd.input_value("#subseed-strength") == "0.4"
