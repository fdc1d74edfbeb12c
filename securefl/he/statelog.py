"""A site's persisted record of the encrypted global models it has decrypted.

Under the blind server (docs/homomorphic-encryption.md) a site decrypts the encrypted
aggregate that arrives with each ``FitIns`` *before* it trains, so it must refuse a second,
different aggregate for a round before it decrypts anything.  Per site:

* a CKKS key id belongs to one run: keys are fresh per federation run, and a key id seen
  under another run id is refused (the operator must rotate the keys, ``securefl certs init
  --he``);
* within a run, a site decrypts at most one aggregate per round (by SHA-256 of its encoded
  state); the identical aggregate again (a server that resumed after a crash) is allowed;
* rounds strictly increase: an aggregate for a round before the last one is refused;
* the public initial model (no aggregate yet) is accepted only until the site has decrypted
  an aggregate of the run: a server cannot send the sites back to a model of its choosing.

:class:`DecryptionLog` keeps this in SQLite (a file in the site's state directory when
deployed, memory in a simulation), so a restart changes nothing.  The engine's
:class:`~securefl.engine.session.ReleaseLog` then applies the one replay rule to the
decrypted model itself.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from securefl.errors import ProtocolAbort

__all__ = ["DecryptionLog"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (key_id BLOB PRIMARY KEY, run BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS decrypted (run BLOB NOT NULL, round INTEGER NOT NULL,
                                      state BLOB NOT NULL, PRIMARY KEY (run, round));
"""


class DecryptionLog:
    """Which aggregate a site decrypted for which round (module docstring)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self._db = sqlite3.connect(":memory:" if path is None else str(path),
                                   check_same_thread=False, isolation_level=None)
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def admit(self, *, run: bytes, round: int, key_id: bytes, state: bytes,
              initial: bool = False) -> None:
        """Record that this site decrypts ``state`` (a digest; ``initial``: the public initial
        model) for ``round`` of ``run``, or raise :class:`ProtocolAbort` (detail in the
        operator's log)."""
        with self._lock:
            row = self._db.execute("SELECT run FROM keys WHERE key_id = ?",
                                   (key_id,)).fetchone()
            if row is not None and bytes(row[0]) != run:
                raise ProtocolAbort.because(
                    f"CKKS key {key_id.hex()[:16]} was used in run {bytes(row[0]).hex()[:16]}; "
                    f"run {run.hex()[:16]} needs fresh keys (securefl certs init --he)")
            same = self._db.execute("SELECT state FROM decrypted WHERE run = ? AND round = ?",
                                    (run, round)).fetchone()
            if same is not None:
                if bytes(same[0]) != state:
                    raise ProtocolAbort.because(
                        f"round {round}: a second, different aggregate to decrypt")
                return
            last = self._db.execute("SELECT MAX(round) FROM decrypted WHERE run = ?",
                                    (run,)).fetchone()[0]
            if last is not None and round < int(last):
                raise ProtocolAbort.because(f"aggregate for round {round} after round {last}")
            if initial and self._db.execute(
                    "SELECT 1 FROM decrypted WHERE run = ? AND state != ?",
                    (run, state)).fetchone() is not None:
                raise ProtocolAbort.because(f"round {round}: the initial model again after an "
                                            "aggregate of this run")
            self._db.execute("INSERT OR IGNORE INTO keys (key_id, run) VALUES (?, ?)",
                             (key_id, run))
            self._db.execute("INSERT INTO decrypted (run, round, state) VALUES (?, ?, ?)",
                             (run, round, state))

    def close(self) -> None:
        self._db.close()
