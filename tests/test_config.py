from dataclasses import dataclass, field

import pytest

from openldm.config import ConfigError, apply_overrides, from_dict, load, to_dict


@dataclass
class Inner:
    channels: int = 32
    mult: tuple[int, ...] = (1, 2)
    context_dim: int | None = None


@dataclass
class Outer:
    name: str = "x"
    lr: float = 1e-4
    unet: Inner = field(default_factory=Inner)


def test_round_trip_and_coercion():
    cfg = from_dict(Outer, {"lr": 1, "unet": {"channels": 64, "mult": [1, 2, 4]}})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.unet.mult == (1, 2, 4)
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_unknown_key_names_the_key_and_valid_ones():
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, {"unet": {"chanels": 3}})
    msg = str(e.value)
    assert "unet.chanels" in msg and "channels" in msg and "did you mean" in msg


@pytest.mark.parametrize("data, where", [
    ({"lr": "fast"}, "lr"),
    ({"unet": {"channels": 1.5}}, "unet.channels"),
    ({"unet": {"mult": 3}}, "unet.mult"),
    ({"unet": {"context_dim": "a"}}, "unet.context_dim"),
    ({"name": True}, "name"),
])
def test_mistyped_values_are_errors(data, where):
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        from_dict(Outer, data)


def test_dotted_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: run\nunet:\n  channels: 16\n")
    cfg = load(Outer, f, ["unet.channels=64", "unet.context_dim=768", "unet.mult=[1,2,4]", "lr=3e-4"])
    assert cfg == Outer(name="run", lr=3e-4, unet=Inner(64, (1, 2, 4), 768))
    assert apply_overrides({}, ["a.b=null"]) == {"a": {"b": None}}
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["nonsense"])
    with pytest.raises(ConfigError, match="unet.bogus"):
        load(Outer, f, ["unet.bogus=1"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load(Outer, tmp_path / "nope.yaml")
