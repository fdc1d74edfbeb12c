"""The hello check: a site and the server agree on the model and the protection before round 1.

Each side builds a :class:`Manifest` from its own configuration and its own model: the model's
parameter layout (name, shape and dtype of every parameter, in
:class:`~securefl.vector.Layout` order) and the settings that must be equal at every party
(:func:`shared_settings`).  The site sends its manifest in its hello frame; the server
compares it with its own and refuses the connection (``FAILED_PRECONDITION``, the difference
in the status and in the server's log, naming the site) when they differ.  The server then
announces its own manifest as the first frame of the stream, and the site checks it the same
way before it answers any request: the server is an adversary too, so a site never trusts the
server's verdict alone, and a stream whose first frame is not the announcement is refused.

Settings that each site chooses for itself are deliberately left out: ``[privacy] budget``
(a site may spend less), ``secure_mode``, ``fix_model`` and ``grad_sample_mode`` (how a site
draws and computes, not what the federation is), and ``[protection.secagg] threshold`` and
``min_neighbours`` (each site's own floor on what the server may announce).

Everything in a received manifest is bounded before it is compared: at most
:data:`MAX_MANIFEST_BYTES` on the wire, :data:`MAX_PARAMETERS` parameters of at most
:data:`MAX_NDIM` dimensions, names of at most :data:`MAX_NAME` characters, at most
:data:`MAX_SETTINGS` settings.  A violation is :class:`ManifestError` with one line.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from torch import nn

from securefl.config import Config
from securefl.engine.messages import Message, decode, encode, message
from securefl.errors import MessageError, SecureFLError
from securefl.provenance import layout_record

__all__ = ["MAX_MANIFEST_BYTES", "Manifest", "ManifestError", "announce", "difference",
           "hello_refusal", "manifest_of", "read_manifest", "shared_settings"]

MAX_MANIFEST_BYTES = 1 << 20
MAX_PARAMETERS = 10_000
MAX_NDIM = 8
MAX_DIM = 1 << 31
MAX_NAME = 256
MAX_SETTINGS = 128
MAX_VALUE = 256
#: differences listed in one error line; the rest are counted
MAX_LISTED = 6

#: the ``[privacy]`` fields every party must share (the rest are each site's own choice)
_PRIVACY = ("target_epsilon", "delta", "noise_multiplier", "max_grad_norm", "accountant",
            "clip_norm", "adaptive_clipping", "target_quantile", "clip_learning_rate",
            "clipped_count_stddev", "sampling", "participation_quantile")


class ManifestError(SecureFLError):
    """A manifest from another party is malformed or out of bounds."""


@message
class Manifest(Message):
    """One party's view of the federation: ``layout`` rows are ``(name, shape, dtype)``;
    ``settings`` maps ``"[section] field"`` to its canonical text."""

    layout: list[tuple[str, tuple[int, ...], str]]
    settings: dict[str, str]


def _text(value: Any) -> str:
    """Canonical text of a setting: 8 and 8.0 are both ``"8"``, tuples are JSON lists."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int | float):
        number = float(value)
        if math.isfinite(number) and number == int(number) and abs(number) < 2 ** 53:
            return str(int(number))
        return repr(number)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    return json.dumps(str(value))


def shared_settings(config: Config) -> dict[str, str]:
    """The protection and privacy settings that must be equal at every party."""
    protection = config.protection
    out = {"[protection] kind": _text(protection.kind),
           "[privacy] mode": _text(config.privacy.mode)}
    if protection.kind == "secagg":
        from securefl.secagg.prg import WIRE_VERSION

        out["securefl secagg wire version"] = str(WIRE_VERSION)
        for name in ("clip", "max_weight", "bits"):
            out[f"[protection.secagg] {name}"] = _text(getattr(protection.secagg, name))
    if protection.kind == "he":
        for f in dataclasses.fields(protection.he):
            out[f"[protection.he] {f.name}"] = _text(getattr(protection.he, f.name))
    if config.privacy.mode != "none":
        for name in _PRIVACY:
            out[f"[privacy] {name}"] = _text(getattr(config.privacy, name))
        if config.privacy.target_epsilon is not None:
            # the noise is calibrated from target_epsilon over the whole planned run
            out["[run] rounds"] = _text(config.run.rounds)
    return out


