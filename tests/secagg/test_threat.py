"""`securefl check` knows what SecAgg+ holds against a malicious server."""

from __future__ import annotations

import dataclasses

from securefl.config import Config
from securefl.config.secagg import SecAggConfig
from securefl.threat import load_threat_model
from securefl.threat.controls import collusion, update_secrecy
from securefl.threat.facts import facts
from securefl.threat.model import Adversary


def _config(**secagg) -> Config:
    return Config().replace(data__num_clients=50, protection__kind="secagg",
                            protection__secagg=SecAggConfig(**secagg))


def test_update_secrecy_states_the_malicious_server_guarantee():
    model = load_threat_model("hospital-consortium")
    ok, reason = update_secrecy(facts(_config()), model, ["secagg", "he"])
    assert ok and "deviates from the protocol" in reason and "not range-checked" in reason


def test_collusion_with_a_malicious_server_counts_the_smallest_neighbourhood():
    base = load_threat_model("curious-server-and-byzantine-clients")
    ok, reason = collusion(facts(_config(threshold=0.6)), base)
    assert ok and "11 of 18" in reason  # honest-but-curious: the configured k = 18
    malicious = dataclasses.replace(base, adversaries=tuple(
        dataclasses.replace(a, behaviour="malicious") if a.who == "server" else a
        for a in base.adversaries))
    assert any(isinstance(a, Adversary) and a.behaviour == "malicious"
               for a in malicious.adversaries)
    for min_neighbours, shares, passed in ((2, "2 of 2", False), (18, "11 of 18", True)):
        ok, reason = collusion(facts(_config(threshold=0.6, min_neighbours=min_neighbours)),
                               malicious)
        assert ok is passed and shares in reason
