"""Typed engine messages and their explicit, code-free wire encoding.

Every message is a frozen dataclass registered with :func:`message`.  Fields may hold
``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, ``numpy.ndarray`` (numeric dtypes
only), other messages, and ``tuple``/``list``/``dict`` of those.

Frame layout (all integers little-endian)::

    b"SFLM" | version: u16 | header length: u32 | header (UTF-8 JSON) | blob 0 | blob 1 | ...

The JSON header names the message type and describes its fields as a tree in which
``{"$b": i}`` is blob ``i`` (raw bytes), ``{"$a": i}`` is an array whose dtype and shape sit
in ``header["arrays"][i]`` and whose bytes are a blob, ``{"$t": [...]}`` a tuple,
``{"$m": [[k, v], ...]}`` a dict (keys ``int`` or ``str``), ``{"$mb": [k, ...], "b": i}`` a
dict of ``str`` keys to the blobs ``i, i + 1, ...`` (version 2; version 1 lacks only it) and
``{"$msg": name, "f": {...}}`` a nested message.  Decoding never executes code: arrays are
rebuilt with :func:`numpy.frombuffer` from a whitelist of dtypes (no object dtype, no
pickle), and every decoded field is checked against the dataclass annotations first.

Decoding a frame from another party raises :class:`~securefl.errors.MessageError` and nothing
else: the header is at most ``max_header_bytes`` (default :data:`MAX_HEADER_BYTES`, 1 MiB),
its tree at most :data:`MAX_DEPTH` (32) containers deep, an array at most :data:`MAX_NDIM`
dimensions whose element count is computed exactly (no int64 wrap-around), and any other
failure inside the decoder is reported as a malformed message.  A header text decoded once
is not parsed again (:mod:`securefl.engine.plans`): the next frame with the same header
reads its blobs with the steps the first one found, and gets the same value.
"""

from __future__ import annotations

import itertools
import json
import struct
from typing import Any, TypeVar

import numpy as np

from securefl.engine import layout, plans
from securefl.engine.fields import field_hints, field_names
from securefl.engine.registry import REGISTRY as _REGISTRY
from securefl.engine.registry import Message, message, registered
from securefl.errors import MessageError

__all__ = [
    "DEFAULT_MAX_BYTES", "MAX_DEPTH", "MAX_HEADER_BYTES", "MAX_NDIM", "WIRE_VERSION",
    "Decline", "EvaluateIns", "EvaluateRes", "FitIns", "FitRes", "Message", "PlainUpdate",
    "decode", "encode", "message", "registered",
]

WIRE_VERSION = 2
_READABLE = frozenset((1, WIRE_VERSION))  # version 1: the same frames without ``$mb`` nodes
DEFAULT_MAX_BYTES = 1 << 31
MAX_HEADER_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NDIM = 32
_MAGIC = b"SFLM"
_PREFIX = struct.Struct("<4sHI")
_DTYPES = frozenset(
    np.dtype(t).str
    for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
              "uint64", "float16", "float32", "float64", "complex64", "complex128")
)

#: the types ``json.loads`` builds scalars of; ``encode`` passes their subclasses through too
_JSON_SCALARS = frozenset((type(None), bool, int, float, str))
_SCALAR_TYPES = (bool, int, float, str)
_KEY_TYPES = frozenset((int, str))
T = TypeVar("T")
# the tree holds fresh containers only, so the circular-reference check is skipped
_HEADER = json.JSONEncoder(separators=(",", ":"), allow_nan=True, check_circular=False)


# ----------------------------------------------------------------------------- encoding
# The codec's recursion lives in module-level functions and a small reader class, never in
# nested closures: a recursive closure is a reference cycle, which would keep every frame's
# blob list (the sender's 400 KB masked input, say) alive until the garbage collector runs.
def encode(msg: Message) -> bytes:
    """Serialize a registered message into one self-describing frame."""
    blobs: list[bytes | memoryview] = []
    arrays: list[dict[str, Any]] = []
    names = _registered_fields(msg)
    if names is None:
        raise MessageError("only registered messages can be encoded")
    body = layout.body_text(msg, names, blobs, arrays, tree=_tree, dumps=_HEADER.encode,
                     flat=_registered_fields)
    sizes = ",".join([str(len(b) if isinstance(b, bytes) else b.nbytes) for b in blobs])
    header = f'{{"body":{body},"arrays":{_HEADER.encode(arrays)},"blobs":[{sizes}]}}'.encode()
    return b"".join([_PREFIX.pack(_MAGIC, WIRE_VERSION, len(header)), header, *blobs])


