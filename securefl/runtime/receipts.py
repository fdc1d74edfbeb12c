"""Privacy receipts: each site's signed statement of what one round cost it.

After a round the server asks every site for its receipts after the last one the server holds
(:class:`ReceiptRequest`).  A site whose own privacy ledger charged it since its previous
receipt first makes the round's receipt::

    body_t = {federation: run id, site, round: t, model_sha256 (the global model it trained
              from), events: [{round, mechanism, noise_multiplier, sample_rate, steps}, ...] (a
              Skellam event also holds its l1_sensitivity and l2_sensitivity),
              epsilon_charged, epsilon_total, delta, prev: SHA-256 of the previous receipt}
    sig_t  = Ed25519_sign(site identity key, b"securefl-receipt-v1" || canonical JSON(body_t))

(``events`` lists every ledger row since the previous receipt: DP-FedAvg also charges the
rounds a site was not sampled in.)  The site appends each receipt to its own
``receipts-<site>-<run>.jsonl``; asked again for the same round it returns the same receipt.  It
answers with every receipt after the one the server names (so a receipt that reached the
server too late, or not at all, is delivered with the next round's and the chain has no
gap).  The server verifies each signature under the site's pinned identity key and the
chain link, takes the site's ε from the receipts (never from a bare number in the metrics),
stores them and writes them into the round's audit entry; ``securefl privacy report`` and
``securefl report`` read the receipts back from the audit log and verify each signature
(:func:`read_receipts`).

ε is read from the site's ledger through its public API only
(:meth:`~securefl.privacy.ledger.PrivacyLedger.history` and ``events``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefl.engine.messages import Message, message
from securefl.runtime.evidence import canonical

__all__ = ["RECEIPT_DOMAIN", "ReceiptReply", "ReceiptRequest", "SiteReceipts",
           "collect_receipts", "read_receipts", "verify_receipt"]

_log = logging.getLogger(__name__)
RECEIPT_DOMAIN = b"securefl-receipt-v1"
_GENESIS = "0" * 64


@message
class ReceiptRequest(Message):
    """Server -> site: your receipts up to round ``round`` of run ``run`` after the receipt
    whose hash is ``after`` (``0^64``: from the first)."""

    run: str
    round: int
    after: str


@message
class ReceiptReply(Message):
    """Site -> server: receipts, each ``canonical({"body": body, "signature": hex})``."""

    receipts: list[bytes]


def receipt_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def verify_receipt(raw: bytes, *, site: str, key: bytes) -> dict[str, Any]:
    """The receipt's body, after checking its form and signature; ``ValueError`` otherwise."""
    try:
        outer = json.loads(raw)
        body, signature = outer["body"], bytes.fromhex(outer["signature"])
        Ed25519PublicKey.from_public_bytes(key).verify(signature,
                                                       RECEIPT_DOMAIN + canonical(body))
    except (ValueError, KeyError, TypeError, InvalidSignature):
        raise ValueError(f"receipt of {site} is malformed or its signature does not verify"
                         ) from None
    if not isinstance(body, dict) or body.get("site") != site:
        raise ValueError(f"receipt of {site} names another site")
    for name in ("epsilon_charged", "epsilon_total", "delta"):
        value = body.get(name)
        if not isinstance(value, int | float) or not 0 <= value < float("inf"):
            raise ValueError(f"receipt of {site}: {name} is not a finite number >= 0")
    return body


