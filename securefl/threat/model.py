"""Threat models: one TOML file each, read into frozen dataclasses.

A threat model says who is trusted, what each adversary can do, what must stay secret and
which controls are required.  The file format (documented in ``threat_models/README.md``)::

    name = "honest-but-curious-server"
    title = "..."
    summary = "..."
    trusted = ["...", ...]
    secrets = ["...", ...]
    gives_up = ["...", ...]                  # optional: what this model knowingly concedes

    [[adversaries]]
    who = "server"
    behaviour = "honest-but-curious"         # see BEHAVIOURS
    capabilities = ["...", ...]
    max_fraction = 0.2                       # byzantine clients: up to this fraction per round
    max_colluding = 1                        # clients colluding with the server
    colludes_with_server = true              # these clients share all they know with it

    [[requirements]]
    id = "hide-individual-updates"
    control = "update_secrecy"               # a control of securefl.threat.controls
    because = "why the model needs it"
    # any further keys are the control's parameters

Unknown keys, unknown controls and bad parameters are :class:`~securefl.errors.ConfigError`
naming the file, so a typo never weakens a model silently.
"""

from __future__ import annotations

import math
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from securefl.errors import ConfigError

__all__ = [
    "BEHAVIOURS",
    "Adversary",
    "Requirement",
    "ThreatModel",
    "available_threat_models",
    "load_threat_model",
    "threat_model_dir",
]

#: how an adversary may behave (Goldreich, Foundations of Cryptography II, section 7.2)
BEHAVIOURS = ("honest-but-curious", "malicious", "byzantine", "eavesdropper", "none")

_TOP_KEYS = {"name", "title", "summary", "trusted", "secrets", "gives_up", "adversaries",
             "requirements"}
_ADVERSARY_KEYS = {"who", "behaviour", "capabilities", "max_fraction", "max_count",
                   "max_colluding", "colludes_with_server"}
_REQUIREMENT_KEYS = {"id", "control", "because"}


@dataclass(frozen=True)
class Adversary:
    """One adversary: who it is, how it behaves, what it can do and how many of it there are."""

    who: str
    behaviour: str
    capabilities: tuple[str, ...] = ()
    max_fraction: float | None = None
    max_count: int | None = None
    max_colluding: int = 0
    colludes_with_server: bool = False

    def count(self, participants: int) -> int:
        """How many of ``participants`` this adversary may control: ``max_count``, else
        ``floor(max_fraction * participants)``, else 0."""
        if self.max_count is not None:
            return self.max_count
        if self.max_fraction is not None:
            return math.floor(self.max_fraction * participants + 1e-9)
        return 0


@dataclass(frozen=True)
class Requirement:
    """A control the model requires; ``params`` go to the control's check."""

    id: str
    control: str
    because: str
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class ThreatModel:
    name: str
    title: str
    summary: str
    trusted: tuple[str, ...]
    secrets: tuple[str, ...]
    adversaries: tuple[Adversary, ...]
    requirements: tuple[Requirement, ...]
    gives_up: tuple[str, ...] = ()
    source: str = ""

    def max_byzantine(self, participants: int) -> int:
        """f: the most byzantine clients among ``participants`` (0 if none are in scope)."""
        return max((a.count(participants) for a in self.adversaries
                    if a.behaviour == "byzantine"), default=0)

    def max_colluding(self, participants: int) -> int:
        """t: the most clients among ``participants`` that may collude with the server: the
        largest ``max_colluding``, or the size of a client adversary that colludes with it."""
        return max((max(a.max_colluding, a.count(participants) if a.colludes_with_server else 0)
                    for a in self.adversaries), default=0)


def threat_model_dir() -> Path:
    """The shipped ``threat_models/`` folder.

    In a source checkout or an editable install it sits next to the ``securefl`` package; an
    installed wheel puts it under ``<prefix>/share/securefl/threat_models``.
    """
    beside_package = Path(__file__).resolve().parents[2] / "threat_models"
    installed = Path(sys.prefix) / "share" / "securefl" / "threat_models"
    return beside_package if beside_package.is_dir() or not installed.is_dir() else installed


def available_threat_models() -> list[str]:
    """Names of the shipped threat models."""
    return sorted(p.stem for p in threat_model_dir().glob("*.toml"))


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of strings, got {value!r}")
    return tuple(value)


