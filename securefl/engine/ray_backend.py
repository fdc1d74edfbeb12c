"""Ray backend: sites in Ray actors, every message between driver and actors as wire bytes.

The server's round loop runs in the driver, unchanged: :class:`RayTransport` is one more
:class:`~securefl.engine.transport.Transport`.  Each actor (:class:`SiteHost`) hosts a group of
sites that it builds itself from plain data (for a simulation, the config's TOML text), so
every trainer, ledger and protection secret lives in the actor that made it:

* a request is :func:`~securefl.engine.messages.encode`\\ d in the driver, sent as its
  bytes (a uint8 array, which Ray moves without copying it into a pickle), and
  :func:`~securefl.engine.messages.decode`\\ d (bounded by ``max_bytes``) in the actor,
  once per frame: the sites a broadcast is addressed to share its one frozen decoded
  message; the reply comes back the same way.  A securefl message never crosses
  as a pickled object.
* Ray pickles its own task specifications (the actor's class, the lists of frames, the plain
  set-up data) and keeps actor state.  That pickle stays inside one trust domain: one user's
  simulation on machines that user controls.  The rule "no pickle on bytes from another
  party" is about securefl's parties (server and sites) and keeps holding for every securefl
  message; a deployment across organisations uses :mod:`securefl.runtime` (gRPC + mTLS).

The group a :class:`SiteHost` hosts comes from a *factory*, named ``"module:function"`` and
called in the actor as ``factory(client_ids, setup)``; it returns a :class:`SiteGroup`.
Dropouts are injected in the driver by the same :class:`~securefl.engine.simulation.
DropInjector` as in-process, so both backends drop the same clients.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

from securefl.engine.messages import DEFAULT_MAX_BYTES, Message, decode, encode
from securefl.engine.simulation import DropInjector
from securefl.engine.transport import ClientHandler, Exchange
from securefl.errors import ConfigError, MessageError, RunFailed

__all__ = ["RayTransport", "SiteGroup", "SiteHost", "abandon_early_start", "claim_early_start",
           "import_ray", "init_ray", "start_early", "start_hosts"]

_log = logging.getLogger(__name__)
T = TypeVar("T")
#: seconds the actors of a run may take to start (their imports) before it fails
START_TIMEOUT = 300.0

#: a reply frame (its bytes as a uint8 array), or why the site counts as dropped
Outcome = np.ndarray | str


def as_buffer(frame: bytes) -> np.ndarray:
    """A frame's bytes as a uint8 array: Ray moves it out of band, without a copy into the
    task's pickle, and the receiver reads it in place (read-only)."""
    return np.frombuffer(frame, np.uint8)


def identity(message: Message) -> tuple[int, ...]:
    """The ids of a message's type and field objects: equal ids, equal frames."""
    return (id(type(message)), *(id(getattr(message, f.name))
                                 for f in dataclasses.fields(message)))  # type: ignore[arg-type]


