"""What the wire codec learnt from a frame's header, kept for the next frame with the same
header text (:mod:`securefl.engine.messages`).

Most frames of a round repeat a header byte for byte: every site's key advertisement,
graph reveal, masked input and signature has the same field shapes and blob sizes, and the
sites of a simulation decode the same broadcast requests.  A header fixes everything the
decoder checks except the blobs' bytes (the codec never looks inside a blob): the blob
table, the array descriptions, the tree and the field types.  A :class:`Plan` keeps what
the first decode of a header found, the parsed header and, when the direct path read
every field of the message, its :data:`~securefl.engine.layout.Step` recipe, so that the
next frame with that header text skips the JSON parse and the tree walk and reads its
blobs with the same steps.  A header is planned the second time it is seen (most headers
that name a site's neighbours occur once), and only from a frame that decoded without
error; its length is still checked against the header.  The result is the value a full
decode gives.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, NamedTuple

from securefl.engine.layout import Step
from securefl.errors import MessageError

__all__ = ["MAX_PLANNED_HEADER_BYTES", "MAX_PLANS", "Plan", "lookup", "parse", "remember",
           "wanted"]

#: headers longer than this are decoded in full every time
MAX_PLANNED_HEADER_BYTES = 8192
#: the store is emptied when it holds this many plans (a peer sending ever-new headers
#: costs itself a full decode each, nothing more)
MAX_PLANS = 1024


class Plan(NamedTuple):
    """A decoded header: frame ``version``, the frame length ``end`` its blob table gives,
    the blob ``offsets`` and ``arrays`` table, the parsed ``body``; the top-level
    ``message`` class and the ``recipe`` of its fields when the direct path read them all
    (else ``None`` and ``()``)."""

    version: int
    end: int
    offsets: list[int]
    arrays: list[Any]
    body: Any
    message: type | None
    recipe: tuple[Step, ...]


_PLANS: dict[tuple[int, bytes], Plan] = {}
_SEEN: set[tuple[int, bytes]] = set()


def lookup(header: bytes, version: int) -> Plan | None:
    """The plan of a header text of frame ``version``, if one was remembered."""
    return _PLANS.get((version, header))


def wanted(header: bytes, version: int) -> bool:
    """Whether a header without a plan is worth one: it was seen once before (a header
    that every site of a round sends, not one of the many that name a site's neighbours
    and occur once).  Marks it seen."""
    key = (version, header)
    if key in _SEEN:
        return True
    if len(header) <= MAX_PLANNED_HEADER_BYTES:
        if len(_SEEN) >= MAX_PLANS:
            _SEEN.clear()
        _SEEN.add(key)
    return False


def remember(header: bytes, plan: Plan) -> None:
    """Keep ``plan`` for ``header`` (a header that decoded without error)."""
    if len(header) > MAX_PLANNED_HEADER_BYTES:
        return
    if len(_PLANS) >= MAX_PLANS:
        _PLANS.clear()
    _PLANS[plan.version, header] = plan


def parse(text: bytes, *, start: int, end: int) -> tuple[list[int], list[Any], Any]:
    """The blob offsets, array table and body of a header ``text`` whose blobs span
    ``start:end`` of the frame; :class:`MessageError` unless it is a JSON object with a
    list of non-negative int ``blobs`` sizes that add up, a list of ``arrays`` and a ``body``."""
    try:
        header = json.loads(str(text, "utf-8"))
        sizes = header["blobs"]
        arrays = header["arrays"]
        body = header["body"]
        # json.loads makes ints of exact type int (a bool is not a size)
        well_formed = (type(sizes) is list and set(map(type, sizes)) <= {int}
                       and type(arrays) is list)
    except (ValueError, KeyError, TypeError, RecursionError):
        raise MessageError("malformed message header") from None
    if not well_formed:
        raise MessageError("malformed message header")
    if (sizes and min(sizes) < 0) or start + sum(sizes) != end:
        raise MessageError("message length does not match its header")
    return list(itertools.accumulate(sizes, initial=start)), arrays, body
