"""Sites countersign every round: an audit log the server cannot rewrite alone.

After round ``t`` is committed the server builds the round's *statement*::

    S_t = {run, round: t, prev: audit chain head before the entry, model_sha256,
           participants, epsilon_charged: {site: ε}, accuracy}

and asks every connected site (:class:`Countersign`) to sign it with its Ed25519 identity
key (the key pinned in ``identities.json``, RFC 8032)::

    c_{t,i} = Ed25519_sign(k_i, b"securefl-countersign-v1" || canonical JSON(S_t))

A site signs only a statement of its own run whose round is later than the last one it
signed (or a byte-identical repeat of that one, after a server crash), and only when the ε
the statement charges it equals the ε of its own privacy receipt for that round
(:mod:`securefl.runtime.receipts`; no receipt, no charge).  It keeps its *head*
(``audit-head-<site>-<run>.json``: the round and hash of the last statement it signed) on its own
disk.  The server writes ``S_t`` and the countersignatures into the ``round_end`` entry.

Because ``S_t`` contains the chain head before it, every countersignature commits to the
whole log up to round ``t``: a server that rewrites any entry, re-signs the chain with its
own (or a new) key, or drops rounds cannot produce the sites' signatures for the rewritten
statements.  :func:`check_countersignatures` and :func:`check_site_heads` are the checks of
``securefl audit verify --identities DIR --site-head FILE``.  What remains undetectable:
cutting the tail of the log (the last rounds) when every site's head is withheld from the
auditor.  (Witness cosigning of an authority's statements: Syta et al., "Keeping
Authorities 'Honest or Bust' with Decentralized Witness Cosigning", IEEE S&P 2016.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefl.engine.messages import Message, message
from securefl.output import atomic_write

__all__ = ["COUNTERSIGN_DOMAIN", "Countersign", "Countersigned", "SiteWitness",
           "check_countersignatures", "check_site_heads", "collect_countersignatures",
           "statement", "statement_digest"]

_log = logging.getLogger(__name__)
COUNTERSIGN_DOMAIN = b"securefl-countersign-v1"
_FIELDS = ("run", "round", "prev", "model_sha256", "participants", "epsilon_charged",
           "accuracy")


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def statement(*, run: str, round: int, prev: str, model_sha256: str,
              participants: Sequence[str], epsilon_charged: Mapping[str, float],
              accuracy: float | None) -> dict[str, Any]:
    """``S_t`` (see the module docstring); NaN accuracy is recorded as ``None``."""
    if accuracy is not None and not math.isfinite(accuracy):
        accuracy = None
    return {"run": run, "round": round, "prev": prev, "model_sha256": model_sha256,
            "participants": sorted(participants),
            "epsilon_charged": {k: float(v) for k, v in sorted(epsilon_charged.items())},
            "accuracy": accuracy}


def statement_digest(statement: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(dict(statement))).hexdigest()


@message
class Countersign(Message):
    """Server -> site: sign this round's statement (canonical JSON of ``S_t``)."""

    statement: bytes


@message
class Countersigned(Message):
    """Site -> server: ``c_{t,i}``."""

    signature: bytes


def _parse(raw: bytes) -> dict[str, Any]:
    """A statement, checked field by field (it comes from the server)."""
    value = json.loads(raw)
    if not isinstance(value, dict) or sorted(value) != sorted(_FIELDS):
        raise ValueError("statement fields do not match")
    if canonical(value) != raw:
        raise ValueError("statement is not in canonical form")
    if not (isinstance(value["run"], str) and isinstance(value["round"], int)
            and value["round"] >= 1 and isinstance(value["prev"], str)
            and isinstance(value["model_sha256"], str)
            and isinstance(value["participants"], list)
            and isinstance(value["epsilon_charged"], dict)):
        raise ValueError("statement field of the wrong type")
    return value