def _registered_fields(value: Any) -> tuple[str, ...] | None:
    """The wire fields of ``value`` if the generic tree writes it as a message, else None."""
    if isinstance(value, Message) and type(value).__name__ in _REGISTRY:
        return field_names(type(value))
    return None


def _tree(value: Any, blobs: list[bytes | memoryview], arrays: list[dict[str, Any]]) -> Any:
    """The header node of ``value``; its raw bytes go to ``blobs``, its arrays to ``arrays``."""
    if type(value) is bytes:  # the common leaf of protocol messages
        blobs.append(value)
        return {"$b": len(blobs) - 1}
    if type(value) in _JSON_SCALARS or isinstance(value, _SCALAR_TYPES):
        return value
    if isinstance(value, bytes | bytearray):
        blobs.append(bytes(value))
        return {"$b": len(blobs) - 1}
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        if array.dtype.str not in _DTYPES:
            raise MessageError(f"array dtype {array.dtype} cannot be sent")
        blobs.append(memoryview(array.data).cast("B"))
        arrays.append({"blob": len(blobs) - 1, "dtype": array.dtype.str,
                       "shape": list(array.shape)})
        return {"$a": len(arrays) - 1}
    if isinstance(value, np.generic):
        return _tree(value.item(), blobs, arrays)
    if isinstance(value, tuple):
        return {"$t": [_tree(v, blobs, arrays) for v in value]}
    if isinstance(value, list):
        return [_tree(v, blobs, arrays) for v in value]
    if isinstance(value, dict):
        if layout.str_to_bytes(value):  # ids to blobs, the shape of most protocol dicts
            start = len(blobs)
            blobs.extend(value.values())
            return {"$mb": list(value), "b": start}
        for key in value:
            if type(key) is not str and (not isinstance(key, int | str)
                                         or isinstance(key, bool)):
                raise MessageError(f"dict key {key!r} must be int or str")
        return {"$m": [[k, _tree(v, blobs, arrays)] for k, v in value.items()]}
    if isinstance(value, Message) and type(value).__name__ in _REGISTRY:
        return {"$msg": type(value).__name__, "f": {
            name: _tree(getattr(value, name), blobs, arrays)
            for name in field_names(type(value))}}
    raise MessageError(f"cannot encode a value of type {type(value).__name__}")


# ----------------------------------------------------------------------------- decoding
def decode(frame: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES,
           max_header_bytes: int = MAX_HEADER_BYTES, expect: type[T] | None = None) -> T:
    """Parse and validate a frame made by :func:`encode`.

    Raises :class:`MessageError`, and only that, on anything malformed: bad magic or version,
    a frame larger than ``max_bytes`` or a header larger than ``max_header_bytes``, a tree
    deeper than :data:`MAX_DEPTH`, lengths or shapes that do not add up, an unknown type, an
    unknown or missing field, or a field whose type disagrees with the dataclass annotation.
    """
    try:
        return _decode(frame, max_bytes=max_bytes, max_header_bytes=max_header_bytes,
                       expect=expect)
    except MessageError:
        raise
    except Exception as exc:  # the codec has one error type, whatever broke inside it
        raise MessageError(f"malformed message ({type(exc).__name__})") from None


