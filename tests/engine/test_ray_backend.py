"""The Ray backend: the same federation as in-process, its sites in Ray actors, every message
through the wire codec.  One local Ray (2 CPUs, loopback) serves the whole module."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from securefl.config import config_from_dict, load_config
from securefl.engine.messages import EvaluateIns, EvaluateRes
from securefl.engine.ray_backend import RayTransport, import_ray, start_hosts
from securefl.errors import ConfigError
from securefl.ray_simulation import site_groups
from securefl.simulation import build_simulation, run_simulation

# one node on the loopback address only (Ray's name for "no multi-node"; read at import)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "examples"
SITES = "tests.engine.ray_sites:echo_sites"


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    """One local Ray for the module (``local_ray`` of ``conftest.py``)."""
    return local_ray


def on_ray(config, **fields):
    return config.replace(**{"simulation__backend": "ray", "simulation__actors": 2, **fields})


def test_plain_run_is_the_in_process_run_with_injected_dropouts():
    config = load_config(EXAMPLES / "quickstart.toml").replace(
        run__rounds=2, client__epochs=1, simulation__dropout=0.3)
    here, there = run_simulation(config), run_simulation(on_ray(config))
    assert [r.dropped for r in there.history.rounds] == [r.dropped for r in here.history.rounds]
    assert sum(len(r.dropped) for r in here.history.rounds) >= 2  # p = 0.3 of 2 x 10 sites
    assert [r.clients for r in there.history.rounds] == [r.clients for r in here.history.rounds]
    assert there.history.metric("accuracy") == here.history.metric("accuracy")
    np.testing.assert_array_equal(there.parameters, here.parameters)


@pytest.mark.parametrize("rounds", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_secagg_run_matches_in_process_through_dropouts_and_a_redo(rounds):
    """Round 1 loses sites at the keys, consistency and unmask steps (recovered by Shamir
    shares); round 2 (slow) aborts before any reveal and is redone with three sites."""
    config = load_config(EXAMPLES / "secagg.toml").replace(run__rounds=rounds,
                                                           client__epochs=1)
    ids: list[str] = []

    def schedule(round, exchange, client_id):
        if round == 2:  # all but three miss the masked input: redone with the three
            return exchange == 3 and client_id not in ids[:3]
        # exchanges: 0 FitIns, 1 commitments, 2 keys, 3 relay, 4 consistency, 5 unmask
        return (exchange, client_id) in {(2, "client-1"), (4, "client-4"), (5, "client-3")}

    here = build_simulation(config, schedule=schedule)
    there = build_simulation(on_ray(config), schedule=schedule)
    ids.extend(here.transport.client_ids())
    assert there.transport.client_ids() == ids and there.clients == {}
    try:
        for rnd in range(1, rounds + 1):
            a, b = here.server.run_round(rnd), there.server.run_round(rnd)
            assert b.aborted is None and a.aborted is None
            assert (b.clients, b.dropped, b.extra) == (a.clients, a.dropped, a.extra)
            # each sum is off the exact one by at most n W c / L / sum(w) ~ 3e-7 per coordinate
            assert np.abs(there.server.parameters - here.server.parameters).max() < 1e-4
        if rounds == 2:
            assert set(a.clients) == set(ids[:3]) and a.extra["redone"] == ids[3:]
        else:  # client-3 and client-4 sent masked inputs before dropping: counted
            assert set(a.clients) == set(ids) - {"client-1"}
    finally:
        there.transport.close()
    assert there.transport.bytes_sent > 0 and there.transport.bytes_received > 0  # frames


@pytest.mark.slow
def test_he_run_matches_in_process_with_a_blind_server():
    """The server half is built from the public context and the sites' announced verify keys;
    in round 2 every site decrypts the encrypted global model itself."""
    config = load_config(EXAMPLES / "he.toml").replace(run__rounds=2, client__epochs=1)
    here, there = run_simulation(config), run_simulation(on_ray(config))
    assert [len(r.clients) for r in there.history.rounds] == [10, 10]
    assert all(r.aborted is None and not r.rejected for r in there.history.rounds)
    assert np.abs(there.parameters - here.parameters).max() < 1e-5  # CKKS error ~ 1e-7
    for a, b in zip(there.history.metric("accuracy"), here.history.metric("accuracy"),
                    strict=True):
        assert abs(a - b) <= 0.005


def test_sites_are_rebuilt_from_the_config_text():
    config = load_config(EXAMPLES / "secagg.toml")
    import tomllib

    assert config_from_dict(tomllib.loads(config.to_toml())) == config


def test_failing_slow_and_unknown_sites_are_dropped_not_raised():
    groups = [["a", "b"], ["c"]]
    hosts = start_hosts(SITES, groups, {"fail": ["b"], "delay": {"c": 0.3}}, cpus=0.5,
                        gpus=0.0, threads=None)
    transport = RayTransport(hosts, {"a": 0, "b": 0, "c": 1})
    try:
        request = EvaluateIns(round=4, parameters=np.arange(3, dtype=np.float32))
        out = transport.exchange(dict.fromkeys(["a", "b", "c", "zz"], request), round=4,
                                 timeout=0.1)
        assert set(out.replies) == {"a"}
        reply = out.replies["a"]
        assert isinstance(reply, EvaluateRes) and (reply.loss, reply.accuracy) == (3.0, 0.04)
        assert out.dropped["b"] == "client error: RuntimeError: site crashed"
        assert out.dropped["c"] == "missed the 0.1 s deadline"
        assert out.dropped["zz"] == "unknown client"
    finally:
        transport.close()


def test_a_malformed_reply_frame_drops_its_site_and_names_it(caplog):
    from tests.engine.ray_sites import ForgingHost

    forger = ray.remote(ForgingHost).options(num_cpus=0.5).remote(SITES, ["mallory"], {})
    honest = start_hosts(SITES, [["alice"]], {}, cpus=0.5, gpus=0.0, threads=None)
    transport = RayTransport([forger, *honest], {"mallory": 0, "alice": 1})
    try:
        request = EvaluateIns(round=1, parameters=np.ones(2, np.float32))
        with caplog.at_level(logging.WARNING, logger="securefl.engine.ray_backend"):
            out = transport.exchange(dict.fromkeys(["mallory", "alice"], request), round=1)
        assert set(out.replies) == {"alice"} and out.replies["alice"].loss == 2.0
        assert out.dropped["mallory"].startswith("malformed reply")
        assert any("client mallory sent a malformed reply" in r.getMessage()
                   for r in caplog.records)
    finally:
        transport.close()


def test_an_actor_reports_when_it_started_imported_and_built_its_sites():
    (host,) = start_hosts(SITES, [["a", "b"]], {}, cpus=0.5, gpus=0.0, threads=1)
    try:
        marks = ray.get(host.startup.remote(), timeout=120)
    finally:
        ray.kill(host)
    assert list(marks) == ["entered", "imported", "built"]
    assert marks["entered"] <= marks["imported"] <= marks["built"]


def test_a_dead_actor_drops_its_sites_only():
    hosts = start_hosts(SITES, [["a"], ["b", "c"]], {}, cpus=0.5, gpus=0.0, threads=None)
    transport = RayTransport(hosts, {"a": 0, "b": 1, "c": 1})
    try:
        ray.get(hosts[1].announce.remote())
        ray.kill(hosts[1])
        request = EvaluateIns(round=1, parameters=np.ones(2, np.float32))
        out = transport.exchange(dict.fromkeys("abc", request), round=1)
        assert set(out.replies) == {"a"}
        assert out.dropped["b"] == out.dropped["c"] == "actor 1 failed: ActorDiedError"
    finally:
        transport.close()


def test_site_groups_split_contiguously():
    ids = [f"c{i}" for i in range(10)]
    assert site_groups(ids, actors=2, clients_per_actor=1) == [ids[:5], ids[5:]]
    assert [len(g) for g in site_groups(ids, actors=0, clients_per_actor=4)] == [3, 4, 3]
    assert site_groups(ids[:2], actors=5, clients_per_actor=1) == [["c0"], ["c1"]]


def test_actors_the_cluster_cannot_place_are_a_config_error():
    config = on_ray(load_config(EXAMPLES / "quickstart.toml"), simulation__actors=3,
                    simulation__cpus=1.0)
    with pytest.raises(ConfigError, match=r"3 actors with cpus = 1 need 3 CPUs, but the Ray "
                                          r"cluster has 2"):
        build_simulation(config)
    assert ray.is_initialized()  # the module's Ray, not this build's, is left running


def test_an_infeasible_round_is_refused_before_any_actor_starts():
    config = on_ray(load_config(EXAMPLES / "quickstart.toml"), server__min_clients=11)
    with pytest.raises(ConfigError, match="min_clients = 11"):
        build_simulation(config)
    assert free_cpus() == 2.0


def test_a_config_error_after_the_actors_started_stops_them(monkeypatch):
    """The actors start before the driver builds ``[privacy]``; the driver's ConfigError
    there (a delta no smaller than 1 / clients) kills them.  The module's Ray is not this
    build's: it stays up."""
    from securefl import ray_simulation

    started: list = []

    def start_hosts_kept(*args, **kwargs):
        started.extend(start_hosts(*args, **kwargs))
        return started

    monkeypatch.setattr(ray_simulation, "start_hosts", start_hosts_kept)
    config = on_ray(load_config(EXAMPLES / "dp_fedavg.toml"), data__num_clients=10,
                    server__clients_per_round=10, privacy__delta=0.5,
                    privacy__adaptive_clipping=False)
    with pytest.raises(ConfigError, match=r"delta must be < 1 / \(number of clients\) = "
                                          r"1/10"):
        build_simulation(config)
    assert len(started) == 2
    for host in started:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(host.ready.remote(), timeout=60)
    assert free_cpus() == 2.0 and ray.is_initialized()


