"""Wire envelope: engine messages split into bounded chunks, with round and sequence numbers.

One gRPC stream message is one chunk frame (integers little-endian)::

    b"SFLW" | version u16 | kind u8 | reserved u8 | round i64 | seq u64
            | index u32 | count u32 | total u64 | id length u16 | client id (UTF-8) | chunk

``total`` is the byte length of the whole payload (for requests and replies, one frame made
by :func:`securefl.engine.messages.encode`); the chunks of one payload share every header
field except ``index``, which runs ``0 .. count-1``.  The receiver refuses a payload whose
announced ``total`` exceeds its limit *before* allocating anything, refuses chunks that are
larger than the chunk limit, out of order or inconsistent, grows its buffer only with the
bytes that actually arrived (an announced total reserves nothing), can charge those bytes to
a :class:`ByteBudget` shared by every stream, and hands out only raw bytes: the
engine codec decodes them from JSON and numeric arrays, so no received byte is ever executed
(no pickle).  ``seq`` ties a reply to the one request it answers, which rejects replays;
``round`` rejects messages that belong to another round.
"""

from __future__ import annotations

import enum
import re
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from securefl.config.network import NetworkConfig
from securefl.errors import MessageError

__all__ = ["ENVELOPE_VERSION", "Assembler", "ByteBudget", "Envelope", "Kind", "WireError", "blamed",
           "channel_options", "error_payload", "split"]

ENVELOPE_VERSION = 1
_MAGIC = b"SFLW"
_HEADER = struct.Struct("<4sHBBqQIIQH")
_MAX_ID_BYTES = 128


class WireError(MessageError):
    """A frame violated the envelope format or a limit; the stream it came on is not trusted."""


class Kind(enum.IntEnum):
    HELLO = 1  # client -> server: first frame of a stream, names the site (empty payload)
    REQUEST = 2  # server -> client: an engine message to handle
    REPLY = 3  # client -> server: the handler's answer, same round and seq as the request
    ERROR = 4  # either way: UTF-8 reason; a client that cannot answer says so at once
    CLOSE = 5  # server -> client: the federation is over


@dataclass(frozen=True)
class Envelope:
    kind: Kind
    round: int
    seq: int
    client_id: str
    payload: bytes | bytearray


