"""The audit log is evidence against the server: every tampering the red team tried fails
``securefl audit verify`` once the verifier pins the keys, and the sites' receipts are what
the server records as ε.  One real networked run (5 site clients over loopback mTLS, DP-SGD)
is made once; each test tampers with a copy of its state as the server could."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from securefl.errors import ConfigError
from securefl.runtime.auditlog import (
    _DOMAIN,
    _canonical,
    _entry_hash,
    _head_hash,
    audit_run,
    command,
    load_signing_key,
)
from securefl.runtime.auditlog import _identities as read_identities
from securefl.runtime.receipts import read_receipts
from securefl.runtime.server import serve
from securefl.runtime.store import ServerStore
from tests.runtime.test_federation import SITES, Sites, deployment, make_config  # noqa: F401


@pytest.fixture(scope="module")
def run(deployment, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("evidence")
    base = make_config(deployment, tmp, rounds=2)
    config = base.replace(privacy=dataclasses.replace(
        base.privacy, mode="dp_sgd", noise_multiplier=1.0, delta=1e-5))
    sites = Sites(config, site_dirs=tmp / "sites")
    try:
        result = serve(config)
    finally:
        sites.join()
    certs = Path(config.network.certs)
    return {"config": config, "state": result.state_dir, "sites": tmp / "sites",
            "identities": read_identities(certs), "pub": (result.state_dir / "audit.pub")
            .read_text().strip(), "result": result}


def _copy(run, tmp_path) -> Path:
    target = tmp_path / "state"
    shutil.copytree(run["state"], target)
    return target


def _heads(run) -> list[Path]:
    return sorted(run["sites"].glob("*/audit-head-*.json"))


def _check(run, state: Path, **changes):
    options = {"public_key": bytes.fromhex(run["pub"]), "identities": run["identities"],
               "site_heads": _heads(run), **changes}
    return audit_run(state, **options)


def _entries(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / "audit.log").read_bytes().splitlines()]


def _resign(state: Path, entries: list[dict], key_path: Path | None = None) -> None:
    """Rewrite the whole chain and head as the server can, with its key (or a new one)."""
    key = load_signing_key(key_path or state / "keys" / "audit.key")
    prev, lines = "0" * 64, []
    for index, entry in enumerate(entries):
        digest = _entry_hash(index, entry["time"], entry["event"], entry["data"], prev)
        lines.append(_canonical({**entry, "index": index, "prev": prev, "hash": digest,
                                 "sig": key.sign(_DOMAIN + bytes.fromhex(digest)).hex()}))
        prev = digest
    (state / "audit.log").write_bytes(b"".join(line + b"\n" for line in lines))
    head = {"index": len(entries) - 1, "hash": prev,
            "sig": key.sign(_head_hash(len(entries) - 1, prev)).hex()}
    (state / "audit.head").write_bytes(_canonical(head) + b"\n")


def test_an_honest_run_is_countersigned_by_every_site_and_its_receipts_verify(run):
    report = _check(run, run["state"])
    assert report.ok, report.problems
    ends = [e["data"] for e in report.events if e["event"] == "round_end"]
    assert [sorted(e["countersignatures"]) for e in ends] == [SITES, SITES]
    assert len(_heads(run)) == 5 and all(
        json.loads(p.read_bytes())["round"] == 2 for p in _heads(run))
    receipts, problems = read_receipts(report.events, run["identities"])
    assert problems == [] and sorted(receipts) == SITES
    store = ServerStore(run["state"])
    spent = store.spent()
    store.close()
    for site in SITES:  # the server's ε is the receipts' ε, and the receipts chain
        first, second = receipts[site]
        assert second["epsilon_total"] == spent[site]
        assert first["epsilon_charged"] + second["epsilon_charged"] == pytest.approx(spent[site])
        assert first["events"][0]["mechanism"] == "dp_sgd" and first["events"][0]["steps"] > 0
        assert ends[1]["epsilon_charged"][site] == second["epsilon_charged"]


def test_rewritten_accuracy_resigned_with_the_server_key_fails(run, tmp_path):
    state = _copy(run, tmp_path)
    entries = _entries(state)
    for entry in entries:
        if entry["event"] == "round_end":
            entry["data"]["accuracy"] = 0.99
    _resign(state, entries)
    assert audit_run(state).ok  # the server's own key alone cannot tell
    problems = _check(run, state).problems
    assert any("differs from its countersigned statement" in p for p in problems)


def test_rewritten_statement_too_fails_the_countersignatures(run, tmp_path):
    state = _copy(run, tmp_path)
    entries = _entries(state)
    for entry in entries:
        if entry["event"] == "round_end":
            entry["data"]["accuracy"] = entry["data"]["statement"]["accuracy"] = 0.99
    _resign(state, entries)
    problems = _check(run, state).problems
    assert any("does not verify under the pinned identity keys" in p for p in problems)


def test_a_new_server_key_and_a_replaced_audit_pub_fail_with_the_pinned_key(run, tmp_path):
    state = _copy(run, tmp_path)
    _resign(state, _entries(state), key_path=tmp_path / "new.key")
    from cryptography.hazmat.primitives import serialization

    new = load_signing_key(tmp_path / "new.key").public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    (state / "audit.pub").write_text(new.hex() + "\n")
    assert audit_run(state).ok
    assert "signature does not verify" in _check(run, state).problems[0]


def _resign_before_round(state, round):
    """The log cut just before ``round`` starts, re-signed with the server's own key."""
    entries = _entries(state)
    cut = next(i for i, e in enumerate(entries)
               if e["event"] == "round_start" and e["data"]["round"] == round)
    _resign(state, entries[:cut])


