"""Server state in SQLite: rounds, participants, checkpoints and the server's copy of the ledger.

Crash safety rests on one ordering rule.  At the end of round ``t`` the new server state
(global model, optimizer state) is first written to ``checkpoints/round-<t>.safetensors``
through a temporary file, ``fsync`` and ``rename`` (atomic on POSIX), and only then is round
``t`` marked completed — together with its participants, metrics and privacy charges — in a
single SQLite transaction.  A crash before the commit leaves round ``t`` incomplete: resume
restarts it from checkpoint ``t - 1``, so no round is ever applied twice, and the charges of
a round are recorded exactly when the round is.  Checkpoints are safetensors (no code in the
file format; the checksum in the database is verified on load).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from securefl.engine.session import RUN_ID_BYTES, model_digest
from securefl.errors import ConfigError
from securefl.output import atomic_write

__all__ = ["ServerStore", "model_hash"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, status TEXT NOT NULL, started REAL NOT NULL,
    finished REAL, participants TEXT NOT NULL, dropped TEXT, metrics TEXT,
    checkpoint TEXT, checkpoint_sha256 TEXT, model_sha256 TEXT);
CREATE TABLE IF NOT EXISTS ledger (
    round INTEGER NOT NULL, client_id TEXT NOT NULL, epsilon REAL NOT NULL,
    delta REAL NOT NULL, detail TEXT NOT NULL, PRIMARY KEY (round, client_id));
"""


def model_hash(vector: np.ndarray) -> str:
    """:func:`~securefl.engine.session.model_digest` in hex (what the audit log records)."""
    return model_digest(vector).hex()




def completed_rounds(directory: str | Path) -> list[int] | None:
    """Rounds recorded as completed in ``directory/state.sqlite`` (read-only), ``None`` if
    there is no state file."""
    path = Path(directory) / "state.sqlite"
    if not path.is_file():
        return None
    try:
        with closing(sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT round FROM rounds WHERE status='completed' "
                              "ORDER BY round").fetchall()
    except sqlite3.DatabaseError:
        return None
    return [int(r[0]) for r in rows]


