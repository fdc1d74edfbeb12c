"""Distributed Skellam DP over the gRPC + mTLS runtime (sites in threads, all on 127.0.0.1):
the sites' own ledgers charge the paper's closed form, the run matches the simulation up to
the noise, the receipts verify, and a survivor set below ``min_cohort`` unmasks nothing."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from securefl.engine.messages import decode, encode
from securefl.privacy import LEDGER_FILE, distributed_settings
from securefl.privacy.ledger import PrivacyLedger
from securefl.runtime.auditlog import _identities as read_identities
from securefl.runtime.auditlog import verify
from securefl.runtime.receipts import read_receipts
from securefl.runtime.server import serve
from securefl.runtime.store import ServerStore
from securefl.simulation import run_simulation
from tests.privacy.test_skellam import independent_epsilon
from tests.runtime.test_federation import (  # noqa: F401
    SITES,
    KillAt,
    Sites,
    deployment,
    make_config,
    run_networked,
)

DELTA = 1e-5


def distributed_config(deployment, tmp_path, *, rounds=3, **privacy):  # noqa: F811
    """Five sites, all sampled; epsilon is large because five noise shares of a 650-weight
    model at epsilon 8 leave digits near chance in three rounds (measured: 0.17)."""
    base = make_config(deployment, tmp_path, kind="secagg", rounds=rounds)
    table = {"mode": "distributed", "target_epsilon": 200.0, "delta": DELTA, "clip_norm": 1.0,
             "bits": 16, "expected_cohort": 5, "min_cohort": 4, "colluding_sites": 1,
             "budget": 1000.0, **privacy}
    return base.replace(privacy=dataclasses.replace(base.privacy, **table))


def test_distributed_dp_over_the_network_charges_the_closed_form(deployment, tmp_path):  # noqa: F811
    config = distributed_config(deployment, tmp_path)
    result, sites = run_networked(config, site_dirs=tmp_path / "sites")
    assert set(sites.codes.values()) == {0}
    simulated = run_simulation(config)
    # the noise is each site's CSPRNG draw: the runs agree in everything but its values
    assert [sorted(r.clients) for r in result.history.rounds] == [SITES] * 3
    assert [r.clients for r in result.history.rounds] == [
        r.clients for r in simulated.history.rounds]
    assert [r.aborted for r in result.history.rounds] == [None] * 3
    assert np.isfinite(result.parameters).all()
    assert result.parameters.shape == simulated.parameters.shape
    assert result.history.final.accuracy > 0.25  # ten classes: chance is 0.1
    # each site's own ledger charges Theorem 3.5 of Agarwal et al. at the plan's parameters
    plan = distributed_settings(config, len(SITES)).plan(result.parameters.size)
    closed = independent_epsilon(3, variance=plan.variance, l1=plan.l1, l2=plan.l2,
                                 delta=DELTA)
    store = ServerStore(result.state_dir)
    spent = store.spent()
    store.close()
    for site in SITES:
        ledger = PrivacyLedger.open_existing(tmp_path / "sites" / site / LEDGER_FILE)
        events = ledger.events(site)
        assert len(events) == 3 and {e.mechanism for e in events} == {"skellam"}
        assert ledger.epsilon(site) == pytest.approx(closed, rel=1e-9)
        assert spent[site] == pytest.approx(closed, rel=1e-9)  # the server's copy agrees
    report = verify(result.state_dir)
    assert report.ok, report.problems
    receipts, problems = read_receipts(report.events,
                                       read_identities(Path(config.network.certs)))
    assert problems == [] and sorted(receipts) == SITES
    for site in SITES:
        first, *_, last = receipts[site]
        assert first["events"][0]["mechanism"] == "skellam"
        assert last["epsilon_total"] == pytest.approx(closed, rel=1e-9)


class Spy:
    """Handler wrapper: records the type of every reply the real site code sends, each
    re-read through the wire codec as the network delivers it."""

    def __init__(self, handler, sent: list) -> None:
        self.client_id, self.inner, self.sent = handler.client_id, handler, sent

    def handle(self, request, *, round):
        reply = self.inner.handle(decode(encode(request)), round=round)
        self.sent.append(type(decode(encode(reply))).__name__)
        return reply


class Lenient:
    """A deviating server's encoding: everything as agreed, but it never refuses a cohort."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def check_cohort(self, survivors: int) -> str | None:
        return None


