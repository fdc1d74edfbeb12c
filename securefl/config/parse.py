"""Strict TOML table -> frozen dataclass conversion, shared by every config section.

Each section is a frozen dataclass.  :func:`parse` builds one from a TOML table, refusing
unknown keys and values of the wrong type, and runs the dataclass's ``validate()`` method if
it has one.  Validation failures raise :class:`FieldError`; the top-level loader turns them
into one-line :class:`~securefl.errors.ConfigError` messages such as
``examples/x.toml: [data] alpha must be > 0, got -1``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

__all__ = ["FieldError", "check", "dump_toml", "parse"]

T = TypeVar("T")


class FieldError(ValueError):
    """A field failed validation.  ``table`` is the dotted table path, ``field`` the key."""

    def __init__(self, field: str, problem: str, table: str = "") -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem, self.table = field, problem, table

    def located(self, path: str) -> str:
        where = f"[{self.table}] " if self.table else ""
        return f"{path}: {where}{self.field} {self.problem}"


def check(condition: bool, field: str, problem: str) -> None:
    """Raise :class:`FieldError` for ``field`` unless ``condition`` holds."""
    if not condition:
        raise FieldError(field, problem)


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    if hint is type(None):
        return "absent"
    if origin is tuple:
        return f"a list of {_describe(get_args(hint)[0])}"
    if origin in (dict, Mapping):
        return "a table"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, field: str, table: str) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value in get_args(hint) and type(value) is type(get_args(hint)[0]):
            return value
        raise FieldError(field, f"must be {_describe(hint)}, got {value!r}", table)
    if origin in (Union, types.UnionType):
        for arg in get_args(hint):
            try:
                return _coerce(value, arg, field, table)
            except FieldError:
                continue
        raise FieldError(field, f"must be {_describe(hint)}, got {value!r}", table)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise FieldError(field, f"must be a table, got {value!r}", table)
        return parse(hint, value, f"{table}.{field}" if table else field)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    if origin is tuple and isinstance(value, list):
        item = get_args(hint)[0]
        return tuple(_coerce(v, item, field, table) for v in value)
    if origin in (dict, Mapping) and isinstance(value, dict):
        return types.MappingProxyType(dict(value))
    raise FieldError(field, f"must be {_describe(hint)}, got {value!r}", table)


def parse(cls: type[T], table: Mapping[str, Any], name: str = "") -> T:
    """Build dataclass ``cls`` from ``table``; unknown keys and wrong types are errors.

    ``name`` is the dotted table path used in error messages.  A class may take over its
    own parsing with a ``from_table(table)`` classmethod.
    """
    custom = getattr(cls, "from_table", None)
    if custom is not None:
        try:
            return custom(table)
        except FieldError as exc:
            exc.table = exc.table or name
            raise
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise FieldError(unknown[0], f"is not a known key (allowed: {', '.join(sorted(fields))})",
                         name)
    values = {}
    for key, value in table.items():
        values[key] = _coerce(value, hints[key], key, name)
    try:
        obj = cls(**values)
    except TypeError as exc:
        missing = [f for f, spec in fields.items() if f not in values
                   and spec.default is dataclasses.MISSING
                   and spec.default_factory is dataclasses.MISSING]
        raise FieldError(missing[0] if missing else "table", "is required", name) from exc
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except FieldError as exc:
            exc.table = exc.table or name
            raise
    return obj


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(obj: Any, *, table: str = "") -> str:
    """Render a (nested) config dataclass as TOML that :func:`parse` reads back."""
    scalars: list[str] = []
    tables: list[str] = []
    for spec in dataclasses.fields(obj):
        value = getattr(obj, spec.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            tables.append(dump_toml(value, table=f"{table}.{spec.name}" if table else spec.name))
        elif isinstance(value, Mapping) and spec.name == "options":
            scalars.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
        else:
            scalars.append(f"{spec.name} = {_toml_value(value)}")
    head = [f"[{table}]"] if table and scalars else []
    return "\n".join([*head, *scalars, *("\n" + t for t in tables if t)]).strip() + "\n"
