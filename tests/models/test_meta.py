"""Meta-device builds within a budget: every preset fits a budget of exactly its own weights, an absurd config is
stopped at once, and the global registration hooks count only the building thread's modules."""
import dataclasses
import threading
import time

import pytest

from openldm.models.meta import BudgetExceeded, build_on_meta
from openldm.models.unet import UNet
from openldm.registry import MODELS, PRESETS


@pytest.mark.parametrize("preset", [name for name, _ in PRESETS.items()])
def test_every_preset_fits_a_budget_of_exactly_its_weights(preset):
    kind, cfg = PRESETS.get(preset)()
    state = build_on_meta(MODELS.get(kind), cfg).state_dict()
    count, elements = len(state), sum(t.numel() for t in state.values())
    module = build_on_meta(MODELS.get(kind), cfg, max_tensors=count, max_elements=elements)
    assert len(module.state_dict()) == count
    with pytest.raises(BudgetExceeded, match="tensors|elements"):
        build_on_meta(MODELS.get(kind), cfg, max_tensors=count - 1, max_elements=elements)
    with pytest.raises(BudgetExceeded, match="elements"):
        build_on_meta(MODELS.get(kind), cfg, max_tensors=count, max_elements=elements - 1)


def test_an_absurd_config_stops_at_once():
    _, cfg = PRESETS.get("tiny-unet")()
    start = time.perf_counter()
    with pytest.raises(BudgetExceeded, match="more than 1,000 tensors"):
        build_on_meta(UNet, dataclasses.replace(cfg, num_res_blocks=10**9), max_tensors=1000)
    assert time.perf_counter() - start < 5


def test_the_budget_counts_only_its_own_thread():
    """Another thread building a big model meanwhile neither trips the budget nor is stopped by it."""
    _, small = PRESETS.get("tiny-unet")()
    _, big = PRESETS.get("small-unet")()
    n = len(build_on_meta(UNet, small).state_dict())
    started, results = threading.Event(), {}

    def other() -> None:
        started.wait()
        results["other"] = len(build_on_meta(UNet, big).state_dict())

    thread = threading.Thread(target=other)
    thread.start()

    class Slow(UNet):  # builds while the other thread does
        def __init__(self, cfg):
            started.set()
            time.sleep(0.2)
            super().__init__(cfg)

    results["own"] = len(build_on_meta(Slow, small, max_tensors=n).state_dict())
    thread.join()
    assert results == {"own": n, "other": len(build_on_meta(UNet, big).state_dict())}
    assert results["other"] > n