@pytest.mark.parametrize("deviating", [False, True], ids=["honest", "deviating-server"])
def test_survivors_below_the_minimum_cohort_get_no_reveal(deployment, tmp_path, caplog,  # noqa: F811
                                                          monkeypatch, deviating):
    caplog.set_level(logging.INFO, logger="securefl")
    if deviating:
        import securefl.runtime.server as runtime_server

        honest = runtime_server.server_protection

        def lenient(*args, **kwargs):
            protection = honest(*args, **kwargs)
            protection.encoding = Lenient(protection.encoding)
            return protection

        monkeypatch.setattr(runtime_server, "server_protection", lenient)
    # min_cohort 5 of 5: the victim lost before its masked input leaves 4 survivors
    config = distributed_config(deployment, tmp_path, rounds=1, min_cohort=5)
    victim, holder, sent = "client-2", {}, {site: [] for site in SITES}

    def wrap(site, handler):
        spied = Spy(handler, sent[site])
        return KillAt(spied, round=1, phase=3, sites=holder) if site == victim else spied

    sites = Sites(config, wrap, site_dirs=tmp_path / "sites")
    holder["self"] = sites
    try:
        result = serve(config)
    finally:
        sites.join()
    (record,) = result.history.rounds
    assert record.aborted is not None and record.clients == []
    assert victim in record.dropped
    assert record.update_norm is None  # no sum was unmasked, no update applied
    for site in SITES:  # no site signed a survivor set nor revealed a secret
        assert "SecAggSignature" not in sent[site] and "SecAggUnmaskReply" not in sent[site]
    if deviating:  # the sites' own check refused the server's survivor set
        assert "bad survivor set: 4 survivors, below the minimum cohort 5" in caplog.text
    else:
        assert "4 survivors, below the minimum cohort 5" in caplog.text


def test_a_deployment_stops_cleanly_when_every_site_is_out_of_budget(deployment, tmp_path,  # noqa: F811
                                                                     caplog):
    caplog.set_level(logging.WARNING, logger="securefl")
    config, one = one_round_budget(deployment, tmp_path, rounds=4)
    result, sites = run_networked(config, site_dirs=tmp_path / "sites")
    assert set(sites.codes.values()) == {0}
    first, second = result.history.rounds  # every site declines round 2: no round 3
    assert sorted(first.clients) == SITES and sorted(second.declined) == SITES
    assert result.history.stopped is not None
    assert result.history.stopped.startswith("stopped before round 3: 0 of 5 clients have "
                                             "privacy budget left")
    assert caplog.text.count("stopped before round 3") == 1
    summary = json.loads((result.state_dir / "summary.json").read_text())
    assert summary["stopped"] == result.history.stopped
    report = verify(result.state_dir)
    assert report.ok and [e["event"] for e in report.events] == ["round_start",
                                                                 "round_end"] * 2
    store = ServerStore(result.state_dir)
    assert [r["round"] for r in store.rounds()] == [1, 2]
    assert store.spent() == {site: pytest.approx(one, rel=1e-9) for site in SITES}
    store.close()


def one_round_budget(deployment, tmp_path, *, rounds):  # noqa: F811
    """:func:`distributed_config` with a budget that pays one round per site, and the ε of
    that round (the closed form)."""
    config = distributed_config(deployment, tmp_path, rounds=rounds)
    plan = distributed_settings(config, len(SITES)).plan(server_manifest_size(config))
    one, two = (independent_epsilon(r, variance=plan.variance, l1=plan.l1, l2=plan.l2,
                                    delta=DELTA) for r in (1, 2))
    return config.replace(privacy__budget=(one + two) / 2), one


def server_manifest_size(config) -> int:
    from securefl.build import central_evaluator
    from securefl.data import federate

    return central_evaluator(config, federate(config.data, seed=config.run.seed)).layout.size
