"""``securefl run`` starts a Ray run's Ray in a thread while it imports and builds; the run
claims that Ray (and shuts it down), and a run that fails its checks first shuts it down too.
Played against a stand-in ``ray`` module, so no Ray starts here."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from securefl import cli
from securefl.engine import ray_backend

ROOT = Path(__file__).parents[2]


class FakeRay:
    def __init__(self, *, fail: bool = False) -> None:
        self.fail, self.up, self.calls = fail, False, []

    def init(self, **options):
        self.calls.append(("init", options, threading.current_thread().name))
        if self.fail:
            raise ConnectionError("no cluster at that address")
        self.up = True

    def is_initialized(self) -> bool:
        return self.up

    def shutdown(self) -> None:
        self.calls.append(("shutdown",))
        self.up = False

    # what a build asks of Ray up to its actors' start (no ``get``: nothing answers here)
    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 2.0}

    def remote(self, cls):
        ray = self

        class Actors:
            def options(self, **_options):
                return self

            def remote(self, factory, client_ids, setup, *, threads):
                ray.calls.append(("actor", tuple(client_ids)))
                return ("actor", tuple(client_ids))

        return Actors()

    def kill(self, handle) -> None:
        self.calls.append(("kill", handle[1]))


@pytest.fixture
def fake_ray(monkeypatch):
    ray = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setattr(ray_backend, "_early", [])
    return ray


def test_ray_starts_on_the_calling_thread_while_the_imports_run_on_another(fake_ray):
    seen = []
    value = ray_backend.start_early(None, lambda: seen.append(
        threading.current_thread().name) or "module")
    assert value == "module" and seen == ["securefl-imports"]
    ((kind, options, thread),) = fake_ray.calls
    # Ray's processes die with the thread that started them: never a short-lived one
    assert (kind, thread) == ("init", threading.current_thread().name)
    assert options == {"address": "local", "include_dashboard": False, "log_to_driver": False,
                       "configure_logging": False}
    assert ray_backend.claim_early_start("") is True  # "" and None: a new local Ray
    assert ray_backend.claim_early_start("") is False  # claimed: nothing left to claim
    ray_backend.abandon_early_start()
    assert fake_ray.up and len(fake_ray.calls) == 1  # the claimer owns it now


def test_an_import_error_is_raised_on_the_calling_thread(fake_ray):
    def broken():
        raise ImportError("no module named torch")

    with pytest.raises(ImportError, match="torch"):
        ray_backend.start_early(None, broken)
    ray_backend.abandon_early_start()
    assert [c[0] for c in fake_ray.calls] == ["init", "shutdown"]


def test_an_early_start_for_another_address_is_shut_down_not_claimed(fake_ray):
    ray_backend.start_early(None, lambda: None)
    assert ray_backend.claim_early_start("ray://10.0.0.5:10001") is False
    assert [c[0] for c in fake_ray.calls] == ["init", "shutdown"] and not fake_ray.up


def test_a_failed_early_start_leaves_the_run_to_report_it(monkeypatch):
    ray = FakeRay(fail=True)
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setattr(ray_backend, "_early", [])
    assert ray_backend.start_early("127.0.0.1:1", lambda: 7) == 7
    assert ray_backend.claim_early_start("127.0.0.1:1") is False
    with pytest.raises(ConnectionError, match="no cluster"):  # the run's own init, again
        ray_backend.init_ray("127.0.0.1:1")


def test_a_run_that_fails_its_checks_shuts_the_early_ray_down(fake_ray, tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('[simulation]\nbackend = "ray"\n\n[server]\nfraction = 7.0\n')
    assert cli.main(["run", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "fraction" in capsys.readouterr().err
    assert [c[0] for c in fake_ray.calls] == ["init", "shutdown"] and not fake_ray.up


def test_only_a_ray_run_starts_ray_early(fake_ray, tmp_path):
    for text in ('[simulation]\nbackend = "inprocess"\n', "not toml [", '[simulation]\n'
                 'backend = "ray"\naddress = 5\n'):
        config = tmp_path / "c.toml"
        config.write_text(text)
        assert cli._import_starting_ray(str(config), "json") is sys.modules["json"]
        assert ray_backend._early == [] and fake_ray.calls == []
    cli._import_starting_ray(str(tmp_path / "missing.toml"), "json")
    assert fake_ray.calls == []


def test_actors_that_never_start_fail_the_run_in_one_line(monkeypatch):
    """The transport waits for its actors once (their imports), so that an exchange's
    deadline is the sites' work; actors that never come up fail the run, not a round."""
    import types

    from securefl.errors import RunFailed

    class Timeout(Exception):
        pass

    waited = []

    def get(calls, *, timeout):
        waited.append((len(calls), timeout))
        raise Timeout

    fake = types.SimpleNamespace(get=get, exceptions=types.SimpleNamespace(
        GetTimeoutError=Timeout))
    monkeypatch.setitem(sys.modules, "ray", fake)
    host = types.SimpleNamespace(ready=types.SimpleNamespace(remote=lambda: "pending"))
    with pytest.raises(RunFailed, match="did not start within 300 s"):
        ray_backend.RayTransport([host, host], {"a": 0, "b": 1})
    assert waited == [(2, ray_backend.START_TIMEOUT)]