def manifest_of(config: Config, model: nn.Module) -> Manifest:
    """This party's manifest: ``model``'s layout and ``config``'s shared settings."""
    layout, _ = layout_record(model)
    return Manifest(layout=[(p["name"], tuple(p["shape"]), p["dtype"]) for p in layout],
                    settings=shared_settings(config))


def read_manifest(payload: bytes | bytearray, *, sender: str) -> Manifest:
    """Decode and bound a manifest that ``sender`` sent; :class:`ManifestError` otherwise."""
    if len(payload) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{sender} sent a manifest of {len(payload)} bytes (limit "
                            f"{MAX_MANIFEST_BYTES})")
    try:
        manifest = decode(payload, max_bytes=MAX_MANIFEST_BYTES,
                          max_header_bytes=MAX_MANIFEST_BYTES, expect=Manifest)
    except MessageError as exc:
        raise ManifestError(f"{sender} sent no readable manifest ({exc})") from None
    if len(manifest.layout) > MAX_PARAMETERS:
        raise ManifestError(f"{sender}'s manifest lists {len(manifest.layout)} parameters "
                            f"(limit {MAX_PARAMETERS})")
    for name, shape, dtype in manifest.layout:
        if not (0 < len(name) <= MAX_NAME and name.isprintable() and len(dtype) <= 32
                and dtype.isprintable() and len(shape) <= MAX_NDIM
                and all(0 <= d <= MAX_DIM for d in shape)):
            raise ManifestError(f"{sender}'s manifest has a malformed parameter "
                                f"{name[:64]!r}")
    if len(manifest.settings) > MAX_SETTINGS or not all(
            len(k) <= MAX_NAME and len(v) <= MAX_VALUE and k.isprintable() and v.isprintable()
            for k, v in manifest.settings.items()):
        raise ManifestError(f"{sender}'s manifest has malformed or too many settings")
    return manifest


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _layout_difference(ours: Manifest, theirs: Manifest, here: str, there: str) -> str | None:
    for index, (mine, other) in enumerate(zip(ours.layout, theirs.layout, strict=False)):
        if mine[0] != other[0]:
            return (f"model parameter {index} is {mine[0]!r} {here}, {other[0][:64]!r} "
                    f"{there}")
        if tuple(mine[1]) != tuple(other[1]):
            return (f"model parameter {mine[0]!r} has shape {_shape(mine[1])} {here}, "
                    f"{_shape(other[1])} {there}")
        if mine[2] != other[2]:
            return f"model parameter {mine[0]!r} is {mine[2]} {here}, {other[2]} {there}"
    if len(ours.layout) != len(theirs.layout):
        return (f"the model has {len(ours.layout)} parameter tensors {here}, "
                f"{len(theirs.layout)} {there}")
    return None


def difference(ours: Manifest, theirs: Manifest, *, here: str, there: str) -> str | None:
    """One line naming every way ``theirs`` differs from ``ours`` (the first layout
    difference, then each differing setting), or ``None`` when they agree.  ``here`` and
    ``there`` name the two parties in the text, e.g. ``"at site-b"``, ``"at the server"``."""
    problems = []
    layout = _layout_difference(ours, theirs, here, there)
    if layout is not None:
        problems.append(layout)
    keys = [*ours.settings, *(k for k in theirs.settings if k not in ours.settings)]
    for key in keys:
        mine, other = ours.settings.get(key, "unset"), theirs.settings.get(key, "unset")
        if mine != other:
            problems.append(f"{key} is {mine} {here}, {other[:64]} {there}")
    if not problems:
        return None
    listed = "; ".join(problems[:MAX_LISTED])
    more = len(problems) - MAX_LISTED
    return listed + (f"; and {more} more" if more > 0 else "")


def hello_refusal(ours: Manifest, payload: bytes | bytearray, *, site: str) -> str | None:
    """Why the server refuses ``site``'s hello ``payload`` (no readable manifest, or one that
    differs from the server's, ``ours``), or ``None`` when they agree."""
    try:
        theirs = read_manifest(payload, sender=site)
    except ManifestError as exc:
        return str(exc)
    diff = difference(ours, theirs, here="at the server", there=f"at {site}")
    return None if diff is None else f"{site} and the server disagree: {diff}"


def announce(manifest: Manifest) -> bytes:
    """The hello payload carrying ``manifest``."""
    return encode(manifest)
