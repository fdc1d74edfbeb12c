"""SQLite server state: rounds commit once, checkpoints are atomic and checked."""

from __future__ import annotations

import numpy as np
import pytest

from securefl.errors import ConfigError
from securefl.runtime.store import ServerStore, model_hash


@pytest.fixture
def store(tmp_path):
    s = ServerStore(tmp_path)
    s.bind("cfg", resume=False)
    yield s
    s.close()


def _complete(store, rnd, value, charges=None):
    store.begin_round(rnd, ["a", "b"])
    return store.complete_round(rnd, state={"model": np.full(4, value, np.float32),
                                            "optimizer.m": np.arange(3.0)},
                                dropped={"c": "disconnected"}, metrics={"accuracy": value},
                                charges=charges or {})


def test_rounds_checkpoints_and_ledger_copy(store):
    digest = _complete(store, 1, 0.5, {"a": {"epsilon": 0.25, "delta": 1e-5}})
    _complete(store, 2, 0.75, {"a": {"epsilon": 0.5}, "b": {"epsilon": 1.0}})  # cumulative
    assert digest == model_hash(np.full(4, 0.5, np.float32))
    assert store.last_completed() == 2
    saved = store.load_checkpoint(2)
    np.testing.assert_array_equal(saved["model"], np.full(4, 0.75, np.float32))
    np.testing.assert_array_equal(saved["optimizer.m"], np.arange(3.0))
    assert store.spent() == {"a": 0.5, "b": 1.0}
    assert store.charges()[0] == (1, "a", 0.25, 1e-5)
    rows = store.rounds()
    assert [r["round"] for r in rows] == [1, 2] and rows[0]["dropped"] == {"c": "disconnected"}


def test_a_round_is_never_applied_twice(store):
    _complete(store, 1, 0.5, {"a": {"epsilon": 0.25}})
    with pytest.raises(ConfigError, match="round 1 is already completed"):
        store.begin_round(1, ["a"])
    assert store.spent() == {"a": 0.25}


def test_an_interrupted_round_is_restarted_not_counted(store):
    _complete(store, 1, 0.5)
    store.begin_round(2, ["a"])  # the server dies here
    assert store.last_completed() == 1
    store.begin_round(2, ["a", "b"])  # resumed: the round starts over
    _complete_again = store.complete_round(2, state={"model": np.zeros(4, np.float32)},
                                           dropped={}, metrics={}, charges={})
    assert _complete_again == model_hash(np.zeros(4, np.float32))
    assert [r["participants"] for r in store.rounds()] == [["a", "b"], ["a", "b"]]


def test_tampered_checkpoint_is_refused(store, tmp_path):
    _complete(store, 1, 0.5)
    path = next((tmp_path / "checkpoints").glob("round-000001.*"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="does not match its checksum"):
        store.load_checkpoint(1)


def test_bind_refuses_a_second_fresh_run_and_a_different_config(store, tmp_path):
    _complete(store, 1, 0.5)
    again = ServerStore(tmp_path)
    with pytest.raises(ConfigError, match="pass --resume"):
        again.bind("cfg", resume=False)
    with pytest.raises(ConfigError, match="different configuration"):
        again.bind("other", resume=True)
    again.bind("cfg", resume=True)
    assert again.last_completed() == 1
    again.close()