def free_cpus(wait: float = 20.0) -> float:
    """The cluster's free CPUs once they reach its 2 (actors release theirs asynchronously),
    or what is free after ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while (free := ray.available_resources().get("CPU", 0.0)) < 2.0 \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    return free


def test_what_the_ray_backend_does_not_run_is_refused_in_one_line():
    config = on_ray(load_config(EXAMPLES / "quickstart.toml"))
    with pytest.raises(ValueError, match="client_hooks need backend = \"inprocess\""):
        build_simulation(config, client_hooks={"client-0": [lambda u: u]})


def test_without_ray_installed_the_backend_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError) as info:
        import_ray()
    assert str(info.value) == ('[simulation] backend = "ray" needs Ray, which is not '
                               'installed: pip install "securefl[ray]"')


def test_backend_is_validated_by_the_config():
    with pytest.raises(ConfigError, match=r"\[simulation\] backend must be one of 'inprocess', "
                                          r"'ray', got 'dask'"):
        config_from_dict({"simulation": {"backend": "dask"}})
    with pytest.raises(ConfigError, match=r"\[simulation\] gpus must be >= 0"):
        config_from_dict({"simulation": {"gpus": -0.5}})


class FakeRay:
    """Records the options ``start_hosts`` gives Ray's actor class (no Ray, no GPU)."""

    def __init__(self, resources):
        self.resources, self.options, self.started = resources, [], []

    def cluster_resources(self):
        return self.resources

    def remote(self, cls):
        fake = self

        class Actor:
            def options(self, **options):
                fake.options.append(options)
                return self

            def remote(self, *args, **kwargs):
                fake.started.append((cls, args, kwargs))
                return len(fake.started)

        return Actor()


