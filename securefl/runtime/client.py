"""A site's side of the runtime: dial out to the server, answer with the engine Client.

The site opens one bidirectional stream and sends a hello naming its site (the server checks
it against the site's certificate) and carrying its
:class:`~securefl.runtime.manifest.Manifest` (model layout, shared protection and privacy
settings).  The stream's first frame from the server must be the server's own manifest,
equal to the site's; otherwise the site answers nothing and exits (:class:`Disagreement`).
It then handles each request frame with ``handler.handle(message, round=...)`` and streams
the reply back under the request's round and sequence number.  A handler failure is reported
at once as an error frame, so the server drops the site from that exchange instead of
waiting for the deadline.  When the stream breaks (server restart, network), the site
reconnects with exponential backoff for up to ``reconnect_timeout`` seconds, keeping its
state (keys, privacy ledger, trainer) in memory; a ``CLOSE`` frame ends the process cleanly.

With its identity key (``[network] certs``) a site also answers the server's evidence
requests itself, outside the engine: :class:`~securefl.runtime.receipts.ReceiptRequest`
from its own privacy ledger and :class:`~securefl.runtime.evidence.Countersign` with its
:class:`~securefl.runtime.evidence.SiteWitness` (both kept in ``client_state_dir``).
"""

from __future__ import annotations

import argparse
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from securefl.build import local_trainer
from securefl.config import Config
from securefl.config.network import NetworkConfig
from securefl.data import federate
from securefl.engine.client import Client
from securefl.engine.messages import FitIns, Message, decode, encode
from securefl.engine.session import ReleaseLog
from securefl.engine.trainer import RoundRewind, Trainer
from securefl.engine.transport import ClientHandler
from securefl.errors import ConfigError
from securefl.output import write_json
from securefl.progress import progress
from securefl.provenance import site_provenance
from securefl.runtime.deploy import load_deployment, load_identity, site_protection
from securefl.runtime.evidence import Countersign, SiteWitness
from securefl.runtime.manifest import (
    Manifest,
    ManifestError,
    announce,
    difference,
    manifest_of,
    read_manifest,
)
from securefl.runtime.receipts import ReceiptReply, ReceiptRequest, SiteReceipts
from securefl.runtime.store import model_hash
from securefl.runtime.tls import certificate_problem, client_credentials, site_paths
from securefl.runtime.transport import METHOD
from securefl.runtime.wire import (
    Assembler,
    Envelope,
    Kind,
    WireError,
    channel_options,
    error_payload,
    split,
)

__all__ = ["SiteClient", "SiteEvidence", "build_site", "build_site_client",
           "command"]

_log = logging.getLogger(__name__)

#: status codes after which retrying cannot help (the server refused this site's identity).
#: ALREADY_EXISTS is retried: after a crash the server may not yet have seen the old
#: connection die, and keepalive will end it.
_FATAL = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION})


class Disagreement(ConfigError):
    """The server announced a model or settings other than this site's, or none at all."""


@dataclass
class SiteEvidence:
    """A site's countersigning witness and (with privacy accounting) its receipts."""

    witness: SiteWitness
    receipts: SiteReceipts | None = None

    def answer(self, request: Message) -> Message | None:
        """The reply to an evidence request, or ``None`` for an engine message."""
        if isinstance(request, Countersign):
            return self.witness.countersign(request)
        if isinstance(request, ReceiptRequest):
            return ReceiptReply(receipts=[] if self.receipts is None else self.receipts.segment(
                request.run, request.round, request.after))
        if isinstance(request, FitIns) and self.receipts is not None:
            self.receipts.models[request.round] = model_hash(request.parameters)
        return None