class SiteReceipts:
    """A site's receipts for one ledger (``ledger``: a :class:`PrivacyLedger`)."""

    def __init__(self, site: str, *, identity: Ed25519PrivateKey, state_dir: str | Path,
                 ledger: Any) -> None:
        self.site, self._key, self.ledger = site, identity, ledger
        self.state_dir = Path(state_dir)
        self.models: dict[int, str] = {}
        self._lock = threading.Lock()

    def _path(self, run: str) -> Path:
        # the run id comes from the server: it must not name another file
        if not (0 < len(run) <= 64 and run.isascii() and run.isalnum()):
            raise ValueError("run id must be 1-64 ASCII letters or digits")
        # named by site too: sites that share a state folder keep separate chains
        return self.state_dir / f"receipts-{self.site}-{run}.jsonl"

    def chain(self, run: str) -> list[bytes]:
        path = self._path(run)
        return path.read_bytes().splitlines() if path.exists() else []

    def issue(self, run: str, round: int) -> bytes:
        """The receipt for ``round`` (made now if the ledger charged since the last one)."""
        with self._lock:
            chain = self.chain(run)
            for raw in chain:
                if json.loads(raw)["body"]["round"] == round:
                    return raw
            last = json.loads(chain[-1])["body"] if chain else None
            if last is not None and round < last["round"]:
                raise ValueError(f"round {round} is before this site's last receipt "
                                 f"(round {last['round']})")
            history = self.ledger.history(self.site)
            events = self.ledger.events(self.site)
            done = last["round"] if last else 0
            rows = [(r, e, ev) for (r, e), ev in zip(history, events, strict=True)
                    if done < r <= round]
            if not rows or rows[-1][0] != round:
                return b""
            total = rows[-1][1]
            body = {"federation": run, "site": self.site, "round": round,
                    "model_sha256": self.models.get(round, ""),
                    "events": [{"round": r, "mechanism": ev.mechanism,
                                "noise_multiplier": ev.noise_multiplier,
                                "sample_rate": ev.sample_rate, "steps": ev.steps,
                                **({} if ev.l2_sensitivity is None else {
                                    "l1_sensitivity": ev.l1_sensitivity,
                                    "l2_sensitivity": ev.l2_sensitivity})}
                               for r, _, ev in rows],
                    "epsilon_charged": total - (last["epsilon_total"] if last else 0.0),
                    "epsilon_total": total, "delta": self.ledger.delta,
                    "prev": receipt_hash(chain[-1]) if chain else _GENESIS}
            raw = canonical({"body": body,
                             "signature": self._key.sign(RECEIPT_DOMAIN + canonical(body)).hex()})
            with open(self._path(run), "ab") as handle:
                handle.write(raw + b"\n")
            return raw

    def segment(self, run: str, round: int, after: str) -> list[bytes]:
        """Every receipt after the one hashed ``after`` (all of them if it is unknown), up
        to ``round``, making ``round``'s first if the ledger charged it."""
        self.issue(run, round)
        chain = [raw for raw in self.chain(run) if json.loads(raw)["body"]["round"] <= round]
        start = next((i + 1 for i, raw in enumerate(chain) if receipt_hash(raw) == after), 0)
        return chain[start:]

    def charged(self, run: str, round: int) -> float | None:
        """ε of this site's receipt for ``round`` (``None``: no receipt)."""
        for raw in self.chain(run):
            body = json.loads(raw)["body"]
            if body["round"] == round:
                return float(body["epsilon_charged"])
        return None


def collect_receipts(transport: Any, *, run: str, round: int, after: Mapping[str, str],
                     sites: Sequence[str], identities: Mapping[str, bytes], timeout: float
                     ) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Ask ``sites`` for their receipts after ``after[site]`` (the hash of the last one the
    server holds): ``{site: [(receipt, body), ...]}`` of those that verify, belong to this
    run, are no later than ``round`` and continue the chain; the rest are logged by site."""
    requests = {site: ReceiptRequest(run=run, round=round, after=after.get(site, _GENESIS))
                for site in sites}
    exchange = transport.exchange(requests, round=round, timeout=timeout)
    out = {}
    for site, reply in sorted(exchange.replies.items()):
        if not isinstance(reply, ReceiptReply):
            continue
        head, accepted = after.get(site, _GENESIS), []
        for raw in reply.receipts[:round]:
            try:
                if site not in identities:
                    raise ValueError(f"receipt of {site}: no pinned identity key")
                body = verify_receipt(raw, site=site, key=identities[site])
                if body.get("federation") != run or not (
                        isinstance(body.get("round"), int) and body["round"] <= round):
                    raise ValueError(f"receipt of {site} is for another run or a later round")
                if body.get("prev") != head:
                    raise ValueError(f"receipt of {site} for round {body['round']} does not "
                                     "follow its previous receipt")
            except ValueError as exc:
                _log.warning("round %d: refused the privacy receipt of %s: %s", round, site,
                             exc)
                break
            head = receipt_hash(raw)
            accepted.append((raw.decode(), body))
        if accepted:
            out[site] = accepted
    return out


def read_receipts(events: Sequence[Mapping[str, Any]], identities: Mapping[str, bytes]
                  ) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """``({site: [receipt body, ...]}, problems)`` from the ``round_end`` entries of a log.

    Every receipt's signature is checked under the pinned identity keys and each site's
    receipts must form one chain (``prev`` = hash of the previous receipt).
    """
    bodies: dict[str, list[dict[str, Any]]] = {}
    heads: dict[str, str] = {}
    problems = []
    for entry in events:
        if entry["event"] != "round_end":
            continue
        for site, raws in sorted((entry["data"].get("receipts") or {}).items()):
            if not isinstance(raws, list):
                problems.append(f"receipts of {site} are not a list")
                continue
            for raw in raws:
                problem = _read_one(site, raw, identities, heads, bodies)
                if problem is not None:
                    problems.append(problem)
    return bodies, problems


def _read_one(site: str, raw: Any, identities: Mapping[str, bytes], heads: dict[str, str],
              bodies: dict[str, list[dict[str, Any]]]) -> str | None:
    if not isinstance(raw, str):
        return f"receipt of {site} is not text"
    encoded = raw.encode()
    try:
        if site not in identities:
            raise ValueError(f"receipt of {site}: no pinned identity key")
        body = verify_receipt(encoded, site=site, key=identities[site])
    except ValueError as exc:
        return str(exc)
    problem = None
    if body["prev"] != heads.get(site, _GENESIS):
        problem = (f"receipt of {site} for round {body['round']} does not follow its previous "
                   "receipt")
    heads[site] = receipt_hash(encoded)
    bodies.setdefault(site, []).append(body)
    return problem
