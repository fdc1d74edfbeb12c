"""Units of the runtime's bounds: value validation, the in-flight byte budget, the throttle."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from securefl.engine.messages import Decline, EvaluateRes, FitRes, PlainUpdate, decode, encode
from securefl.runtime.throttle import Throttle
from securefl.runtime.validate import Limits, Refused, sanitize
from securefl.runtime.wire import Assembler, ByteBudget, Kind, WireError, split

LIMITS = Limits()


def _through_wire(msg):
    return sanitize(decode(encode(msg)), limits=LIMITS)


def test_honest_replies_pass_unchanged_and_updates_become_float32():
    update = np.linspace(-3, 3, 10)  # float64 from a site: cast, checked, kept as float32
    out = _through_wire(FitRes(payload=PlainUpdate(update=update, weight=120.0),
                               metrics={"train_loss": 0.3, "epsilon": 2.5, "delta": 1e-5}))
    assert out.payload.update.dtype == np.float32
    np.testing.assert_array_equal(out.payload.update, update.astype(np.float32))
    assert out.payload.weight == 120.0 and out.metrics["epsilon"] == 2.5


@pytest.mark.parametrize(("msg", "match"), [
    (FitRes(payload=PlainUpdate(update=np.full(3, 1e300), weight=1.0), metrics={}),
     "outside"),
    (FitRes(payload=PlainUpdate(update=np.array([np.nan]), weight=1.0), metrics={}), "NaN"),
    (FitRes(payload=PlainUpdate(update=np.ones(3), weight=10**400), metrics={}), "not finite"),
    (FitRes(payload=PlainUpdate(update=np.ones(3), weight=2e9), metrics={}), "not finite"),
    (FitRes(payload=PlainUpdate(update=np.ones(3), weight=1.0),
            metrics={f"m{i}": 0.0 for i in range(65)}), "65 metrics"),
    (FitRes(payload=PlainUpdate(update=np.ones(3), weight=1.0), metrics={"x" * 65: 0.0}),
     "metric name"),
    (FitRes(payload=PlainUpdate(update=np.ones(3), weight=1.0), metrics={"loss": 1e7}),
     "metric 'loss'"),
    (EvaluateRes(num_examples=10, loss=0.1, accuracy=1.5), "accuracy"),
    (EvaluateRes(num_examples=-1, loss=0.1, accuracy=0.5), "num_examples"),
    (EvaluateRes(num_examples=1, loss=float("inf"), accuracy=0.5), "loss"),
])
def test_out_of_bounds_values_are_refused(msg, match):
    with pytest.raises(Refused, match=match):
        _through_wire(msg)


def test_limits_are_configurable():
    msg = FitRes(payload=PlainUpdate(update=np.full(2, 50.0), weight=1.0), metrics={})
    with pytest.raises(Refused):
        sanitize(msg, limits=Limits(max_value=10.0))
    assert sanitize(Decline(reason="z" * 500), limits=Limits(max_string=100)).reason == "z" * 100


def test_the_assembler_holds_received_bytes_not_announced_ones():
    budget = ByteBudget(1 << 20, wait=0.0)
    assembler = Assembler(max_bytes=1 << 30, max_chunk_bytes=4096, budget=budget)
    frames = split(Kind.REPLY, memoryview(bytearray((1 << 30) - 1)), round=1, seq=1,
                   client_id="gamma", chunk_bytes=4096)
    assert assembler.feed(next(frames)) is None
    assert assembler.held == 4096 and budget.held == 4096
    assembler.reset()
    assert budget.held == 0


def test_the_byte_budget_is_shared_and_released():
    budget = ByteBudget(10_000, wait=0.0)
    first = Assembler(max_bytes=20_000, max_chunk_bytes=4096, budget=budget)
    second = Assembler(max_bytes=20_000, max_chunk_bytes=4096, budget=budget)
    a = list(split(Kind.REPLY, b"a" * 12_000, round=1, seq=1, client_id="a", chunk_bytes=4096))
    b = list(split(Kind.REPLY, b"b" * 8_000, round=1, seq=1, client_id="b", chunk_bytes=4096))
    first.feed(a[0])
    second.feed(b[0])
    assert budget.held == 8192
    with pytest.raises(WireError, match="in flight"):
        first.feed(a[1])  # 12288 > 10000
    assert budget.held == 4096  # the refused stream's bytes were released
    assert second.feed(b[1]).payload == b"b" * 8_000
    assert budget.held == 0


def test_throttle_logs_once_per_interval_and_counts_the_rest(caplog):
    now = [0.0]
    throttle = Throttle(logging.getLogger("securefl.test"), interval=1.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="securefl.test")
    results = []
    for step in range(5000):
        now[0] = step / 1000  # 5000 messages in 5 s
        results.append(throttle.warning("gamma", "seq", "bad frame from %s", "gamma"))
    assert sum(results) == 5
    assert throttle.warning("beta", "seq", "bad frame from %s", "beta")  # per site
    lines = [r.getMessage() for r in caplog.records]
    assert lines[1] == "bad frame from gamma (999 similar messages suppressed)"