class SiteClient:
    """Connect ``handler`` (an engine :class:`~securefl.engine.client.Client`) to the server."""

    def __init__(self, handler: ClientHandler, config: NetworkConfig, *,
                 site: str | None = None, evidence: SiteEvidence | None = None,
                 manifest: Manifest | None = None) -> None:
        self.site = site or config.site or handler.client_id
        if not self.site:
            raise ConfigError("[network] site is required for a client")
        self.handler, self.config, self.evidence = handler, config, evidence
        #: this site's :class:`~securefl.runtime.manifest.Manifest`, sent in its hello; the
        #: server must announce an equal one before the site answers anything
        self.manifest = manifest
        self._stop = threading.Event()
        self._call: grpc.Future | None = None
        self.requests_handled = 0
        #: called with the round of every training request this site answered
        self.on_round: Callable[[int], None] | None = None

    def stop(self) -> None:
        """Leave now: the open stream is cancelled, as if the site had crashed."""
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()

    def _channel(self) -> grpc.Channel:
        if self.config.insecure:
            return grpc.insecure_channel(self.config.address, options=channel_options(self.config))
        options = channel_options(self.config)
        if self.config.server_name:
            options.append(("grpc.ssl_target_name_override", self.config.server_name))
        return grpc.secure_channel(self.config.address,
                                   client_credentials(self.config, self.site), options=options)

    def run(self) -> int:
        """Serve until the server closes the federation (0) or retrying is hopeless (1)."""
        if not self.config.insecure:
            cert_path, _ = site_paths(self.config.certs or ".", self.site)
            try:
                problem = certificate_problem(cert_path.read_bytes())
            except (OSError, ValueError) as exc:
                problem = f"cannot read {cert_path}: {exc}"
            if problem is not None:
                _log.error("site %s: cannot connect: own %s", self.site, problem)
                return 1
        backoff, gave_up_at = 0.2, time.monotonic() + self.config.reconnect_timeout
        while not self._stop.is_set():
            try:
                if self._session():
                    return 0
                gave_up_at = time.monotonic() + self.config.reconnect_timeout
                backoff = 0.2
            except Disagreement as exc:
                _log.error("site %s: not joining the server at %s: %s", self.site,
                           self.config.address, exc)
                return 1
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                if code in _FATAL:
                    _log.error("site %s: the server refused the connection: %s (%s)",
                               self.site, details, code)
                    return 1
                if code == grpc.StatusCode.ALREADY_EXISTS:
                    _log.error("site %s: the server refused the connection: %s", self.site,
                               details)
                elif code == grpc.StatusCode.UNAVAILABLE and "handshake" in (details or "").lower():
                    _log.error("site %s: TLS handshake failed (is the certificate expired, or "
                               "not issued by the federation CA?): %s", self.site, details)
                else:
                    _log.warning("site %s: connection lost: %s", self.site, details)
            if time.monotonic() > gave_up_at:
                _log.error("site %s: no connection for %.0f s; giving up", self.site,
                           self.config.reconnect_timeout)
                return 1
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)
        return 0

    def _session(self) -> bool:
        """One connection; True when the server closed the federation."""
        outbox: queue.Queue[bytes | None] = queue.Queue()
        hello = b"" if self.manifest is None else announce(self.manifest)
        for frame in split(Kind.HELLO, hello, round=0, seq=0, client_id=self.site,
                           chunk_bytes=self.config.chunk_bytes):
            outbox.put(frame)
        checked = self.manifest is None

        def frames() -> Iterator[bytes]:
            while True:
                item = outbox.get()
                if item is None:
                    return
                yield item

        assembler = Assembler(max_bytes=self.config.max_message_bytes,
                              max_chunk_bytes=self.config.chunk_bytes)
        with self._channel() as channel:
            call = self._call = channel.stream_stream(METHOD)(frames())
            try:
                for frame in call:
                    envelope = assembler.feed(frame)
                    if envelope is None:
                        continue
                    if not checked:
                        self._check_server(envelope)
                        checked = True
                        continue
                    if envelope.kind == Kind.CLOSE:
                        _log.info("site %s: the server closed the federation", self.site)
                        return True
                    if envelope.kind == Kind.REQUEST:
                        for reply in self._answer(envelope):
                            outbox.put(reply)
                    if self._stop.is_set():
                        call.cancel()
                        return True
            except WireError as exc:
                _log.error("site %s: malformed frame from the server: %s", self.site, exc)
                call.cancel()
                return False
            except Disagreement:
                call.cancel()
                raise
            except grpc.RpcError:
                if self._stop.is_set():
                    return True
                raise
            finally:
                self._call = None
                outbox.put(None)
        return False

    def _check_server(self, envelope: Envelope) -> None:
        """The stream's first frame must be the server's manifest, equal to this site's;
        otherwise :class:`Disagreement` (the site answers nothing and does not retry)."""
        if self.manifest is None:
            return
        if envelope.kind != Kind.HELLO:
            raise Disagreement(f"the server sent a {envelope.kind.name} frame before "
                               "announcing its model and settings")
        try:
            theirs = read_manifest(envelope.payload, sender="the server")
        except ManifestError as exc:
            raise Disagreement(str(exc)) from None
        diff = difference(self.manifest, theirs, here=f"at {self.site}",
                          there="at the server")
        if diff is not None:
            raise Disagreement(f"the server announces another federation: {diff}")
        _log.info("site %s: the server runs the same model and settings", self.site)

    def _answer(self, envelope: Envelope) -> Iterator[bytes]:
        try:
            request: Message = decode(envelope.payload,
                                      max_bytes=self.config.max_message_bytes)
            reply = self.evidence.answer(request) if self.evidence is not None else None
            if reply is None:
                reply = self.handler.handle(request, round=envelope.round)
            kind, payload = Kind.REPLY, encode(reply)
            if isinstance(request, FitIns) and self.on_round is not None:
                self.on_round(request.round)
        except Exception as exc:  # any handler failure is reported, never fatal to the site
            _log.warning("site %s: cannot answer request %d of round %d: %s", self.site,
                         envelope.seq, envelope.round, exc)
            kind, payload = Kind.ERROR, error_payload(exc)
        self.requests_handled += 1
        return split(kind, payload, round=envelope.round, seq=envelope.seq, client_id=self.site,
                     chunk_bytes=self.config.chunk_bytes)


