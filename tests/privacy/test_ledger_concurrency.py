"""Several site processes that share one state folder open the same new ledger at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from securefl.privacy.ledger import PrivacyLedger


def test_a_ledger_created_by_another_process_meanwhile_is_opened_not_recreated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the interleaving of two processes: B saw no file, then A created the ledger and charged
    # nothing yet, then B opens it; B must take A's ledger, not fail on "table exists"
    path = tmp_path / "privacy_ledger.sqlite"
    with PrivacyLedger(path, delta=1e-5, budgets=8.0):
        pass
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists",
                        lambda self: False if self == path else real_exists(self))
    with PrivacyLedger(path, delta=1e-5, budgets=8.0) as ledger:
        assert ledger.delta == 1e-5
    monkeypatch.undo()
    # and a stale view never hides a disagreement: B with another delta is still refused
    monkeypatch.setattr(Path, "exists",
                        lambda self: False if self == path else real_exists(self))
    from securefl.errors import ConfigError

    with pytest.raises(ConfigError, match="accounts at delta"):
        PrivacyLedger(path, delta=1e-6, budgets=8.0)
