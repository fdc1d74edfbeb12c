"""Rule names in ``[aggregation]``, options passed through, and the server-facing protocols."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from securefl.aggregation import (
    NNM,
    RULES,
    Aggregator,
    CenteredClipping,
    FLTrust,
    Krum,
    TrimmedMean,
    build_aggregator,
)
from securefl.build import aggregator_for, config_from_dict
from securefl.errors import ConfigError

TABLES: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "krum": {"num_byzantine": 2},
    "multikrum": {"num_byzantine": 2, "num_selected": 5},
    "median": {},
    "trimmed_mean": {"beta": 0.2},
    "bulyan": {"num_byzantine": 2},
    "geometric_median": {"smoothing": 1e-5, "max_iterations": 50},
    "centered_clipping": {"tau": 0.5, "iterations": 2},
    "norm_bound": {"max_norm": 3.0},
    "nnm": {"num_byzantine": 2, "inner": "krum"},
    "bucketing": {"bucket_size": 2, "num_byzantine": 2, "inner": "krum"},
    "fltrust": {"root_examples": 50},
}


def test_every_rule_has_a_config_name() -> None:
    assert set(RULES) == set(TABLES)


@pytest.mark.parametrize("rule", sorted(TABLES))
def test_config_builds_each_rule_with_its_options(rule: str) -> None:
    config = config_from_dict({"aggregation": {"rule": rule, **TABLES[rule]}})
    aggregator = aggregator_for(config)
    assert isinstance(aggregator, Aggregator)
    assert aggregator.linear is (rule == "fedavg")
    for key, value in TABLES[rule].items():
        if key != "inner":
            assert getattr(aggregator, key) == value


def test_nnm_inner_from_a_name_or_an_inline_table() -> None:
    by_name = build_aggregator("nnm", num_byzantine=3, inner="krum")
    assert isinstance(by_name, NNM) and isinstance(by_name.inner, Krum)
    assert by_name.inner.num_byzantine == 3  # passed on to an inner rule that takes it
    table = aggregator_for(config_from_dict({"aggregation": {
        "rule": "nnm", "num_byzantine": 1,
        "inner": {"rule": "trimmed_mean", "beta": 0.25}}}))
    assert isinstance(table.inner, TrimmedMean) and table.inner.beta == 0.25
    explicit = build_aggregator("nnm", num_byzantine=1, inner={"rule": "krum",
                                                               "num_byzantine": 2})
    assert explicit.inner.num_byzantine == 2


@pytest.mark.parametrize(("table", "message"), [
    ({"rule": "krum"}, "num_byzantine"),
    ({"rule": "krum", "num_byzantine": -1}, ">= 0"),
    ({"rule": "trimmed_mean", "beta": 0.7}, r"\[0, 0.5\)"),
    ({"rule": "median", "beta": 0.1}, r"unknown option\(s\) beta \(allowed: none\)"),
    ({"rule": "nnm", "num_byzantine": 1, "inner": "no_such_rule"}, "unknown rule"),
    ({"rule": "no_such_rule"}, "unknown rule"),
])
def test_bad_tables_are_config_errors(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"aggregation": table})


def test_robust_rules_refuse_protected_sums() -> None:
    with pytest.raises(ConfigError, match="plaintext"):
        config_from_dict({"aggregation": {"rule": "median"},
                          "protection": {"kind": "secagg"}})


def test_stateful_protocol_of_the_server() -> None:
    """With ``stateful``, the server calls ``rule(rows, w, state=s)`` and keeps the new state."""
    rng = np.random.default_rng(0)
    rule = build_aggregator("centered_clipping", tau=0.3)
    assert rule.stateful
    state = None
    for _ in range(3):
        rows = rng.standard_normal((6, 8)).astype(np.float32)
        previous = state
        delta, state = rule(rows, np.ones(6), state=state)
        assert delta.shape == (8,) and state is not delta
        np.testing.assert_array_equal(state, delta)
        if previous is not None:  # one iteration moves at most tau from the carried state
            assert np.linalg.norm(delta - previous) <= 0.3 + 1e-5
    plain = CenteredClipping(tau=0.3)(rows)
    assert isinstance(plain, np.ndarray) and plain.shape == (8,)


def test_reference_protocol_of_fltrust() -> None:
    rule = build_aggregator("fltrust")
    assert rule.needs_reference and not getattr(build_aggregator("krum", num_byzantine=1),
                                                 "needs_reference", False)
    rows = np.eye(3)
    np.testing.assert_allclose(rule(rows, reference=2 * np.eye(3)[0]), [2, 0, 0])
    assert isinstance(rule, FLTrust) and rule.root_examples == 100
