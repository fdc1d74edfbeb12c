"""Bounds on everything a site sends, checked after decoding and before the engine sees it.

The codec (:mod:`securefl.engine.messages`) guarantees *types*; this module guarantees
*values*.  A reply is refused (the site is dropped from the exchange, with one log line naming
it) when

* any float, or any element of a float array, is NaN or infinite, or leaves the float32
  range when cast to float32 (the cast is performed and checked, never assumed: a finite
  float64 ``1e300`` becomes ``inf``);
* an update vector (:data:`UPDATE_FIELDS`) has an element of magnitude above ``max_value``;
* an aggregation weight (:data:`WEIGHT_FIELDS`) is not in ``(0, max_weight]``;
* a reported metric is not finite or out of its range: ``epsilon`` in ``[0, max_epsilon]``,
  ``delta`` in ``[0, 1]``, every other metric of magnitude at most ``max_value``; more than
  :data:`MAX_METRICS` metrics, or a metric name longer than :data:`MAX_NAME`;
* an evaluation result has ``accuracy`` outside ``[0, 1]``, a negative ``loss`` or
  ``num_examples`` outside ``[0, max_weight]``.

Every string is truncated to ``max_string`` characters (a decline reason of 4 MiB is kept as
its first 2048 characters).  Update vectors are returned as float32, the dtype the engine
aggregates, so the checked cast is the one used.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from securefl.config.network import NetworkConfig
from securefl.engine.messages import EvaluateRes, FitRes, Message

__all__ = ["MAX_METRICS", "MAX_NAME", "UPDATE_FIELDS", "WEIGHT_FIELDS", "Limits", "Refused",
           "sanitize"]

#: (message type, field) holding one site's update vector, bounded by ``max_value``
UPDATE_FIELDS = frozenset({("PlainUpdate", "update"), ("HEUpload", "clear")})
#: (message type, field) holding an aggregation weight, in ``(0, max_weight]``
WEIGHT_FIELDS = frozenset({("PlainUpdate", "weight"), ("HEUpload", "weight")})
MAX_METRICS = 64
MAX_NAME = 64
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class Refused(ValueError):
    """A message from a site is out of bounds; the text says which value and why."""


@dataclass(frozen=True)
class Limits:
    max_value: float = 1e6
    max_weight: float = 1e9
    max_epsilon: float = 1e6
    max_string: int = 2048

    @classmethod
    def of(cls, config: NetworkConfig) -> Limits:
        return cls(max_value=config.max_value, max_weight=config.max_weight,
                   max_epsilon=config.max_epsilon, max_string=config.max_string)


def _number(value: float, where: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        number = math.inf
    if not (math.isfinite(number) and low <= number <= high):
        raise Refused(f"{where} = {str(value)[:32]} is not finite and in [{low:g}, {high:g}]")
    return value


def _array(value: np.ndarray, where: str, bound: float) -> np.ndarray:
    if value.dtype.kind == "c":
        raise Refused(f"{where} is a complex array")
    if value.dtype.kind != "f":
        return value
    with np.errstate(over="ignore"):  # an overflow becomes inf, which is refused below
        cast = value.astype(np.float32, copy=False)
    if cast.size:
        low, high = float(cast.min()), float(cast.max())
        if not (math.isfinite(low) and math.isfinite(high) and -bound <= low
                and high <= bound):
            raise Refused(f"{where} has values outside [-{bound:g}, {bound:g}] (or NaN/Inf) "
                          "as float32")
    return cast


def _metrics(metrics: dict[str, float], limits: Limits) -> dict[str, float]:
    if len(metrics) > MAX_METRICS:
        raise Refused(f"{len(metrics)} metrics, at most {MAX_METRICS} allowed")
    out = {}
    for name, value in metrics.items():
        if len(name) > MAX_NAME:
            raise Refused(f"a metric name of {len(name)} characters (at most {MAX_NAME})")
        where = f"metric {name!r}"
        if name == "epsilon":
            out[name] = _number(value, where, 0.0, limits.max_epsilon)
        elif name == "delta":
            out[name] = _number(value, where, 0.0, 1.0)
        else:
            out[name] = _number(value, where, -limits.max_value, limits.max_value)
    return out


def sanitize(message: Message, *, limits: Limits) -> Message:
    """``message`` with its strings truncated and update vectors as float32, or :class:`Refused`.

    One pass over the message tree; arrays are scanned once (min and max of the float32
    cast), so the cost is one read of the payload.
    """

    def walk(value: Any, where: str, bound: float) -> Any:
        if isinstance(value, bool) or value is None or isinstance(value, int | bytes):
            return value
        if isinstance(value, float):
            return _number(value, where, -bound, bound)
        if isinstance(value, str):
            return value[:limits.max_string]
        if isinstance(value, np.ndarray):
            return _array(value, where, bound)
        if isinstance(value, tuple):
            return tuple(walk(v, where, bound) for v in value)
        if isinstance(value, list):
            return [walk(v, where, bound) for v in value]
        if isinstance(value, dict):
            return {k[:limits.max_string] if isinstance(k, str) else k: walk(v, where, bound)
                    for k, v in value.items()}
        if isinstance(value, Message):
            return node(value)
        raise Refused(f"{where} has an unexpected type {type(value).__name__}")

    def node(msg: Message) -> Message:
        name = type(msg).__name__
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(msg):  # type: ignore[arg-type]
            value, where = getattr(msg, f.name), f"{name}.{f.name}"
            if (name, f.name) in WEIGHT_FIELDS:
                changes[f.name] = _number(value, where, 0.0, limits.max_weight)
                if value <= 0:
                    raise Refused(f"{where} = {value!r} must be > 0")
            elif (name, f.name) in UPDATE_FIELDS:
                changes[f.name] = walk(value, where, limits.max_value)
            elif isinstance(msg, FitRes) and f.name == "metrics":
                changes[f.name] = _metrics(value, limits)
            else:
                changes[f.name] = walk(value, where, _FLOAT32_MAX)
        if isinstance(msg, EvaluateRes):
            _number(msg.accuracy, f"{name}.accuracy", 0.0, 1.0)
            _number(msg.loss, f"{name}.loss", 0.0, _FLOAT32_MAX)
            _number(msg.num_examples, f"{name}.num_examples", 0, limits.max_weight)
        return dataclasses.replace(msg, **changes)  # type: ignore[type-var]

    return node(message)
