"""The engine over the gRPC runtime (mutual TLS on loopback), sites in threads of this process.

The same runs as real processes are in ``test_processes.py``; threads keep these fast.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from securefl.build import central_evaluator
from securefl.config import config_from_dict
from securefl.data import federate
from securefl.engine.messages import FitIns, FitRes, PlainUpdate
from securefl.runtime.auditlog import verify
from securefl.runtime.client import build_site, build_site_client
from securefl.runtime.manifest import manifest_of
from securefl.runtime.server import serve
from securefl.runtime.store import ServerStore, model_hash
from securefl.runtime.tls import init_certificates
from securefl.runtime.transport import GrpcTransport
from securefl.simulation import run_simulation

SITES = [f"client-{i}" for i in range(5)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deploy")
    allowlist = init_certificates(folder / "certs", SITES)
    from securefl.config.he import HEConfig
    from securefl.runtime.keys import init_he_context

    init_he_context(folder / "certs", HEConfig(poly_modulus_degree=4096,
                                               coeff_modulus_bits=(40, 30), scale_bits=25))
    return folder, allowlist


def make_config(deployment, tmp_path, *, kind="plain", rounds=3, **network):
    folder, allowlist = deployment
    table = {
        "run": {"name": "net", "rounds": rounds, "seed": 0},
        "data": {"dataset": "digits", "num_clients": 5, "partition": "dirichlet", "alpha": 0.5},
        "model": {"name": "logistic"},
        "client": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        "protection": {"kind": kind},
        "network": {"address": f"127.0.0.1:{free_port()}", "certs": str(folder / "certs"),
                    "allowlist": dict(allowlist), "state_dir": str(tmp_path / "state"),
                    "round_timeout": 30.0, "connect_timeout": 20.0,
                    "reconnect_timeout": 20.0, **network},
    }
    if kind == "he":
        table["protection"]["he"] = {"poly_modulus_degree": 4096,
                                     "coeff_modulus_bits": [40, 30], "scale_bits": 25}
        table["server"] = {"evaluate": "federated"}  # the server never holds the model
    if kind == "secagg":
        table["protection"]["secagg"] = {}
    return config_from_dict(table)


class Sites:
    """Every site of ``config`` served by a SiteClient thread; ``wrap`` may wrap a handler."""

    def __init__(self, config, wrap=None, site_dirs=None) -> None:
        self.clients, self.threads, self.codes = {}, [], {}
        # one folder of site disks per server state: two runs never share a site's state
        state = Path(config.network.state_dir)
        site_dirs = site_dirs or state.with_name(f"{state.name}-sites")
        for site in SITES:
            # each site's own disk
            own = config.replace(network__client_state_dir=str(site_dirs / site))
            client = build_site_client(
                own, site, wrap=None if wrap is None else lambda c, s=site: wrap(s, c))
            self.clients[site] = client
            thread = threading.Thread(target=lambda s=site, c=client: self.codes.__setitem__(
                s, c.run()), daemon=True)
            thread.start()
            self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(30)


def run_networked(config, *, wrap=None, resume=False, transport=None, site_dirs=None):
    sites = Sites(config, wrap, site_dirs=site_dirs)
    try:
        return serve(config, resume=resume, transport=transport), sites
    finally:
        sites.join()


def server_manifest(config):
    """The manifest ``serve(config)`` checks the sites against."""
    data = federate(config.data, seed=config.run.seed)
    return manifest_of(config, central_evaluator(config, data).model)


def test_plain_over_the_network_equals_the_simulation(deployment, tmp_path):
    config = make_config(deployment, tmp_path)
    result, sites = run_networked(config)
    simulated = run_simulation(config)
    assert model_hash(result.parameters) == model_hash(simulated.parameters)
    assert [r.accuracy for r in result.history.rounds] == pytest.approx(
        [r.accuracy for r in simulated.history.rounds])
    assert set(sites.codes.values()) == {0}
    report = verify(result.state_dir)
    assert report.ok and report.entries == 6  # round_start + round_end, 3 rounds
    assert [e["event"] for e in report.events] == ["round_start", "round_end"] * 3
    assert report.events[-1]["data"]["model_sha256"] == model_hash(result.parameters)
    from securefl.config import load_config

    assert load_config(result.state_dir / "config.toml") == config
    assert (result.state_dir / "accuracy.png").stat().st_size > 1000
    store = ServerStore(result.state_dir)
    assert store.last_completed() == 3
    assert [r["participants"] for r in store.rounds()] == [SITES] * 3
    store.close()


def final_model(result, config):
    """The final model: the server's, or under HE the one a site decrypts from model.he."""
    if config.protection.kind != "he":
        return result.parameters
    from securefl.engine.messages import decode
    from securefl.he.wire import HEState

    state = decode((result.state_dir / "model.he").read_bytes(), expect=HEState)
    store = ServerStore(result.state_dir)
    run = store.run_id()
    store.close()
    site = build_site(config.replace(network__client_state_dir=str(result.state_dir / "x")),
                      SITES[0])
    return site.protection.open_state(state, run=run)


