"""DP against the server: a deviating server played against the real deployed site
(:func:`securefl.runtime.client.build_site`), every message through the wire codec."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from securefl.build import local_trainer
from securefl.config import Config, config_from_dict, load_config
from securefl.data import federate
from securefl.engine.client import Client
from securefl.engine.messages import FitIns, FitRes, decode, encode
from securefl.errors import ProtocolAbort
from securefl.privacy import LEDGER_FILE, build_privacy
from securefl.privacy.accounting import epsilon
from securefl.privacy.ledger import PrivacyLedger
from securefl.runtime.client import build_site
from securefl.threat import check_config

DELTA = 1e-5
SITE = "client-1"
HOSPITAL = Path(__file__).parents[1] / "threat_configs" / "hospital-consortium.toml"

RUN = b"\x05" * 32


def deployment(state: Path, **privacy: object) -> Config:
    """The shared config every party holds (the server included), for one site's state dir."""
    return config_from_dict({
        "run": {"rounds": 5, "seed": 7},
        "data": {"dataset": "digits", "num_clients": 3, "partition": "iid"},
        "model": {"name": "mlp", "hidden": [8]},
        "client": {"epochs": 1, "batch_size": 64, "lr": 0.2},
        "privacy": {"mode": "dp_sgd", "noise_multiplier": 1.0, "delta": DELTA, **privacy},
        "network": {"address": "127.0.0.1:1", "insecure": True, "client_state_dir": str(state),
                    "allowlist": {f"client-{i}": f"{i:064x}" for i in range(3)}}})


def ask(site: Client, rnd: int, parameters: np.ndarray) -> np.ndarray:
    """The server's FitIns through the codec; the site's update as the server decodes it."""
    request = decode(encode(FitIns(run=RUN, round=rnd, parameters=parameters, config={},
                                   protection=None)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reply = decode(encode(site.handle(request, round=rnd)))
    assert isinstance(reply, FitRes)
    return np.asarray(reply.payload.update)


def replica(config: Config):
    """What the server can build from the shared config: the site's trainer with the seed
    derived from ``[run] seed`` and the shard index (here even with the site's own data)."""
    data = federate(config.data, seed=config.run.seed)
    base = local_trainer(config, data, SITE)
    setup = build_privacy(config, run_dir=None, client_ids=[SITE],
                          num_examples={SITE: len(data.clients[SITE].train)})
    assert setup is not None and not setup.secure
    return setup.wrap_trainer(SITE, base)


@pytest.mark.parametrize("secure_mode", [None, False])
def test_the_servers_replica_no_longer_reproduces_the_sites_noise(
        tmp_path: Path, secure_mode: bool | None) -> None:
    options = {} if secure_mode is None else {"secure_mode": secure_mode}
    config = deployment(tmp_path / "site", **options)
    site = build_site(config, SITE)
    copy = replica(config)
    start = np.asarray(copy.layout.size * [0.01], np.float32)
    released = ask(site, 1, start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predicted = copy.fit(start, round=1)[0].delta
    if secure_mode is False:
        # the attack of the issue: every draw replayed, the noise subtracts out exactly
        np.testing.assert_array_equal(released, predicted)
        return
    # the default at a deployed site: CSPRNG sample and noise, nothing the config predicts
    assert site.trainer.secure_mode is True
    assert np.mean(released == predicted) < 0.01
    residual = released - predicted
    assert np.linalg.norm(residual) > 0.5 * np.linalg.norm(released)


def test_alternating_rounds_are_declined_or_charged_and_repeats_cost_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = deployment(tmp_path / "site")
    site = build_site(config, SITE)
    event = site.trainer.round_event()
    size = site.trainer.layout.size
    models = [np.full(size, 0.001 * k, np.float32) for k in range(8)]

    ask(site, 1, models[1])
    second = ask(site, 2, models[2])
    with caplog.at_level(logging.WARNING, logger="securefl.security"):
        with pytest.raises(ProtocolAbort) as refused:  # round 1 again, new parameters
            ask(site, 1, models[3])
    assert str(refused.value) == ProtocolAbort.MESSAGE  # opaque to the server
    assert "round 1 requested after round 2 of this run" in caplog.text
    np.testing.assert_array_equal(ask(site, 2, models[2]), second)  # a repeat: from memory
    ledger_file = tmp_path / "site" / LEDGER_FILE

    # the site restarts: the memo is on disk, so a repeat is still answered, not retrained
    site = build_site(config, SITE)
    np.testing.assert_array_equal(ask(site, 2, models[2]), second)
    with pytest.raises(ProtocolAbort):
        ask(site, 1, models[4])
    with pytest.raises(ProtocolAbort):  # round 1's update was replaced by round 2's
        ask(site, 1, models[1])
    ask(site, 3, models[5])
    # restarted again, the server opens with an old round number and new parameters: the
    # site's persisted release log still knows the run's last round and refuses
    site = build_site(config, SITE)
    with pytest.raises(ProtocolAbort):
        ask(site, 1, models[6])

    with PrivacyLedger.open_existing(ledger_file) as ledger:
        assert ledger.rounds(SITE) == [1, 2, 3]  # three trainings, three charges
        recorded = ledger.epsilon(SITE)
    accountant = RDPAccountant()
    accountant.history = [(event.noise_multiplier, event.sample_rate, 3 * event.steps)]
    assert recorded == pytest.approx(accountant.get_epsilon(delta=DELTA), rel=1e-12)
    assert recorded == epsilon([event] * 3, delta=DELTA)


def test_the_hospital_check_refuses_server_noise_and_predictable_site_noise() -> None:
    hospital = load_config(HOSPITAL)
    assert all(r.passed for r in check_config(hospital, "hospital-consortium",
                                              deployment="network"))
    fedavg = {r.id: r for r in check_config(hospital.replace(privacy__mode="dp_fedavg"),
                                            "hospital-consortium", deployment="network")
              if not r.passed}
    assert set(fedavg) == {"differential-privacy"}
    assert "includes the server" in fedavg["differential-privacy"].reason
    seeded = hospital.replace(privacy__secure_mode=False)
    # in a simulation the seeded noise is fine (only the missing audit log fails)
    assert {r.id for r in check_config(seeded, "hospital-consortium")
            if not r.passed} == {"signed-audit-log"}
    failed = {r.id: r for r in check_config(seeded, "hospital-consortium",
                                            deployment="network") if not r.passed}
    assert set(failed) == {"differential-privacy"}
    assert "server holds" in failed["differential-privacy"].reason
    # the other server-adversary models refuse DP-FedAvg too, and predictable DP-SGD rows
    both = load_config(HOSPITAL.with_name("curious-server-and-byzantine-clients.toml"))
    rows = {r.id for r in check_config(both.replace(privacy__secure_mode=False),
                                       "curious-server-and-byzantine-clients",
                                       deployment="network") if not r.passed}
    assert "protect-individual-updates" in rows
    hbc = load_config(HOSPITAL.with_name("honest-but-curious-server.toml"))
    assert "client-side-dp" in {r.id for r in check_config(
        hbc.replace(privacy__mode="dp_fedavg"), "honest-but-curious-server") if not r.passed}
