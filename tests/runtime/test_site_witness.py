"""A site is its own witness against the server: it countersigns a round's statement only
for the run it trains in, once per round, and only when the statement's ε agrees with its own
receipt; a run id from the server never names a file.  Each statement reaches the site through
the wire codec, as the server sends it."""

from __future__ import annotations

import logging

import pytest


def _witness(tmp_path, charged=None):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from securefl.runtime.evidence import SiteWitness

    return SiteWitness("alpha", identity=Ed25519PrivateKey.generate(), state_dir=tmp_path,
                       pinned=lambda: bytes.fromhex("ab12"),
                       charged=charged or (lambda _run, _round: None))


def _claim(round, **changes):
    from securefl.engine.messages import decode, encode
    from securefl.runtime.evidence import Countersign, canonical, statement

    fields = {"run": "ab12", "round": round, "prev": "0" * 64, "model_sha256": "f" * 64,
              "participants": ["alpha", "beta"], "epsilon_charged": {}, "accuracy": 0.5,
              **changes}
    # through the wire codec, as the site receives it
    return decode(encode(Countersign(statement=canonical(statement(**fields)))))


def test_a_site_countersigns_only_the_run_it_trains_in(tmp_path, caplog):
    witness = _witness(tmp_path)
    with caplog.at_level(logging.ERROR), pytest.raises(ValueError, match="not in"):
        witness.countersign(_claim(1, run="cd34"))  # a history the server made up
    assert "this site trains in run ab12" in caplog.text
    assert witness.head("cd34") is None and witness.countersign(_claim(1)).signature


def test_a_site_signs_each_round_once_and_refuses_equivocation(tmp_path, caplog):
    witness = _witness(tmp_path)
    first = witness.countersign(_claim(1))
    assert witness.countersign(_claim(1)).signature == first.signature  # a byte-identical repeat
    assert witness.head("ab12")["round"] == 1
    with pytest.raises(ValueError, match="not after the last countersigned round 1"):
        witness.countersign(_claim(1, accuracy=0.9))  # another statement for round 1
    witness.countersign(_claim(3))
    with pytest.raises(ValueError, match="not after"):
        witness.countersign(_claim(2))  # a round the site already signed past
    assert witness.head("ab12")["round"] == 3
    assert "site alpha: refused to countersign round 1 of run ab12" in caplog.text


def test_a_site_refuses_a_statement_whose_epsilon_disagrees_with_its_receipt(tmp_path, caplog):
    witness = _witness(tmp_path, charged=lambda _run, rnd: 0.25 if rnd == 1 else None)
    with pytest.raises(ValueError, match="epsilon charged in round 1"):
        witness.countersign(_claim(1, epsilon_charged={"alpha": 0.1}))
    with pytest.raises(ValueError, match="epsilon charged in round 1"):
        witness.countersign(_claim(1))  # the charge left out
    with pytest.raises(ValueError, match="epsilon charged in round 2"):
        witness.countersign(_claim(2, epsilon_charged={"alpha": 0.5}))  # a charge it never had
    assert witness.countersign(_claim(1, epsilon_charged={"alpha": 0.25})).signature
    assert "the statement charges epsilon 0.1, the site's ledger 0.25" in caplog.text


@pytest.mark.parametrize("raw", [b"[]", b'{"run": 1}', b"not json",
                                 b'{"accuracy":0.5,"epsilon_charged":{},"model_sha256":"f",'
                                 b'"participants":[],"prev":"0","round":0,"run":"a"}'])
def test_a_malformed_statement_is_refused(tmp_path, raw):
    from securefl.runtime.evidence import Countersign

    with pytest.raises(ValueError):
        _witness(tmp_path).countersign(Countersign(statement=raw))


@pytest.mark.parametrize("run_id", ["../../etc/x", "a/b", "", "x" * 65, "ü"])
def test_a_run_id_from_the_server_cannot_name_another_file(tmp_path, run_id):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from securefl.runtime.receipts import SiteReceipts

    receipts = SiteReceipts("alpha", identity=Ed25519PrivateKey.generate(),
                            state_dir=tmp_path / "site", ledger=None)
    with pytest.raises(ValueError, match="run id"):
        receipts.issue(run_id, 1)
    with pytest.raises(ValueError, match="run id"):
        _witness(tmp_path / "w").countersign(_claim(1, run=run_id))
    assert not any(p for p in tmp_path.rglob("*") if p.is_file())


def test_sites_sharing_a_state_folder_keep_their_own_heads(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from securefl.runtime.evidence import SiteWitness

    witnesses = [SiteWitness(site, identity=Ed25519PrivateKey.generate(), state_dir=tmp_path,
                             pinned=lambda: bytes.fromhex("ab12")) for site in ("alpha", "beta")]
    for witness in witnesses:
        witness.countersign(_claim(1))
    witnesses[0].countersign(_claim(2))
    assert [w.head("ab12")["round"] for w in witnesses] == [2, 1]  # two files, no mixing
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "audit-head-alpha-ab12.json", "audit-head-beta-ab12.json"]
