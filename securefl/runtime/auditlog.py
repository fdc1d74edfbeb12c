"""Tamper-evident audit log: an append-only, hash-chained, Ed25519-signed list of events.

Entry ``i`` is one JSON line ``{"index", "time", "event", "data", "prev", "hash", "sig"}``::

    hash_i = SHA-256(canonical JSON of {index, time, event, data, prev})     prev_i = hash_{i-1}
    sig_i  = Ed25519_sign(server key, b"securefl-audit-v1" || hash_i)        prev_0 = 0^64

(hash chains for tamper evidence: Haber & Stornetta, J. Cryptology 1991; Schneier & Kelsey,
"Secure audit logs to support computer forensics", ACM TISSEC 1999; Ed25519: RFC 8032.)
Editing any field changes ``hash_i``; recomputing it breaks ``sig_i``; deleting or reordering
entries breaks ``index`` and ``prev``.  Deleting the tail is caught by ``audit.head``, the
signed (index, hash) of the last entry, rewritten atomically after each append (a crash
between the two leaves one signed entry past the head, which verifies; the head is
re-signed when the log is reopened).  Only a
rollback to an *older copy* of both files cannot be detected from the files alone: anchor
the head hash elsewhere (e.g. print it in the run report) when that matters.

Files in the run directory: ``audit.log``, ``audit.head``, ``audit.pub`` (raw public key, hex).
The signing key lives in ``keys/audit.key`` (mode 0600) and should not be handed to auditors.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefl.errors import ConfigError, SecureFLError
from securefl.output import atomic_write
from securefl.runtime.receipts import read_receipts

__all__ = ["AuditLog", "Verification", "audit_run", "command", "load_signing_key",
           "receipts_command", "receipts_of_run", "verify"]

_DOMAIN = b"securefl-audit-v1"
_GENESIS = "0" * 64
LOG, HEAD, PUBLIC = "audit.log", "audit.head", "audit.pub"


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _entry_hash(index: int, time: str, event: str, data: Any, prev: str) -> str:
    return hashlib.sha256(_canonical({"index": index, "time": time, "event": event,
                                      "data": data, "prev": prev})).hexdigest()


def _head_hash(index: int, entry_hash: str) -> bytes:
    return _DOMAIN + b"head" + _canonical({"index": index, "hash": entry_hash})




def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """Load the server's Ed25519 audit key, creating it (mode 0600) on first use."""
    path = Path(path)
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path}: not an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()), mode=0o600)
    return key


