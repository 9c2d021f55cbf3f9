"""Every registered sampler carries its AUTOMATIC1111 name; names (and legacy "... Karras" names) map back."""
import pytest

from openldm.registry import SAMPLERS
from openldm.samplers import a1111_name, from_a1111_name


def test_every_sampler_round_trips_through_its_a1111_name():
    names = [a1111_name(n) for n in SAMPLERS.names()]
    assert len(set(names)) == len(names)
    for name in SAMPLERS.names():
        assert from_a1111_name(a1111_name(name)) == (name, False)
        assert from_a1111_name(name) == (name, False)  # our own names are accepted too


def test_a1111_names_and_legacy_karras_names():
    assert from_a1111_name("Euler a") == ("euler_ancestral", False)
    assert from_a1111_name("DPM++ 2M") == ("dpmpp_2m", False)
    assert from_a1111_name("DPM++ 2M Karras") == ("dpmpp_2m", True)
    assert from_a1111_name("DPM++ 2M SDE Karras") == ("dpmpp_2m_sde", True)
    with pytest.raises(KeyError, match="Euler a"):
        from_a1111_name("UniPC")
