"""`securefl client` trains each site's own model on its own CSV, over mTLS, on loopback:
one server and three site processes, each site with its own config naming its own file."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from securefl.runtime.auditlog import verify
from securefl.runtime.tls import init_certificates
from tests.runtime.test_federation import free_port
from tests.runtime.test_processes import finish, start

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hospital"
SITES = ["site-a", "site-b", "site-c"]


def common(folder: Path, port: int, allowlist: dict[str, str]) -> str:
    table = ", ".join(f'"{s}" = "{f}"' for s, f in allowlist.items())
    return f"""
[run]
name = "hospital-net"
rounds = 5
seed = 0
[model]
factory = "model:tabular"
[client]
epochs = 2
batch_size = 16
lr = 0.1
[protection]
kind = "secagg"
[protection.secagg]
clip = 1.0
max_weight = 1000.0
[privacy]
mode = "dp_sgd"
target_epsilon = 8.0
delta = 1e-3
[network]
address = "127.0.0.1:{port}"
certs = "{folder / 'certs'}"
state_dir = "{folder / 'state'}"
client_state_dir = "{folder / 'site-state'}"
round_timeout = 60.0
connect_timeout = 90.0
reconnect_timeout = 90.0
allowlist = {{ {table} }}
"""


def test_three_site_processes_train_their_own_model_on_their_own_csv(tmp_path):
    sys.path.insert(0, str(EXAMPLE))
    try:
        import make_sites
    finally:
        sys.path.remove(str(EXAMPLE))
    make_sites.main(tmp_path / "sites")
    shutil.copy(EXAMPLE / "model.py", tmp_path / "model.py")
    allowlist = init_certificates(tmp_path / "certs", SITES)
    base = common(tmp_path, free_port(), allowlist)
    data = '[data]\ndataset = "csv"\nlabel = "benign"\nnum_classes = 2\nnum_clients = 1\n'
    server = tmp_path / "server.toml"
    server.write_text(base + data.replace("[data]", '[data]\npath = "sites/test.csv"\n'
                                          'test_path = "sites/test.csv"'))
    for site in SITES:  # each site: its own file, its whole file for training
        own = base.replace(str(tmp_path / "site-state"), str(tmp_path / f"site-state-{site}"))
        (tmp_path / f"{site}.toml").write_text(  # and its own disk for ledger and evidence
            own.replace("[network]", f'[network]\nsite = "{site}"\ndata_shard = "client-0"')
            + data + f'path = "sites/{site}.csv"\ntest_path = "sites/test.csv"\n')
    proc = start("server", str(server), log=tmp_path / "server.log")
    clients = {s: start("client", str(tmp_path / f"{s}.toml"), log=tmp_path / f"{s}.log")
               for s in SITES}
    finish(proc, clients)
    logs = {s: (tmp_path / f"{s}.log").read_text()[-2000:] for s in SITES}
    assert all(c.returncode == 0 for c in clients.values()), logs
    rows = [json.loads(line) for line in (tmp_path / "state" / "metrics.jsonl").open()]
    assert len(rows) == 5 and all(r["aborted"] is None for r in rows)
    assert all(sorted(r["clients"]) == SITES for r in rows)
    summary = json.loads((tmp_path / "state" / "summary.json").read_text())
    assert summary["final_accuracy"] >= 0.85
    assert verify(tmp_path / "state").ok
    # with the sites' keys pinned: every round countersigned, every receipt verified
    from securefl.runtime.auditlog import _identities as read_identities
    from securefl.runtime.auditlog import audit_run

    heads = sorted(tmp_path.glob("site-state-*/audit-head-*.json"))
    assert len(heads) == 3
    report = audit_run(tmp_path / "state", identities=read_identities(tmp_path / "certs"),
                       site_heads=heads)
    assert report.ok, report.problems
    assert not any("refused" in (tmp_path / f"{s}.log").read_text() for s in SITES)
    # what was really trained, recorded by each party about what it holds
    served = json.loads((tmp_path / "state" / "provenance.json").read_text())
    assert served["model"]["source"] == "import model:tabular"
    assert served["data"]["test"]["files"][0]["name"] == "test.csv"
    assert sorted(served["sites"]) == SITES and "clients" not in served["data"]
    for site in SITES:
        mine = json.loads((tmp_path / f"site-state-{site}" / f"provenance-{site}.json")
                          .read_text())
        assert mine["model"]["layout_sha256"] == served["model"]["layout_sha256"]
        assert mine["data"]["files"][0]["name"] == f"{site}.csv"
        assert mine["data"]["train_rows"] + mine["data"]["val_rows"] == (
            mine["data"]["files"][0]["rows"])
