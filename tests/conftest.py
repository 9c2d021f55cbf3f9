"""Shared test set-up: deterministic, two-thread torch so timings and results are stable on the CI machine."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # shared helpers: sd_testing.py, dist_testing.py, model_testing.py

torch.set_num_threads(2)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny tensors gain nothing from a second thread and lose much on a busy
    machine (OpenMP spin-waits). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The bundled model's recipe chain on a few steps, exported: shared by the recipe test (training/) and the demo
# test (pipelines/), trained once per session.
TINY_AE = ["data.options={size: 32, limit: 64}", "steps=2", "batch_size=8", "sample_every=0", "scale_samples=16",
           "disc_start=1"]
TINY_LDM = ["data.options={size: 32, limit: 64, captions: true}", "steps=2", "batch_size=8", "sample_every=0",
            "unet.model_channels=16", "unet.head_dim=8", "unet.norm_groups=4"]


@pytest.fixture(scope="session")
def retrained(tmp_path_factory):
    from openldm.pipelines.trained import export_run
    from openldm.training.recipes import retrain

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("demo")
    run = retrain(work, progress=False, overrides=TINY_LDM, autoencoder_overrides=TINY_AE, log=lambda m: None)
    out = export_run(run, work / "model")
    torch.set_num_threads(threads)
    return out

