"""A secure-aggregation round the server could know would abort is never started.

Three sites under SecAgg+ form a complete graph with k = 2 and t = 2: the round survives no
dropped site, and a site that is not connected shrinks it below the sites' min_neighbours.
Before training, ``securefl server`` refuses a ``min_connected`` that allows such a round and
``securefl check`` does not pass it; while running, the server waits for the missing sites
and stops without sending anything, so no site trains or is charged.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from securefl.cli import main
from securefl.config import load_config
from securefl.config.secagg import SecAggConfig
from securefl.errors import RunFailed
from securefl.runtime.server import _await_round
from securefl.secagg.tolerance import round_problem, round_shape, smallest_round

HOSPITAL = Path(__file__).parents[1] / "threat_configs" / "hospital-consortium.toml"


def deployment(tmp_path: Path, *, min_connected: int | None) -> Path:
    text = HOSPITAL.read_text().replace("num_clients = 10", "num_clients = 3").replace(
        "audit = true", f"audit = true\nstate_dir = \"{tmp_path / 'state'}\""
        + ("" if min_connected is None else f"\nmin_connected = {min_connected}"))
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_three_sites_tolerate_no_dropout_and_need_all_three() -> None:
    config = SecAggConfig()
    shape = round_shape(3, config)
    assert shape is not None and (shape.neighbours, shape.threshold, shape.tolerated) == (2, 2, 0)
    assert smallest_round(config) == 3 and round_problem(2, config) is not None
    assert round_problem(3, config) is None
    ten = round_shape(10, config)
    assert ten is not None and (ten.neighbours, ten.threshold, ten.tolerated) == (9, 5, 4)
    assert smallest_round(SecAggConfig(neighbours=4, min_neighbours=4)) == 5


def test_the_server_refuses_a_min_connected_secagg_cannot_survive(tmp_path, capsys) -> None:
    config = deployment(tmp_path, min_connected=2)
    assert main(["server", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert ("[network] min_connected = 2 lets a round start with 1 of its 3 sites absent, but a "
            "round of 3 sites has k = 2 neighbours and threshold t = 2, so it survives 0 "
            "dropped sites and needs at least 3 sites present; set min_connected = 3") in err[0]
    assert not (tmp_path / "state").exists()  # refused before any state, wait or round


def test_check_does_not_pass_what_the_server_refuses(tmp_path, capsys) -> None:
    refused = deployment(tmp_path, min_connected=2)
    argv = ["check", str(refused), "--threat-model", "hospital-consortium",
            "--deployment", "network"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "7 of 7 requirements pass; its rounds cannot finish" in out
    assert re.search(r"^FAIL  rounds-can-finish: .*min_connected = 2", out, re.M)
    assert main([argv[0], str(deployment(tmp_path, min_connected=None)), *argv[2:]]) == 0
    assert "rounds-can-finish" not in capsys.readouterr().out


def test_a_simulation_too_small_for_secure_aggregation_is_refused(tmp_path, capsys) -> None:
    text = HOSPITAL.read_text().replace("num_clients = 10", "num_clients = 2")
    (tmp_path / "c.toml").write_text(text)
    assert main(["run", str(tmp_path / "c.toml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "secure aggregation needs at least 3 sites" in err
    assert "samples 2 of the 2 clients" in err


class _Transport:
    """Three allowlisted sites, two connected; records every request it would send."""

    def __init__(self) -> None:
        self.sent: list[object] = []
        self.waits = 0

    def client_ids(self) -> list[str]:
        return ["hospital-a", "hospital-b", "hospital-c"]

    def connected(self) -> list[str]:
        return ["hospital-a", "hospital-c"]

    def wait_for_clients(self, count: int, *, timeout: float) -> list[str]:
        self.waits += 1
        return self.connected()

    def exchange(self, requests, **kwargs):  # pragma: no cover - must never be called
        self.sent.append(requests)
        raise AssertionError("a round was started")


def test_a_round_missing_a_site_is_not_started_and_charges_nobody(caplog) -> None:
    config = load_config(HOSPITAL).replace(data__num_clients=3, network__connect_timeout=1e-3)
    transport = _Transport()
    server = SimpleNamespace(sampler=lambda ids, rng: list(ids),
                             round_rng=lambda rnd: np.random.default_rng(rnd))
    with caplog.at_level(logging.WARNING, logger="securefl"), \
            pytest.raises(RunFailed) as failed:
        _await_round(transport, server, config, 4)
    assert str(failed.value) == (
        "round 4 not started: 2 of its 3 sites connected (hospital-a, hospital-c) within "
        "0.001 s and secure aggregation needs at least 3 sites in a round (each site accepts "
        "no fewer than min_neighbours = 2 neighbours); no site was charged; restart with "
        "--resume when the sites are back")
    assert transport.sent == []
    assert transport.waits + caplog.text.count("round 4 waits: 2 of its 3 sites") >= 1
