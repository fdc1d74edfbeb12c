"""The privacy ledger's SQLite file: its schema, its hash chain and the checks on opening.

Every charge row carries ``digest_i = SHA-256(digest_{i-1} || canonical row)`` (floats as
``float.hex``, JSON without spaces) from :data:`GENESIS`, and the ``meta`` table stores the
chain head, so an edited, deleted or reordered row, a garbage file, an emptied file or a
foreign schema is a :class:`LedgerError` on open (:func:`verify`), never a silent reset.  A
schema /2 file (before Skellam events) is migrated in place by adding the two sensitivity
columns; its rows hash as before, since a row's digest covers the sensitivities only when it
has them (:func:`body`).  :class:`~securefl.privacy.ledger.PrivacyLedger` is the one user.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3

from securefl.errors import ConfigError, SecureFLError
from securefl.privacy.accounting import PrivacyEvent

__all__ = ["GENESIS", "ROW", "SCHEMA", "LedgerError", "body", "create", "digest", "event",
           "verify"]

SCHEMA = "securefl-privacy-ledger/3"
#: the schema before Skellam events; opened as /3 by adding the two sensitivity columns
_PREVIOUS = "securefl-privacy-ledger/2"
_SENSITIVITIES = ["l1_sensitivity", "l2_sensitivity"]
GENESIS = "0" * 64
_TABLES = {
    "meta": ["key", "value"],
    "budgets": ["client_id", "epsilon"],
    "charges": ["seq", "client_id", "round", "mechanism", "noise_multiplier", "sample_rate",
                "steps", "epsilon", "budget", "release", "digest", *_SENSITIVITIES],
    "releases": ["client_id", "release", "round", "weight", "metrics", "delta"],
}
_CREATE = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE budgets (client_id TEXT PRIMARY KEY, epsilon REAL);
CREATE TABLE charges (
    seq INTEGER PRIMARY KEY, client_id TEXT NOT NULL, round INTEGER NOT NULL,
    mechanism TEXT NOT NULL, noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL, epsilon REAL NOT NULL, budget REAL, release TEXT,
    digest TEXT NOT NULL, l1_sensitivity REAL, l2_sensitivity REAL,
    UNIQUE (client_id, release));
CREATE TABLE releases (
    client_id TEXT NOT NULL, release TEXT NOT NULL, round INTEGER NOT NULL,
    weight REAL NOT NULL, metrics TEXT NOT NULL, delta BLOB,
    PRIMARY KEY (client_id, release));
"""
#: a charge row: seq, client, round, the event's fields, epsilon after it, budget, release,
#: the sensitivities, and last its digest
ROW = ("SELECT seq, client_id, round, mechanism, noise_multiplier, sample_rate, steps, "
       "epsilon, budget, release, l1_sensitivity, l2_sensitivity, digest FROM charges")


class LedgerError(SecureFLError):
    """The ledger file is corrupted, tampered with, or inconsistent with this charge."""


def digest(previous: str, row: tuple[object, ...]) -> str:
    """``SHA-256(previous || canonical JSON of row)``, floats written exactly."""
    def canonical(value: object) -> object:
        return value.hex() if isinstance(value, float) else value

    text = json.dumps([canonical(v) for v in row], separators=(",", ":"))
    return hashlib.sha256((previous + text).encode()).hexdigest()


def body(row: tuple) -> tuple[object, ...]:
    """What a charge's digest covers: the row without its digest, and without the
    sensitivity columns when they are empty (a Gaussian event hashes as in schema /2)."""
    fields = row[:-1]
    return fields[:10] if fields[10:] == (None, None) else fields


def event(row: tuple) -> PrivacyEvent:
    return PrivacyEvent(row[3], row[4], row[5], row[6], row[10], row[11])


def create(db: sqlite3.Connection, *, delta: float, accountant: str) -> bool:
    """Create the tables in one ``BEGIN IMMEDIATE`` transaction; ``False`` (nothing done)
    when another process that opened the same new file first has just done so."""
    db.execute("BEGIN IMMEDIATE")
    try:
        made = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        if made is None:
            for statement in filter(str.strip, _CREATE.split(";")):
                db.execute(statement)
            db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("schema", SCHEMA), ("delta", float(delta).hex()),
                ("accountant", accountant), ("head", GENESIS)])
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return made is None


def verify(db: sqlite3.Connection, *, where: str, delta: float, accountant: str) -> None:
    """Check the tables, the schema (migrating /2), the ``(delta, accountant)`` the file
    accounts at, every row's digest and validity, monotone epsilon per client, and the head."""
    migrate = False
    for table, columns in _TABLES.items():
        found = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
        if table == "charges" and found == columns[:-len(_SENSITIVITIES)]:
            migrate = True
        elif found != columns:
            raise LedgerError(f"{where} has no valid {table!r} table (found columns "
                              f"{found}); it is corrupted or not a securefl ledger")
    meta = dict(db.execute("SELECT key, value FROM meta"))
    if migrate and meta.get("schema") == _PREVIOUS:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ALTER TABLE charges ADD COLUMN l1_sensitivity REAL")
        db.execute("ALTER TABLE charges ADD COLUMN l2_sensitivity REAL")
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (SCHEMA,))
        db.execute("COMMIT")
        meta["schema"] = SCHEMA
    elif migrate:
        meta["schema"] = meta.get("schema") or "none"
    if meta.get("schema") != SCHEMA:
        raise LedgerError(f"{where} has schema {meta.get('schema')!r}, expected {SCHEMA!r}"
                          f" (a /1 ledger charged per round number, not per release: "
                          f"keep it for the record and start a new file)")
    try:
        stored_delta = float.fromhex(meta["delta"])
    except (KeyError, ValueError):
        raise LedgerError(f"{where} has no valid delta") from None
    if stored_delta != delta or meta.get("accountant") != accountant:
        raise ConfigError(
            f"{where} accounts at delta={stored_delta:g} with {meta.get('accountant')!r}, "
            f"but the config asks for delta={delta:g} with {accountant!r}; "
            f"a budget is an (epsilon, delta) pair, so keep the original settings")
    head = GENESIS
    last_epsilon: dict[str, float] = {}
    for row in db.execute(f"{ROW} ORDER BY seq"):
        if digest(head, body(row)) != row[-1]:
            raise LedgerError(f"{where}: charge #{row[0]} does not match its digest "
                              f"(edited, reordered or deleted rows)")
        try:
            event(row)
        except (ValueError, TypeError) as exc:
            raise LedgerError(f"{where}: charge #{row[0]} is invalid ({exc})") from None
        if row[7] < last_epsilon.get(row[1], 0.0):
            raise LedgerError(f"{where}: epsilon of {row[1]} decreases at charge #{row[0]}")
        last_epsilon[row[1]] = row[7]
        head = row[-1]
    if meta.get("head") != head:
        raise LedgerError(f"{where}: chain head does not match the last charge "
                          f"(rows were deleted or appended outside the ledger)")