class ServerStore:
    """The server's durable state under ``directory`` (``state.sqlite``, ``checkpoints/``)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        (self.directory / "checkpoints").mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.directory / "state.sqlite", isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ run identity
    def bind(self, fingerprint: str, *, resume: bool) -> None:
        """Tie the state to one run configuration.

        A fresh start refuses a folder that already holds rounds (use ``--resume``); a
        resume refuses a folder made by a different configuration.
        """
        row = self._db.execute("SELECT value FROM meta WHERE key='config'").fetchone()
        if row is None:
            if self.last_completed() is not None:
                raise ConfigError(f"{self.directory}: state without a configuration record")
            self._db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("config", fingerprint), ("run", os.urandom(RUN_ID_BYTES).hex())])
            return
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('run', ?)",
                         (os.urandom(RUN_ID_BYTES).hex(),))
        if not resume:
            raise ConfigError(f"{self.directory}: holds the state of an earlier run; "
                              "pass --resume to continue it or choose another state_dir")
        if row[0] != fingerprint:
            raise ConfigError(f"{self.directory}: was written by a different configuration; "
                              "resume needs the same config file")

    def run_id(self) -> bytes:
        """This run's id, drawn from the CSPRNG at the first bind: announced in every FitIns
        (sites pin it), countersigned by the sites and named by their receipts."""
        row = self._db.execute("SELECT value FROM meta WHERE key='run'").fetchone()
        if row is None:
            raise ConfigError(f"{self.directory}: state without a run id (call bind first)")
        return bytes.fromhex(str(row[0]))

    # ------------------------------------------------------------------ rounds
    def begin_round(self, round: int, participants: Sequence[str]) -> None:
        """Record that ``round`` started (replacing an earlier, interrupted attempt)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            done = self._db.execute("SELECT status FROM rounds WHERE round=?",
                                    (round,)).fetchone()
            if done is not None and done[0] == "completed":
                raise ConfigError(f"round {round} is already completed; it cannot run twice")
            self._db.execute("INSERT OR REPLACE INTO rounds (round, status, started, "
                             "participants) VALUES (?, 'started', ?, ?)",
                             (round, time.time(), json.dumps(list(participants))))

    def complete_round(self, round: int, *, state: Mapping[str, np.ndarray],
                       dropped: Mapping[str, str], metrics: Mapping[str, Any],
                       charges: Mapping[str, Mapping[str, float]]) -> str:
        """Checkpoint ``state`` atomically, then commit the round; returns the model hash.

        ``state["model"]`` must be the global model after the round; ``charges`` maps
        client id -> {"epsilon": cumulative ε from the site's signed receipt (or, without
        identity keys, its metrics), "delta": ..., "receipts": [...]} for the
        server's copy of the ledger.
        """
        if "model" not in state:
            raise ValueError("state must contain the global 'model' vector")
        blob = save_tensors({k: np.ascontiguousarray(v) for k, v in state.items()})
        name = f"round-{round:06d}.safetensors"
        atomic_write(self.directory / "checkpoints" / name, blob)
        digest = model_hash(state["model"])
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            updated = self._db.execute(
                "UPDATE rounds SET status='completed', finished=?, dropped=?, metrics=?, "
                "checkpoint=?, checkpoint_sha256=?, model_sha256=? "
                "WHERE round=? AND status='started'",
                (time.time(), json.dumps(dict(dropped)), json.dumps(dict(metrics)), name,
                 hashlib.sha256(blob).hexdigest(), digest, round)).rowcount
            if updated != 1:
                raise ConfigError(f"round {round} was not started or is already completed")
            self._db.executemany(
                "INSERT INTO ledger VALUES (?, ?, ?, ?, ?)",
                [(round, cid, float(c.get("epsilon", 0.0)), float(c.get("delta", 0.0)),
                  json.dumps(dict(c))) for cid, c in sorted(charges.items())])
        return digest

    def last_completed(self) -> int | None:
        row = self._db.execute("SELECT MAX(round) FROM rounds WHERE status='completed'").fetchone()
        return None if row[0] is None else int(row[0])

    def rounds(self) -> list[dict[str, Any]]:
        cursor = self._db.execute("SELECT round, status, participants, dropped, metrics, "
                                  "model_sha256 FROM rounds ORDER BY round")
        return [{"round": r, "status": s, "participants": json.loads(p),
                 "dropped": json.loads(d) if d else {}, "metrics": json.loads(m) if m else {},
                 "model_sha256": h} for r, s, p, d, m, h in cursor]

    def load_checkpoint(self, round: int) -> dict[str, np.ndarray]:
        """The state saved at the end of ``round``; the file's checksum must match the record."""
        row = self._db.execute("SELECT checkpoint, checkpoint_sha256 FROM rounds "
                               "WHERE round=? AND status='completed'", (round,)).fetchone()
        if row is None:
            raise ConfigError(f"{self.directory}: no completed round {round}")
        blob = (self.directory / "checkpoints" / row[0]).read_bytes()
        if hashlib.sha256(blob).hexdigest() != row[1]:
            raise ConfigError(f"{self.directory}: checkpoint {row[0]} does not match its checksum")
        return dict(load_tensors(blob))

    # ------------------------------------------------------------------ ledger copy
    def spent(self) -> dict[str, float]:
        """ε each client reported having spent in total, as of its latest completed round.

        Sites report their cumulative ε (their own ledger is authoritative); a redone round
        replaces nothing and adds nothing, so nothing is lost or counted twice.
        """
        cursor = self._db.execute(
            "SELECT client_id, epsilon FROM ledger AS l WHERE round = "
            "(SELECT MAX(round) FROM ledger WHERE client_id = l.client_id)")
        return {cid: float(total) for cid, total in cursor}

    def details(self, round: int) -> dict[str, dict[str, Any]]:
        """What was recorded per client for ``round`` (its receipts, under ``"receipts"``)."""
        cursor = self._db.execute("SELECT client_id, detail FROM ledger WHERE round = ?",
                                  (round,))
        return {cid: json.loads(detail) for cid, detail in cursor}

    def receipt_heads(self) -> dict[str, str]:
        """SHA-256 of the last privacy receipt recorded for each site."""
        heads = {}
        for cid, detail in self._db.execute("SELECT client_id, detail FROM ledger "
                                            "ORDER BY round"):
            receipts = json.loads(detail).get("receipts")
            if receipts:
                heads[cid] = hashlib.sha256(receipts[-1].encode()).hexdigest()
        return heads

    def charges(self) -> list[tuple[int, str, float, float]]:
        cursor = self._db.execute("SELECT round, client_id, epsilon, delta FROM ledger "
                                  "ORDER BY round, client_id")
        return [(int(r), c, float(e), float(d)) for r, c, e, d in cursor]
