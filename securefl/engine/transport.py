"""The Transport seam: send typed messages to a set of clients, gather replies by a deadline.

The server's round loop talks only to this protocol.  :class:`~securefl.engine.simulation.
InProcessTransport` implements it for simulation and :mod:`securefl.runtime` over gRPC.  A
client that misses the deadline, disconnects, fails, or answers with something malformed is
*reported* in :attr:`Exchange.dropped` with a reason; it is never raised.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from securefl.engine.messages import Message

__all__ = ["ClientHandler", "Exchange", "Transport"]


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
class ClientHandler(Protocol):
    """What a transport calls on the client side (see :class:`securefl.engine.client.Client`)."""

    client_id: str

    def handle(self, request: Message, *, round: int) -> Message: ...
