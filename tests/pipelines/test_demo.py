"""The README demo: grids from a trained model (a row per class, a row per prompt); the model is the recipe chain's
(tests/training/test_recipes.py), retrained on a few steps and exported."""
import pytest
from PIL import Image

from openldm.pipelines.demo import demo_grids, run_demo
from openldm.pipelines.trained import load_run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_grids_have_a_row_per_class_and_per_prompt(retrained, tmp_path):
    grids = demo_grids(load_run(retrained), per_row=3, steps=2, zoom=2, prompts=["a bag", "a dress"])
    cell = 28 + 2  # tiles of 28 px with 2 px gaps
    assert grids["classes"].size == (2 * (2 + 3 * cell), 2 * (2 + 10 * cell))
    assert grids["prompts"].size == (2 * (2 + 3 * cell), 2 * (2 + 2 * cell))
    paths = run_demo(retrained, tmp_path / "demo.png", steps=2, per_row=2, log=lambda m: None)
    assert [p.name for p in paths] == ["demo-classes.png", "demo-prompts.png"]
    assert Image.open(paths[0]).mode == "L"