def _decode(frame: bytes | bytearray | memoryview, *, max_bytes: int, max_header_bytes: int,
            expect: type[T] | None) -> T:
    view = memoryview(frame).cast("B")
    if view.nbytes > max_bytes:
        raise MessageError(f"message of {view.nbytes} bytes exceeds the limit of {max_bytes}")
    if view.nbytes < _PREFIX.size:
        raise MessageError("truncated message")
    magic, version, header_len = _PREFIX.unpack_from(view)
    if magic != _MAGIC:
        raise MessageError("not a securefl message")
    if version not in _READABLE:
        raise MessageError(f"unsupported wire version {version}, expected {WIRE_VERSION}")
    if header_len > max_header_bytes:
        raise MessageError(f"message header of {header_len} bytes exceeds the limit of "
                           f"{max_header_bytes}")
    start = _PREFIX.size + header_len
    if start > view.nbytes:
        raise MessageError("truncated message header")
    text = view[_PREFIX.size:start].tobytes()
    plan = plans.lookup(text, version)
    if plan is not None:  # a header decoded before (securefl.engine.plans)
        if plan.end != view.nbytes:
            raise MessageError("message length does not match its header")
        reader, cls = _Reader(frame, view, plan.offsets, plan.arrays), plan.message
        values = None if cls is None else layout.replay(reader, plan.recipe,
                                                        layout.checks_of(cls), 1)
        msg = reader.build(plan.body, 0) if cls is None or values is None else cls(**values)
    else:
        msg, fresh = _first(frame, view, text, version, start)
    if not isinstance(msg, Message):
        raise MessageError("message body is not a message")
    if plan is None and fresh is not None:
        plans.remember(text, fresh)  # only a frame that decoded
    if expect is not None and not isinstance(msg, expect):
        raise MessageError(f"expected {expect.__name__}, got {type(msg).__name__}")
    return msg  # type: ignore[return-value]


def _first(frame: bytes | bytearray | memoryview, view: memoryview, text: bytes, version: int,
           start: int) -> tuple[Any, plans.Plan | None]:
    """The value of a frame whose header has no plan yet, and the plan it gives if wanted."""
    offsets, arrays, body = plans.parse(text, start=start, end=view.nbytes)
    reader = _Reader(frame, view, offsets, arrays)
    if not plans.wanted(text, version):
        return reader.build(body, 0), None
    recipe: list[layout.Step] = []
    msg, cls = layout.planned(reader, body, 0, MAX_DEPTH, recipe)
    return msg, plans.Plan(version, view.nbytes, offsets, arrays, body, cls,
                           tuple(recipe) if cls else ())


