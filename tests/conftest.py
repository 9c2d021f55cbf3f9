"""Shared test set-up: deterministic, two-thread torch so timings and results are stable on the CI machine."""
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)
