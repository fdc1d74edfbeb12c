"""A payload of more than 200 MB crosses the runtime in 1 MiB chunks over mutual TLS."""

from __future__ import annotations

import time

import numpy as np
import pytest

from securefl.engine.messages import EvaluateIns, EvaluateRes
from tests.runtime.conftest import federation, network


class Checksum:
    client_id = "alpha"

    def handle(self, request, *, round):
        data = request.parameters
        return EvaluateRes(num_examples=int(data.size), loss=float(data[::4096].sum()),
                           accuracy=float(data[-1]) / data.size)


def test_payload_over_200_mb_round_trips(certs):
    size = 210 * 1024 * 1024 // 4  # 210 MiB of float32
    data = np.arange(size, dtype=np.float32)
    config = network(certs, {"alpha": certs[1]["alpha"]}, chunk_bytes=1 << 20,
                     max_message_bytes=1 << 30, round_timeout=120.0)
    with federation(config, [Checksum()]) as fed:
        started = time.perf_counter()
        out = fed.transport.exchange({"alpha": EvaluateIns(round=1, parameters=data)}, round=1)
        seconds = time.perf_counter() - started
    reply = out.replies["alpha"]
    assert reply.num_examples == size and reply.accuracy == float(data[-1]) / size
    assert reply.loss == pytest.approx(float(data[::4096].sum()))
    print(f"210 MiB round trip in {seconds:.1f} s")