@pytest.mark.parametrize("kind", ["secagg", "he"])
def test_protected_runs_match_the_simulation(deployment, tmp_path, kind):
    config = make_config(deployment, tmp_path, kind=kind, rounds=2)
    result, _ = run_networked(config)
    simulated = run_simulation(config)
    assert [len(r.clients) for r in result.history.rounds] == [5, 5]
    # secure aggregation quantizes, CKKS is approximate: equal up to their precision
    np.testing.assert_allclose(final_model(result, config), simulated.parameters, atol=2e-3)
    assert result.history.final.accuracy == pytest.approx(simulated.history.final.accuracy,
                                                          abs=0.02)


def test_he_layer_selection_over_the_network_matches_the_simulation(deployment, tmp_path):
    config = make_config(deployment, tmp_path, kind="he", rounds=2)
    config = config.replace(protection__he=dataclasses.replace(config.protection.he,
                                                               layers=("1.bias",)))
    result, sites = run_networked(config)
    simulated = run_simulation(config)
    assert [len(r.clients) for r in result.history.rounds] == [5, 5]
    final = final_model(result, config)
    np.testing.assert_allclose(final, simulated.parameters, atol=2e-3)
    # the weights travel in the clear: those agree with the simulation to float32 rounding
    # (the sum is taken in a different order); the bias, under CKKS, only to its precision
    weights = slice(0, 64 * 10)
    np.testing.assert_allclose(final[weights], simulated.parameters[weights], atol=1e-6)
    assert set(sites.codes.values()) == {0}


def test_a_layer_pattern_that_matches_nothing_is_a_config_error(deployment, tmp_path):
    from securefl.errors import ConfigError

    config = make_config(deployment, tmp_path, kind="he", rounds=1)
    config = config.replace(protection__he=dataclasses.replace(config.protection.he,
                                                               layers=("fc9.*",)))
    with pytest.raises(ConfigError, match=r"\[protection.he\] layers: layer pattern 'fc9.\*'"):
        serve(config)



class KillAt:
    """Handler wrapper: the site's connection dies when it receives its ``phase``-th message
    of round ``round`` (0 = FitIns, 1.. = the protection's later steps)."""

    def __init__(self, handler, *, round: int, phase: int, sites: dict) -> None:
        self.client_id, self.inner = handler.client_id, handler
        self.round, self.phase, self.sites, self.seen = round, phase, sites, 0

    def handle(self, request, *, round):
        if round == self.round:
            if isinstance(request, FitIns):
                self.seen = 0
            if self.seen == self.phase:
                self.sites["self"].clients[self.client_id].stop()
                raise RuntimeError("killed")
            self.seen += 1
        return self.inner.handle(request, round=round)


# SecAgg exchanges: 0 FitIns, 1 graph commitments (a site lost here aborts the round: its
# coin is never revealed), 2 keys, 3 relay, 4 consistency check, 5 unmask; HE has one
@pytest.mark.parametrize(("kind", "phase"), [("plain", 0), ("secagg", 0), ("secagg", 2),
                                             ("secagg", 3), ("secagg", 4), ("he", 0)])
def test_a_site_killed_mid_round_in_each_phase(deployment, tmp_path, kind, phase, caplog):
    caplog.set_level(logging.WARNING, logger="securefl")
    # the victim is stopped for good; the others keep the default reconnect window, which
    # also covers a server slow to start listening on a loaded machine
    config = make_config(deployment, tmp_path, kind=kind, rounds=2)
    holder: dict = {}
    victim = "client-1"

    def wrap(site, handler):
        return KillAt(handler, round=2, phase=phase, sites=holder) if site == victim else handler

    sites = Sites(config, wrap)
    holder["self"] = sites
    try:
        result = serve(config)
    finally:
        sites.join()
    first, second = result.history.rounds
    assert sorted(first.clients) == SITES and first.aborted is None
    assert second.aborted is None, second.aborted
    if (kind, phase) == ("secagg", 4):
        # killed after its masked input was in: the survivors unmask the sum, which still
        # contains it
        assert sorted(second.clients) == SITES
    else:
        assert victim not in second.clients and len(second.clients) == 4
    assert victim in second.dropped
    # HE evaluates federated: the model round 2 trained from, one round behind
    assert np.isfinite(result.parameters).all()
    assert result.history.final.accuracy > (0.2 if kind == "he" else 0.3)


class _Crash(GrpcTransport):
    """A server that dies between rounds: its port closes without telling the sites."""

    def __init__(self, config, *, sites) -> None:
        super().__init__(config.network, sites=sites, manifest=server_manifest(config))

    def close(self, *, notify: bool = True) -> None:
        super().close(notify=False)


