"""The Transport seam: send typed messages to a set of clients, gather replies by a deadline.

The server's round loop talks only to this protocol.  :class:`~securefl.engine.simulation.
InProcessTransport` implements it for simulation and :mod:`securefl.runtime` over gRPC.  A
client that misses the deadline, disconnects, fails, or answers with something malformed is
*reported* in :attr:`Exchange.dropped` with a reason; it is never raised.

A transport that can (:class:`HandsOver`, the in-process one) also takes ``on_reply``: it
calls it with each reply once it has accepted it (decoded, on time) and keeps what it returns
in :attr:`Exchange.replies`, so the server can consume a large reply as it arrives instead
of holding every reply of the exchange (a SecAgg+ server sums the masked inputs so).  The
server applies the same hook after the exchange for a transport that cannot.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from securefl.engine.messages import Message

__all__ = ["ClientHandler", "Exchange", "HandsOver", "ReplyHook", "Transport"]

#: ``(client id, accepted reply) -> what the exchange keeps of it``
ReplyHook = Callable[[str, Message], Message]


@dataclass
class Exchange:
    """Replies by client id, and the clients that did not reply, each with a reason."""

    replies: dict[str, Message] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Transport(Protocol):
    def client_ids(self) -> list[str]:
        """Clients currently available for sampling, in a stable order."""
        ...

    def exchange(self, requests: Mapping[str, Message], *, round: int,
                 timeout: float | None = None) -> Exchange:
        """Deliver ``requests[c]`` to each client ``c`` and gather the replies."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class HandsOver(Protocol):
    """A transport whose ``exchange`` also takes ``on_reply`` (module docstring)."""

    hands_over_replies: bool

    def exchange(self, requests: Mapping[str, Message], *, round: int,
                 timeout: float | None = None, on_reply: ReplyHook | None = None) -> Exchange:
        """:meth:`Transport.exchange`; each accepted reply ``m`` of client ``c`` is kept as
        ``on_reply(c, m)``, called in the caller's thread, one reply at a time."""
        ...


@runtime_checkable
class ClientHandler(Protocol):
    """What a transport calls on the client side (see :class:`securefl.engine.client.Client`)."""

    client_id: str

    def handle(self, request: Message, *, round: int) -> Message: ...
