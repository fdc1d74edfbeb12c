"""Attack 3 over the deployment path: sites built by ``securefl.runtime`` from
``identities.json``, each with its release log on its own disk, restarted between the runs."""

from __future__ import annotations

import numpy as np

from securefl.config import config_from_dict
from securefl.engine.session import model_digest
from securefl.runtime.client import build_site
from securefl.runtime.deploy import server_protection
from securefl.runtime.keys import init_identities

from .protocol_driver import conversation

SITES = [f"client-{i}" for i in range(5)]


def test_attack3_a_resumed_server_rerunning_a_round_with_another_cohort_gets_nothing(tmp_path):
    init_identities(tmp_path / "certs", SITES)
    config = config_from_dict({
        "run": {"name": "replay", "rounds": 1, "seed": 0},
        "data": {"dataset": "digits", "num_clients": 5},
        "model": {"name": "logistic"},
        "client": {"epochs": 1, "batch_size": 64, "lr": 0.1},
        "protection": {"kind": "secagg", "secagg": {"max_weight": 1000.0}},
        "network": {"certs": str(tmp_path / "certs"), "client_state_dir": str(tmp_path / "sites"),
                    "allowlist": {site: "0" * 64 for site in SITES}}})
    server = server_protection(config, SITES)
    sites = {site: build_site(config, site) for site in SITES}
    run = b"\x09" * 32
    parameters = np.zeros(sites[SITES[0]].trainer.base.layout.size, np.float32)
    first, aborted = conversation(server, sites, SITES, run=run, round=1, parameters=parameters)
    assert first is not None and sorted(first.client_ids) == SITES and not aborted
    restarted = {site: build_site(config, site) for site in SITES}  # same disks, new processes
    second, aborted = conversation(server, restarted, SITES[:4], run=run, round=1,
                                    parameters=parameters)
    assert second is None and aborted == dict.fromkeys(SITES[:4], 5)
    assert all(restarted[s].releases.released(run=run, model=model_digest(parameters))
               == frozenset(SITES) for s in SITES)

