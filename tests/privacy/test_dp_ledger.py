"""PrivacyLedger: dry run then commit, idempotence, persistence, and corruption is an error."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from securefl.engine.protection import Update
from securefl.errors import BudgetExceeded, ConfigError, SecureFLError
from securefl.privacy.accounting import PrivacyEvent, epsilon
from securefl.privacy.ledger import LedgerError, PrivacyLedger

DELTA = 1e-5
EVENT = PrivacyEvent("dp_sgd", 1.0, 0.1, 30)


def test_charge_returns_composed_epsilon(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "l.sqlite", delta=DELTA, budgets=50.0) as ledger:
        first = ledger.charge("a", EVENT, round=1)
        second = ledger.charge("a", EVENT, round=2)
        assert first == epsilon([EVENT], delta=DELTA)
        assert second == epsilon([EVENT, EVENT], delta=DELTA) > first
        assert ledger.epsilon("a") == second
        assert ledger.rounds("a") == [1, 2]
        assert ledger.history("a") == [(1, first), (2, second)]
        assert ledger.remaining("a") == pytest.approx(50.0 - second)
        assert ledger.epsilon("b") == 0.0


def test_budget_exceeded_commits_nothing(tmp_path: Path) -> None:
    one = epsilon([EVENT], delta=DELTA)
    two = epsilon([EVENT, EVENT], delta=DELTA)
    budget = (one + two) / 2
    with PrivacyLedger(tmp_path / "l.sqlite", delta=DELTA, budgets=budget) as ledger:
        assert ledger.charge("a", EVENT, round=1) == one
        with pytest.raises(BudgetExceeded, match=r"round 2 would raise epsilon"):
            ledger.charge("a", EVENT, round=2)
        assert ledger.rounds("a") == [1]
        assert ledger.epsilon("a") == one <= budget
    with PrivacyLedger(tmp_path / "l.sqlite", delta=DELTA, budgets=budget) as again:
        assert again.rounds("a") == [1]


def test_first_charge_over_budget_is_refused() -> None:
    with PrivacyLedger(":memory:", delta=DELTA, budgets=0.01) as ledger:
        with pytest.raises(BudgetExceeded):
            ledger.charge("a", EVENT, round=1)
        assert ledger.epsilon("a") == 0.0
        assert ledger.rounds("a") == []


def test_charge_is_idempotent_per_client_and_round() -> None:
    with PrivacyLedger(":memory:", delta=DELTA, budgets=None) as ledger:
        first = ledger.charge("a", EVENT, round=3)
        assert ledger.charge("a", EVENT, round=3) == first
        assert ledger.events("a") == [EVENT]
        # another client's round 3 is its own charge
        assert ledger.charge("b", EVENT, round=3) == first
        with pytest.raises(LedgerError, match="already charged"):
            ledger.charge("a", PrivacyEvent("dp_sgd", 2.0, 0.1, 30), round=3)
        assert ledger.events("a") == [EVENT]


def test_reopening_gives_the_same_epsilon(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    with PrivacyLedger(path, delta=DELTA, budgets={"a": 9.0, "b": None}) as ledger:
        for rnd in range(1, 4):
            ledger.charge("a", EVENT, round=rnd)
        ledger.charge("b", PrivacyEvent("dp_fedavg", 1.5, 0.2, 1), round=1)
        before = {c: ledger.epsilon(c) for c in ("a", "b")}
    with PrivacyLedger(path, delta=DELTA, budgets={"a": 9.0, "b": None}) as ledger:
        assert {c: ledger.epsilon(c) for c in ("a", "b")} == before
        assert ledger.charge("a", EVENT, round=3) == before["a"]  # still idempotent
    with PrivacyLedger.open_existing(path) as reader:
        assert reader.delta == DELTA and reader.accountant == "rdp"
        assert reader.clients() == ["a", "b"]
        assert reader.epsilon("a") == before["a"]
        assert reader.stored_budget("a") == 9.0 and reader.stored_budget("b") is None


def test_a_new_ledger_creates_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "site" / "state" / "ledger.sqlite"
    with PrivacyLedger(path, delta=DELTA) as ledger:
        ledger.charge("a", EVENT, round=1)
    assert path.is_file()


def test_unlisted_client_and_bad_budget_are_errors() -> None:
    with PrivacyLedger(":memory:", delta=DELTA, budgets={"a": 1.0}) as ledger:
        with pytest.raises(ValueError, match="no privacy budget is configured for client 'z'"):
            ledger.charge("z", EVENT, round=1)
    with pytest.raises(ValueError, match="budget"):
        PrivacyLedger(":memory:", delta=DELTA, budgets=-1.0)
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger(":memory:", delta=1.0)


def test_other_delta_or_accountant_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    PrivacyLedger(path, delta=DELTA).close()
    with pytest.raises(ConfigError, match="accounts at delta=1e-05"):
        PrivacyLedger(path, delta=1e-3)
    with pytest.raises(ConfigError, match="'rdp'"):
        PrivacyLedger(path, delta=DELTA, accountant="prv")


def _filled(path: Path) -> None:
    with PrivacyLedger(path, delta=DELTA, budgets=None) as ledger:
        for rnd in (1, 2, 3):
            ledger.charge("a", EVENT, round=rnd)


def _execute(path: Path, sql: str) -> None:
    db = sqlite3.connect(path)
    db.execute(sql)
    db.commit()
    db.close()


@pytest.mark.parametrize(("damage", "message"), [
    ("UPDATE charges SET steps = 1 WHERE round = 2", "does not match its digest"),
    ("UPDATE charges SET noise_multiplier = 9.0 WHERE round = 1", "does not match its digest"),
    ("DELETE FROM charges WHERE round = 3", "chain head"),
    ("DELETE FROM charges WHERE round = 2", "does not match its digest"),
    ("DELETE FROM charges", "chain head"),
    ("UPDATE meta SET value = 'other/9' WHERE key = 'schema'", "schema"),
    ("DROP TABLE budgets", "budgets"),
])
def test_tampered_ledger_is_an_error(tmp_path: Path, damage: str, message: str) -> None:
    path = tmp_path / "l.sqlite"
    _filled(path)
    _execute(path, damage)
    with pytest.raises(LedgerError, match=message):
        PrivacyLedger(path, delta=DELTA)


@pytest.mark.parametrize("content", [b"", b"not a database at all" * 100,
                                     b"SQLite format 3\x00" + b"\xff" * 4000])
def test_garbage_file_is_an_error_not_a_reset(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "l.sqlite"
    path.write_bytes(content)
    with pytest.raises(LedgerError) as caught:
        PrivacyLedger(path, delta=DELTA)
    assert isinstance(caught.value, SecureFLError)
    assert path.read_bytes() == content  # nothing was written over it


def test_foreign_sqlite_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    _execute(path, "CREATE TABLE notes (text TEXT)")
    with pytest.raises(LedgerError, match="no valid 'meta' table"):
        PrivacyLedger(path, delta=DELTA)


def test_open_existing_requires_a_ledger(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no privacy ledger"):
        PrivacyLedger.open_existing(tmp_path / "missing.sqlite")
    (tmp_path / "junk").write_bytes(b"junk" * 100)
    with pytest.raises(LedgerError):
        PrivacyLedger.open_existing(tmp_path / "junk")


def test_concurrent_charges_never_exceed_the_budget() -> None:
    one = epsilon([EVENT], delta=DELTA)
    budget = epsilon([EVENT] * 4, delta=DELTA)
    ledger = PrivacyLedger(":memory:", delta=DELTA, budgets=budget)
    refused: list[int] = []

    def charge(rnd: int) -> None:
        try:
            ledger.charge("a", EVENT, round=rnd)
        except BudgetExceeded:
            refused.append(rnd)

    threads = [threading.Thread(target=charge, args=(r,)) for r in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ledger.rounds("a")) == 4 and len(refused) == 4
    assert one < ledger.epsilon("a") <= budget
    ledger.close()


def test_every_release_is_charged_whatever_its_round_number(tmp_path: Path) -> None:
    one, two = bytes(32), b"\x01" * 32
    with PrivacyLedger(tmp_path / "l.sqlite", delta=DELTA, budgets=None) as ledger:
        first = ledger.charge("a", EVENT, round=1, release=one)
        assert ledger.charge("a", EVENT, round=1, release=one) == first  # the same release
        assert ledger.charge("a", EVENT, round=5, release=one) == first  # any round number
        second = ledger.charge("a", EVENT, round=1, release=two)  # round 1 again, new model
        assert second == epsilon([EVENT, EVENT], delta=DELTA) > first
        assert ledger.rounds("a") == [1, 1]
        with pytest.raises(LedgerError, match="refusing a different charge"):
            ledger.charge("a", PrivacyEvent("dp_sgd", 2.0, 0.1, 30), round=2, release=two)
        with pytest.raises(ValueError, match="32-byte"):
            ledger.charge("a", EVENT, round=3, release=b"short")


def test_released_answers_survive_a_restart_and_only_the_latest_update_is_kept(
        tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    first, second = Update(np.arange(4, dtype=np.float32), 7.0), Update(np.ones(4, np.float32), 7.0)
    with PrivacyLedger(path, delta=DELTA) as ledger:
        assert ledger.recall("a", bytes(32)) is None
        ledger.remember("a", bytes(32), round=1, update=first, metrics={"epsilon": 0.5})
        ledger.remember("a", b"\x02" * 32, round=2, update=second, metrics={"epsilon": 0.7})
        ledger.remember("b", bytes(32), round=1, update=first, metrics={})
    with PrivacyLedger(path, delta=DELTA) as again:
        latest = again.recall("a", b"\x02" * 32)
        assert latest is not None and latest.round == 2 and latest.metrics == {"epsilon": 0.7}
        assert latest.update is not None and latest.update.weight == 7.0
        np.testing.assert_array_equal(latest.update.delta, second.delta)
        older = again.recall("a", bytes(32))
        assert older is not None and older.round == 1 and older.update is None
        other = again.recall("b", bytes(32))  # another client's memo is its own
        assert other is not None and other.update is not None
        assert again.released_rounds("a") == [1, 2]


def test_a_ledger_of_the_round_keyed_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    _filled(path)
    _execute(path, "UPDATE meta SET value = 'securefl-privacy-ledger/1' WHERE key = 'schema'")
    with pytest.raises(LedgerError, match="not per release"):
        PrivacyLedger(path, delta=DELTA)


def test_a_schema_2_ledger_opens_as_schema_3_with_its_chain_intact(tmp_path):
    """Ledgers written before Skellam events (no sensitivity columns) keep their spend: the
    two columns are added on open and every old row still matches its digest."""
    import sqlite3

    from securefl.privacy.accounting import PrivacyEvent

    path = tmp_path / "old.sqlite"
    event = PrivacyEvent("dp_fedavg", 1.1, 1.0, 1)
    with PrivacyLedger(path, delta=1e-5, budgets=50.0) as ledger:
        before = [ledger.charge("site", event, round=r) for r in (1, 2)]
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE charges DROP COLUMN l1_sensitivity")
    db.execute("ALTER TABLE charges DROP COLUMN l2_sensitivity")
    db.execute("UPDATE meta SET value = 'securefl-privacy-ledger/2' WHERE key = 'schema'")
    db.commit()
    db.close()
    with PrivacyLedger(path, delta=1e-5, budgets=50.0) as ledger:
        assert [eps for _, eps in ledger.history("site")] == before
        skellam = PrivacyEvent("skellam", 1.5, 1.0, 1, l1_sensitivity=9e4, l2_sensitivity=300.0)
        assert ledger.charge("site", skellam, round=3) > before[-1]
    with PrivacyLedger(path, delta=1e-5, budgets=50.0) as ledger:
        assert ledger.events("site") == [event, event, skellam]