class SiteWitness:
    """A site's side: check and countersign statements, keep the head, hand out receipts.

    ``charged(run, round)`` returns the ε of the site's own receipt for that round
    (``None`` when it has none: no privacy accounting, or not charged).  ``pinned()`` is
    the run the site trains in (its :class:`~securefl.engine.session.ReleaseLog`'s); a
    statement about any other run is refused, so a server cannot collect countersignatures
    for a history that never happened.
    """

    def __init__(self, site: str, *, identity: Ed25519PrivateKey, state_dir: str | Path,
                 pinned: Callable[[], bytes | None],
                 charged: Callable[[str, int], float | None] = lambda _run, _round: None
                 ) -> None:
        self.site, self._key, self._pinned = site, identity, pinned
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._charged = charged
        self._lock = threading.Lock()

    def head_path(self, run: str) -> Path:
        return self.state_dir / f"audit-head-{self.site}-{run}.json"

    def head(self, run: str) -> dict[str, Any] | None:
        path = self.head_path(run)
        return json.loads(path.read_bytes()) if path.exists() else None

    def countersign(self, request: Countersign) -> Countersigned:
        """Sign ``request.statement`` if it is consistent with what this site knows.

        Raises ``ValueError`` (reported to the server as an error frame, and logged here)
        when it is not: an earlier round than the last one signed, a different statement for
        that round (the server equivocates), or an ε charge that the site's ledger disagrees
        with.
        """
        statement = _parse(request.statement)
        run, rnd = statement["run"], statement["round"]
        if not (0 < len(run) <= 64 and run.isascii() and run.isalnum()):
            raise ValueError("statement run id must be 1-64 ASCII letters or digits")
        pinned = self._pinned()
        if pinned is None or pinned.hex() != run:
            _log.error("site %s: refused to countersign round %s of run %s: this site trains "
                       "in run %s", self.site, rnd, run[:16],
                       "none yet" if pinned is None else pinned.hex()[:16])
            raise ValueError("the statement is about a run this site is not in")
        digest = statement_digest(statement)
        with self._lock:
            head = self.head(run)
            if head is not None:
                if rnd < head["round"] or (rnd == head["round"]
                                           and head["statement_sha256"] != digest):
                    _log.error("site %s: refused to countersign round %d of run %s: it already "
                               "signed %s round %d", self.site, rnd, run,
                               "a different statement for" if rnd == head["round"] else "",
                               head["round"])
                    raise ValueError(f"round {rnd} is not after the last countersigned round "
                                     f"{head['round']} (or differs from it)")
            claimed = statement["epsilon_charged"].get(self.site)
            own = self._charged(run, rnd)
            if (claimed is None) != (own is None) or (
                    own is not None and not (isinstance(claimed, int | float) and math.isclose(
                        claimed, own, rel_tol=1e-9, abs_tol=1e-12))):
                _log.error("site %s: refused to countersign round %d: the statement charges "
                           "epsilon %s, the site's ledger %s", self.site, rnd, claimed, own)
                raise ValueError(f"epsilon charged in round {rnd} does not match the site's "
                                 "ledger")
            signature = self._key.sign(COUNTERSIGN_DOMAIN + canonical(statement))
            atomic_write(self.head_path(run), canonical(
                {"site": self.site, "run": run, "round": rnd, "statement_sha256": digest,
                 "signature": signature.hex()}) + b"\n")
        return Countersigned(signature=signature)


def collect_countersignatures(transport: Any, statement: Mapping[str, Any], *,
                              sites: Sequence[str], identities: Mapping[str, bytes],
                              timeout: float) -> dict[str, str]:
    """Ask ``sites`` to countersign; keep the signatures that verify (hex, by site)."""
    request = Countersign(statement=canonical(dict(statement)))
    exchange = transport.exchange(dict.fromkeys(sites, request), round=statement["round"],
                                  timeout=timeout)
    signatures = {}
    for site, reply in sorted(exchange.replies.items()):
        signature = reply.signature.hex() if isinstance(reply, Countersigned) else ""
        if site in identities and _verifies(identities[site], signature, statement):
            signatures[site] = signature
        else:
            _log.warning("round %d: countersignature from %s does not verify", statement["round"],
                         site)
    for site, reason in sorted(exchange.dropped.items()):
        _log.warning("round %d: %s did not countersign: %s", statement["round"], site, reason)
    return signatures