class AuditLog:
    """Append signed, chained entries to ``directory/audit.log`` (continuing an existing log)."""

    def __init__(self, directory: str | Path, *, signing_key: Ed25519PrivateKey) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = signing_key
        public = signing_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                       serialization.PublicFormat.Raw)
        pub_path = self.directory / PUBLIC
        if pub_path.exists() and pub_path.read_text().strip() != public.hex():
            raise ConfigError(f"{pub_path}: this run was signed with a different audit key")
        pub_path.write_text(public.hex() + "\n")
        report = verify(self.directory, public_key=public)
        if not report.ok:
            raise ConfigError(f"{self.directory / LOG}: existing audit log does not verify: "
                              + "; ".join(report.problems))
        self._index, self._prev = report.entries, report.head
        if report.entries:
            self._sign_head(report.entries - 1, report.head)

    @property
    def head(self) -> str:
        """Hash of the last entry (``0^64`` for an empty log)."""
        return self._prev

    def _sign_head(self, index: int, digest: str) -> None:
        head = {"index": index, "hash": digest,
                "sig": self._key.sign(_head_hash(index, digest)).hex()}
        atomic_write(self.directory / HEAD, _canonical(head) + b"\n")

    def append(self, event: str, **data: Any) -> str:
        """Append one event; returns its hash.  The head is re-signed after the line is durable."""
        time = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        digest = _entry_hash(self._index, time, event, data, self._prev)
        signature = self._key.sign(_DOMAIN + bytes.fromhex(digest)).hex()
        line = _canonical({"index": self._index, "time": time, "event": event, "data": data,
                           "prev": self._prev, "hash": digest, "sig": signature})
        with open(self.directory / LOG, "ab") as handle:
            handle.write(line + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._sign_head(self._index, digest)
        self._index, self._prev = self._index + 1, digest
        return digest


@dataclass
class Verification:
    entries: int = 0
    head: str = _GENESIS
    problems: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(directory: str | Path, *, public_key: bytes | None = None) -> Verification:
    """Check every entry's index, chain link, hash and signature, and the signed head.

    ``public_key`` (32 raw bytes) pins the expected signer; by default ``audit.pub`` is used.
    An empty run (no log, no head) verifies with zero entries.
    """
    directory = Path(directory)
    report = Verification()
    if public_key is None:
        try:
            public_key = bytes.fromhex((directory / PUBLIC).read_text().strip())
        except (OSError, ValueError):
            report.problems.append(f"{PUBLIC} is missing or malformed")
            return report
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError:
        report.problems.append("public key is not a 32-byte Ed25519 key")
        return report
    log_path, head_path = directory / LOG, directory / HEAD
    lines = log_path.read_bytes().splitlines() if log_path.exists() else []
    for position, raw in enumerate(lines):
        try:
            entry = json.loads(raw)
            index, time, event = entry["index"], entry["time"], entry["event"]
            data, prev, digest, sig = entry["data"], entry["prev"], entry["hash"], entry["sig"]
            recomputed = _entry_hash(index, time, event, data, prev)
        except (ValueError, KeyError, TypeError):
            report.problems.append(f"line {position + 1}: not a well-formed entry")
            return report
        if index != position:
            report.problems.append(f"line {position + 1}: index {index}, expected {position} "
                                   "(an entry was deleted, inserted or reordered)")
        if prev != report.head:
            report.problems.append(f"line {position + 1}: does not link to the previous entry "
                                   "(deleted, inserted or reordered)")
        if recomputed != digest:
            report.problems.append(f"line {position + 1}: content does not match its hash "
                                   "(the entry was edited)")
        try:
            key.verify(bytes.fromhex(sig), _DOMAIN + bytes.fromhex(digest))
        except (InvalidSignature, ValueError):
            report.problems.append(f"line {position + 1}: signature does not verify")
        if report.problems:
            return report
        report.entries, report.head = position + 1, digest
        report.events.append(entry)
    if not head_path.exists():
        if lines:
            report.problems.append(f"{HEAD} is missing")
        return report
    try:
        head = json.loads(head_path.read_bytes())
        key.verify(bytes.fromhex(head["sig"]), _head_hash(head["index"], head["hash"]))
        index = int(head["index"])
        known = 0 <= index < report.entries and report.events[index]["hash"] == head["hash"]
    except (ValueError, KeyError, TypeError, InvalidSignature):
        report.problems.append(f"{HEAD} is malformed or its signature does not verify")
        return report
    # Entries after the head are fine (a crash between appending a signed line and
    # re-signing the head); a head past the end, or off the chain, means a cut tail.
    if index >= report.entries:
        report.problems.append(f"the log ends at entry {report.entries - 1} but the signed head "
                               f"is entry {index} (entries were deleted at the end)")
    elif not known:
        report.problems.append(f"the signed head does not match entry {index}")
    return report


def _public_key(value: str) -> bytes:
    """``--public-key``: 64 hex digits, or a file holding them (a copy of ``audit.pub``)."""
    text = value.strip()
    if not (len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)):
        try:
            text = Path(value).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--public-key: not 64 hex digits nor a readable file ({exc})"
                              ) from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError("--public-key: not hex") from None
    if len(key) != 32:
        raise ConfigError("--public-key: an Ed25519 public key is 32 bytes (64 hex digits)")
    return key


def _identities(directory: str | Path) -> dict[str, bytes]:
    path = Path(directory)
    path = path / "identities.json" if path.is_dir() else path
    try:
        return {s: bytes.fromhex(k) for s, k in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path}: cannot read the identity directory ({exc})") from None


