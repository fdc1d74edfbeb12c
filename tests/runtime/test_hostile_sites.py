"""One allowlisted site cannot take the federation down: real gRPC streams on loopback.

Each test plays the hostile site with raw frames (``RawSite``) against the real server
transport, with honest alpha and beta answering through the real ``SiteClient``, and asserts
that the bad input is refused with a log line naming the site, that the honest sites complete
the exchange, and that memory and connection slots stay bounded.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time

import grpc
import numpy as np
import pytest

from securefl.engine.messages import Decline, EvaluateIns, FitRes, PlainUpdate, encode
from securefl.runtime.tls import client_credentials
from securefl.runtime.transport import METHOD
from securefl.runtime.wire import Kind, channel_options, split
from tests.contracts.transport import EchoHandler
from tests.runtime.conftest import federation, network, wait_connected
from tests.runtime.test_transport import _answer, _round_with, _with_raw


def _frame(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<4sHI", b"SFLM", 1, len(raw)) + raw


HUGE_SHAPE = _frame({"body": {"$msg": "EvaluateIns", "f": {"round": 1, "parameters": {"$a": 0}}},
                     "arrays": [{"blob": 0, "dtype": "<f4", "shape": [2**32, 2**32]}],
                     "blobs": [0]})
DEEP = (struct.pack("<4sHI", b"SFLM", 1, 200_011) + b'{"body":' + b"[" * 100_000
        + b"]" * 100_000 + b"}")


@pytest.mark.parametrize("payload", [HUGE_SHAPE, DEEP], ids=["shape-2^32x2^32", "nested-1e5"])
def test_hostile_headers_drop_one_exchange_and_the_reader_lives_on(certs, caplog, payload):
    def body(fed, raw):
        first = _round_with(fed, raw, lambda r, e: r.reply(payload, round=1, seq=e.seq))
        assert first.dropped["gamma"].startswith("undecodable payload")
        second = _round_with(fed, raw, lambda r, e: r.reply(_answer(4.0), round=2, seq=e.seq),
                             round=2)
        assert second.replies["gamma"].loss == 4.0 and not second.dropped

    log = _with_raw(certs, body, caplog)
    assert log.count("rejected message from gamma: undecodable payload") == 1


def test_a_failing_reader_frees_the_slot_and_the_site_reconnects(certs, caplog):
    caplog.set_level(logging.INFO, logger="securefl")
    handlers = [EchoHandler(s) for s in ("alpha", "beta", "gamma")]
    with federation(network(certs, reconnect_timeout=10.0), handlers) as fed:
        original, calls = fed.transport._receive, []

        def breaks_once(session, envelope):
            calls.append(session.site)
            if session.site == "gamma" and calls.count("gamma") == 1:
                raise RuntimeError("unexpected")
            original(session, envelope)

        fed.transport._receive = breaks_once
        requests = {s: _evaluate_ins() for s in ("alpha", "beta", "gamma")}
        out = fed.transport.exchange(requests, round=1)
        assert set(out.replies) == {"alpha", "beta"}
        assert out.dropped["gamma"] == "stream failed (RuntimeError)"
        wait_connected(fed.transport, "gamma")
        again = fed.transport.exchange(requests, round=2)
        assert set(again.replies) == {"alpha", "beta", "gamma"} and not again.dropped
    assert "site gamma: stream closed after an error (RuntimeError)" in caplog.text


def _evaluate_ins():
    return EvaluateIns(round=1, parameters=np.ones(3, np.float32))


def test_an_announced_gigabyte_reserves_only_the_bytes_received(certs, caplog):
    def body(fed, raw):
        started = threading.Event()

        def respond(r, e):
            # one 44-byte chunk of a payload that claims just under the 4 MiB limit
            frames = split(Kind.REPLY, b"x" * (fed.client_config.max_message_bytes - 1),
                           round=1, seq=e.seq, client_id="gamma", chunk_bytes=4096)
            r.send([next(frames)])
            started.set()

        result = {}
        thread = threading.Thread(target=lambda: result.setdefault(
            "out", fed.transport.exchange({"gamma": _evaluate_ins()}, round=1, timeout=1.5)))
        thread.start()
        respond(raw, raw.next_request())
        started.wait(5)
        deadline = time.monotonic() + 5
        while fed.transport._budget.held == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fed.transport._budget.held == 4096  # not the announced 4 MiB
        thread.join(10)
        assert result["out"].dropped["gamma"].startswith("missed the")

    _with_raw(certs, body, caplog)


def _silent_stream(config, site: str):
    """A stream under ``site``'s certificate that never sends its hello."""
    channel = grpc.secure_channel(config.address, client_credentials(config, site),
                                  options=channel_options(config))
    gate = threading.Event()

    def nothing():
        gate.wait(30)
        return
        yield  # pragma: no cover

    call = channel.stream_stream(METHOD)(nothing())
    return channel, call, gate