class _Reader:
    """The values of one frame's header tree: blob ``i`` spans ``offsets[i]:offsets[i + 1]``
    of ``view``; ``arrays`` is the header's array table."""

    __slots__ = ("arrays", "count", "offsets", "view", "whole")

    def __init__(self, frame: bytes | bytearray | memoryview, view: memoryview,
                 offsets: list[int], arrays: list[Any]) -> None:
        self.view, self.offsets, self.arrays = view, offsets, arrays
        self.count = len(offsets) - 1
        self.whole = frame if type(frame) is bytes else None  # a slice of it copies once

    def blob(self, index: Any) -> memoryview:
        if not isinstance(index, int) or not 0 <= index < self.count:
            raise MessageError("message refers to a missing blob")
        return self.view[self.offsets[index]:self.offsets[index + 1]]

    def blob_bytes(self, index: Any) -> bytes:
        if not isinstance(index, int) or not 0 <= index < self.count:
            raise MessageError("message refers to a missing blob")
        if self.whole is not None:
            return self.whole[self.offsets[index]:self.offsets[index + 1]]
        return bytes(self.view[self.offsets[index]:self.offsets[index + 1]])

    def blob_run(self, first: Any, count: int) -> list[bytes]:
        """Blobs ``first .. first + count - 1`` as ``bytes``."""
        if type(first) is not int or not 0 <= first <= first + count <= self.count:
            raise MessageError("message refers to a missing blob")
        spans = itertools.pairwise(self.offsets[first:first + count + 1])
        source = self.whole if self.whole is not None else self.view
        return [bytes(source[start:stop]) for start, stop in spans]

    def array(self, index: Any) -> np.ndarray:
        if not isinstance(index, int) or not 0 <= index < len(self.arrays):
            raise MessageError("message refers to a missing array")
        spec = self.arrays[index]
        try:
            dtype = np.dtype(spec["dtype"]) if spec["dtype"] in _DTYPES else None
            shape = tuple(spec["shape"])
            raw = self.blob(spec["blob"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageError("malformed array description") from exc
        if dtype is None:
            raise MessageError(f"array dtype {str(spec['dtype'])[:32]!r} is not allowed")
        if len(shape) > MAX_NDIM or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise MessageError("malformed array shape")
        count = 1
        for s in shape:  # exact Python integers: [2**32, 2**32] cannot wrap around to 0
            count *= s
        if count * dtype.itemsize != raw.nbytes:
            raise MessageError("array shape does not match its bytes")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def items(self, nodes: list[Any], depth: int) -> list[Any]:
        return [v if type(v) in _JSON_SCALARS else self.build(v, depth) for v in nodes]

    def build(self, node: Any, depth: int) -> Any:
        kind = type(node)  # json.loads makes exactly these types, never subclasses
        if kind in _JSON_SCALARS:
            return node
        if depth >= MAX_DEPTH:
            raise MessageError(f"message nests deeper than {MAX_DEPTH} levels")
        depth += 1
        if kind is list:
            return self.items(node, depth)
        if kind is dict and len(node) in (1, 2):
            if "$b" in node:
                return self.blob_bytes(node["$b"])
            if "$a" in node:
                return self.array(node["$a"])
            if "$t" in node and type(node["$t"]) is list:
                return tuple(self.items(node["$t"], depth))
            if "$m" in node and type(node["$m"]) is list:
                return self.entries(node["$m"], depth)
            if "$mb" in node and (table := layout.key_blobs(self, node)) is not None:
                return table
            if "$msg" in node and type(node.get("f")) is dict:
                fields, name = node["f"], node["$msg"]
                msg = layout.direct_message(self, name, fields, depth, MAX_DEPTH)
                if msg is not None:
                    return msg
                return _construct(name, dict(zip(
                    fields, self.items(list(fields.values()), depth), strict=True)))
        raise MessageError("malformed message body")

    def entries(self, pairs: list[Any], depth: int) -> dict[Any, Any]:
        """A ``$m`` node's dict; a ``{"$b": i}`` value (the common one) is read inline."""
        out = {}
        for pair in pairs:
            if not (type(pair) is list and len(pair) == 2 and type(pair[0]) in _KEY_TYPES):
                raise MessageError("malformed dict entry")
            key, value = pair
            kind = type(value)
            if kind is dict and len(value) == 1 and "$b" in value and depth < MAX_DEPTH:
                out[key] = self.blob_bytes(value["$b"])
            else:
                out[key] = value if kind in _JSON_SCALARS else self.build(value, depth)
        return out


def _construct(name: Any, fields: dict[str, Any]) -> Message:
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise MessageError(f"unknown message type {str(name)[:64]!r}")
    hints = field_hints(cls)
    if fields.keys() != hints.keys():
        raise MessageError(f"{name}: fields {sorted(fields)[:16]} do not match "
                           f"{sorted(hints)}")
    checkers = layout.checks_of(cls)
    for key, value in fields.items():
        if not checkers[key](value):
            raise MessageError(f"{name}.{key} has the wrong type ({type(value).__name__})")
    return cls(**fields)


# ----------------------------------------------------------------------------- engine messages
@message
class FitIns(Message):
    """Server -> client: train from ``parameters``; ``protection`` opens the protection's round;
    ``run``: the run id (:data:`~securefl.engine.session.RUN_ID_BYTES` bytes) a site pins in
    its :class:`~securefl.engine.session.ReleaseLog`."""

    run: bytes
    round: int
    parameters: np.ndarray
    config: dict[str, Any]
    protection: Message | None


@message
class FitRes(Message):
    """Client -> server: the protection's first reply (e.g. a :class:`PlainUpdate`) and metrics."""

    payload: Message
    metrics: dict[str, float]


@message
class EvaluateIns(Message):
    """Server -> client: evaluate ``parameters`` on the client's own validation split."""

    round: int
    parameters: np.ndarray


@message
class EvaluateRes(Message):
    """Client -> server: weighted federated evaluation result."""

    num_examples: int
    loss: float
    accuracy: float


@message
class Decline(Message):
    """Client -> server: the client will not take part in this round (e.g. budget exhausted)."""

    reason: str


@message
class PlainUpdate(Message):
    """The unprotected update: the delta and its aggregation weight."""

    update: np.ndarray
    weight: float
