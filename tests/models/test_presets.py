"""Every preset builds, with the parameter counts the issue names for the SD topologies."""
import pytest

from openldm.models.catalog import count_parameters, preset_rows
from openldm.registry import MODELS, PRESETS


def test_sd_parameter_counts_exact():
    rows = {r.name: r.parameters for r in preset_rows()}
    assert rows["sd15-unet"] == 859_520_964
    assert rows["sd-vae"] == 83_653_863
    assert rows["sd15-text-encoder"] == 123_060_480


@pytest.mark.parametrize("name", [n for n in PRESETS.names() if n.startswith(("tiny", "small"))])
def test_small_presets_build_and_count(name):
    kind, cfg = PRESETS.get(name)()
    model = MODELS.get(kind)(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(kind, cfg) > 0


def test_models_command_prints_thousands_separators(capsys):
    from openldm.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "859,520,964" in out and "83,653,863" in out and "123,060,480" in out
