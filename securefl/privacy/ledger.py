"""The per-client privacy ledger: SQLite, dry-run then commit, one charge per release.

Each charge is an immutable :class:`~securefl.privacy.accounting.PrivacyEvent`.  Following
the dry-run-then-commit pattern of Google's ``dp_accounting`` (``PrivacyAccountant``), a
charge first composes the client's committed events with the new one (Opacus's accountant,
:func:`~securefl.privacy.accounting.epsilon`) and, if epsilon at the ledger's delta would
exceed the client's budget, raises :class:`~securefl.errors.BudgetExceeded` with nothing
written.  Otherwise the row is committed in one SQLite transaction.

What is charged once: a **release**, named by the SHA-256 of the global parameters it was
trained from (``release=``).  Round numbers do not make two releases one: a server that asks
for round 1, 2, 1, 2, ... with new parameters each time is charged for every one of them.
A charge without a release (``release=None``: a DP-FedAvg round in which the client was not
sampled) is idempotent per ``(client, round)``.  The ``releases`` table keeps what each
release returned (:meth:`PrivacyLedger.remember`), so a request repeated for byte-identical
parameters gets the same answer, across restarts, without training or charging again
(:mod:`securefl.privacy.release`).

Integrity: every charge row extends a SHA-256 hash chain whose head the file stores, checked
on every open (:mod:`securefl.privacy.ledger_file`, the file format).  The chain detects
corruption and careless edits; it is not a signature (whoever can rewrite the whole file can
recompute it), which is what the signed run audit log is for.

In simulation the ledger lives in the run directory; in a deployment each site keeps its own
file on its own disk, so the data holder itself refuses a round over budget, and its spend
carries over from run to run.
"""

from __future__ import annotations

import io
import json
import math
import sqlite3
import threading
from collections.abc import Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from securefl.engine.protection import Update
from securefl.errors import BudgetExceeded
from securefl.privacy import ledger_file
from securefl.privacy.accounting import AccountantName, PrivacyEvent, epsilon
from securefl.privacy.ledger_file import GENESIS, ROW, SCHEMA, LedgerError, body
from securefl.privacy.ledger_file import digest as chain_digest
from securefl.privacy.ledger_file import event as row_event

__all__ = ["LEDGER_FILE", "SCHEMA", "LedgerError", "PrivacyLedger", "Release"]

#: the ledger's file in a run directory or a site's state folder
LEDGER_FILE = "privacy_ledger.sqlite"

Budgets = float | Mapping[str, float | None] | None


@dataclass(frozen=True)
class Release:
    """What a client returned for one release; ``update`` is ``None`` once a later release
    of the client replaced it (only the latest update is kept, every digest forever)."""

    round: int
    update: Update | None
    metrics: dict[str, float]


