"""These tests use tiny tensors, where intra-op threads only add synchronisation (and on a busy machine stall for
tens of milliseconds per op): run each on one thread, restoring the session's setting after."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test in this folder runs on one torch thread (the fixture lives in tests/conftest.py)."""


