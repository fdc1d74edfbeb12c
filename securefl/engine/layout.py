"""The wire codec's direct path for the common field shapes (:mod:`securefl.engine.messages`).

Protocol messages are mostly flat: ``bytes``, ``int`` and ``str`` fields, tuples of ids,
dicts from ids to ``bytes``.  For those the header is written as JSON text directly and read
back field by field, instead of building a tree of nodes for the JSON encoder and walking the
decoded tree node by node.  Nothing about the frame changes:

* :func:`body_text` writes exactly the text ``JSONEncoder(separators=(",", ":"))`` writes for
  the generic tree (strings through the encoder's own ``encode_basestring_ascii``, blobs
  numbered in the same depth-first order); any other value is encoded by the generic path
  (``tree``) and its node by the same JSON encoder (``dumps``), so the frame is byte for byte
  the generic one;
* :func:`read_fields` reads a message's fields when each has the one shape the generic
  encoder writes for its annotation, and the value is then exactly what the generic reader
  builds and passes the annotation's check; on the first field of any other shape it returns
  ``None`` and the caller decodes the whole message the generic way, which gives every
  malformed frame the same error as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from json.encoder import encode_basestring_ascii as _quote
from typing import Any, Protocol

import numpy as np

from securefl.engine.fields import field_checkers, field_hints
from securefl.engine.registry import REGISTRY, Message

__all__ = ["Reader", "Step", "body_text", "checks_of", "direct_message", "field_kinds",
           "key_blobs", "kinds_of", "planned", "read_fields", "replay", "str_to_bytes"]

Tree = Callable[[Any, list[Any], list[Any]], Any]

# field kinds of the read path, by annotation
_KINDS: dict[Any, str] = {bytes: "bytes", int: "int", str: "str", tuple[str, ...]: "ids",
                          dict[str, bytes]: "blob_map", tuple[bytes, ...]: "blob_tuple",
                          np.ndarray: "array"}
_KIND_CACHE: dict[type, dict[str, str]] = {}
_STR = frozenset((str,))
_BYTES = frozenset((bytes,))
_NESTING = 3  # the read path nests at most this deep below a message (dict, pair, blob)
# the steps of a recipe (read_fields, replay): how one field is read from a frame's blobs
_BLOB, _CONST, _RUN, _ARRAY, _MAP, _BLOBS, _NODE, _NESTED = range(8)
#: ``(field, operation, argument)``: one field of a :func:`replay` recipe
Step = tuple[str, int, Any]


def field_kinds(cls: type, hints: Mapping[str, Any]) -> dict[str, str]:
    """``{field: kind}`` of the message class ``cls`` with field annotations ``hints``, for
    the read path: a kind of ``_KINDS``, else ``"other"`` (computed once per class)."""
    kinds = _KIND_CACHE.get(cls)
    if kinds is None:
        kinds = _KIND_CACHE[cls] = {name: _KINDS.get(hint, "other")
                                    for name, hint in hints.items()}
    return kinds


def body_text(msg: Any, names: tuple[str, ...], blobs: list[Any], arrays: list[Any], *,
              tree: Tree, dumps: Callable[[Any], str],
              flat: Callable[[Any], tuple[str, ...] | None]) -> str:
    """The JSON text of ``{"$msg": name, "f": {...}}`` for the registered message ``msg``
    with fields ``names``; ``flat(value)``: the field names of a registered message value
    (written the same way), else ``None``."""
    parts = []
    for name in names:
        value = getattr(msg, name)
        kind = type(value)
        if kind is bytes:
            text = f'{{"$b":{len(blobs)}}}'
            blobs.append(value)
        elif kind is str:
            text = _quote(value)
        elif kind is int:
            text = int.__repr__(value)
        elif value is None:
            text = "null"
        elif kind is dict and str_to_bytes(value):
            text = f'{{"$mb":[{",".join(map(_quote, value))}],"b":{len(blobs)}}}'
            blobs.extend(value.values())
        elif kind is tuple and all(type(v) is str for v in value):
            text = '{"$t":[' + ",".join(map(_quote, value)) + "]}"
        elif (fields := flat(value)) is not None:
            text = body_text(value, fields, blobs, arrays, tree=tree, dumps=dumps, flat=flat)
        else:
            text = dumps(tree(value, blobs, arrays))
        parts.append(f"{_quote(name)}:{text}")
    return f'{{"$msg":{_quote(type(msg).__name__)},"f":{{{",".join(parts)}}}}}'


def str_to_bytes(value: dict[Any, Any]) -> bool:
    """Whether every key of ``value`` is a ``str`` and every value ``bytes`` (a ``$mb``)."""
    return set(map(type, value)) <= _STR and set(map(type, value.values())) <= _BYTES


def key_blobs(reader: Reader, node: dict[str, Any]) -> dict[str, bytes] | None:
    """The dict of a ``{"$mb": [k, ...], "b": i}`` node (``None`` for any other shape)."""
    keys = node.get("$mb")
    if len(node) != 2 or type(keys) is not list or not set(map(type, keys)) <= _STR:
        return None
    return dict(zip(keys, reader.blob_run(node.get("b"), len(keys)), strict=True))


class Reader(Protocol):
    """What :func:`read_fields` needs of the codec's frame reader."""

    def blob_bytes(self, index: Any) -> bytes: ...

    def blob_run(self, first: Any, count: int) -> list[bytes]: ...

    def array(self, index: Any) -> np.ndarray: ...

    def build(self, node: Any, depth: int) -> Any: ...