def import_ray() -> Any:
    """The ``ray`` module, or a one-line :class:`ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("[simulation] backend = \"ray\" needs Ray, which is not installed: "
                          "pip install \"securefl[ray]\"") from None
    return ray


def init_ray(address: str | None) -> None:
    """Start the Ray this run uses: ``address``'s cluster, or (``None``) a new local one,
    never a stray cluster that ``ray start`` left behind."""
    import_ray().init(address=address or "local", include_dashboard=False,
                      log_to_driver=False, configure_logging=False)


#: the address of a Ray that :func:`start_early` started and no run has claimed yet
_early: list[str | None] = []


def start_early(address: str | None, meanwhile: Callable[[], T]) -> T:
    """Start the Ray of a Ray run (:func:`init_ray`) on this thread while ``meanwhile`` (the
    run's heavy imports: torch) runs on another, and return what ``meanwhile`` returns.
    ``securefl run`` does this as soon as it has read ``[simulation] backend = "ray"``: Ray's
    start (seconds: its GCS, raylet and prestarted workers) overlaps the imports.  These
    begin once ``import ray`` is done: imports on two threads share the interpreter lock,
    and ``import ray`` is on the way to Ray's start.  After ``meanwhile`` the thread also
    imports what Ray's serialization will need (:func:`warm_serialization`).  Ray is started
    on the calling thread because its processes die with the thread that started them.
    Nothing is started when Ray is not installed or already up, and a failed start is left
    to the run's own :func:`init_ray` to report: the run's checks and errors are the same
    as without this."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            value = meanwhile()
            warm_serialization()
            outcome.append((True, value))
        except BaseException as exc:  # re-raised on the calling thread
            outcome.append((False, exc))

    ray: Any = None
    try:  # alone, before the imports' thread starts
        import ray
    except ImportError:
        pass  # the build says how to install it, in one line
    worker = threading.Thread(target=run, name="securefl-imports", daemon=True)
    worker.start()
    if ray is not None and not _early and not ray.is_initialized():
        try:
            init_ray(address)
            _early.append(address)
        except Exception as exc:  # the run's own init_ray reports it
            _log.debug("early ray.init failed: %s", exc)
    worker.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


#: what Ray's serialization context imports when installed, the first time a process sends
#: or receives a task (in the driver: the first actor's ``.remote()``)
SERIALIZATION_IMPORTS = ("pydantic.main", "pydantic.fields", "pydantic.v1.fields", "pyarrow",
                         "pyarrow.json")


def warm_serialization() -> None:
    """Import :data:`SERIALIZATION_IMPORTS` (those installed) now, while Ray starts: the
    driver's first actor creation otherwise imports them after ``ray.init`` (0.1 to 0.3 s
    on the critical path of a Ray run's start-up)."""
    for name in SERIALIZATION_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a warm-up only: Ray meets the same error itself, later
            _log.debug("not imported ahead of Ray's serialization: %s: %s", name, exc)


def claim_early_start(address: str | None) -> bool:
    """True when :func:`start_early` started Ray for ``address``: the caller owns that Ray
    (and shuts it down).  One for another address is shut down, and the caller
    starts its own with :func:`init_ray`."""
    if not _early:
        return False
    started = _early.pop()
    if (started or None) == (address or None):
        return True
    import_ray().shutdown()
    return False


def abandon_early_start() -> None:
    """Shut down a Ray that :func:`start_early` started and no run claimed (the run failed
    its checks first)."""
    if _early:
        _early.clear()
        import_ray().shutdown()


class SiteGroup(Protocol):
    """The sites of one actor.  ``announce`` gives their public keys (e.g. SecAgg+ identity
    keys) by client id; ``attach`` hands every site the federation's public directory."""

    clients: Mapping[str, ClientHandler]

    def announce(self) -> dict[str, bytes]: ...

    def attach(self, directory: Mapping[str, bytes]) -> None: ...


class SiteHost:
    """A Ray actor's body: a group of sites answering wire frames (see the module doc)."""

    def __init__(self, factory: str, client_ids: Sequence[str], setup: Any, *,
                 threads: int | None = None) -> None:
        self._marks = {"entered": time.time()}
        if threads is not None:  # the same torch thread count per client as in-process
            import torch

            torch.set_num_threads(threads)
        module, _, name = factory.partition(":")
        build = getattr(importlib.import_module(module), name)
        self._marks["imported"] = time.time()
        self.group: SiteGroup = build(list(client_ids), setup)
        self._marks["built"] = time.time()

    def ready(self) -> int:
        """How many sites this actor hosts; answered once its constructor has run."""
        return len(self.group.clients)

    def startup(self) -> dict[str, float]:
        """When (``time.time()``) this actor's constructor began (``entered``: after Ray
        placed it and it read its arguments), had imported torch and the factory's module
        (``imported``) and had built its sites (``built``): the benchmark's timeline."""
        return dict(self._marks)

    def announce(self) -> dict[str, bytes]:
        return self.group.announce()

    def attach(self, directory: Mapping[str, bytes]) -> None:
        self.group.attach(directory)

    def ask(self, name: str, *arguments: Any) -> Any:
        """The group's method ``name`` on plain data (e.g. the report of its sites' privacy
        ledgers, or set-up data such as a key holder's secret): the driver's questions and
        set-up for the sites it runs, never a site's message."""
        return getattr(self.group, name)(*arguments)

    def handle(self, round: int, frames: Sequence[np.ndarray],
               items: Sequence[tuple[str, int]], timeout: float | None,
               max_bytes: int) -> list[tuple[str, Outcome]]:
        """Each site's reply frame to its request ``frames[index]``, in order, or why it
        dropped.  A frame is decoded once and the sites it is addressed to get the same
        decoded message (frozen; its arrays read-only views of the frame): an actor holds
        one copy of a broadcast, not one per site.  Each site validates it as its own."""
        requests: dict[int, Message | MessageError] = {}
        replies = []
        for cid, index in items:
            if index not in requests:
                try:
                    requests[index] = decode(frames[index].data, max_bytes=max_bytes)
                except MessageError as exc:
                    requests[index] = exc
            replies.append((cid, self._one(cid, requests[index], round, timeout)))
        return replies

    def _one(self, client_id: str, request: Message | MessageError, round: int,
             timeout: float | None) -> Outcome:
        handler = self.group.clients.get(client_id)
        if handler is None:
            return "unknown client"
        started = time.perf_counter()
        try:
            if isinstance(request, MessageError):
                raise request
            reply = as_buffer(encode(handler.handle(request, round=round)))
        except Exception as exc:  # a failing client is dropped, never fatal to the round
            _log.warning("client %s failed: %s", client_id, exc)
            return f"client error: {type(exc).__name__}: {exc}"
        if timeout is not None and time.perf_counter() - started > timeout:
            return f"missed the {timeout:g} s deadline"
        return reply


class RayTransport:
    """Driver side: deliver each exchange as one call per actor with its sites' frames.

    ``hosts`` are Ray actor handles of :class:`SiteHost`, ``assignment`` maps each client id
    to the index of its host.  An actor that dies or does not answer in time drops all its
    sites of that exchange, each with the reason; a reply that does not decode drops its
    site.  ``owns_ray``: :meth:`close` also shuts Ray down (it was started for this run).
    """

    def __init__(self, hosts: Sequence[Any], assignment: Mapping[str, int], *,
                 drops: DropInjector | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 owns_ray: bool = False) -> None:
        self._ray = import_ray()
        self.hosts = list(hosts)
        self.assignment = dict(assignment)
        if any(not 0 <= h < len(self.hosts) for h in self.assignment.values()):
            raise ValueError("every client must be assigned to one of the hosts")
        self.drops = drops or DropInjector()
        self.max_bytes, self.owns_ray = max_bytes, owns_ray
        self.bytes_sent = 0
        self.bytes_received = 0
        # an exchange's deadline is for the sites' work: wait for the actors' start
        # (their imports: seconds, more on a loaded machine) here, once
        try:
            self._ray.get([host.ready.remote() for host in self.hosts], timeout=START_TIMEOUT)
        except self._ray.exceptions.GetTimeoutError:
            raise RunFailed(f"the Ray actors did not start within {START_TIMEOUT:g} s") from None

    def client_ids(self) -> list[str]:
        return list(self.assignment)

    def close(self) -> None:
        for host in self.hosts:
            self._ray.kill(host)
        self.hosts = []
        if self.owns_ray and self._ray.is_initialized():
            self._ray.shutdown()

    def exchange(self, requests: Mapping[str, Message], *, round: int,
                 timeout: float | None = None) -> Exchange:
        result = Exchange()
        batches: dict[int, list[tuple[str, int]]] = {}
        frames: dict[int, list[np.ndarray]] = {}
        known: dict[tuple[int, tuple[int, ...]], int] = {}
        for client_id in self.drops.split(requests, round=round, dropped=result.dropped):
            host = self.assignment.get(client_id)
            if host is None:
                result.dropped[client_id] = "unknown client"
                continue
            message = requests[client_id]
            # messages made of the very same field objects (every FitIns of a plain round)
            # have the same frame: encode it once, send it once to each actor
            key = (host, identity(message))
            if key not in known:
                frame = encode(message)
                self.bytes_sent += len(frame)
                frames.setdefault(host, []).append(as_buffer(frame))
                known[key] = len(frames[host]) - 1
            batches.setdefault(host, []).append((client_id, known[key]))
        calls = {host: self.hosts[host].handle.remote(round, frames[host], batch, timeout,
                                                      self.max_bytes)
                 for host, batch in batches.items()}
        for host, call in calls.items():
            # the actor answers its sites one after another: its deadline is theirs summed
            deadline = None if timeout is None else timeout * len(batches[host]) + 10.0
            try:
                outcomes = self._ray.get(call, timeout=deadline)
            except Exception as exc:  # a dead or silent actor drops its sites, not the round
                why = f"actor {host} failed: {type(exc).__name__}"
                _log.warning("%s; its %d sites are dropped", why, len(batches[host]))
                result.dropped.update((cid, why) for cid, _ in batches[host])
                continue
            for client_id, outcome in outcomes:
                self._receive(client_id, outcome, result)
        return result

    def _receive(self, client_id: str, outcome: Outcome, result: Exchange) -> None:
        if isinstance(outcome, str):
            result.dropped[client_id] = outcome
            return
        self.bytes_received += outcome.nbytes
        try:
            result.replies[client_id] = decode(outcome.data, max_bytes=self.max_bytes)
        except MessageError as exc:
            _log.warning("client %s sent a malformed reply: %s", client_id, exc)
            result.dropped[client_id] = f"malformed reply: {exc}"


def start_hosts(factory: str, groups: Sequence[Sequence[str]], setup: Any, *,
                cpus: float, gpus: float, threads: int | None) -> list[Any]:
    """One :class:`SiteHost` actor per group of client ids (Ray must be initialised).

    Refuses, with a one-line :class:`ConfigError`, actors that the cluster can never place
    (they would wait forever): ``len(groups) * cpus`` must fit the cluster's CPUs and each
    actor's ``gpus`` one node's GPUs.
    """
    ray = import_ray()
    total = ray.cluster_resources()
    if len(groups) * cpus > total.get("CPU", 0) + 1e-9:
        raise ConfigError(f"[simulation] {len(groups)} actors with cpus = {cpus:g} need "
                          f"{len(groups) * cpus:g} CPUs, but the Ray cluster has "
                          f"{total.get('CPU', 0):g}; lower cpus or clients per actor")
    if gpus > 0 and gpus > total.get("GPU", 0):
        raise ConfigError(f"[simulation] gpus = {gpus:g} per actor, but the Ray cluster has "
                          f"{total.get('GPU', 0):g} GPUs")
    actor = ray.remote(SiteHost).options(num_cpus=cpus, num_gpus=gpus)
    return [actor.remote(factory, list(ids), setup, threads=threads) for ids in groups]
