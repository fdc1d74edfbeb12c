"""``[protection.secagg]`` parsing and validation."""

from __future__ import annotations

import pytest

from securefl.config import config_from_dict
from securefl.errors import ConfigError


def secagg(**table):
    return config_from_dict({"protection": {"kind": "secagg", "secagg": table}}).protection.secagg


def test_defaults_and_explicit_values():
    default = secagg()
    assert (default.clip, default.bits, default.neighbours, default.threshold,
            default.min_neighbours) == (1.0, "auto", "auto", 0.5, 2)
    explicit = secagg(clip=0.5, max_weight=200, bits=20, neighbours=8, threshold=0.75)
    assert (explicit.clip, explicit.max_weight, explicit.bits, explicit.neighbours,
            explicit.threshold) == (0.5, 200.0, 20, 8, 0.75)


@pytest.mark.parametrize(("table", "message"), [
    ({"clip": 0}, "clip must be finite and > 0"),
    ({"max_weight": -1}, "max_weight must be finite and > 0"),
    ({"bits": 32}, "bits must be in [2, 31]"),
    ({"bits": "many"}, "bits must be"),
    ({"neighbours": 1}, "neighbours must be >= min_neighbours (2)"),
    ({"neighbours": 4, "min_neighbours": 6}, "neighbours must be >= min_neighbours (6)"),
    ({"min_neighbours": 1}, "min_neighbours must be an integer >= 2"),
    ({"threshold": 0.3}, "threshold must be in [0.5, 1)"),
    ({"threshold": 1.0}, "threshold must be in [0.5, 1)"),
    ({"shares": 3}, "shares is not a known key"),
])
def test_invalid_values_name_the_field(table, message):
    with pytest.raises(ConfigError) as error:
        secagg(**table)
    assert "[protection.secagg]" in str(error.value) and message in str(error.value)