def test_gpus_per_actor_reach_rays_actor_options(monkeypatch):
    """Not run on a GPU here: what Ray is asked for, checked against a stand-in."""
    import securefl.engine.ray_backend as backend

    fake = FakeRay({"CPU": 4.0, "GPU": 1.0})
    monkeypatch.setattr(backend, "import_ray", lambda: fake)
    hosts = start_hosts(SITES, [["a"], ["b"]], {}, cpus=1.0, gpus=0.5, threads=2)
    assert hosts == [1, 2]
    assert fake.options == [{"num_cpus": 1.0, "num_gpus": 0.5}]
    assert [args for _, args, _ in fake.started] == [(SITES, ["a"], {}), (SITES, ["b"], {})]
    assert {cls.__name__ for cls, _, _ in fake.started} == {"SiteHost"}
    with pytest.raises(ConfigError, match=r"gpus = 2 per actor, but the Ray cluster has 1 GPUs"):
        start_hosts(SITES, [["a"]], {}, cpus=1.0, gpus=2.0, threads=None)
    monkeypatch.setattr(backend, "import_ray", lambda: FakeRay({"CPU": 4.0}))
    with pytest.raises(ConfigError, match=r"gpus = 0.5 per actor, but the Ray cluster has 0"):
        start_hosts(SITES, [["a"]], {}, cpus=1.0, gpus=0.5, threads=None)


def test_an_actor_decodes_a_broadcast_once_and_its_sites_share_it():
    """Two sites of one actor get the very same decoded request, a third site's own frame
    is decoded for it; every site still answers for itself."""
    hosts = start_hosts("tests.engine.ray_sites:recording_sites", [["a", "b", "c"]], {},
                        cpus=0.5, gpus=0.0, threads=None)
    transport = RayTransport(hosts, dict.fromkeys("abc", 0))
    try:
        shared = EvaluateIns(round=2, parameters=np.ones(4, np.float32))
        own = EvaluateIns(round=2, parameters=np.zeros(4, np.float32))
        out = transport.exchange({"a": shared, "b": shared, "c": own}, round=2)
        assert {c: r.loss for c, r in out.replies.items()} == {"a": 4.0, "b": 4.0, "c": 0.0}
        seen = ray.get(hosts[0].ask.remote("seen"))
        assert seen["a"] == seen["b"] != seen["c"]  # ids of the decoded messages
        assert ray.get(hosts[0].ask.remote("writable")) == [False, False, False]
    finally:
        transport.close()