def read_fields(reader: Reader, fields: dict[str, Any], kinds: Mapping[str, str],
                checks: Mapping[str, Callable[[Any], bool]], depth: int,
                max_depth: int, recipe: list[Step] | None = None) -> dict[str, Any] | None:
    """The values of a message's ``fields`` (the header's ``"f"`` object, whose keys are
    exactly those of ``kinds``) read at ``depth``, or ``None`` where the generic reader must
    decide (module docstring).  ``recipe``, if given, gets one :data:`Step` per field: how
    :func:`replay` reads the same field of another frame with this header."""
    if depth + _NESTING >= max_depth:
        return None
    values: dict[str, Any] = {}
    steps: list[Step] = []
    for name, node in fields.items():
        kind = kinds[name]
        if kind == "bytes":
            if not (type(node) is dict and len(node) == 1 and "$b" in node):
                return None
            values[name] = reader.blob_bytes(node["$b"])
            steps.append((name, _BLOB, node["$b"]))
        elif kind == "int" or kind == "str":
            if type(node) is not (int if kind == "int" else str):
                return None
            values[name] = node
            steps.append((name, _CONST, node))
        elif kind == "ids":
            items = _sequence(node, "$t")
            if items is None or not all(type(v) is str for v in items):
                return None
            values[name] = tuple(items)
            steps.append((name, _CONST, values[name]))  # a tuple of str: immutable
        elif kind == "array":
            if not (type(node) is dict and len(node) == 1 and "$a" in node):
                return None
            values[name] = reader.array(node["$a"])
            steps.append((name, _ARRAY, node["$a"]))
        elif kind == "blob_map":
            mb = type(node) is dict and "$mb" in node
            read = key_blobs(reader, node) if mb else _blob_map(reader, node)
            if read is None:
                return None
            values[name] = read
            steps.append((name, _RUN, (tuple(node["$mb"]), node["b"])) if mb
                         else (name, _MAP, tuple((k, v["$b"]) for k, v in node["$m"])))
        elif kind == "blob_tuple":
            items = _sequence(node, "$t")
            if items is None or not all(type(v) is dict and len(v) == 1 and "$b" in v
                                        for v in items):
                return None
            values[name] = tuple([reader.blob_bytes(v["$b"]) for v in items])
            steps.append((name, _BLOBS, tuple(v["$b"] for v in items)))
        else:  # a nested message is read the same way, and its steps kept with it
            inner: list[Step] = []
            value, cls = planned(reader, node, depth, max_depth, inner)
            if not checks[name](value):
                return None
            values[name] = value
            steps.append((name, _NESTED, (cls, tuple(inner), node)) if cls is not None
                         else (name, _NODE, node))
    if recipe is not None:
        recipe.extend(steps)
    return values