# ----------------------------------------------------------------------------- verification
def _verifies(key: bytes, signature: str, statement: Mapping[str, Any]) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(
            bytes.fromhex(signature), COUNTERSIGN_DOMAIN + canonical(dict(statement)))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def check_countersignatures(events: Sequence[Mapping[str, Any]],
                            identities: Mapping[str, bytes]) -> list[str]:
    """Problems with the ``round_end`` entries of a verified chain, under pinned site keys.

    Each ``round_end`` must carry its statement ``S_t``, agree with it (round, model hash,
    participants, ε, accuracy), link it to the previous entry's hash, and carry at least one
    countersignature, every one of which verifies under ``identities``.
    """
    problems = []
    previous = "0" * 64
    for entry in events:
        data = entry["data"]
        if entry["event"] == "round_end":
            where = f"round_end of round {data.get('round')}"
            statement = data.get("statement")
            signatures = data.get("countersignatures") or {}
            if not isinstance(statement, dict) or not isinstance(signatures, dict):
                problems.append(f"{where}: no countersigned statement")
            elif statement.get("prev") != previous:
                problems.append(f"{where}: its statement does not link to the previous entry")
            elif any(statement.get(k) != data.get(v) for k, v in (
                    ("round", "round"), ("model_sha256", "model_sha256"),
                    ("participants", "clients"), ("epsilon_charged", "epsilon_charged"),
                    ("accuracy", "accuracy"))):
                problems.append(f"{where}: the entry differs from its countersigned statement")
            elif not signatures:
                problems.append(f"{where}: no site countersigned it")
            else:
                bad = sorted(s for s, sig in signatures.items()
                             if s not in identities or not _verifies(identities[s], sig,
                                                                     statement))
                if bad:
                    problems.append(f"{where}: countersignature of {bad} does not verify "
                                    "under the pinned identity keys")
        previous = entry["hash"]
    return problems


def check_site_heads(events: Sequence[Mapping[str, Any]], heads: Sequence[Path],
                     identities: Mapping[str, bytes]) -> list[str]:
    """Each site head (kept at the site) must be a countersigned statement in the log."""
    signed = {}
    for entry in events:
        statement = entry["data"].get("statement") if entry["event"] == "round_end" else None
        if isinstance(statement, dict):
            signed[(statement.get("run"), statement.get("round"))] = statement_digest(statement)
    last = max((r for _, r in signed if isinstance(r, int)), default=0)
    problems = []
    for path in heads:
        try:
            head = json.loads(Path(path).read_bytes())
            site, run, rnd = head["site"], head["run"], int(head["round"])
            digest, signature = head["statement_sha256"], head["signature"]
        except (OSError, ValueError, KeyError, TypeError):
            problems.append(f"{path}: not a readable site head")
            continue
        if (run, rnd) not in signed:
            problems.append(f"site {site}'s head is at round {rnd} but the log's last "
                            f"countersigned round is {last} (rounds were cut or removed)")
        elif signed[(run, rnd)] != digest:
            problems.append(f"site {site}'s head for round {rnd} differs from the log's "
                            "statement (the entry was rewritten)")
        elif site not in identities:
            problems.append(f"site {site}'s head: no pinned identity key")
        else:
            statement = next(e["data"]["statement"] for e in events
                             if e["event"] == "round_end"
                             and isinstance(e["data"].get("statement"), dict)
                             and e["data"]["statement"].get("round") == rnd)
            if not _verifies(identities[site], signature, statement):
                problems.append(f"site {site}'s head signature does not verify")
    return problems