def test_removed_rounds_resigned_fail(run, tmp_path):
    state = _copy(run, tmp_path)
    _resign_before_round(state, 2)
    problems = _check(run, state).problems
    assert any("holds completed rounds [2] that the log lacks" in p for p in problems)
    assert sum("head is at round 2" in p for p in problems) == 5


def test_a_cut_tail_is_caught_by_a_site_head_even_when_state_agrees(run, tmp_path):
    state = _copy(run, tmp_path)
    _resign_before_round(state, 2)
    (state / "state.sqlite").unlink()  # the server hides its state too
    one_head = _heads(run)[:1]
    problems = _check(run, state, site_heads=one_head).problems
    assert problems == ["site client-0's head is at round 2 but the log's last countersigned "
                        "round is 1 (rounds were cut or removed)"]
    # the documented undetectable case: every site head withheld
    assert _check(run, state, site_heads=[]).ok


def test_stripped_countersignatures_fail(run, tmp_path):
    state = _copy(run, tmp_path)
    entries = _entries(state)
    for entry in entries:
        entry["data"].pop("countersignatures", None)
        entry["data"].pop("statement", None)
    _resign(state, entries)
    problems = _check(run, state).problems
    assert problems[:2] == ["round_end of round 1: no countersigned statement",
                            "round_end of round 2: no countersigned statement"]


def test_a_deleted_log_fails_verification_and_resume(run, tmp_path, capsys):
    state = _copy(run, tmp_path)
    (state / "audit.log").unlink()
    (state / "audit.head").unlink()
    args = argparse.Namespace(run_dir=str(state), public_key=run["pub"], identities=None,
                              site_head=None)
    assert command(args) == 1
    assert "audit.log is missing" in capsys.readouterr().out
    config = run["config"].replace(run__rounds=3)
    with pytest.raises(ConfigError, match="audit log is gone; refusing to resume"):
        serve(config, state_dir=state, resume=True)


def test_a_tampered_receipt_fails(run, tmp_path):
    state = _copy(run, tmp_path)
    entries = _entries(state)
    end = next(e for e in entries if e["event"] == "round_end")
    raw = json.loads(end["data"]["receipts"]["client-3"][0])
    raw["body"]["epsilon_charged"] = 0.0
    end["data"]["receipts"]["client-3"] = [json.dumps(raw)]
    _resign(state, entries)
    problems = _check(run, state).problems
    assert "receipt of client-3 is malformed or its signature does not verify" in problems


def test_verify_cli_with_pinned_keys(run, capsys):
    certs = Path(run["config"].network.certs)
    args = argparse.Namespace(run_dir=str(run["state"]), public_key=run["pub"],
                              identities=str(certs),
                              site_head=[str(p) for p in _heads(run)])
    assert command(args) == 0
    out = capsys.readouterr().out
    assert "countersigned by the sites, 5 site heads checked" in out


def test_resuming_a_finished_run_returns_at_once_and_keeps_the_summary(run, tmp_path):
    state = _copy(run, tmp_path)
    before = json.loads((state / "summary.json").read_text())
    result = serve(run["config"], state_dir=state, resume=True)
    assert result.complete and result.resumed_from == 2
    assert json.loads((state / "summary.json").read_text()) == before
    assert before["final_accuracy"] == run["result"].history.final.accuracy


