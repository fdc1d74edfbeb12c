"""The gRPC transport: the Transport contract over mutual TLS, and every kind of bad input."""

from __future__ import annotations

import logging
import pickle
import queue
import threading

import grpc
import numpy as np
import pytest

from securefl.config.network import NetworkConfig
from securefl.engine.messages import EvaluateIns, EvaluateRes, encode
from securefl.errors import ConfigError
from securefl.runtime.tls import client_credentials
from securefl.runtime.transport import METHOD, GrpcTransport
from securefl.runtime.wire import Assembler, Kind, channel_options, split
from tests.contracts.transport import EchoHandler, TransportContract
from tests.runtime.conftest import SITES, Federation, add_sites, federation, network


class TestGrpcContract(TransportContract):
    @pytest.fixture(autouse=True)
    def _certs(self, certs):
        self.certs = certs

    def make(self, handlers):
        allowlist = add_sites(self.certs, handlers)
        fed = Federation(network(self.certs, {s: allowlist[s] for s in handlers}))
        for site, handler in handlers.items():
            fed.join(handler, site=site)
        fed.transport.close = fed.close  # closing the transport also stops the sites
        return fed.transport


def _evaluate(round: int, value: float = 1.0) -> EvaluateIns:
    return EvaluateIns(round=round, parameters=np.full(3, value, np.float32))


class RawSite:
    """A site that speaks raw frames, to send what an honest SiteClient never would."""

    def __init__(self, fed: Federation, site: str, config: NetworkConfig | None = None) -> None:
        config = config or fed.client_config
        self.site, self.config = site, config
        self.outbox: queue.Queue = queue.Queue()
        self.inbox: queue.Queue = queue.Queue()
        self.channel = grpc.secure_channel(config.address, client_credentials(config, site),
                                           options=channel_options(config))
        self.send(split(Kind.HELLO, b"", round=0, seq=0, client_id=site, chunk_bytes=4096))
        self.call = self.channel.stream_stream(METHOD)(iter(self.outbox.get, None))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assembler = Assembler(max_bytes=1 << 24, max_chunk_bytes=1 << 20)
        try:
            for frame in self.call:
                envelope = assembler.feed(frame)
                if envelope is not None:
                    self.inbox.put(envelope)
        except grpc.RpcError as exc:
            self.inbox.put(exc)

    def send(self, frames) -> None:
        for frame in frames:
            self.outbox.put(frame)

    def reply(self, message_bytes: bytes, *, round: int, seq: int, client_id: str | None = None,
              kind: Kind = Kind.REPLY) -> None:
        self.send(split(kind, message_bytes, round=round, seq=seq,
                        client_id=client_id or self.site, chunk_bytes=4096))

    def next_request(self, timeout: float = 10.0):
        return self.inbox.get(timeout=timeout)

    def close(self) -> None:
        self.outbox.put(None)
        self.channel.close()


def _answer(value: float) -> bytes:
    return encode(EvaluateRes(num_examples=1, loss=value, accuracy=0.0))


def _with_raw(certs, body, caplog):
    """Run ``body(fed, raw)`` with honest alpha and beta and a raw gamma; returns the logs."""
    caplog.set_level(logging.INFO, logger="securefl")
    with federation(network(certs), [EchoHandler("alpha"), EchoHandler("beta")]) as fed:
        raw = RawSite(fed, "gamma")
        from tests.runtime.conftest import wait_connected

        wait_connected(fed.transport, "gamma")
        try:
            body(fed, raw)
        finally:
            raw.close()
    return caplog.text


def _round_with(fed: Federation, raw: RawSite, respond, *, round: int = 1, timeout: float = 3.0):
    """One exchange to all three sites; ``respond(raw, envelope)`` plays gamma's part."""
    result = {}

    def run() -> None:
        result["out"] = fed.transport.exchange(
            {s: _evaluate(round, i + 1.0) for i, s in enumerate(SITES)}, round=round,
            timeout=timeout)

    thread = threading.Thread(target=run)
    thread.start()
    respond(raw, raw.next_request())
    thread.join(timeout + 5)
    out = result["out"]
    assert out.replies["alpha"].loss == pytest.approx(3.0)  # the round went on
    assert out.replies["beta"].loss == pytest.approx(6.0)
    return out


