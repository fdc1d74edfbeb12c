"""A site's memory of what it has released: the one replay rule, persisted.

The rule (docs/secure-aggregation.md, "Replays"), for every protection that reveals anything
at the end of a round (SecAgg+ unmasking secrets, an HE decryption):

* for each ``(run id, SHA-256 of the global parameters)`` a site reveals for **at most one
  survivor set**; asking again with the same set is idempotent, asking with another is a
  :class:`~securefl.errors.ProtocolAbort`.  Two reveals for two survivor sets of the same
  model would let the server subtract two sums that differ by one site's update;
* within a run, round numbers strictly increase; a byte-identical repeat of the current
  round (same round, same model: a server that resumed after a crash) is recognised, a
  repeat with another model or an older round is refused;
* a site never reveals for a round it has left (once a later round has started).

A round that aborted before any reveal may be redone: its masked inputs can never be
unmasked, because the sites refuse every reveal except for the one survivor set.

:class:`ReleaseLog` keeps this in SQLite (a file at a deployed site, memory in a simulation),
so a restart changes nothing.  A run id is pinned on first use; a log refuses another run id
unless it was opened with ``new_run=True`` (a site operator starting a new run).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from securefl.errors import ProtocolAbort

__all__ = ["RUN_ID_BYTES", "ReleaseLog", "RoundContext", "model_digest"]

RUN_ID_BYTES = 32

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run (id INTEGER PRIMARY KEY CHECK (id = 0), run BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS current (run BLOB PRIMARY KEY, round INTEGER NOT NULL,
                                    model BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS releases (run BLOB NOT NULL, model BLOB NOT NULL,
                                     survivors TEXT NOT NULL, PRIMARY KEY (run, model));
"""
_CURRENT = "SELECT round, model FROM current WHERE run = ?"
_START = ("SELECT p.run, c.round, c.model FROM run AS p LEFT JOIN current AS c ON c.run = ? "
          "WHERE p.id = 0")
# the round in progress of a run, and the survivor set released for (run, model) if any
_RELEASE = ("SELECT c.round, c.model, r.survivors FROM current AS c LEFT JOIN releases AS r "
            "ON r.run = c.run AND r.model = ? WHERE c.run = ?")


def model_digest(parameters: np.ndarray) -> bytes:
    """``SHA-256(float32 little-endian bytes of the global parameters)``.

    A model read from an immutable ``bytes`` frame (what the codec's decoder returns: a
    read-only view into the frame) is hashed once per frame and region: sites that share a
    process (a simulation) receive one broadcast ``FitIns`` frame, and each would hash the
    same immutable bytes again.  The digest is still exactly that of the bytes each site
    received; a site in its own process (a deployment) hashes every frame it gets.
    """
    flat = np.ascontiguousarray(parameters, dtype="<f4")
    frame = _frame_of(flat)
    key = None
    if frame is not None:
        key = (flat.__array_interface__["data"][0], flat.nbytes)
        held = _LAST_DIGEST
        if held is not None and held[0] is frame and held[1] == key:
            return held[2]
    digest = hashlib.sha256(flat.data.cast("B")).digest()
    if frame is not None and key is not None:
        _remember(frame, key, digest)
    return digest


# (frame, (address, length), digest) of the last model hashed from an immutable frame; the
# frame is held, so its identity and address cannot be reused while it is remembered
_LAST_DIGEST: tuple[bytes, tuple[int, int], bytes] | None = None


def _remember(frame: bytes, key: tuple[int, int], digest: bytes) -> None:
    global _LAST_DIGEST
    _LAST_DIGEST = (frame, key, digest)


def _frame_of(array: np.ndarray) -> bytes | None:
    """The ``bytes`` object whose memory ``array`` views (read-only), or None."""
    base = array.base
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview) and base.readonly and type(base.obj) is bytes:
        return base.obj
    return None