# ------------------------------------------------------------- deployments with the sites
def pinned_audit(result, config, site_dirs):
    """``audit verify`` with the sites' keys and heads pinned; it must pass."""
    identities = read_identities(Path(config.network.certs))
    heads = sorted(site_dirs.glob("*/audit-head-*.json"))
    report = audit_run(result.state_dir, identities=identities, site_heads=heads)
    assert report.ok, report.problems
    return report, identities


def test_privacy_report_and_compliance_report_read_and_verify_the_receipts(run, tmp_path,
                                                                           capsys):
    from securefl.report import build_sections
    from securefl.report.privacy import command as privacy_report

    state = _copy(run, tmp_path)
    assert privacy_report(argparse.Namespace(run_dir=str(state))) == 0
    out = capsys.readouterr().out
    assert "privacy receipts signed by the sites" in out and out.count("dp_sgd") == 5
    blocks = next(s for s in build_sections(state) if s.id == "audit-log").blocks
    start = next(i for i, b in enumerate(blocks)
                 if getattr(b, "text", "") == "Privacy receipts signed by the sites:")
    assert blocks[start + 1].text.startswith("VERIFIED: 10 receipts of 5 sites")
    assert len(blocks[start + 2].rows) == 10
    entries = _entries(state)
    end = next(e for e in entries if e["event"] == "round_end")
    raw = json.loads(end["data"]["receipts"]["client-0"][0])
    raw["body"]["epsilon_total"] = 0.0
    end["data"]["receipts"]["client-0"] = [json.dumps(raw)]
    _resign(state, entries)
    assert privacy_report(argparse.Namespace(run_dir=str(state))) == 1
    blocks = next(s for s in build_sections(state) if s.id == "audit-log").blocks
    assert any("receipt of client-0 is malformed or its signature does not verify"
               in getattr(b, "text", "") for b in blocks)


def test_a_round_end_cut_by_a_crash_is_recovered_and_countersigned(deployment, tmp_path,  # noqa: F811
                                                                   monkeypatch):
    from securefl.runtime import server as server_module
    from tests.runtime.test_federation import _Crash

    config = make_config(deployment, tmp_path, rounds=3)
    original = server_module._audit_round_end

    def crash_at_two(audit, server, evidence, rnd, **kwargs):
        if rnd == 2 and not kwargs.get("recovered"):
            raise RuntimeError("power cut after round 2 was committed")
        return original(audit, server, evidence, rnd, **kwargs)

    sites = Sites(config, site_dirs=tmp_path / "sites")
    try:
        monkeypatch.setattr(server_module, "_audit_round_end", crash_at_two)
        with pytest.raises(RuntimeError, match="power cut"):
            serve(config, transport=_Crash(config, sites=SITES))
        monkeypatch.setattr(server_module, "_audit_round_end", original)
        resumed = serve(config, resume=True)
    finally:
        sites.join()
    assert resumed.resumed_from == 2
    identities = read_identities(Path(config.network.certs))
    heads = sorted((tmp_path / "sites").glob("*/audit-head-*.json"))
    report = audit_run(resumed.state_dir, identities=identities, site_heads=heads)
    assert report.ok, report.problems
    ends = [e["data"] for e in report.events if e["event"] == "round_end"]
    assert [e["round"] for e in ends] == [1, 2, 3] and ends[1]["recovered"] is True
    assert all(sorted(e["countersignatures"]) == SITES for e in ends)


def test_dp_fedavg_receipts_cover_every_round_a_site_took_part_in(deployment, tmp_path):  # noqa: F811
    base = make_config(deployment, tmp_path, rounds=3)
    config = base.replace(
        privacy=dataclasses.replace(base.privacy, mode="dp_fedavg", noise_multiplier=1.0,
                                    delta=1e-5),
        server=dataclasses.replace(base.server, fraction=0.6, min_clients=2))
    sites = Sites(config, site_dirs=tmp_path / "sites")
    try:
        result = serve(config)
    finally:
        sites.join()
    report, identities = pinned_audit(result, config, tmp_path / "sites")
    receipts, problems = read_receipts(report.events, identities)
    store = ServerStore(result.state_dir)
    spent = store.spent()
    took_part = {site: [r["round"] for r in store.rounds() if site in r["participants"]]
                 for site in receipts}
    store.close()
    assert problems == [] and sorted(receipts) == sorted(spent)
    for site, bodies in receipts.items():
        # a public sample is charged q = 1 in each round taken part in, and only there
        covered = [e["round"] for b in bodies for e in b["events"]]
        assert covered == took_part[site]  # every such round, none twice
        assert bodies[-1]["epsilon_total"] == spent[site]
        assert sum(b["epsilon_charged"] for b in bodies) == pytest.approx(spent[site])
    assert any(len(rounds) < 3 for rounds in took_part.values())  # someone sat a round out