def test_replayed_message_is_ignored_and_logged(certs, caplog):
    def body(fed, raw):
        first = _round_with(fed, raw, lambda r, e: r.reply(_answer(9.0), round=1, seq=e.seq))
        assert first.replies["gamma"].loss == 9.0

        def replay(r, e):
            r.reply(_answer(9.0), round=1, seq=e.seq - 1)  # the old answer, replayed
            r.reply(_answer(7.0), round=1, seq=e.seq)

        second = _round_with(fed, raw, replay)
        assert second.replies["gamma"].loss == 7.0 and not second.dropped

    assert "ignored replayed or unexpected message from gamma" in _with_raw(certs, body, caplog)


def test_wrong_round_message_is_ignored_and_logged(certs, caplog):
    def body(fed, raw):
        out = _round_with(fed, raw, lambda r, e: r.reply(_answer(5.0), round=2, seq=e.seq),
                          timeout=1.0)
        assert out.dropped["gamma"].startswith("missed the 1 s deadline")
        assert "gamma" not in out.replies

    assert "ignored message from gamma for round 2 (current round is 1)" in _with_raw(
        certs, body, caplog)


@pytest.mark.parametrize(("payload", "reason"), [
    (b"\x00garbage" * 10, "undecodable payload: not a securefl message"),
    (pickle.dumps({"weights": [1, 2, 3]}), "undecodable payload: not a securefl message"),
    (encode(EvaluateRes(num_examples=1, loss=1.0, accuracy=0.0))[:-3] + b"}}}",
     "undecodable payload"),
])
def test_malformed_and_pickle_payloads_drop_the_site_for_the_exchange(certs, caplog, payload,
                                                                      reason):
    def body(fed, raw):
        out = _round_with(fed, raw, lambda r, e: r.reply(payload, round=1, seq=e.seq))
        assert out.dropped["gamma"].startswith(reason)
        assert "gamma" not in out.replies

    assert "rejected message from gamma: undecodable payload" in _with_raw(certs, body, caplog)


