"""The signed hash chain detects every edit, deletion and reordering."""

from __future__ import annotations

import argparse
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefl.errors import ConfigError
from securefl.runtime.auditlog import AuditLog, command, load_signing_key, verify


@pytest.fixture
def run_dir(tmp_path):
    log = AuditLog(tmp_path, signing_key=load_signing_key(tmp_path / "keys" / "audit.key"))
    for rnd in range(1, 4):
        log.append("round_start", round=rnd, participants=["a", "b"], protection="secagg")
        log.append("round_end", round=rnd, epsilon_charged={"a": 0.5}, model_sha256="00" * 32)
    return tmp_path


def _lines(run_dir):
    return (run_dir / "audit.log").read_text().splitlines()


def _write(run_dir, lines):
    (run_dir / "audit.log").write_text("".join(line + "\n" for line in lines))


def test_intact_log_verifies(run_dir):
    report = verify(run_dir)
    assert report.ok and report.entries == 6
    assert [e["data"]["round"] for e in report.events] == [1, 1, 2, 2, 3, 3]
    assert (run_dir / "keys" / "audit.key").stat().st_mode & 0o777 == 0o600


def test_reopening_continues_the_chain(run_dir):
    log = AuditLog(run_dir, signing_key=load_signing_key(run_dir / "keys" / "audit.key"))
    log.append("note", text="resumed")
    assert verify(run_dir).entries == 7


@pytest.mark.parametrize("field", ["data", "time", "event"])
def test_edit_is_detected(run_dir, field):
    lines = _lines(run_dir)
    entry = json.loads(lines[2])
    entry[field] = {"round": 2, "epsilon_charged": {"a": 0.0}} if field == "data" else "x"
    lines[2] = json.dumps(entry)
    _write(run_dir, lines)
    report = verify(run_dir)
    assert not report.ok and "line 3: content does not match its hash" in report.problems[0]


def test_edit_with_recomputed_hash_fails_the_signature(run_dir):
    from securefl.runtime.auditlog import _entry_hash

    lines = _lines(run_dir)
    entry = json.loads(lines[1])
    entry["data"]["epsilon_charged"] = {"a": 0.0}
    entry["hash"] = _entry_hash(entry["index"], entry["time"], entry["event"], entry["data"],
                                entry["prev"])
    lines[1] = json.dumps(entry)
    _write(run_dir, lines)
    problems = verify(run_dir).problems
    assert problems == ["line 2: signature does not verify"]


def test_deletion_in_the_middle_is_detected(run_dir):
    lines = _lines(run_dir)
    _write(run_dir, lines[:3] + lines[4:])
    problems = verify(run_dir).problems
    assert problems[0].startswith("line 4: index 4, expected 3")


def test_deletion_at_the_end_is_detected(run_dir):
    _write(run_dir, _lines(run_dir)[:-1])
    problems = verify(run_dir).problems
    assert problems == ["the log ends at entry 4 but the signed head is entry 5 "
                        "(entries were deleted at the end)"]


def test_reordering_is_detected(run_dir):
    lines = _lines(run_dir)
    lines[2], lines[3] = lines[3], lines[2]
    _write(run_dir, lines)
    assert not verify(run_dir).ok


def test_a_log_signed_by_another_key_is_refused(run_dir):
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    assert verify(run_dir, public_key=other).problems == ["line 1: signature does not verify"]
    with pytest.raises(ConfigError, match="different audit key"):
        AuditLog(run_dir, signing_key=Ed25519PrivateKey.generate())


def _args(run_dir):
    return argparse.Namespace(run_dir=str(run_dir), public_key=None, identities=None,
                              site_head=None)


def test_verify_command_exit_status(run_dir, capsys):
    assert command(_args(run_dir)) == 0
    assert "audit log OK: 6 entries" in capsys.readouterr().out
    _write(run_dir, _lines(run_dir)[1:])
    assert command(_args(run_dir)) == 1
    assert "audit log FAILED: line 1: index 1, expected 0" in capsys.readouterr().out


def test_crash_between_line_and_head_verifies_and_is_repaired(run_dir):
    head = (run_dir / "audit.head").read_bytes()
    log = AuditLog(run_dir, signing_key=load_signing_key(run_dir / "keys" / "audit.key"))
    log.append("round_start", round=4)
    (run_dir / "audit.head").write_bytes(head)  # the crash: the head was not re-signed
    assert verify(run_dir).ok
    AuditLog(run_dir, signing_key=load_signing_key(run_dir / "keys" / "audit.key"))
    assert json.loads((run_dir / "audit.head").read_text())["index"] == 6
    _write(run_dir, _lines(run_dir)[:-2])  # but cutting below the head is caught
    assert not verify(run_dir).ok