def planned(reader: Reader, node: Any, depth: int, max_depth: int,
            recipe: list[Step]) -> tuple[Any, type | None]:
    """``reader.build(node, depth)``, and the class of the message ``node`` if
    :func:`read_fields` read all its fields (their steps are then in ``recipe``)."""
    if (type(node) is dict and len(node) == 2 and depth < max_depth
            and type(fields := node.get("f")) is dict):
        msg = direct_message(reader, node.get("$msg"), fields, depth + 1, max_depth, recipe)
        if msg is not None:
            return msg, type(msg)
    return reader.build(node, depth), None


def direct_message(reader: Reader, name: Any, fields: dict[str, Any], depth: int,
                   max_depth: int, recipe: list[Step] | None = None) -> Any | None:
    """The registered message ``name`` with the header's ``fields``, read by
    :func:`read_fields` at ``depth``; ``None`` where the generic reader must decide."""
    cls = REGISTRY.get(name) if type(name) is str else None
    if cls is None or fields.keys() != field_hints(cls).keys():
        return None
    values = read_fields(reader, fields, kinds_of(cls), checks_of(cls), depth, max_depth,
                         recipe)
    return None if values is None else cls(**values)


def kinds_of(cls: type) -> dict[str, str]:
    """:func:`field_kinds` of the registered message class ``cls``."""
    return field_kinds(cls, field_hints(cls))


def checks_of(cls: type) -> dict[str, Callable[[Any], bool]]:
    """The field checks of the registered message class ``cls`` (built once per class)."""
    return field_checkers(cls, message=Message)


def replay(reader: Reader, recipe: tuple[Step, ...],
           checks: Mapping[str, Callable[[Any], bool]], depth: int) -> dict[str, Any] | None:
    """What :func:`read_fields` read into ``recipe`` from a frame with the same header text,
    read from ``reader``'s frame (whose blob table that header fixes): the same values,
    without parsing the header again; ``None`` where a field would now fail its check."""
    values: dict[str, Any] = {}
    for name, op, arg in recipe:
        if op == _BLOB:
            values[name] = reader.blob_bytes(arg)
        elif op == _CONST:
            values[name] = arg
        elif op == _RUN:
            keys, first = arg
            values[name] = dict(zip(keys, reader.blob_run(first, len(keys)), strict=True))
        elif op == _ARRAY:
            values[name] = reader.array(arg)
        elif op == _MAP:
            values[name] = {key: reader.blob_bytes(index) for key, index in arg}
        elif op == _BLOBS:
            values[name] = tuple([reader.blob_bytes(index) for index in arg])
        else:
            if op == _NESTED:
                cls, inner, node = arg
                read = replay(reader, inner, checks_of(cls), depth + 1)
                value = cls(**read) if read is not None else reader.build(node, depth)
            else:
                value = reader.build(arg, depth)
            if not checks[name](value):
                return None
            values[name] = value
    return values


def _sequence(node: Any, key: str) -> list[Any] | None:
    if type(node) is dict and len(node) == 1 and type(items := node.get(key)) is list:
        return items
    return None


def _blob_map(reader: Reader, node: Any) -> dict[str, bytes] | None:
    pairs = _sequence(node, "$m")
    if pairs is None:
        return None
    out = {}
    for pair in pairs:
        if not (type(pair) is list and len(pair) == 2 and type(pair[0]) is str):
            return None
        value = pair[1]
        if not (type(value) is dict and len(value) == 1 and "$b" in value):
            return None
        out[pair[0]] = reader.blob_bytes(value["$b"])
    return out
