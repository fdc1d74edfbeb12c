"""The wire message types: the :class:`Message` base, the :func:`message` decorator and the
registry by name that the codec (:mod:`securefl.engine.messages`) encodes and decodes."""

from __future__ import annotations

import dataclasses
import typing
from typing import TypeVar

__all__ = ["REGISTRY", "Message", "message", "registered"]

T = TypeVar("T")
#: name -> frozen dataclass of every registered message type
REGISTRY: dict[str, type] = {}


class Message:
    """Marker base class of every wire message."""


@typing.dataclass_transform(frozen_default=True, eq_default=False)
def message(cls: type[T]) -> type[T]:
    """Class decorator: make ``cls`` a frozen message dataclass and register it by name."""
    if cls.__name__ in REGISTRY:
        raise TypeError(f"message type {cls.__name__!r} is already registered")
    if not issubclass(cls, Message):
        raise TypeError(f"{cls.__name__} must subclass securefl.engine.messages.Message")
    data_cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    REGISTRY[cls.__name__] = data_cls
    return data_cls


def registered() -> dict[str, type]:
    """A copy of the name -> class registry (used by the round-trip contract tests)."""
    return dict(REGISTRY)