def _text(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {key} is required and must be a non-empty string")
    return value.strip()


def _unknown(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]} is not a known key "
                          f"(allowed: {', '.join(sorted(allowed))})")


def _adversary(table: Any, where: str) -> Adversary:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    _unknown(table, _ADVERSARY_KEYS, where)
    behaviour = _text(table, "behaviour", where)
    if behaviour not in BEHAVIOURS:
        raise ConfigError(f"{where}: behaviour must be one of {', '.join(BEHAVIOURS)}, "
                          f"got {behaviour!r}")
    fraction = table.get("max_fraction")
    if fraction is not None and (not isinstance(fraction, int | float)
                                 or isinstance(fraction, bool) or not 0 <= fraction < 1):
        raise ConfigError(f"{where}: max_fraction must be a number in [0, 1), got {fraction!r}")
    for key in ("max_count", "max_colluding"):
        value = table.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where}: {key} must be an integer >= 0, got {value!r}")
    colludes = table.get("colludes_with_server", False)
    if not isinstance(colludes, bool):
        raise ConfigError(f"{where}: colludes_with_server must be true or false, got {colludes!r}")
    return Adversary(
        who=_text(table, "who", where), behaviour=behaviour,
        capabilities=_strings(table.get("capabilities", []), f"{where}: capabilities"),
        max_fraction=None if fraction is None else float(fraction),
        max_count=table.get("max_count"), max_colluding=table.get("max_colluding", 0),
        colludes_with_server=colludes)


def _requirement(table: Any, where: str) -> Requirement:
    from securefl.threat.controls import CONTROLS

    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    control = _text(table, "control", where)
    if control not in CONTROLS:
        raise ConfigError(f"{where}: control must be one of {', '.join(sorted(CONTROLS))}, "
                          f"got {control!r}")
    raw = {k: v for k, v in table.items() if k not in _REQUIREMENT_KEYS}
    specs = CONTROLS[control].params
    _unknown(raw, set(specs), f"{where} (control {control})")
    params = {}
    for key, parse in specs.items():
        if key not in raw:
            raise ConfigError(f"{where}: control {control} needs parameter {key}")
        try:
            params[key] = parse(raw[key])
        except ValueError as exc:
            raise ConfigError(f"{where}: {key} {exc}, got {raw[key]!r}") from None
    return Requirement(id=_text(table, "id", where), control=control,
                       because=_text(table, "because", where),
                       params=MappingProxyType(params))


def parse_threat_model(table: Mapping[str, Any], *, source: str = "<threat model>") -> ThreatModel:
    """Build a :class:`ThreatModel` from a TOML table; every problem names ``source``."""
    _unknown(table, _TOP_KEYS, source)
    adversaries = table.get("adversaries", [])
    requirements = table.get("requirements", [])
    if not isinstance(adversaries, list) or not adversaries:
        raise ConfigError(f"{source}: at least one [[adversaries]] table is required")
    if not isinstance(requirements, list) or not requirements:
        raise ConfigError(f"{source}: at least one [[requirements]] table is required")
    model = ThreatModel(
        name=_text(table, "name", source), title=_text(table, "title", source),
        summary=_text(table, "summary", source),
        trusted=_strings(table.get("trusted", []), f"{source}: trusted"),
        secrets=_strings(table.get("secrets", []), f"{source}: secrets"),
        gives_up=_strings(table.get("gives_up", []), f"{source}: gives_up"),
        adversaries=tuple(_adversary(a, f"{source}: adversaries[{i}]")
                          for i, a in enumerate(adversaries)),
        requirements=tuple(_requirement(r, f"{source}: requirements[{i}]")
                           for i, r in enumerate(requirements)),
        source=source)
    ids = [r.id for r in model.requirements]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"{source}: requirement id {duplicates[0]!r} appears twice")
    return model


def load_threat_model(name_or_path: str | Path) -> ThreatModel:
    """A shipped model by name (``"hospital-consortium"``) or any TOML file by path."""
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith(".toml") or path.is_file()):
        path = threat_model_dir() / f"{text}.toml"
        if not path.is_file():
            raise ConfigError(f"unknown threat model {text!r} (shipped: "
                              f"{', '.join(available_threat_models())}; or give a TOML path)")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such threat model file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return parse_threat_model(table, source=str(path))