class ReleaseLog:
    """The replay rule for one site (see the module docstring).

    ``path=None`` keeps the log in memory (a simulation); a deployed site passes a file in
    its own state directory.
    """

    def __init__(self, path: str | Path | None = None, *, new_run: bool = False) -> None:
        self._db = sqlite3.connect(":memory:" if path is None else str(path),
                                   check_same_thread=False, isolation_level=None)
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._new_run = new_run

    def _pin(self, run: bytes, pinned: bytes | None) -> None:
        """Pin ``run`` (``pinned``: the run already pinned, if any)."""
        if len(run) != RUN_ID_BYTES:
            raise ProtocolAbort.because(f"run id of {len(run)} bytes, expected {RUN_ID_BYTES}")
        if pinned == run:
            return
        if pinned is not None and not self._new_run:
            raise ProtocolAbort.because(
                f"the server announced run {run.hex()[:16]}, but this site is in run "
                f"{pinned.hex()[:16]}; start the site for a new run to join it")
        self._db.execute("INSERT OR REPLACE INTO run (id, run) VALUES (0, ?)", (run,))
        self._new_run = False

    def start(self, *, run: bytes, round: int, model: bytes) -> bool:
        """Enter ``round`` of ``run`` training from ``model``; True for an identical repeat."""
        with self._lock:
            # one query: the pinned run and this run's round in progress (if any)
            state = self._db.execute(_START, (run,)).fetchone()
            pinned = None if state is None else bytes(state[0])
            self._pin(run, pinned)
            row = None if state is None or state[1] is None else state[1:]
            if row is not None:
                last, last_model = int(row[0]), bytes(row[1])
                if round == last and model == last_model:
                    return True
                if round <= last:
                    raise ProtocolAbort.because(
                        f"round {round} requested after round {last} of this run "
                        f"({'another model' if round == last else 'an older round'})")
            self._db.execute("INSERT OR REPLACE INTO current (run, round, model) "
                             "VALUES (?, ?, ?)", (run, round, model))
            return False

    def pinned(self) -> bytes | None:
        """The run this site is in (the run id of its first FitIns), if any."""
        row = self._db.execute("SELECT run FROM run WHERE id = 0").fetchone()
        return None if row is None else bytes(row[0])

    def current(self, run: bytes) -> tuple[int, bytes] | None:
        """The round in progress of ``run`` and the model it trains from, if any."""
        row = self._db.execute(_CURRENT, (run,)).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def release(self, *, run: bytes, round: int, model: bytes,
                survivors: Collection[str]) -> None:
        """Allow one reveal for ``survivors``, or raise :class:`ProtocolAbort`."""
        chosen = json.dumps(sorted(set(survivors)))
        with self._lock:
            # one query reads both rules' state: the round in progress and the one release
            row = self._db.execute(_RELEASE, (model, run)).fetchone()
            if row is None or (int(row[0]), bytes(row[1])) != (round, model):
                raise ProtocolAbort.because(f"reveal for round {round}, which this site has "
                                            "left or never started")
            if row[2] is None:
                self._db.execute("INSERT INTO releases (run, model, survivors) VALUES (?, ?, ?)",
                                 (run, model, chosen))
            elif row[2] != chosen:
                raise ProtocolAbort.because(
                    f"round {round}: a reveal for survivors {chosen} of a model already "
                    f"revealed for survivors {row[2]}")

    def released(self, *, run: bytes, model: bytes) -> frozenset[str] | None:
        """The one survivor set revealed for ``(run, model)``, if any."""
        row = self._db.execute("SELECT survivors FROM releases WHERE run = ? AND model = ?",
                               (run, model)).fetchone()
        return None if row is None else frozenset(json.loads(row[0]))

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class RoundContext:
    """What a client's protection round knows about the round it belongs to."""

    run: bytes
    round: int
    model: bytes  # model_digest of the global parameters this round trains from
    releases: ReleaseLog

    def release(self, survivors: Collection[str]) -> None:
        """Check the replay rule before revealing anything for ``survivors``."""
        self.releases.release(run=self.run, round=self.round, model=self.model,
                              survivors=survivors)

    @classmethod
    def standalone(cls, *, round: int, run: bytes | None = None,
                   model: bytes = b"\0" * 32) -> RoundContext:
        """A context with a log of its own (tests, and protections driven without a Client)."""
        run = run if run is not None else b"\x01" * RUN_ID_BYTES
        log = ReleaseLog()
        log.start(run=run, round=round, model=model)
        return cls(run=run, round=round, model=model, releases=log)
