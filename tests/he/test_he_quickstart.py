"""The quickstart under HE stays within 0.5% of plain accuracy."""

import pytest

from securefl.config import load_config
from securefl.simulation import run_simulation


def _accuracies(path, **changes):
    history = run_simulation(load_config(path).replace(**changes)).history
    assert all(r.aborted is None and not r.rejected for r in history.rounds)
    assert all(len(r.clients) == 10 for r in history.rounds)
    return [r.accuracy for r in history.rounds]


def test_he_example_is_the_quickstart_with_he_protection():
    plain, he = load_config("examples/quickstart.toml"), load_config("examples/he.toml")
    assert he.protection.kind == "he" and plain.protection.kind == "plain"
    assert he.replace(run=plain.run, protection=plain.protection) == plain


def test_reduced_quickstart_under_he_matches_plain_within_half_a_percent():
    changes = {"run__rounds": 3, "client__epochs": 1, "simulation__wire": True}
    plain = _accuracies("examples/quickstart.toml", **changes)
    he = _accuracies("examples/he.toml", **changes)
    assert he[-1] > 0.5  # it learned something
    assert all(abs(a - b) <= 0.005 for a, b in zip(plain, he, strict=True))


@pytest.mark.slow
def test_full_quickstart_under_he_matches_plain_within_half_a_percent():
    plain = _accuracies("examples/quickstart.toml")
    he = _accuracies("examples/he.toml")
    assert plain[-1] >= 0.9
    assert abs(plain[-1] - he[-1]) <= 0.005