class PrivacyLedger:
    """Per-client epsilon spend at a fixed ``delta``, persisted in SQLite at ``path``.

    ``budgets``: one epsilon for every client, a ``{client_id: epsilon | None}`` mapping
    (charging an unlisted client is an error), or ``None`` (record only, no limit).
    ``path=":memory:"`` keeps the ledger in memory.  Thread-safe; safe across processes by
    SQLite's file lock.
    """

    def __init__(self, path: str | Path, *, delta: float, budgets: Budgets = None,
                 accountant: AccountantName = "rdp") -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if accountant not in ("rdp", "prv"):
            raise ValueError(f"accountant must be 'rdp' or 'prv', got {accountant!r}")
        self.path = str(path)
        self.delta, self.accountant = float(delta), accountant
        self._budgets = budgets
        self._lock = threading.Lock()
        fresh = self.path == ":memory:" or not Path(self.path).exists()
        if fresh and self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            if fresh:
                self._create()
            else:
                self._verify()
            self._store_budgets()
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"privacy ledger {self.path} is not a readable ledger ({exc}); "
                              f"refusing to start from zero") from None

    # ------------------------------------------------------------------ opening and checking
    def _create(self) -> None:
        """Create the file's tables, or verify those another process just created."""
        if not ledger_file.create(self._db, delta=self.delta, accountant=self.accountant):
            self._verify()

    def _verify(self) -> None:
        ledger_file.verify(self._db, where=f"privacy ledger {self.path}", delta=self.delta,
                           accountant=self.accountant)

    def _store_budgets(self) -> None:
        if isinstance(self._budgets, Mapping):
            rows = []
            for client_id, value in self._budgets.items():
                if value is not None and not value > 0:
                    raise ValueError(f"budget of {client_id!r} must be > 0, got {value}")
                rows.append((str(client_id), None if value is None else float(value)))
            with self._lock:
                self._db.executemany("INSERT OR REPLACE INTO budgets VALUES (?, ?)", rows)
        elif self._budgets is not None and not self._budgets > 0:
            raise ValueError(f"budget must be > 0, got {self._budgets}")

    # ------------------------------------------------------------------ charging
    def budget(self, client_id: str) -> float | None:
        """The epsilon budget of ``client_id`` (``None``: unlimited)."""
        if isinstance(self._budgets, Mapping):
            if client_id not in self._budgets:
                raise ValueError(f"no privacy budget is configured for client {client_id!r}")
            value = self._budgets[client_id]
            return None if value is None else float(value)
        return None if self._budgets is None else float(self._budgets)

    def charge(self, client_id: str, event: PrivacyEvent, *, round: int,
               release: bytes | None = None) -> float:
        """Charge ``event`` for ``round``; return the client's epsilon after it.

        Dry run first: if the composition would exceed the budget, raise
        :class:`~securefl.errors.BudgetExceeded` and write nothing.  With ``release`` (the
        SHA-256 of the parameters trained from) the charge is made once per release, whatever
        the round number; without, once per ``(client, round)``.  Charging a known release or
        round again with the same event is a no-op returning the epsilon then recorded; with
        a different event it is a :class:`LedgerError`.
        """
        if not isinstance(event, PrivacyEvent):
            raise TypeError(f"event must be a PrivacyEvent, got {type(event).__name__}")
        if release is not None and (not isinstance(release, bytes) or len(release) != 32):
            raise ValueError("release must be a 32-byte SHA-256 digest")
        budget = self.budget(client_id)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = self._charge_locked(client_id, event, round, budget,
                                             None if release is None else release.hex())
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return result

    def _charge_locked(self, client_id: str, event: PrivacyEvent, round: int,
                       budget: float | None, release: str | None) -> float:
        rows = self._db.execute(f"{ROW} WHERE client_id = ? ORDER BY seq",
                                (client_id,)).fetchall()
        for row in reversed(rows):
            if (row[9] == release) if release is not None else (row[2] == round):
                if row_event(row) != event:
                    what = f"release {release[:16]}" if release else f"round {round}"
                    raise LedgerError(f"{client_id} was already charged {row_event(row)} for "
                                      f"{what}; refusing a different charge {event}")
                return float(row[7])
        spent = epsilon([*map(row_event, rows), event], delta=self.delta,
                        accountant=self.accountant)
        if budget is not None and not spent <= budget:
            raise BudgetExceeded(
                f"{client_id}: round {round} would raise epsilon to {spent:.4g} at "
                f"delta={self.delta:g}, over its budget {budget:g}")
        head = self._db.execute("SELECT value FROM meta WHERE key = 'head'").fetchone()[0]
        last = self._db.execute("SELECT digest FROM charges ORDER BY seq DESC LIMIT 1").fetchone()
        if head != (last[0] if last else GENESIS):
            raise LedgerError(f"privacy ledger {self.path}: chain head does not match")
        seq = int(self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM charges").fetchone()[0])
        sensitivities = (event.l1_sensitivity, event.l2_sensitivity)
        row = (seq, client_id, int(round), event.mechanism, float(event.noise_multiplier),
               float(event.sample_rate), int(event.steps), float(spent),
               None if budget is None else float(budget), release,
               *(None if v is None else float(v) for v in sensitivities))
        digest = chain_digest(head, body((*row, None)))
        self._db.execute(
            "INSERT INTO charges (seq, client_id, round, mechanism, noise_multiplier, "
            "sample_rate, steps, epsilon, budget, release, l1_sensitivity, l2_sensitivity, "
            "digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (*row, digest))
        self._db.execute("UPDATE meta SET value = ? WHERE key = 'head'", (digest,))
        return float(spent)

    # ------------------------------------------------------------------ released answers
    def remember(self, client_id: str, release: bytes, *, round: int, update: Update,
                 metrics: dict[str, float]) -> None:
        """Keep what ``release`` returned; the client's earlier updates are dropped (their
        digests stay, so a repeat of an older release is recognised, not trained again)."""
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(update.delta, dtype=np.float32),
                allow_pickle=False)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE releases SET delta = NULL WHERE client_id = ?",
                             (client_id,))
            self._db.execute("INSERT OR REPLACE INTO releases VALUES (?, ?, ?, ?, ?, ?)",
                             (client_id, release.hex(), int(round), float(update.weight),
                              json.dumps(metrics), buffer.getvalue()))
            self._db.execute("COMMIT")

    def recall(self, client_id: str, release: bytes) -> Release | None:
        """What ``client_id`` returned for ``release``, or ``None`` if it never released it."""
        with self._lock:
            row = self._db.execute("SELECT round, weight, metrics, delta FROM releases "
                                   "WHERE client_id = ? AND release = ?",
                                   (client_id, release.hex())).fetchone()
        if row is None:
            return None
        update = None
        if row[3] is not None:
            delta = np.load(io.BytesIO(row[3]), allow_pickle=False)
            update = Update(delta.astype(np.float32, copy=False), float(row[1]))
        return Release(int(row[0]), update, {k: float(v) for k, v in json.loads(row[2]).items()})

    def released_rounds(self, client_id: str) -> list[int]:
        """The round of every release of ``client_id`` (its participation), in order."""
        with self._lock:
            rows = self._db.execute("SELECT round FROM releases WHERE client_id = ? "
                                    "ORDER BY round", (client_id,)).fetchall()
        return [int(r[0]) for r in rows]

    # ------------------------------------------------------------------ reading
    def _rows(self, client_id: str) -> list[tuple]:
        with self._lock:
            return self._db.execute(f"{ROW} WHERE client_id = ? ORDER BY seq",
                                    (client_id,)).fetchall()

    def clients(self) -> list[str]:
        """Every client with a stored budget or a charge, sorted."""
        with self._lock:
            rows = self._db.execute("SELECT client_id FROM budgets UNION "
                                    "SELECT client_id FROM charges").fetchall()
        return sorted(r[0] for r in rows)

    def events(self, client_id: str) -> list[PrivacyEvent]:
        return [row_event(row) for row in self._rows(client_id)]

    def charges(self, client_id: str) -> list[tuple[int, PrivacyEvent, bytes | None]]:
        """``(round, event, release)`` of every charge of ``client_id``, in order: what
        :meth:`charge` needs to rebuild this client's part of the ledger elsewhere."""
        return [(int(row[2]), row_event(row), None if row[9] is None else bytes.fromhex(row[9]))
                for row in self._rows(client_id)]

    def rounds(self, client_id: str) -> list[int]:
        return [int(row[2]) for row in self._rows(client_id)]

    def history(self, client_id: str) -> list[tuple[int, float]]:
        """``(round, epsilon after that round)`` at the ledger's delta and accountant."""
        return [(int(row[2]), float(row[7])) for row in self._rows(client_id)]

    def stored_budget(self, client_id: str) -> float | None:
        """The budget recorded for ``client_id`` (from the budgets table or its last charge)."""
        with self._lock:
            row = self._db.execute("SELECT epsilon FROM budgets WHERE client_id = ?",
                                   (client_id,)).fetchone()
        if row is not None:
            return None if row[0] is None else float(row[0])
        rows = self._rows(client_id)
        if rows:
            return None if rows[-1][8] is None else float(rows[-1][8])
        return None if isinstance(self._budgets, Mapping) else self.budget(client_id)

    def epsilon(self, client_id: str, *, delta: float | None = None,
                accountant: AccountantName | None = None) -> float:
        """Epsilon spent by ``client_id`` at ``delta`` (default: the ledger's)."""
        return epsilon(self.events(client_id), delta=self.delta if delta is None else delta,
                       accountant=accountant or self.accountant)

    def remaining(self, client_id: str) -> float:
        """Budget left at the ledger's delta (``inf`` when unlimited)."""
        budget = self.stored_budget(client_id)
        return math.inf if budget is None else budget - self.epsilon(client_id)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    @classmethod
    def open_existing(cls, path: str | Path) -> PrivacyLedger:
        """Open a ledger for reading with its own stored delta and accountant."""
        if not Path(path).is_file():
            raise LedgerError(f"no privacy ledger at {path}")
        try:
            uri = f"file:{Path(path).resolve()}?mode=ro"
            with closing(sqlite3.connect(uri, uri=True)) as db:
                meta = dict(db.execute("SELECT key, value FROM meta"))
            delta = float.fromhex(meta["delta"])
            accountant = meta["accountant"]
        except (sqlite3.DatabaseError, KeyError, ValueError) as exc:
            raise LedgerError(f"privacy ledger {path} is not readable ({exc})") from None
        if accountant not in ("rdp", "prv"):
            raise LedgerError(f"privacy ledger {path} names an unknown accountant {accountant!r}")
        return cls(path, delta=delta, budgets=None, accountant=accountant)