def bad_privacy_after_the_actors(tmp_path):
    """A Ray run's config that passes every check before the actors start and fails the
    driver's ``[privacy]`` set-up after: delta 0.5 is not below 1 / (10 clients)."""
    text = (ROOT / "examples" / "dp_fedavg.toml").read_text()
    for old, new in (("num_clients = 100", "num_clients = 10"), ("delta = 1e-5", "delta = 0.5"),
                     ("clients_per_round = 20", "clients_per_round = 10"),
                     ("adaptive_clipping = true", "adaptive_clipping = false")):
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "bad_privacy.toml"
    path.write_text(text + '\n[simulation]\nbackend = "ray"\nactors = 2\n')
    return path


FIVE = [tuple(f"client-{i}" for i in range(5)), tuple(f"client-{i}" for i in range(5, 10))]


def test_a_config_error_after_the_actors_started_stops_them_and_the_early_ray(
        fake_ray, tmp_path, capsys):
    path = bad_privacy_after_the_actors(tmp_path)
    assert cli.main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "delta must be < 1 / (number of clients) = 1/10" in capsys.readouterr().err
    assert [c[0] for c in fake_ray.calls] == ["init", "actor", "actor", "kill", "kill",
                                              "shutdown"]
    assert [c[1] for c in fake_ray.calls if c[0] in ("actor", "kill")] == FIVE + FIVE
    assert not fake_ray.up and ray_backend._early == []


def test_a_build_that_started_its_own_ray_stops_it_after_such_an_error(fake_ray, tmp_path):
    from securefl.config import load_config
    from securefl.errors import ConfigError
    from securefl.simulation import build_simulation

    with pytest.raises(ConfigError, match="delta must be"):
        build_simulation(load_config(bad_privacy_after_the_actors(tmp_path)))
    assert [c[0] for c in fake_ray.calls] == ["init", "actor", "actor", "kill", "kill",
                                              "shutdown"]
    assert not fake_ray.up


def test_the_import_thread_also_imports_what_rays_serialization_needs(fake_ray, monkeypatch):
    """Ray's first actor creation would import them after ``ray.init``; the thread imports
    those installed while Ray starts, and skips the others."""
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    monkeypatch.setattr(ray_backend, "SERIALIZATION_IMPORTS", ("colorsys", "no_such_module"))
    assert ray_backend.start_early(None, lambda: 3) == 3
    assert "colorsys" in sys.modules and "no_such_module" not in sys.modules
    ray_backend.abandon_early_start()