def _outcome(call) -> grpc.StatusCode | None:
    try:
        for _ in call:
            pass
    except grpc.RpcError as exc:
        return exc.code()
    return None


def test_a_stream_without_hello_is_cancelled_at_the_deadline(certs, caplog):
    caplog.set_level(logging.INFO, logger="securefl")
    with federation(network(certs, hello_timeout=0.5), [EchoHandler("alpha")]) as fed:
        channel, call, gate = _silent_stream(fed.client_config, "gamma")
        assert _outcome(call) == grpc.StatusCode.CANCELLED
        gate.set()
        channel.close()
        # the server's stream thread frees the slot once it leaves the cancelled read
        deadline = time.monotonic() + 5.0
        while fed.transport._hellos.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fed.transport._hellos.pending == {}
        fed.join(EchoHandler("gamma"))
        out = fed.transport.exchange({"alpha": _evaluate_ins(), "gamma": _evaluate_ins()},
                                     round=1)
        assert set(out.replies) == {"alpha", "gamma"}
    assert "refused connection from gamma: no hello within 0.5 s" in caplog.text


def test_streams_that_never_say_hello_cannot_lock_out_honest_sites(certs, caplog):
    """30 hello-less streams on gamma's certificate (the server has 14 slots for 3 sites):
    each cancels the one before, so a restarted alpha and an honest gamma both get in."""
    caplog.set_level(logging.INFO, logger="securefl")
    with federation(network(certs, hello_timeout=60.0, reconnect_timeout=10.0),
                    [EchoHandler("alpha"), EchoHandler("beta")]) as fed:
        hogs = [_silent_stream(fed.client_config, "gamma") for _ in range(30)]
        deadline = time.monotonic() + 20
        while sum(call.done() for _, call, _ in hogs) < 29 and time.monotonic() < deadline:
            time.sleep(0.01)
        ended = [call.code() for _, call, _ in hogs if call.done()]
        assert ended == [grpc.StatusCode.CANCELLED] * 29
        assert len(fed.transport._hellos.pending) == 1
        first = next(k for k in fed.clients if k.startswith("alpha"))
        fed.clients[first].stop()
        fed.wait_exit(first)
        fed.join(EchoHandler("alpha"))  # the restarted site
        fed.join(EchoHandler("gamma"))  # honest gamma replaces the last hog
        out = fed.transport.exchange({s: _evaluate_ins() for s in ("alpha", "beta", "gamma")},
                                     round=1)
        assert set(out.replies) == {"alpha", "beta", "gamma"}
        assert [_outcome(call) for _, call, _ in hogs] == [grpc.StatusCode.CANCELLED] * 30
        for channel, _, gate in hogs:
            gate.set()
            channel.close()
    assert "Concurrent RPC limit exceeded" not in caplog.text


def _fit(update, *, weight=1.0, metrics=None) -> bytes:
    return encode(FitRes(payload=PlainUpdate(update=update, weight=weight),
                         metrics=metrics or {"train_loss": 0.5}))


