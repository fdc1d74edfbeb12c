"""The server's gRPC :class:`~securefl.engine.transport.Transport`: sites dial in, it pushes.

Hospitals sit behind firewalls, so each site *connects out* to the server and opens one
bidirectional stream (``/securefl.Federation/Connect``, raw-bytes frames, no protoc).  The
server pushes :data:`~securefl.runtime.wire.Kind.REQUEST` frames down the stream and the site
streams its replies back.  Per connection the server:

1. identifies the site by its TLS client certificate: the SHA-256 fingerprint must be pinned in
   the allowlist (and the certificate currently valid); a certificate it does not know is
   refused with ``UNAUTHENTICATED``.  Without TLS (``insecure = true``, loopback only) the
   site's name in its hello frame must be on the allowlist;
2. refuses a second live connection for the same site (``ALREADY_EXISTS``); with a
   server :class:`~securefl.runtime.manifest.Manifest`, refuses a site whose hello carries
   none or a different one (``FAILED_PRECONDITION``, naming the difference), and announces
   its own as the stream's first frame so that the site can check the server in turn;
3. accepts a reply only if it names the connection's own site, the current round, and the
   sequence number of the one request outstanding for that site (a replayed, stale or
   wrong-round frame is logged and ignored: the site may still answer properly);
4. decodes the payload with the engine's safe codec under the size limit and bounds every
   value in it (:mod:`securefl.runtime.validate`); a malformed, oversized, out-of-bounds or
   non-securefl (e.g. pickle) payload drops the site from that exchange with the reason, and
   a framing violation, or any other failure while reading, also closes its stream and frees
   the site's slot, so that it can reconnect.

Connection slots (:mod:`securefl.runtime.slots`): a stream must send its hello within
``hello_timeout`` seconds or it is cancelled; each certificate has at most one stream waiting
for its hello (a newer one replaces it, so an honest site that reconnects is never locked out
by its own stale stream), and the server admits ``2 * sites + 8`` concurrent streams, so the
allowlisted sites always find a slot.  Bytes of partly received payloads count against a per-server
:class:`~securefl.runtime.wire.ByteBudget` (``max_inflight_bytes``); per stream at most one
payload of ``max_message_bytes`` is in flight, and memory grows with the bytes received.
Repeated warnings about one site are rate-limited (:class:`~securefl.runtime.throttle.Throttle`).

Blame: a site's error frame that ends in ``[suspect: A]`` (:func:`~securefl.runtime.wire.
blamed`: the sender of a message that failed authentication at the site, e.g. a tampered
SecAgg share bundle) is logged naming ``A`` as the suspect and the site as the reporter, and
recorded in :attr:`GrpcTransport.suspects`.

Disconnections and missed deadlines appear in :attr:`Exchange.dropped`; nothing is raised, so
the round logic (and secure aggregation's dropout recovery) runs exactly as in simulation.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from typing import NoReturn

import grpc

from securefl.config.network import NetworkConfig, is_loopback, split_address
from securefl.engine.messages import Message, decode, encode
from securefl.engine.transport import Exchange
from securefl.errors import ConfigError, MessageError
from securefl.runtime.manifest import Manifest, announce, hello_refusal
from securefl.runtime.slots import HelloGate
from securefl.runtime.throttle import Throttle
from securefl.runtime.tls import (
    certificate_problem,
    common_name,
    fingerprint,
    peer_certificate,
    server_credentials,
    site_for,
)
from securefl.runtime.validate import Limits, Refused, sanitize
from securefl.runtime.wire import (
    Assembler,
    ByteBudget,
    Envelope,
    Kind,
    WireError,
    blamed,
    channel_options,
    split,
)

__all__ = ["METHOD", "GrpcTransport"]

_log = logging.getLogger(__name__)
SERVICE = "securefl.Federation"
METHOD = f"/{SERVICE}/Connect"


@dataclass
class _Session:
    site: str
    outbox: queue.Queue[Iterable[bytes] | None] = field(default_factory=queue.Queue)
    closed: threading.Event = field(default_factory=threading.Event)


class GrpcTransport:
    """Server side of the runtime.  ``sites`` are the federation's client ids (default: the
    allowlist); a site not connected when it is sampled is reported dropped."""

    def __init__(self, config: NetworkConfig, *, sites: Iterable[str] | None = None,
                 manifest: Manifest | None = None) -> None:
        host, _ = split_address(config.address)
        if config.insecure and not is_loopback(host):
            raise ConfigError(f"[network] insecure = true binds to loopback only, got "
                              f"address {config.address!r}")
        if not config.insecure and config.certs is None:
            raise ConfigError("[network] certs is required: the server refuses to start "
                              "without TLS unless insecure = true (loopback only)")
        self.config = config
        #: the server's :class:`~securefl.runtime.manifest.Manifest`: with one, every site
        #: must send an equal one in its hello, and is sent this one in return
        self.manifest = manifest
        self._sites = sorted(sites if sites is not None else config.allowlist)
        if not self._sites:
            raise ConfigError("[network] allowlist names no site")
        self._cond = threading.Condition()
        self._sessions: dict[str, _Session] = {}
        self._round: int | None = None
        self._pending: dict[str, int] = {}
        self._replies: dict[str, Message] = {}
        self._dropped: dict[str, str] = {}
        # Random start: a reply recorded under an earlier server process can never match.
        self._seq = int.from_bytes(os.urandom(6), "little")
        #: reporter -> the site it blamed in its latest error (see :meth:`_blame`)
        self.suspects: dict[str, str] = {}
        self._budget = ByteBudget(config.max_inflight_bytes, wait=config.round_timeout)
        self._limits = Limits.of(config)
        self._throttle = Throttle(_log, interval=config.warning_interval)
        self._hellos = HelloGate(config, self._throttle)
        # every stream holds a worker thread: one session and one pending hello per site,
        # plus room for refused strangers
        slots = 2 * len(self._sites) + 8
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=slots, thread_name_prefix="securefl-rpc"),
            options=channel_options(config), maximum_concurrent_rpcs=slots)
        handler = grpc.stream_stream_rpc_method_handler(self._connect)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Connect": handler}),))
        if config.insecure:
            self.port = self._server.add_insecure_port(config.address)
        else:
            self.port = self._server.add_secure_port(config.address, server_credentials(config))
        if self.port == 0:
            raise ConfigError(f"[network] cannot listen on {config.address!r}")
        self._server.start()
        _log.info("listening on %s (%s)", config.address,
                  "insecure, loopback only" if config.insecure else "mutual TLS")

    # ------------------------------------------------------------------ Transport protocol
    def client_ids(self) -> list[str]:
        """Every site on the allowlist, sorted (sampling stays deterministic across restarts)."""
        return list(self._sites)

    def connected(self) -> list[str]:
        with self._cond:
            return sorted(self._sessions)

    def wait_for_clients(self, count: int, *, timeout: float) -> list[str]:
        """Block until ``count`` sites are connected (or ``timeout``); returns who is.  The
        wait is visible: every 10 s the log says who is in and how long is left."""
        from securefl.progress import progress

        deadline = time.monotonic() + timeout
        next_note = time.monotonic()
        with progress("waiting for sites", count, log=_log, transient=True) as bar, self._cond:
            while len(self._sessions) < count and (now := time.monotonic()) < deadline:
                who = ", ".join(sorted(self._sessions)) or "none"
                bar.update(completed=len(self._sessions),
                           status=f"{who}; {deadline - now:.0f} s left")
                if now >= next_note and not bar.drawn:
                    _log.info("waiting for sites: %d of %d connected (%s); %.0f s left",
                              len(self._sessions), count, who, deadline - now)
                    next_note = now + 10.0
                self._cond.wait(min(deadline - now, 1.0 if bar.drawn
                                    else max(0.0, next_note - now)))
            return sorted(self._sessions)

    def exchange(self, requests: Mapping[str, Message], *, round: int,
                 timeout: float | None = None) -> Exchange:
        timeout = self.config.round_timeout if timeout is None else timeout
        deliveries: list[tuple[_Session, int, Message]] = []
        with self._cond:
            self._round, self._pending, self._replies, self._dropped = round, {}, {}, {}
            for site, msg in requests.items():
                session = self._sessions.get(site)
                if session is None:
                    self._dropped[site] = "not connected"
                    continue
                self._seq += 1
                self._pending[site] = self._seq
                deliveries.append((session, self._seq, msg))
        for session, seq, msg in deliveries:
            session.outbox.put(split(Kind.REQUEST, encode(msg), round=round, seq=seq,
                                     client_id=session.site, chunk_bytes=self.config.chunk_bytes))
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            for site in self._pending:
                _log.warning("round %d: %s missed the %.1f s deadline", round, site, timeout)
                self._dropped[site] = f"missed the {timeout:g} s deadline"
            result = Exchange(replies=dict(self._replies), dropped=dict(self._dropped))
            self._pending, self._replies, self._dropped = {}, {}, {}
        return result

    def close(self, *, notify: bool = True) -> None:
        """Stop serving; with ``notify``, first tell every site the federation is over
        (without it the sites keep reconnecting, e.g. to a server that will resume)."""
        with self._cond:
            sessions = list(self._sessions.values()) if notify else []
        for session in sessions:
            session.outbox.put(split(Kind.CLOSE, b"", round=self._round or 0, seq=0,
                                     client_id=session.site, chunk_bytes=self.config.chunk_bytes))
            session.outbox.put(None)
        for session in sessions:
            session.closed.wait(2.0)
        self._server.stop(grace=1.0).wait()

    # ------------------------------------------------------------------ connections
    def _identify(self, context: grpc.ServicerContext) -> str | None:
        if self.config.insecure:
            return None
        pem = peer_certificate(context)
        if pem is None:
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, "no client certificate",
                         context.peer())
        site = site_for(pem, self.config.allowlist)
        who = (site if site is not None
               else f"{context.peer()} (certificate of {common_name(pem)!r}, not pinned)")
        problem = certificate_problem(pem)
        if problem is not None:
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, problem, who)
        if site is None or site not in self._sites:
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED,
                         f"certificate {fingerprint(pem)} is not on the allowlist", who)
        return site

    @staticmethod
    def _refuse(context: grpc.ServicerContext, code: grpc.StatusCode, reason: str,
                who: str) -> NoReturn:
        _log.warning("refused connection from %s: %s", who, reason)
        context.abort(code, reason)
        raise RuntimeError("unreachable: grpc's abort raises")

    def _connect(self, frames: Iterator[bytes],
                 context: grpc.ServicerContext) -> Iterator[bytes]:
        site = self._identify(context)
        hello = self._hellos.await_hello(site, frames, context)
        if hello is None:
            return
        claimed = hello.client_id
        if hello.kind != Kind.HELLO:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "first frame is not a hello",
                         claimed)
        if site is None:
            site = claimed
            if site not in self._sites:
                self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                             f"site {site!r} is not on the allowlist", context.peer())
        elif claimed != site:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"certificate of {site!r} used to claim site {claimed!r}", site)
        refusal = None if self.manifest is None else hello_refusal(self.manifest, hello.payload,
                                                                   site=site)
        if refusal is not None:
            self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION, refusal, site)
        session = _Session(site=site)
        with self._cond:
            if site in self._sessions:
                duplicate = True
            else:
                duplicate = False
                self._sessions[site] = session
        if duplicate:
            self._refuse(context, grpc.StatusCode.ALREADY_EXISTS,
                         f"site {site!r} is already connected (duplicated client id)", site)
        context.add_callback(lambda: self._forget(session, "disconnected"))
        reader = threading.Thread(target=self._read, args=(session, frames, context),
                                  name=f"securefl-read-{site}", daemon=True)
        reader.start()
        _log.info("site %s connected from %s", site, context.peer())
        with self._cond:
            self._cond.notify_all()
        try:
            if self.manifest is not None:  # the site checks what the server runs, too
                yield from split(Kind.HELLO, announce(self.manifest), round=0, seq=0,
                                 client_id=site, chunk_bytes=self.config.chunk_bytes)
            while True:
                item = session.outbox.get()
                if item is None:
                    break
                yield from item
        finally:
            session.closed.set()

    def _forget(self, session: _Session, reason: str) -> None:
        with self._cond:
            if self._sessions.get(session.site) is not session:
                return
            del self._sessions[session.site]
            if session.site in self._pending:
                del self._pending[session.site]
                self._dropped[session.site] = reason
            self._cond.notify_all()
        session.outbox.put(None)
        _log.warning("site %s: %s", session.site, reason)

    def _read(self, session: _Session, frames: Iterator[bytes],
              context: grpc.ServicerContext) -> None:
        assembler = Assembler(max_bytes=self.config.max_message_bytes,
                              max_chunk_bytes=self.config.chunk_bytes, budget=self._budget)
        try:
            for frame in frames:
                envelope = assembler.feed(frame)
                if envelope is not None:
                    self._receive(session, envelope)
        except WireError as exc:
            self._reject(session, f"malformed stream: {exc}")
            self._forget(session, f"stream closed after a framing violation ({exc})")
            context.cancel()
            return
        except grpc.RpcError:
            pass
        except Exception as exc:  # whatever broke, the slot is freed and the site may return
            _log.exception("site %s: reading its stream failed", session.site)
            self._reject(session, f"stream failed ({type(exc).__name__})")
            self._forget(session, f"stream closed after an error ({type(exc).__name__})")
            context.cancel()
            return
        finally:
            assembler.reset()
        self._forget(session, "disconnected")

    def _reject(self, session: _Session, reason: str) -> None:
        """Drop the site from the exchange in progress (if it owes a reply) with ``reason``."""
        reason = reason[:self.config.max_string]
        # one line per site and round at least: a flood within a round is what is throttled
        self._throttle.warning(session.site, f"reject-{self._round}",
                               "round %s: rejected message from %s: %s", self._round,
                               session.site, reason)
        with self._cond:
            if session.site in self._pending:
                del self._pending[session.site]
                self._dropped[session.site] = reason
                self._cond.notify_all()

    def _blame(self, reporter: str, text: str) -> None:
        """Name the suspect of an error a site blames on another (``[suspect: A]``)."""
        suspect = blamed(text)
        if suspect is None:
            return
        if suspect in self._sites and suspect != reporter:
            self.suspects[reporter] = suspect
            _log.warning("round %s: suspect %s: %s reports that a message from %s failed "
                         "authentication (reporter %s)", self._round, suspect, reporter,
                         suspect, reporter)
        else:
            _log.warning("round %s: %s blamed an unknown party %r", self._round, reporter,
                         suspect[:64])

    def _receive(self, session: _Session, envelope: Envelope) -> None:
        site = session.site
        if envelope.client_id != site:
            self._reject(session, f"frame claims client id {envelope.client_id!r}")
            return
        with self._cond:
            expected = self._pending.get(site)
            current = self._round
        if envelope.round != current:
            self._throttle.warning(site, "round", "ignored message from %s for round %d "
                                   "(current round is %s)", site, envelope.round, current)
            return
        if expected is None or envelope.seq != expected:
            self._throttle.warning(site, "seq", "ignored replayed or unexpected message from %s "
                                   "(sequence %d, expected %s)", site, envelope.seq, expected)
            return
        if envelope.kind == Kind.ERROR:
            text = bytes(envelope.payload[:self.config.max_string]).decode("utf-8", "replace")
            self._blame(site, text)
            self._reject(session, "client error: " + text[:500])
            return
        if envelope.kind != Kind.REPLY:
            self._reject(session, f"unexpected {envelope.kind.name} frame")
            return
        try:
            reply = sanitize(decode(envelope.payload, max_bytes=self.config.max_message_bytes),
                             limits=self._limits)
        except MessageError as exc:
            self._reject(session, f"undecodable payload: {exc}")
            return
        except Refused as exc:
            self._reject(session, f"out-of-bounds value: {exc}")
            return
        with self._cond:
            if self._pending.get(site) == envelope.seq:
                del self._pending[site]
                self._replies[site] = reply
                self._cond.notify_all()
