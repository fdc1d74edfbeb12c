"""Connection slots: each new stream must say hello in time, one waiting stream per certificate.

Every gRPC stream holds a server worker thread from its first byte, so streams that never send
a hello could take every slot.  :class:`HelloGate` bounds them: a stream has
``hello_timeout`` seconds to send its hello frame or it is cancelled, and each certificate
(site) has at most one stream waiting for its hello: a newer one cancels the older, so an
honest site that reconnects is never locked out by its own stale stream, and a hostile holder
of one certificate holds at most one waiting slot.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from securefl.config.network import NetworkConfig
from securefl.runtime.throttle import Throttle
from securefl.runtime.wire import Assembler, Envelope, WireError

__all__ = ["HelloGate"]


class HelloGate:
    """The hello phase of every stream of one server."""

    def __init__(self, config: NetworkConfig, throttle: Throttle) -> None:
        self.config, self.throttle = config, throttle
        #: site -> the context of its stream waiting for a hello
        self.pending: dict[str, grpc.ServicerContext] = {}
        self._lock = threading.Lock()

    def await_hello(self, site: str | None, frames: Iterator[bytes],
                    context: grpc.ServicerContext) -> Envelope | None:
        """The stream's first envelope, within ``hello_timeout``; one waiting stream per
        certificate (a newer one cancels the older)."""
        if site is not None:
            with self._lock:
                stale = self.pending.get(site)
                self.pending[site] = context
            if stale is not None:
                stale.cancel()
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            context.cancel()

        timer = threading.Timer(self.config.hello_timeout, expire)
        timer.daemon = True
        timer.start()
        assembler = Assembler(max_bytes=min(self.config.max_message_bytes, 1 << 20),
                              max_chunk_bytes=self.config.chunk_bytes)
        hello = None
        try:
            while hello is None:
                hello = assembler.feed(next(frames))
        except (StopIteration, WireError, grpc.RpcError) as exc:
            with self._lock:
                replaced = site is not None and self.pending.get(site) is not context
            if replaced:
                reason = "replaced by a newer stream with the same certificate"
            elif expired.is_set():
                reason = f"no hello within {self.config.hello_timeout:g} s"
            else:
                reason = f"bad hello ({exc or 'stream ended'})"
            self.throttle.warning(site or "?", "hello", "refused connection from %s: %s",
                                  site or context.peer(), reason)
            if context.is_active() and not replaced:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)
        finally:
            timer.cancel()
            if site is not None:
                with self._lock:
                    if self.pending.get(site) is context:
                        del self.pending[site]
        return hello