def test_a_removed_middle_round_resigned_fails_the_statement_link(run, tmp_path):
    state = _copy(run, tmp_path)
    entries = _entries(state)
    kept = [e for e in entries if e["data"].get("round") != 1]
    _resign(state, kept)
    assert audit_run(state).ok is False  # the state still holds round 1
    problems = _check(run, state).problems
    assert "round_end of round 2: its statement does not link to the previous entry" in problems


def test_a_receipt_lost_in_one_round_arrives_with_the_next(deployment, tmp_path):  # noqa: F811
    from securefl.runtime.receipts import ReceiptReply, ReceiptRequest

    base = make_config(deployment, tmp_path, rounds=2)
    config = base.replace(privacy=dataclasses.replace(
        base.privacy, mode="dp_sgd", noise_multiplier=1.0, delta=1e-5))
    sites = Sites(config, site_dirs=tmp_path / "sites")
    evidence = sites.clients["client-2"].evidence
    answer = evidence.answer

    def loses_round_one(request):
        reply = answer(request)
        if isinstance(request, ReceiptRequest) and request.round == 1:
            return ReceiptReply(receipts=[])  # issued and kept at the site, lost on the way
        return reply

    evidence.answer = loses_round_one
    try:
        result = serve(config)
    finally:
        sites.join()
    report, identities = pinned_audit(result, config, tmp_path / "sites")
    ends = [e["data"] for e in report.events if e["event"] == "round_end"]
    assert "client-2" not in ends[0]["receipts"] and len(ends[1]["receipts"]["client-2"]) == 2
    # the statement of round 1 lacked its charge, so client-2 did not countersign it
    assert "client-2" not in ends[0]["countersignatures"]
    assert sorted(ends[1]["countersignatures"]) == SITES
    receipts, _ = read_receipts(report.events, identities)
    assert [b["round"] for b in receipts["client-2"]] == [1, 2]


def test_the_compliance_report_of_a_dp_deployment_agrees_with_its_checks(run, tmp_path,
                                                                       capsys, monkeypatch):
    from tests.report_agreement import (
        audit_verify,
        check_results,
        compliance_report,
        privacy_report,
        report_epsilon,
        requirement_results,
        verdict,
    )

    monkeypatch.setenv("COLUMNS", "200")
    state = _copy(run, tmp_path)
    config = state / "config.toml"
    config.write_text(config.read_text().replace('name = "net"',
                                                 'name = "net"\nthreat_model = "hospital-'
                                                 'consortium"', 1))
    report = compliance_report(state, capsys)
    # ε: the report's table is the sites' receipts, as `privacy report` prints them
    spent = privacy_report(state, capsys)
    assert sorted(spent) == SITES and all(v > 0 for v in spent.values())
    assert report_epsilon(report) == pytest.approx(spent, abs=5e-4)
    assert report.paragraphs["privacy"][0] == ("Source of every ε in this report: the privacy "
                                               "receipts signed by the sites (verified).")
    rows = verdict(report)
    assert rows["Privacy spent"][0] == "PASS"
    assert f"largest ε {max(spent.values()):.4g}" in rows["Privacy spent"][1]
    assert f"at most ε = {max(spent.values()):.4g} per site" in report.paragraphs["verdict"][0]
    # the audit log: verified in the report as by `audit verify` with the pinned keys
    code, out = audit_verify(state, capsys, "--identities", str(run["config"].network.certs))
    entries = int(out.split("audit log OK: ")[1].split()[0])
    assert code == 0 and rows["Signed audit log"] == (
        "PASS", f"verified: {entries} entries, every hash link and signature checks out")
    # controls: the same requirements pass and fail as `securefl check --deployment network`
    checked = check_results(config, "hospital-consortium", "network", capsys)
    assert requirement_results(report) == checked
    failing = sorted(k for k, v in checked.items() if v == "FAIL")
    assert rows["Threat-model controls"][0] == ("FAIL" if failing else "PASS")
    assert all(f in rows["Threat-model controls"][1] for f in failing)
    assert report.paragraphs["verdict"][0].startswith(
        "Verdict: needs attention (Threat-model controls)" if failing
        else "Verdict: every recorded control held")
