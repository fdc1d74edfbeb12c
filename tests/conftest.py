"""Fixtures shared across the test tree."""

import pytest

from securefl.engine.trainer import torch_threads


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test runs with one intra-op torch thread, as a simulation does by default
    (``[simulation] threads = "auto"``): stable results, and no oversubscription of 2 cores
    when a networked run is compared with a simulated one."""
    with torch_threads(1):
        yield
