"""Fixtures shared across the test tree."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Run a test with one intra-op torch thread (stable timings and results on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
