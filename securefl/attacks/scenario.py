"""Attack scenarios: a TOML grid of attacks x defenses x data distributions x byzantine
fractions x seeds, expanded into independent cells.  The format is documented in
``attacks/README.md``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securefl.config import Config, config_from_dict
from securefl.errors import ConfigError

__all__ = ["BYZANTINE", "BYZANTINE_DATA", "DATA_ATTACKS", "Cell", "Scenario", "cell_config",
           "load_scenario"]

#: an option value that stands for the cell's number of byzantine clients
BYZANTINE = "$f"
#: data-poisoning attacks by name (see :mod:`securefl.attacks.data_poisoning`)
DATA_ATTACKS = ("label_flip", "pixel_trigger")

_SCENARIO_KEYS = {"name", "description", "seeds", "byzantine_fractions", "byzantine_data",
                  "evaluate_every", "input_normalization"}
#: where the byzantine clients' data comes from (see ``attacks/README.md``)
BYZANTINE_DATA = ("partition", "iid")
_ATTACK_KEYS = {"name", "update", "options", "data", "data_options", "adaptive"}
_DEFENSE_KEYS = {"name", "rule", "options"}
_TOP_KEYS = {"scenario", "base", "distributions", "attacks", "defenses", "cells"}


@dataclass(frozen=True)
class Cell:
    """One independent run.  ``key`` names it in ``results.jsonl``; ``fingerprint`` changes
    whenever anything that could change its result changes, so stale results are redone."""

    key: str
    kind: str  # "poisoning" or "inference"
    seed: int
    spec: Mapping[str, Any]
    fingerprint: str
    labels: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    name: str
    path: Path
    description: str
    seeds: tuple[int, ...]
    fractions: tuple[float, ...]
    base: Mapping[str, Any]
    distributions: tuple[Mapping[str, Any], ...]
    attacks: tuple[Mapping[str, Any], ...]
    defenses: tuple[Mapping[str, Any], ...]
    cells_extra: tuple[Mapping[str, Any], ...]
    byzantine_data: str = "partition"
    #: central evaluation every k-th round and in the last (1: every round)
    evaluate_every: int = 1
    #: ``(mean, std)``: every feature becomes ``(x - mean) / std`` (torchvision's
    #: ``Normalize``, as Karimireddy et al.'s MNIST loader), None keeps the dataset's scale
    input_normalization: tuple[float, float] | None = None

    def cells(self) -> list[Cell]:
        """Every cell of the grid, in a stable order (poisoning grid first)."""
        out: list[Cell] = []
        for dist in self.distributions:
            for fraction in self.fractions:
                for attack in self.attacks:
                    for defense in self.defenses:
                        for seed in self.seeds:
                            out.append(self._poisoning_cell(dist, fraction, attack, defense,
                                                            seed))
        for extra in self.cells_extra:
            for seed in self.seeds:
                spec = {**extra, "seed": seed, "scenario": self.name, "base": self.base}
                out.append(Cell(f"inference/{extra['name']}/seed{seed}", "inference", seed,
                                spec, _fingerprint(spec), {"name": extra["name"]}))
        return out

    def _poisoning_cell(self, dist: Mapping[str, Any], fraction: float,
                        attack: Mapping[str, Any], defense: Mapping[str, Any],
                        seed: int) -> Cell:
        table = copy.deepcopy(dict(self.base))
        data = {**table.get("data", {}), **{k: v for k, v in dist.items() if k != "name"}}
        table["data"] = data
        table["run"] = {**table.get("run", {}), "seed": seed,
                        "name": f"{self.name}-{attack['name']}-{defense['name']}"}
        num_clients = int(data.get("num_clients", 10))
        # the defense is configured for f = round(fraction * n) whether or not anyone attacks,
        # so the clean row shows what the same defense costs without an attack
        assumed = round(fraction * num_clients)
        attacking = attack.get("update") is not None or attack.get("data") is not None
        num_byzantine = assumed if attacking else 0
        options = {k: (assumed if v == BYZANTINE else v)
                   for k, v in defense.get("options", {}).items()}
        table["aggregation"] = {"rule": defense["rule"], **options}
        spec: dict[str, Any] = {"config": table, "attack": dict(attack),
                                "num_byzantine": num_byzantine}
        if self.byzantine_data == "iid":  # partitioned over the honest clients only
            spec["byzantine_data"] = "iid"
            spec["honest_clients"] = num_clients - assumed
        if self.evaluate_every > 1:
            spec["evaluate_every"] = self.evaluate_every
        if self.input_normalization is not None:
            spec["input_normalization"] = list(self.input_normalization)
        labels = {"distribution": dist["name"], "fraction": fraction,
                  "attack": attack["name"], "defense": defense["name"]}
        key = (f"poisoning/{dist['name']}/{fraction:g}/{attack['name']}/"
               f"{defense['name']}/seed{seed}")
        return Cell(key, "poisoning", seed, spec, _fingerprint(spec), labels)


def _fingerprint(spec: Mapping[str, Any]) -> str:
    text = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cell_config(cell: Cell) -> Config:
    """The validated run config of a poisoning cell."""
    return config_from_dict(cell.spec["config"], source=cell.key)


def _named_list(table: Mapping[str, Any], key: str, allowed: set[str] | None,
                path: Path) -> tuple[dict[str, Any], ...]:
    items = table.get(key, [])
    if not isinstance(items, list):
        raise ConfigError(f"{path}: [[{key}]] must be an array of tables")
    seen: set[str] = set()
    out = []
    for index, item in enumerate(items):
        where = f"{path}: [[{key}]] #{index + 1}"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"{where} needs a string 'name'")
        if allowed is not None and set(item) - allowed:
            bad = sorted(set(item) - allowed)[0]
            raise ConfigError(f"{where} ({item['name']}): {bad} is not a known key "
                              f"(allowed: {', '.join(sorted(allowed))})")
        if item["name"] in seen or "/" in item["name"]:
            raise ConfigError(f"{where}: name {item['name']!r} is repeated or contains '/'")
        seen.add(item["name"])
        out.append(item)
    return tuple(out)


def _validate(scenario: Scenario) -> None:
    from securefl.attacks.registry import ATTACKS

    where = str(scenario.path)
    for attack in scenario.attacks:
        update, data = attack.get("update"), attack.get("data")
        if update is not None and update not in ATTACKS:
            raise ConfigError(f"{where}: attack {attack['name']!r}: unknown update attack "
                              f"{update!r} (known: {', '.join(sorted(ATTACKS))})")
        if data is not None and data not in DATA_ATTACKS:
            raise ConfigError(f"{where}: attack {attack['name']!r}: unknown data attack "
                              f"{data!r} (known: {', '.join(sorted(DATA_ATTACKS))})")
        if data == "pixel_trigger" and scenario.input_normalization is not None:
            raise ConfigError(f"{where}: attack {attack['name']!r}: a pixel trigger's value is "
                              "on the dataset's scale; drop [scenario] input_normalization")
    for defense in scenario.defenses:
        if not isinstance(defense.get("rule"), str):
            raise ConfigError(f"{where}: defense {defense['name']!r} needs a string 'rule'")
    for extra in scenario.cells_extra:
        if extra.get("kind") != "inference":
            raise ConfigError(f"{where}: [[cells]] {extra['name']!r}: kind must be "
                              f"\"inference\", got {extra.get('kind')!r}")
    if scenario.attacks and not (scenario.defenses and scenario.distributions):
        raise ConfigError(f"{where}: a grid needs [[attacks]], [[defenses]] and "
                          "[[distributions]] (one each at least)")


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; every problem is a one-line ConfigError."""
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such scenario file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(table) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]} is not a known table "
                          f"(allowed: {', '.join(sorted(_TOP_KEYS))})")
    head = table.get("scenario", {})
    if set(head) - _SCENARIO_KEYS:
        bad = sorted(set(head) - _SCENARIO_KEYS)[0]
        raise ConfigError(f"{path}: [scenario] {bad} is not a known key "
                          f"(allowed: {', '.join(sorted(_SCENARIO_KEYS))})")
    seeds = head.get("seeds", [0])
    byzantine_data = head.get("byzantine_data", "partition")
    if byzantine_data not in BYZANTINE_DATA:
        raise ConfigError(f"{path}: [scenario] byzantine_data must be one of "
                          f"{', '.join(map(repr, BYZANTINE_DATA))}, got {byzantine_data!r}")
    fractions = head.get("byzantine_fractions", [0.2])
    evaluate_every = head.get("evaluate_every", 1)
    if not (isinstance(evaluate_every, int) and evaluate_every >= 1):
        raise ConfigError(f"{path}: [scenario] evaluate_every must be an int >= 1, "
                          f"got {evaluate_every!r}")
    normalization = head.get("input_normalization")
    if normalization is not None and not (
            isinstance(normalization, list) and len(normalization) == 2
            and all(isinstance(v, int | float) and math.isfinite(v) for v in normalization)
            and normalization[1] > 0):
        raise ConfigError(f"{path}: [scenario] input_normalization must be [mean, std] with "
                          f"std > 0, got {normalization!r}")
    if not (isinstance(seeds, list) and seeds
            and all(isinstance(s, int) and s >= 0 for s in seeds)):
        raise ConfigError(f"{path}: [scenario] seeds must be a non-empty list of ints >= 0")
    if not (isinstance(fractions, list) and fractions
            and all(isinstance(f, int | float) and 0 <= f < 0.5 for f in fractions)):
        raise ConfigError(f"{path}: [scenario] byzantine_fractions must be a non-empty list "
                          "of numbers in [0, 0.5)")
    scenario = Scenario(
        name=str(head.get("name", path.stem)), path=path,
        description=str(head.get("description", "")), seeds=tuple(seeds),
        fractions=tuple(float(f) for f in fractions), base=table.get("base", {}),
        distributions=_named_list(table, "distributions", None, path),
        attacks=_named_list(table, "attacks", _ATTACK_KEYS, path),
        defenses=_named_list(table, "defenses", _DEFENSE_KEYS, path),
        cells_extra=_named_list(table, "cells", None, path), byzantine_data=byzantine_data,
        evaluate_every=evaluate_every,
        input_normalization=None if normalization is None else (float(normalization[0]),
                                                                float(normalization[1])))
    _validate(scenario)
    config_from_dict(scenario.base, source=f"{path} [base]")
    return scenario