def split(kind: Kind, payload: bytes | bytearray | memoryview, *, round: int, seq: int,
          client_id: str, chunk_bytes: int) -> Iterator[bytes]:
    """Yield the chunk frames of one payload (lazily: a 200 MB payload is never copied whole)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    ident = client_id.encode()
    if len(ident) > _MAX_ID_BYTES:
        raise ValueError(f"client id longer than {_MAX_ID_BYTES} bytes")
    view = memoryview(payload).cast("B")
    total = view.nbytes
    count = max(1, -(-total // chunk_bytes))
    for index in range(count):
        head = _HEADER.pack(_MAGIC, ENVELOPE_VERSION, int(kind), 0, round, seq, index, count,
                            total, len(ident))
        yield b"".join((head, ident, view[index * chunk_bytes:(index + 1) * chunk_bytes]))


class ByteBudget:
    """Bytes of partly received payloads held at once, over every stream of a server.

    A chunk that does not fit waits up to ``wait`` seconds for other payloads to complete
    (honest sites are slowed, never refused, by a burst); after that its stream fails.
    """

    def __init__(self, limit: int, *, wait: float) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit, self.wait = limit, wait
        self.held = 0
        self._cond = threading.Condition()

    def acquire(self, count: int) -> bool:
        with self._cond:
            room = self._cond.wait_for(lambda: self.held + count <= self.limit, self.wait)
            if room:
                self.held += count
            return room

    def release(self, count: int) -> None:
        with self._cond:
            self.held -= count
            self._cond.notify_all()


class Assembler:
    """Reassemble chunk frames into :class:`Envelope` objects, enforcing the limits.

    :meth:`feed` returns an envelope when its last chunk arrives and ``None`` before that.
    Any violation raises :class:`WireError` and resets the assembler.  Memory held is the
    bytes received so far (charged to ``budget`` when one is given), never the announced total.
    """

    def __init__(self, *, max_bytes: int, max_chunk_bytes: int,
                 budget: ByteBudget | None = None) -> None:
        if max_bytes < 1 or max_chunk_bytes < 1:
            raise ValueError("max_bytes and max_chunk_bytes must be >= 1")
        self.max_bytes = max_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.budget = budget
        self._key: tuple[int, int, int, int, int, str] | None = None
        self._buffer = bytearray()
        self._next = 0

    def _fail(self, reason: str) -> WireError:
        self.reset()
        return WireError(reason)

    @property
    def held(self) -> int:
        """Bytes of the payload in progress held in memory."""
        return len(self._buffer)

    def reset(self) -> None:
        if self.budget is not None and self._buffer:
            self.budget.release(len(self._buffer))
        self._key, self._buffer, self._next = None, bytearray(), 0

    def feed(self, frame: bytes) -> Envelope | None:
        if len(frame) < _HEADER.size:
            raise self._fail(f"truncated frame of {len(frame)} bytes")
        magic, version, kind, _, round_, seq, index, count, total, id_len = (
            _HEADER.unpack_from(frame))
        if magic != _MAGIC:
            raise self._fail("not a securefl frame (bad magic)")
        if version != ENVELOPE_VERSION:
            raise self._fail(f"unsupported envelope version {version}, "
                             f"expected {ENVELOPE_VERSION}")
        if kind not in Kind.__members__.values():
            raise self._fail(f"unknown frame kind {kind}")
        if total > self.max_bytes:
            raise self._fail(f"payload of {total} bytes exceeds the limit of {self.max_bytes}")
        if id_len > _MAX_ID_BYTES or _HEADER.size + id_len > len(frame):
            raise self._fail("malformed client id")
        chunk = memoryview(frame)[_HEADER.size + id_len:]
        if chunk.nbytes > self.max_chunk_bytes:
            raise self._fail(f"chunk of {chunk.nbytes} bytes exceeds the limit of "
                             f"{self.max_chunk_bytes}")
        try:
            client_id = bytes(frame[_HEADER.size:_HEADER.size + id_len]).decode()
        except UnicodeDecodeError:
            raise self._fail("client id is not UTF-8") from None
        if not 0 <= index < count or count > max(1, total):
            raise self._fail(f"chunk index {index} of {count} is out of range")
        key = (kind, round_, seq, count, total, client_id)
        if index == 0:
            if self._key is not None:
                raise self._fail("a new payload started before the previous one was complete")
            self._key, self._next = key, 0
        elif key != self._key or index != self._next:
            raise self._fail(f"chunk {index} does not continue the payload in progress")
        filled = len(self._buffer)
        if filled + chunk.nbytes > total:
            raise self._fail("chunks carry more bytes than the payload announced")
        if self.budget is not None and chunk.nbytes and not self.budget.acquire(chunk.nbytes):
            raise self._fail(f"the receiver already holds {self.budget.held} bytes in flight "
                             f"(limit {self.budget.limit})")
        self._buffer += chunk
        self._next = index + 1
        if self._next < count:
            return None
        if len(self._buffer) != total:
            raise self._fail(f"payload ended after {len(self._buffer)} of {total} bytes")
        envelope = Envelope(Kind(kind), round_, seq, client_id, self._buffer)
        self.reset()
        return envelope


#: room for the envelope header around one chunk in a gRPC message
_FRAME_SLACK = 4096


def channel_options(config: NetworkConfig) -> list[tuple[str, Any]]:
    """gRPC options: one frame is at most a chunk plus the envelope header."""
    limit = config.chunk_bytes + _FRAME_SLACK
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
            ("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # the server accepts the sites' keepalive pings (20 s) on idle streams
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 0)]


_SUSPECT = re.compile(r"\[suspect: ([^\]]{1,64})\]$")


def error_payload(exc: BaseException) -> bytes:
    """An ERROR frame's UTF-8 text: ``"<type>: <message>"``, and ``" [suspect: <site>]"``
    when the failure is blamed on another party (an exception with a ``suspect`` attribute,
    e.g. the sender of a share bundle that failed authentication)."""
    text = f"{type(exc).__name__}: {exc}"
    suspect = getattr(exc, "suspect", None)
    if isinstance(suspect, str) and suspect:
        text += f" [suspect: {suspect}]"
    return text.encode()


def blamed(text: str) -> str | None:
    """The ``<site>`` an ERROR frame's text (:func:`error_payload`) ends in, at most 64
    characters, else None."""
    match = _SUSPECT.search(text)
    return None if match is None else match.group(1)
