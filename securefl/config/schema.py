"""Run configuration: one TOML file -> frozen dataclasses.

Every error names the file, the table, the field and what is allowed, e.g.
``examples/x.toml: [data] alpha must be > 0, got -1``.  Unknown keys are errors, so a typo is
never silently ignored.  Each area owns its section's dataclass (``[privacy]`` lives in
:mod:`securefl.config.privacy`, and so on); this module assembles them.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from securefl.config.data import DataConfig
from securefl.config.he import HEConfig
from securefl.config.network import NetworkConfig
from securefl.config.parse import FieldError, check, dump_toml, parse
from securefl.config.privacy import PrivacyConfig
from securefl.config.secagg import SecAggConfig
from securefl.errors import ConfigError

__all__ = [
    "AggregationConfig",
    "ClientConfig",
    "Config",
    "DataConfig",
    "ModelConfig",
    "ProtectionConfig",
    "RunConfig",
    "ServerConfig",
    "SimulationConfig",
    "clients_per_round",
    "config_from_dict",
    "load_config",
]


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    rounds: int = 20
    seed: int = 0
    threat_model: str | None = None
    #: where local training runs: "cpu", "cuda" or "auto" (securefl.device)
    device: Literal["cpu", "cuda", "auto"] = "cpu"

    def validate(self) -> None:
        check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class ModelConfig:
    """A built-in model (``name``), or the site's own: ``factory = "package.module:function"``
    (``name`` becomes ``"factory"``; ``path`` is the folder put first on the import path,
    by default the config file's, for ``[client] loss`` and ``step`` too), or
    ``name = "python"`` for a module given as a Python object through :mod:`securefl.own`,
    whose ``factory`` then records its class.  ``variant`` selects ``mnist_cnn``'s form:
    ``"plain"`` (ReLU after both convolutions, no dropout) or ``"karimireddy2022"`` (their
    ``Net``: no ReLU after the second convolution, dropout 0.25 on channels and 0.5 on the
    hidden units; :class:`securefl.models.MnistNet`).  ``dropout_masks`` says where a model's
    dropout masks (:class:`securefl.models.SeededDropout`) come from: ``"site"``, each site's
    own generator, fresh at every step; ``"shared"``, the same masks at every site, from a
    generator reseeded from ``([run] seed, round // mask_period)`` at the start of each
    round, as Karimireddy et al.'s simulator draws them (it restores torch's RNG after each
    worker's call, so every worker gets the same masks until the evaluation draws, every 30
    iterations: ``mask_period = 30``).  Dropout masks are not a privacy mechanism; the
    site's ones follow from its seed as well."""

    name: Literal["logistic", "mlp", "cnn", "mnist_cnn", "factory", "python"] = "mlp"
    hidden: tuple[int, ...] = (64,)
    factory: str | None = None
    path: str | None = None
    variant: Literal["plain", "karimireddy2022"] = "plain"
    dropout_masks: Literal["site", "shared"] = "site"
    mask_period: int = 1

    def __post_init__(self) -> None:
        if self.factory is not None and self.name == "mlp":  # the default: factory wins
            object.__setattr__(self, "name", "factory")

    def validate(self) -> None:
        check(all(h >= 1 for h in self.hidden), "hidden", f"sizes must be >= 1, got {self.hidden}")
        check(self.name not in ("factory", "python") or self.factory is not None, "factory",
              f"is required with name = {self.name!r}")
        check(self.factory is None or self.name in ("factory", "python"), "factory",
              f"and name = {self.name!r} both given; give one")
        check(self.variant == "plain" or self.name == "mnist_cnn", "variant",
              f"= {self.variant!r} is a form of name = \"mnist_cnn\", not of {self.name!r}")
        check(self.mask_period >= 1, "mask_period", f"must be >= 1, got {self.mask_period}")
        check(self.dropout_masks == "site" or self.variant != "plain"
              or self.name in ("factory", "python"), "dropout_masks",
              f"= {self.dropout_masks!r} needs a model with dropout (name = \"mnist_cnn\", "
              f"variant = \"karimireddy2022\", or the site's own)")
        if self.name == "factory":
            check(_import_path(str(self.factory)), "factory",
                  f"must be \"package.module:function\", got {self.factory!r}")


def _import_path(spec: str) -> bool:
    """Whether ``spec`` reads ``"package.module:function"`` (dotted identifiers)."""
    module, _, attr = spec.partition(":")
    return bool(module) and bool(attr) and all(
        p.isidentifier() for p in (*module.split("."), *attr.split(".")))


@dataclass(frozen=True)
class ClientConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    #: minibatch steps per round instead of ``epochs`` passes (1: distributed SGD)
    local_steps: int | None = None
    #: keep the optimizer state (worker momentum) on the client across rounds
    keep_momentum: bool = False
    #: a site's own loss and training step, "package.module:function" (securefl.objective)
    loss: str | None = None
    step: str | None = None

    def validate(self) -> None:
        for name in ("loss", "step"):
            spec = getattr(self, name)
            check(spec is None or spec.startswith("python:") or _import_path(spec), name,
                  f"must be \"package.module:function\", got {spec!r}")
        check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        check(self.local_steps is None or self.local_steps >= 1, "local_steps",
              f"must be >= 1, got {self.local_steps}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")


def clients_per_round(available: int, *, count: int | None, fraction: float) -> int:
    """Clients sampled from ``available``: ``count`` if set, else ``ceil(fraction *
    available)``, at most ``available``.

    The ceiling is taken of the rational that ``fraction`` was written as (0.28 is 7/25),
    so ``0.28 * 25`` samples 7 clients, not the 8 that ``ceil(7.000000000000001)`` gives.
    """
    if count is not None:
        return min(int(count), available)
    exact = Fraction(fraction).limit_denominator(1_000_000)
    return min(available, math.ceil(exact * available))


@dataclass(frozen=True)
class ServerConfig:
    clients_per_round: int | None = None
    fraction: float = 1.0
    min_clients: int = 1
    optimizer: Literal["fedavg", "fedavgm", "fedadam"] = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    evaluate: Literal["central", "federated", "both"] = "central"
    timeout: float | None = None

    def per_round(self, available: int) -> int:
        """How many of ``available`` clients one round samples (:func:`clients_per_round`)."""
        return clients_per_round(available, count=self.clients_per_round,
                                 fraction=self.fraction)

    def validate(self) -> None:
        check(self.clients_per_round is None or self.clients_per_round >= 1,
              "clients_per_round", f"must be >= 1, got {self.clients_per_round}")
        check(0 < self.fraction <= 1, "fraction", f"must be in (0, 1], got {self.fraction}")
        check(self.min_clients >= 1, "min_clients", f"must be >= 1, got {self.min_clients}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1",
              "and beta2 must be in [0, 1)")
        check(self.tau > 0, "tau", f"must be > 0, got {self.tau}")
        check(self.timeout is None or self.timeout > 0, "timeout",
              f"must be > 0 seconds, got {self.timeout}")


@dataclass(frozen=True)
class AggregationConfig:
    """``rule`` names the aggregator; every other key is passed to its constructor."""

    rule: str = "fedavg"
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> AggregationConfig:
        options = {k: v for k, v in table.items() if k != "rule"}
        rule = table.get("rule", "fedavg")
        if not isinstance(rule, str):
            raise FieldError("rule", f"must be a string, got {rule!r}")
        return cls(rule=rule, options=MappingProxyType(options))


@dataclass(frozen=True)
class ProtectionConfig:
    kind: Literal["plain", "secagg", "he"] = "plain"
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    he: HEConfig = field(default_factory=HEConfig)


@dataclass(frozen=True)
class SimulationConfig:
    workers: int = 1
    wire: bool = False
    dropout: float = 0.0
    threads: int | Literal["auto"] = "auto"
    #: where the sites run: this process, or Ray actors (``pip install securefl[ray]``)
    backend: Literal["inprocess", "ray"] = "inprocess"
    #: an existing Ray cluster (``"auto"`` or ``"host:port"``); empty: start a local Ray
    address: str = ""
    #: Ray actors hosting the sites (0: ``ceil(clients / clients_per_actor)``)
    actors: int = 0
    clients_per_actor: int = 100
    #: Ray resources of each actor (one group of sites): CPUs, and a GPU fraction
    cpus: float = 1.0
    gpus: float = 0.0

    def torch_threads(self) -> int:
        """torch intra-op threads for each of the ``workers`` parallel clients.

        ``threads`` is the simulation's whole CPU budget, shared as ``threads // workers``
        (at least 1).  ``"auto"`` gives each client one thread: the reference models are
        too small to gain from intra-op parallelism, and one thread per worker cannot
        oversubscribe a machine that other processes share (torch's default, one thread
        per core in every process, slows a contended run many times over).
        """
        return 1 if self.threads == "auto" else max(1, self.threads // self.workers)

    def validate(self) -> None:
        check(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        check(self.threads == "auto" or self.threads >= 1, "threads",
              f"must be \"auto\" or >= 1, got {self.threads!r}")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.actors >= 0, "actors", f"must be >= 0, got {self.actors}")
        check(self.clients_per_actor >= 1, "clients_per_actor",
              f"must be >= 1, got {self.clients_per_actor}")
        check(self.cpus >= 0, "cpus", f"must be >= 0, got {self.cpus}")
        check(0 <= self.gpus, "gpus", f"must be >= 0, got {self.gpus}")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    protection: ProtectionConfig = field(default_factory=ProtectionConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)

    def validate(self) -> None:
        if self.privacy.mode == "dp_sgd" and (self.client.local_steps is not None
                                              or self.client.keep_momentum):
            name = "local_steps" if self.client.local_steps is not None else "keep_momentum"
            raise FieldError(name, "is not supported with [privacy] mode = \"dp_sgd\", whose "
                             "accounting charges whole epochs of fresh-state DP-SGD", "client")
        if self.privacy.mode == "distributed" and self.protection.kind != "secagg":
            raise FieldError(
                "mode", f"\"distributed\" adds each site's noise share before secure "
                f"aggregation masks it; it needs [protection] kind = \"secagg\", got "
                f"{self.protection.kind!r}", "privacy")
        if self.protection.kind == "he":  # the server holds the model only encrypted
            if self.server.optimizer != "fedavg":
                raise FieldError(
                    "optimizer", f"{self.server.optimizer!r} needs the plaintext model, which "
                    "HE keeps encrypted at the server; use optimizer = \"fedavg\" (its lr is "
                    "applied by the sites)", "server")
            if self.privacy.mode == "dp_fedavg":
                raise FieldError(
                    "mode", "\"dp_fedavg\" adds its noise at the server, which under HE "
                    "holds only ciphertexts; use mode = \"dp_sgd\" (noise at each site)",
                    "privacy")

    def replace(self, **sections: Any) -> Config:
        """A copy with whole sections, or ``section__field`` values, replaced."""
        changes: dict[str, Any] = {}
        for key, value in sections.items():
            if "__" in key:
                section, name = key.split("__", 1)
                base = changes.get(section, getattr(self, section))
                changes[section] = dataclasses.replace(base, **{name: value})
            else:
                changes[key] = value
        return dataclasses.replace(self, **changes)

    def to_toml(self) -> str:
        return dump_toml(self)


def config_from_dict(table: Mapping[str, Any], *, source: str = "<config>") -> Config:
    """Build and validate a :class:`Config`; errors become one-line :class:`ConfigError`."""
    try:
        return parse(Config, table)
    except FieldError as exc:
        raise ConfigError(exc.located(source)) from None


def load_config(path: str | Path) -> Config:
    """Read a TOML config file; every problem is a :class:`ConfigError` naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return _resolve_paths(config_from_dict(table, source=str(path)), path.parent)


def _resolve_paths(config: Config, folder: Path) -> Config:
    """A site's own files resolve from the config file's folder, as does the folder put on
    the import path for ``[model] factory`` and ``[client] loss`` / ``step``."""
    def absolute(value: str | None) -> str | None:
        return None if value is None else str((folder / value).resolve())

    if config.data.dataset in ("csv", "parquet", "npz", "image_folder"):
        config = config.replace(data__path=absolute(config.data.path),
                                data__test_path=absolute(config.data.test_path))
    if config.model.name == "factory" or config.client.loss or config.client.step:
        config = config.replace(model__path=absolute(config.model.path or "."))
    return config