@pytest.mark.parametrize(("payload", "reason"), [
    (_fit(np.full(4, 1e300)), "PlainUpdate.update has values outside [-1e+06, 1e+06]"),
    (_fit(np.full(4, 1e7, np.float32)), "PlainUpdate.update has values outside"),
    (_fit(np.ones(4, np.float32), weight=1e300), "PlainUpdate.weight = 1e+300 is not finite"),
    (_fit(np.ones(4, np.float32), weight=0.0), "PlainUpdate.weight = 0.0 must be > 0"),
    (_fit(np.ones(4, np.float32), metrics={"epsilon": float("nan")}), "metric 'epsilon' = nan"),
    (_fit(np.ones(4, np.float32), metrics={"epsilon": float("inf")}), "metric 'epsilon' = inf"),
    (_fit(np.ones(4, np.float32), metrics={"epsilon": -1e9}), "metric 'epsilon' = -1000000000.0"),
    (_fit(np.ones(4, np.float32), metrics={"delta": 2.0}), "metric 'delta' = 2.0"),
    (encode(Decline(reason="x" * (2 << 20))), "undecodable payload: message header of"),
], ids=["float64-1e300", "float32-1e7", "weight-1e300", "weight-0", "eps-nan", "eps-inf",
        "eps-negative", "delta-2", "decline-2MiB"])
def test_out_of_bounds_values_are_refused_naming_the_site(certs, caplog, payload, reason):
    def body(fed, raw):
        config = fed.client_config

        def respond(r, e):
            r.send(split(Kind.REPLY, payload, round=1, seq=e.seq, client_id="gamma",
                         chunk_bytes=config.chunk_bytes))

        out = _round_with(fed, raw, respond)
        assert reason in out.dropped["gamma"] and "gamma" not in out.replies

    log = _with_raw(certs, body, caplog)
    assert log.count("rejected message from gamma") == 1


def test_a_long_decline_reason_is_truncated(certs, caplog):
    def body(fed, raw):
        out = _round_with(fed, raw, lambda r, e: r.send(split(
            Kind.REPLY, encode(Decline(reason="y" * 500_000)), round=1, seq=e.seq,
            client_id="gamma", chunk_bytes=1 << 16)))
        assert out.replies["gamma"].reason == "y" * 2048

    _with_raw(certs, body, caplog)


def test_a_flood_of_bad_frames_writes_few_log_lines(certs, caplog):
    def body(fed, raw):
        def flood(r, e):
            for _ in range(2000):
                r.reply(_answer(1.0), round=1, seq=e.seq + 7)
            r.reply(_answer(2.0), round=1, seq=e.seq)

        out = _round_with(fed, raw, flood)
        assert out.replies["gamma"].loss == 2.0

    log = _with_raw(certs, body, caplog)
    lines = log.count("ignored replayed or unexpected message from gamma")
    assert 1 <= lines <= 20


class _ShareFailed(Exception):
    """What a receiver raises when a share bundle from ``suspect`` fails authentication."""

    def __init__(self, suspect: str) -> None:
        super().__init__("cryptographic protocol aborted")
        self.suspect = suspect


class _Receiver(EchoHandler):
    def handle(self, request, *, round):
        raise _ShareFailed("alpha")


def test_a_failed_share_names_its_sender_as_suspect_and_the_receiver_as_reporter(certs, caplog):
    with federation(network(certs), [EchoHandler("alpha"), _Receiver("beta"),
                                     EchoHandler("gamma")]) as fed:
        out = fed.transport.exchange({s: _evaluate_ins() for s in ("alpha", "beta", "gamma")},
                                     round=1)
        assert set(out.replies) == {"alpha", "gamma"}  # the round goes on
        assert out.dropped["beta"].endswith("[suspect: alpha]")
        assert fed.transport.suspects == {"beta": "alpha"}
    assert ("round 1: suspect alpha: beta reports that a message from alpha failed "
            "authentication (reporter beta)") in caplog.text