def audit_run(run_dir: str | Path, *, public_key: bytes | None = None,
              identities: dict[str, bytes] | None = None,
              site_heads: list[Path] | tuple[Path, ...] = ()) -> Verification:
    """Everything ``securefl audit verify`` checks, as one :class:`Verification`.

    On top of :func:`verify` (under the pinned ``public_key``): the log must exist, it must
    hold a ``round_end`` for every round ``state.sqlite`` records as completed, and with
    ``identities`` (the sites' pinned keys) every ``round_end`` must be countersigned, every
    privacy receipt must verify, and every site head must be a statement of the log
    (:mod:`securefl.runtime.evidence`).
    """
    from securefl.runtime.evidence import check_countersignatures, check_site_heads
    from securefl.runtime.store import completed_rounds

    directory = Path(run_dir)
    if not (directory / LOG).exists():
        report = Verification()
        report.problems.append(
            f"{directory}: no such folder" if not directory.is_dir() else
            f"{directory / LOG} is missing, though {directory / 'state.sqlite'} records rounds"
            if (directory / "state.sqlite").exists() else
            f"{directory} holds no audit log: only a networked server (securefl server) "
            "writes one; an in-process simulation (securefl run) does not")
        return report
    report = verify(directory, public_key=public_key)
    if not report.ok:
        return report
    ends = {e["data"].get("round") for e in report.events if e["event"] == "round_end"}
    lacking = sorted(set(completed_rounds(directory) or []) - ends)
    if lacking:
        report.problems.append(f"state.sqlite holds completed rounds {lacking} that the log "
                               "lacks (entries were removed)")
    if identities is not None:
        report.problems.extend(check_countersignatures(report.events, identities))
        report.problems.extend(read_receipts(report.events, identities)[1])
        report.problems.extend(check_site_heads(report.events, list(site_heads), identities))
    return report


def command(args: argparse.Namespace) -> int:
    """``securefl audit verify RUN_DIR [--public-key KEY] [--identities DIR] [--site-head F]``:
    print the verdict; exit 0 only if the log is intact."""
    key = _public_key(args.public_key) if args.public_key else None
    identities = _identities(args.identities) if args.identities else None
    report = audit_run(args.run_dir, public_key=key, identities=identities,
                       site_heads=[Path(p) for p in args.site_head or ()])
    if report.ok:
        pub = key.hex() if key else (Path(args.run_dir) / PUBLIC).read_text().strip()
        print(f"audit log OK: {report.entries} entries, head {report.head}, "
              f"signed by Ed25519 key {pub}"
              + ("" if key else " (read from the run directory: pass --public-key to pin it)")
              + (f"; countersigned by the sites, {len(args.site_head or ())} site heads "
                 "checked" if identities else
                 "; countersignatures not checked (pass --identities)"))
        return 0
    for problem in report.problems:
        print(f"audit log FAILED: {problem}")
    return 1


def receipts_of_run(run_dir: str | Path, *, identities: Mapping[str, bytes] | None = None
                    ) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """The verified receipts recorded in a server state directory's audit log.

    ``identities`` default to the ``identities.json`` of the run's ``[network] certs`` (from
    its ``config.toml``); every problem (log does not verify, a signature fails, a chain
    breaks, no identity keys) is listed.
    """
    directory = Path(run_dir)
    report = verify(directory)
    if not report.ok:
        return {}, [f"audit log: {p}" for p in report.problems]
    if identities is None:
        try:
            from securefl.config import load_config

            certs = load_config(directory / "config.toml").network.certs
            identities = _identities(Path(certs or "."))
        except SecureFLError as exc:
            return {}, [f"cannot verify receipts without the sites' identity keys ({exc})"]
    return read_receipts(report.events, identities)


def receipts_command(args: Any) -> int:
    """``securefl privacy report STATE_DIR`` of a networked server: the sites' receipts."""
    from rich.console import Console
    from rich.table import Table

    receipts, problems = receipts_of_run(args.run_dir)
    table = Table(title="privacy receipts signed by the sites (verified)")
    for header in ("site", "receipts", "last round", "epsilon spent", "delta", "mechanism"):
        table.add_column(header, justify="left" if header in ("site", "mechanism") else "right")
    for site, bodies in sorted(receipts.items()):
        last = bodies[-1]
        mechanisms = sorted({e["mechanism"] for b in bodies for e in b["events"]})
        table.add_row(site, str(len(bodies)), str(last["round"]),
                      f"{last['epsilon_total']:.3f}", f"{last['delta']:g}", ",".join(mechanisms))
    console = Console()
    console.print(table)
    for problem in problems:
        console.print(f"receipt check FAILED: {problem}")
    return 1 if problems else 0
