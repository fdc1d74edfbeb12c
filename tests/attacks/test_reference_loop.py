"""The independent reference loop of Karimireddy et al. 2022's exp3
(``attacks/reference/karimireddy_loop.py``: plain torch, their aggregators and attacks, none
of securefl's engine): on label-sorted mnist5k, coordinate-wise median under IPM stays at
the initial model's accuracy on securefl's [0, 1] pixels and learns with their input scaling
``(x - 0.1307) / 0.3081``, as the harness does (``karimireddy2022-normalized.toml``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

LOOP = Path(__file__).resolve().parents[2] / "attacks" / "reference" / "karimireddy_loop.py"


def _loop() -> ModuleType:
    spec = importlib.util.spec_from_file_location("karimireddy_loop", LOOP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~11 s of CPU: two 60-round runs of 25 workers
def test_reference_median_under_ipm_learns_only_with_their_input_scaling() -> None:
    pytest.importorskip("mlxtend")
    loop = _loop()
    plain = loop.run(attack="ipm", rule="cm", seed=0, rounds=60, every=30)
    scaled = loop.run(attack="ipm", rule="cm", seed=0, rounds=60, every=30, normalize=True)
    assert plain["accuracy_curve"] == pytest.approx([0.121, 0.12], abs=0.01)
    assert scaled["accuracy_curve"] == pytest.approx([0.165, 0.191], abs=0.01)
