"""The structural type checks of the wire codec (:mod:`securefl.engine.messages`).

A decoded message is built only after every field has been checked against its dataclass
annotation.  Each check is compiled once per annotation and cached per message class: an
``int`` is never a ``bool``, a ``float`` field accepts ints, containers are checked element
by element, a nested message must be an instance of the annotated message type (a subclass
of the codec's ``message`` base), and anything unlisted is rejected.
"""

from __future__ import annotations

import dataclasses
import itertools
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Union, get_args, get_origin

import numpy as np

__all__ = ["field_checkers", "field_hints", "field_names"]

Check = Callable[[Any], bool]

_HINT_CACHE: dict[type, dict[str, Any]] = {}
_CHECKER_CACHE: dict[type, dict[str, Check]] = {}
_FIELD_CACHE: dict[type, tuple[str, ...]] = {}


def field_names(cls: type) -> tuple[str, ...]:
    """The dataclass fields of ``cls``, in declaration order (the order on the wire)."""
    if cls not in _FIELD_CACHE:
        _FIELD_CACHE[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return _FIELD_CACHE[cls]


def field_hints(cls: type) -> dict[str, Any]:
    """``{field: resolved annotation}`` of the dataclass ``cls``."""
    if cls not in _HINT_CACHE:
        hints = typing.get_type_hints(cls)
        _HINT_CACHE[cls] = {name: hints[name] for name in field_names(cls)}
    return _HINT_CACHE[cls]


def field_checkers(cls: type, *, message: type) -> dict[str, Check]:
    """``{field: check}`` of the dataclass ``cls``; ``message``: the base class of every
    wire message (see the module docstring)."""
    if cls not in _CHECKER_CACHE:
        _CHECKER_CACHE[cls] = {name: _checker(hint, message)
                               for name, hint in field_hints(cls).items()}
    return _CHECKER_CACHE[cls]


def _checker(hint: Any, message: type) -> Check:
    if hint is Any:
        return lambda value: True
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        options = tuple(_checker(h, message) for h in args)
        return lambda value: any(check(value) for check in options)
    if hint is None or hint is type(None):
        return lambda value: value is None
    if hint is float:
        return lambda value: isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return lambda value: isinstance(value, int) and not isinstance(value, bool)
    if hint in (bool, str, bytes, np.ndarray):
        return lambda value: isinstance(value, hint)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            each = _every(args[0], message)
            return lambda value: isinstance(value, tuple) and each(value)
        fixed = tuple(_checker(a, message) for a in args)
        return lambda value: isinstance(value, tuple) and len(value) == len(fixed) and all(
            check(v) for check, v in zip(fixed, value, strict=True))
    if origin is list:
        each = _every(args[0] if args else Any, message)
        return lambda value: isinstance(value, list) and each(value)
    if origin is dict:
        keys, values = (_every(a, message) for a in (args or (Any, Any)))
        return lambda value: isinstance(value, dict) and keys(value) and values(
            value.values())
    if isinstance(hint, type) and issubclass(hint, message):
        return lambda value: isinstance(value, hint)
    return lambda value: False


def _every(hint: Any, message: type) -> Callable[[Iterable[Any]], bool]:
    """``all(check(v) for v in values)``, looped in C (``map``); a plain ``isinstance`` for
    the common leaf types."""
    if hint in (str, bytes, np.ndarray):
        return lambda values: all(map(isinstance, values, itertools.repeat(hint)))
    check = _checker(hint, message)
    return lambda values: all(map(check, values))
