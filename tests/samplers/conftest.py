"""These tests use tiny tensors, where intra-op threads only add synchronisation (and on a busy machine stall for
tens of milliseconds per op): run each on one thread, restoring the session's setting after."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