def test_server_killed_between_rounds_resumes_to_the_same_model(deployment, tmp_path):
    config = make_config(deployment, tmp_path, rounds=3)
    uninterrupted, _ = run_networked(dataclasses.replace(
        config, network=dataclasses.replace(config.network,
                                            state_dir=str(tmp_path / "whole"),
                                            address=f"127.0.0.1:{free_port()}")))
    first_leg = config.replace(run__rounds=2)
    sites = Sites(config)
    try:
        partial = serve(first_leg, transport=_Crash(first_leg, sites=SITES))
        assert len(partial.history.rounds) == 2
        with pytest.raises(Exception, match="--resume"):
            serve(config)
        resumed = serve(config, resume=True)
    finally:
        sites.join()
    assert resumed.resumed_from == 2 and [r.round for r in resumed.history.rounds] == [3]
    assert model_hash(resumed.parameters) == model_hash(uninterrupted.parameters)
    report = verify(resumed.state_dir)
    assert report.ok and [e["event"] for e in report.events] == [
        "round_start", "round_end", "round_start", "round_end", "resume", "round_start",
        "round_end"]
    store = ServerStore(resumed.state_dir)
    assert [r["round"] for r in store.rounds()] == [1, 2, 3]
    store.close()


def test_dp_sgd_sites_keep_their_own_ledgers_and_the_server_a_copy(deployment, tmp_path):
    config = make_config(deployment, tmp_path, rounds=2).replace(
        privacy=dataclasses.replace(make_config(deployment, tmp_path).privacy, mode="dp_sgd",
                                    noise_multiplier=1.0, delta=1e-5))
    sites = Sites(config, site_dirs=tmp_path / "sites")
    try:
        result = serve(config)
    finally:
        sites.join()
    assert [len(r.clients) for r in result.history.rounds] == [5, 5]
    from securefl.privacy import LEDGER_FILE

    for site in SITES:
        assert (tmp_path / "sites" / site / LEDGER_FILE).exists()
    assert not (result.state_dir / LEDGER_FILE).exists()
    store = ServerStore(result.state_dir)
    spent = store.spent()
    store.close()
    assert sorted(spent) == SITES and all(0 < e < 50 for e in spent.values())
    ends = [e for e in verify(result.state_dir).events if e["event"] == "round_end"]
    first, second = (e["data"]["epsilon_charged"] for e in ends)
    for site in SITES:  # cumulative reports become per-round charges that add up
        assert first[site] > 0 and second[site] > 0
        assert first[site] + second[site] == pytest.approx(spent[site])


def test_a_redone_round_trains_exactly_like_the_lost_attempt(deployment, tmp_path):
    config = make_config(deployment, tmp_path, client_state_dir=str(tmp_path / "site"))
    trainer = build_site(config, "client-2").trainer
    start = np.zeros(trainer.base.layout.size, np.float32)
    first, _ = trainer.fit(start, round=1)
    lost, _ = trainer.fit(first.delta, round=2)  # the server crashed after this
    redone, _ = trainer.fit(first.delta, round=2)
    np.testing.assert_array_equal(lost.delta, redone.delta)
    third, _ = trainer.fit(redone.delta, round=3)
    assert not np.array_equal(third.delta, redone.delta)


class Corrupt:
    """Handler wrapper: the site's ``FitRes`` carries a poisoned value from round 1 on."""

    def __init__(self, handler, poison) -> None:
        self.client_id, self.inner, self.poison = handler.client_id, handler, poison

    def handle(self, request, *, round):
        reply = self.inner.handle(request, round=round)
        return self.poison(reply) if isinstance(reply, FitRes) else reply


@pytest.mark.parametrize("poison", [
    lambda r: FitRes(payload=r.payload, metrics={**r.metrics, "epsilon": float("nan")}),
    lambda r: FitRes(payload=r.payload, metrics={**r.metrics, "epsilon": -1e9}),
    lambda r: FitRes(payload=PlainUpdate(update=np.full(r.payload.update.shape, 1e300),
                                         weight=r.payload.weight), metrics=r.metrics),
    lambda r: FitRes(payload=PlainUpdate(update=r.payload.update, weight=1e300),
                     metrics=r.metrics),
], ids=["epsilon-nan", "epsilon-negative", "float64-1e300", "weight-1e300"])
def test_a_poisoning_site_is_refused_and_the_federation_trains_on(deployment, tmp_path, caplog,
                                                                   poison):
    caplog.set_level(logging.WARNING, logger="securefl")
    config = make_config(deployment, tmp_path, rounds=2)
    result, _ = run_networked(config, wrap=lambda site, handler: (
        Corrupt(handler, poison) if site == "client-3" else handler))
    for record in result.history.rounds:
        assert record.aborted is None and "client-3" not in record.clients
        assert len(record.clients) == 4 and "out-of-bounds value" in record.dropped["client-3"]
    assert np.isfinite(result.parameters).all() and result.history.final.accuracy > 0.3
    summary = json.loads((result.state_dir / "summary.json").read_text())
    assert summary["final_accuracy"] == result.history.final.accuracy
    assert caplog.text.count("rejected message from client-3: out-of-bounds value") == 2


def test_a_server_whose_sites_never_come_starts_no_round(deployment, tmp_path):
    from securefl.errors import RunFailed

    config = make_config(deployment, tmp_path, connect_timeout=1.0, min_connected=2)
    with pytest.raises(RunFailed, match="only 0 of the 2 sites needed"):
        serve(config)
    store = ServerStore(tmp_path / "state")
    assert store.rounds() == [] and store.spent() == {}  # nothing run, nothing charged
    store.close()
