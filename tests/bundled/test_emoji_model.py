"""The bundled emoji model: it ships in the package with its autoencoder and the artwork's attributions, loads from
there alone, and writes 64x64 colour images whose colour follows the prompt."""
import pytest
from PIL import Image

from openldm.bundled import available, bundled_dir
from openldm.pipelines.trained import load_run, sample_trained

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return load_run(bundled_dir("emoji"))


def test_the_bundle_is_small_complete_and_attributed(model):
    folder = bundled_dir("emoji")
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 25 * 2**20, f"the bundled emoji model is {size / 2**20:.1f} MiB"
    assert [type(c).__name__ for c in model.conditioner.conditioners.values()] == ["TextConditioner"]
    assert model.autoencoder is not None and model.channels == 3 and model.image_size == (64, 64)
    notice = (folder / "ATTRIBUTION.md").read_text()
    assert all(licence in notice for licence in ("Apache-2.0", "CC-BY-4.0", "MIT"))
    assert available() == ["fashion_mnist", "emoji"]


def test_generate_writes_a_colour_64px_png(tmp_path):
    from openldm.cli import main

    out = tmp_path / "apple.png"
    assert main(["generate", "--model", "emoji", "--prompt", "a red apple, google emoji style", "--steps", "10",
                 "--quiet", "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert len(set(image.getdata())) > 50  # a colour picture, not a flat or grey one


def test_colour_follows_the_prompt(model):
    """Every seed's "blue heart" is bluer than its "red apple": mean red minus blue (images in [-1, 1])."""
    def red_minus_blue(prompt):
        x = sample_trained(model, prompt=prompt, num_images=4, steps=10, seed=0).mean(dim=(2, 3))
        return x[:, 0] - x[:, 2]

    apple = red_minus_blue("a red apple, google emoji style")
    heart = red_minus_blue("a blue heart, twitter emoji style")
    assert (apple > 0).all() and (heart < -0.3).all() and (apple - heart > 0.5).all(), (apple, heart)
