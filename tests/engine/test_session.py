"""The one replay rule and the site's control of evaluation, played by a deviating server
against the real :class:`~securefl.engine.client.Client` through the wire codec."""

import logging

import numpy as np
import pytest

from securefl.engine.client import Client
from securefl.engine.messages import (
    Decline,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    decode,
    encode,
)
from securefl.engine.protection import Plain, Update
from securefl.engine.session import ReleaseLog, model_digest
from securefl.errors import ProtocolAbort

RUN, OTHER_RUN = b"\x01" * 32, b"\x02" * 32
M1, M2 = b"\x11" * 32, b"\x22" * 32


class CountingTrainer:
    """Counts trainings (each one a release) and evaluations."""

    def __init__(self):
        self.fits, self.evaluations = 0, 0

    def fit(self, parameters, *, round):
        self.fits += 1
        return Update(np.ones_like(parameters), 1.0), {}

    def evaluate(self, parameters):
        self.evaluations += 1
        return 7, 0.25, 0.75


def wire(message):
    return decode(encode(message))


def fit(client, *, round, parameters, run=RUN):
    request = wire(FitIns(run=run, round=round, parameters=parameters, config={},
                          protection=None))
    return wire(client.handle(request, round=round))


def test_rounds_strictly_increase_and_identical_repeats_are_recognised():
    log = ReleaseLog()
    assert log.start(run=RUN, round=1, model=M1) is False
    assert log.start(run=RUN, round=1, model=M1) is True  # a resumed server asks again
    with pytest.raises(ProtocolAbort):
        log.start(run=RUN, round=1, model=M2)  # same round, another model
    assert log.start(run=RUN, round=2, model=M2) is False
    with pytest.raises(ProtocolAbort):
        log.start(run=RUN, round=1, model=M1)  # back to an older round


def test_one_survivor_set_per_model(caplog):
    log = ReleaseLog()
    log.start(run=RUN, round=1, model=M1)
    log.release(run=RUN, round=1, model=M1, survivors=["a", "b", "c"])
    log.release(run=RUN, round=1, model=M1, survivors=["c", "b", "a"])  # idempotent
    with caplog.at_level(logging.WARNING, logger="securefl.security"), \
            pytest.raises(ProtocolAbort) as raised:
        log.release(run=RUN, round=1, model=M1, survivors=["a", "b"])
    assert str(raised.value) == ProtocolAbort.MESSAGE  # opaque to the server
    assert "already revealed" in caplog.text  # the operator's log keeps the detail
    assert log.released(run=RUN, model=M1) == frozenset({"a", "b", "c"})
    # an aborted round on the same model, redone as a later round: still the same set only
    log.start(run=RUN, round=2, model=M1)
    with pytest.raises(ProtocolAbort):
        log.release(run=RUN, round=2, model=M1, survivors=["a", "c"])
    log.release(run=RUN, round=2, model=M1, survivors=["a", "b", "c"])


def test_no_reveal_for_a_round_the_site_has_left():
    log = ReleaseLog()
    log.start(run=RUN, round=1, model=M1)
    log.start(run=RUN, round=2, model=M2)
    with pytest.raises(ProtocolAbort):
        log.release(run=RUN, round=1, model=M1, survivors=["a"])


def test_the_rule_survives_a_restart_and_the_run_stays_pinned(tmp_path):
    path = tmp_path / "releases.sqlite"
    log = ReleaseLog(path)
    log.start(run=RUN, round=3, model=M1)
    log.release(run=RUN, round=3, model=M1, survivors=["a", "b"])
    log.close()
    again = ReleaseLog(path)
    assert again.start(run=RUN, round=3, model=M1) is True
    with pytest.raises(ProtocolAbort):
        again.release(run=RUN, round=3, model=M1, survivors=["a"])
    with pytest.raises(ProtocolAbort):  # a server cannot start a "new run" on its own
        again.start(run=OTHER_RUN, round=1, model=M1)
    again.close()
    fresh = ReleaseLog(path, new_run=True)  # the site operator joins a new run
    assert fresh.start(run=OTHER_RUN, round=1, model=M1) is False
    with pytest.raises(ProtocolAbort):
        fresh.start(run=RUN, round=4, model=M2)  # ... and is pinned to it again


def test_alternating_rounds_are_refused_before_any_training():
    trainer = CountingTrainer()
    client = Client("site", trainer, Plain())
    one, two = np.zeros(4, np.float32), np.ones(4, np.float32)
    assert isinstance(fit(client, round=1, parameters=one), FitRes)
    assert isinstance(fit(client, round=2, parameters=two), FitRes)
    for rnd, params in [(1, one + 5), (2, two + 5), (1, one)]:
        with pytest.raises(ProtocolAbort):
            fit(client, round=rnd, parameters=params)
    assert trainer.fits == 2  # the server got two releases, not five


def test_evaluation_is_the_sites_choice_once_per_round_on_the_trained_model():
    trainer = CountingTrainer()
    client = Client("site", trainer, Plain(), evaluate=True)
    model = np.arange(4, dtype=np.float32)
    fit(client, round=1, parameters=model)

    def evaluate(parameters, round=1):
        return wire(client.handle(wire(EvaluateIns(round=round, parameters=parameters)),
                                  round=round))

    crafted = [evaluate(model + np.eye(4, dtype=np.float32)[i]) for i in range(4)]
    assert all(isinstance(r, Decline) for r in crafted)  # crafted models are refused
    assert isinstance(evaluate(model, round=2), Decline)  # a round not in progress
    answer = evaluate(model)
    assert isinstance(answer, EvaluateRes) and answer.accuracy == 0.75
    assert isinstance(evaluate(model), Decline)  # at most once per round
    assert trainer.evaluations == 1
    silent = Client("quiet", CountingTrainer(), Plain())  # evaluation not enabled
    fit(silent, round=1, parameters=model)
    reply = silent.handle(EvaluateIns(round=1, parameters=model), round=1)
    assert isinstance(reply, Decline) and "disabled" in reply.reason


def test_model_digest_is_sha256_of_float32_bytes():
    import hashlib

    x = np.array([1.5, -2.0], np.float64)
    assert model_digest(x) == hashlib.sha256(np.asarray(x, "<f4").tobytes()).digest()