def _build(config: Config, site: str, *,
           new_run: bool = False) -> tuple[Client, Any, Manifest]:
    """The engine :class:`~securefl.engine.client.Client` of ``site``, from its own data.

    The site's :class:`~securefl.engine.session.ReleaseLog` (the one replay rule) lives in
    its state directory; it stays pinned to the run it joined unless ``new_run`` (``securefl
    client --new-run``) lets it join a new one.  The site trains on shard
    ``[network] data_shard`` (default: the site name) of the configured data; with real
    local data (``[data] path``) that is ``"client-0"`` of a one-client partition.  Model
    initialisation and the trainer's seed are derived exactly as in the in-process
    simulation, so a networked run reproduces a simulated one.  Returns the client, the
    site's privacy ledger (``None`` without privacy accounting) and its manifest for the
    hello check; the site's ``provenance-<site>.json`` (its model and the shard it trains
    on) is written to its state directory.
    """
    seed = config.run.seed
    data = federate(config.data, seed=seed)
    shard = config.network.data_shard or site
    if shard not in data.clients:
        raise ConfigError(f"[network] data_shard {shard!r} is not one of the data's shards "
                          f"{sorted(data.clients)}")
    base = local_trainer(config, data, shard)
    hooks: list[Any] = []
    trainer: Trainer = RoundRewind(base)
    state = site_state_dir(config, site)
    state.mkdir(parents=True, exist_ok=True)
    manifest = manifest_of(config, base.model)
    write_json(state / f"provenance-{site}.json",
               site_provenance(config, data, shard, base.model))
    releases = ReleaseLog(state / f"releases-{site}.sqlite", new_run=new_run)
    ledger = None
    if config.privacy.mode != "none":
        # the private trainers answer a repeated round from their cache: no second charge
        from securefl.privacy import build_privacy

        # the site's own ledger, on the site's own disk
        # DP-FedAvg's sampling rate depends on the federation's size: account over all sites
        peers = (sorted(config.network.allowlist) or [site]
                 if config.privacy.mode == "dp_fedavg" else [site])
        privacy = build_privacy(config, run_dir=state, client_ids=peers,
                                num_examples={site: len(data.clients[shard].train)},
                                deployment=True)  # CSPRNG noise unless the site opts out
        if privacy is not None:
            trainer = privacy.wrap_trainer(site, base)
            hooks = list(privacy.client_hooks)
            ledger = privacy.ledger
    protection = site_protection(config, site, sorted(config.network.allowlist) or None,
                                 layout=base.layout, state_dir=state)
    client = Client(site, trainer, protection, update_hooks=hooks, releases=releases,
                    evaluate=config.server.evaluate in ("federated", "both"))
    return client, ledger, manifest


def build_site(config: Config, site: str, *, new_run: bool = False) -> Client:
    """The engine client of ``site`` (see :func:`_build`)."""
    return _build(config, site, new_run=new_run)[0]


def site_state_dir(config: Config, site: str) -> Path:
    return Path(config.network.client_state_dir or f"site-state-{site}")


def build_site_client(config: Config, site: str, *, new_run: bool = False,
                      wrap: Callable[[Client], ClientHandler] | None = None) -> SiteClient:
    """``site``'s :class:`SiteClient` with its evidence (when ``[network] certs`` holds its
    identity key); ``wrap`` may wrap the engine client (tests inject faults with it)."""
    client, ledger, manifest = _build(config, site, new_run=new_run)
    evidence = None
    if config.network.certs is not None:
        identity, state = load_identity(config, site), site_state_dir(config, site)
        receipts = (SiteReceipts(site, identity=identity, state_dir=state, ledger=ledger)
                    if ledger is not None else None)
        witness = SiteWitness(site, identity=identity, state_dir=state,
                              pinned=client.releases.pinned,
                              charged=receipts.charged if receipts is not None
                              else lambda _run, _round: None)
        evidence = SiteEvidence(witness, receipts)
    return SiteClient(client if wrap is None else wrap(client), config.network, site=site,
                      evidence=evidence, manifest=manifest)




def command(args: argparse.Namespace) -> int:
    """``securefl client CONFIG [--site NAME]``: serve one site until the federation ends.

    Without ``[network] client_state_dir`` the site keeps its state (privacy ledger, receipts,
    audit head) in ``site-state-<site>`` next to the config file.
    """
    config = load_deployment(args.config)
    site = args.site or config.network.site
    if not site:
        raise ConfigError(f"{args.config}: [network] site is required (or pass --site)")
    if config.network.client_state_dir is None:
        config = config.replace(network__client_state_dir=str(
            Path(args.config).resolve().parent / f"site-state-{site}"))
    client = build_site_client(config, site, new_run=getattr(args, "new_run", False))
    with progress(f"site {site}", config.run.rounds, log=_log) as bar:
        trained: set[int] = set()

        def advance(rnd: int) -> None:  # a redone round answers again: count it once
            if rnd not in trained:
                trained.add(rnd)
                bar.advance(status=f"trained round {rnd}")

        client.on_round = advance
        return client.run()