def test_pickle_payload_executes_nothing(certs, caplog, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    def body(fed, raw):
        out = _round_with(fed, raw, lambda r, e: r.reply(pickle.dumps(Exploit()), round=1,
                                                         seq=e.seq))
        assert "gamma" in out.dropped

    _with_raw(certs, body, caplog)
    assert not marker.exists()


def test_oversized_payload_is_refused_before_it_is_received(certs, caplog):
    def body(fed, raw):
        limit = fed.client_config.max_message_bytes

        def respond(r, e):
            r.reply(b"x" * (limit + 1), round=1, seq=e.seq)

        out = _round_with(fed, raw, respond)
        assert "exceeds the limit" in out.dropped["gamma"]

    log = _with_raw(certs, body, caplog)
    assert f"payload of {(1 << 22) + 1} bytes exceeds the limit of {1 << 22}" in log


def test_frame_claiming_another_client_id_is_rejected(certs, caplog):
    def body(fed, raw):
        out = _round_with(fed, raw, lambda r, e: r.reply(_answer(1.0), round=1, seq=e.seq,
                                                         client_id="alpha"))
        assert out.dropped["gamma"] == "frame claims client id 'alpha'"

    _with_raw(certs, body, caplog)


def test_duplicated_client_id_is_refused_and_the_first_stays(certs, caplog):
    caplog.set_level(logging.INFO, logger="securefl")
    with federation(network(certs), [EchoHandler("alpha"), EchoHandler("beta")]) as fed:
        fed.join(EchoHandler("alpha"), wait=False)
        assert fed.wait_exit("alpha#2") == 1
        out = fed.transport.exchange({"alpha": _evaluate(1, 2.0)}, round=1)
        assert out.replies["alpha"].loss == pytest.approx(6.0)
    assert "site 'alpha' is already connected (duplicated client id)" in caplog.text


def test_unknown_certificate_is_refused(certs, caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="securefl")
    # "delta" holds a certificate from the federation CA that is not on the allowlist,
    # "omega" one from a foreign CA
    from securefl.runtime.tls import init_certificates, issue_site_certificate

    issue_site_certificate(certs[0], "delta")
    foreign = tmp_path / "foreign"
    init_certificates(foreign, ["omega"])
    (certs[0] / "sites" / "omega.pem").write_bytes((foreign / "sites" / "omega.pem").read_bytes())
    (certs[0] / "sites" / "omega.key").write_bytes((foreign / "sites" / "omega.key").read_bytes())
    with federation(network(certs), [EchoHandler("alpha")]) as fed:
        fed.join(EchoHandler("delta"), wait=False)
        fed.join(EchoHandler("omega"), wait=False)
        assert fed.wait_exit("delta#1") == 1
        assert fed.wait_exit("omega#2") == 1
        assert fed.transport.connected() == ["alpha"]
        out = fed.transport.exchange({"alpha": _evaluate(1)}, round=1)
        assert out.replies["alpha"].loss == pytest.approx(3.0)
    assert "is not on the allowlist" in caplog.text
    assert "site omega connected" not in caplog.text  # the TLS handshake itself failed
    assert "site omega: connection lost" in caplog.text


def test_expired_certificate_is_refused(certs, caplog):
    import datetime as dt

    from securefl.runtime.tls import issue_site_certificate

    caplog.set_level(logging.INFO, logger="securefl")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    pinned = issue_site_certificate(certs[0], "stale", days=1, not_before=past)
    allowlist = {**certs[1], "stale": pinned}
    with federation(network(certs, allowlist), [EchoHandler("alpha")]) as fed:
        fed.join(EchoHandler("stale"), wait=False)
        assert fed.wait_exit("stale#1") == 1
        raw = RawSite(fed, "stale")  # skips the client's own check: the server must refuse
        failure = raw.next_request()
        raw.close()
        assert isinstance(failure, grpc.RpcError)
        assert failure.code() == grpc.StatusCode.UNAVAILABLE
        out = fed.transport.exchange({"alpha": _evaluate(1), "stale": _evaluate(1)}, round=1)
        assert out.replies["alpha"].loss == pytest.approx(3.0)
        assert out.dropped == {"stale": "not connected"}
    assert "site stale: cannot connect: own certificate expired on" in caplog.text


def test_server_refuses_to_start_without_tls(certs):
    with pytest.raises(ConfigError, match="refuses to start without TLS"):
        GrpcTransport(NetworkConfig(address="127.0.0.1:0", allowlist=certs[1]))
    with pytest.raises(ConfigError, match="loopback only"):
        GrpcTransport(NetworkConfig(address="0.0.0.0:0", insecure=True, allowlist=certs[1]))


def test_insecure_mode_on_loopback_works_and_checks_the_allowlist(certs):
    config = NetworkConfig(address="127.0.0.1:0", insecure=True, allowlist=certs[1],
                           round_timeout=5.0, reconnect_timeout=1.0)
    with federation(config, [EchoHandler("alpha")]) as fed:
        fed.join(EchoHandler("mallory"), wait=False)
        assert fed.wait_exit("mallory#1") == 1
        out = fed.transport.exchange({"alpha": _evaluate(1)}, round=1)
        assert out.replies["alpha"].loss == pytest.approx(3.0)


def test_disconnect_mid_exchange_is_a_drop_not_a_wait(certs):
    class Vanish(EchoHandler):
        def __init__(self, client_id, raw_stop):
            super().__init__(client_id)
            self.raw_stop = raw_stop

        def handle(self, request, *, round):
            self.raw_stop()
            raise RuntimeError("unreachable")

    with federation(network(certs), [EchoHandler("alpha")]) as fed:
        raw = RawSite(fed, "beta")
        from tests.runtime.conftest import wait_connected

        wait_connected(fed.transport, "beta")
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("out", fed.transport.exchange(
            {"alpha": _evaluate(1), "beta": _evaluate(1)}, round=1, timeout=30)))
        thread.start()
        raw.next_request()
        raw.call.cancel()
        thread.join(20)
        out = result["out"]
        assert out.replies["alpha"].loss == pytest.approx(3.0)
        assert out.dropped["beta"] == "disconnected"
