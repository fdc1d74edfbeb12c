"""The composition root: config -> model, trainers, protection, aggregator and server.

The simulation (:mod:`securefl.simulation`) and the deployment (:mod:`securefl.runtime`) both
build their parties here, so a networked run reproduces a simulated one.  It is also the one
home of the checks that need area code (an aggregation rule's name, options and linearity):
:func:`check_config`, run by :func:`load_config` and :func:`config_from_dict` here, before
any work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

import securefl.config as _config
from securefl.aggregation import Aggregator, ReferenceRule
from securefl.aggregation import build_aggregator as _rule
from securefl.config import Config
from securefl.config.parse import FieldError
from securefl.data import Dataset, FederatedData
from securefl.device import select_device
from securefl.engine.client import Client
from securefl.engine.optim import build_server_optimizer
from securefl.engine.protection import ClientProtection, Plain, ServerProtection
from securefl.engine.server import Sampler, Server, ServerHook
from securefl.engine.trainer import LocalTrainer, Trainer, derive_seed, evaluate_model
from securefl.engine.transport import Transport
from securefl.errors import ConfigError
from securefl.models import OwnModel, build_model
from securefl.objective import Objective
from securefl.objective import objective as resolve
from securefl.output import save_model
from securefl.vector import Layout, flatten, unflatten

__all__ = ["Simulation", "TestSetEvaluator", "aggregator_for", "build_protection", "build_server",
           "central_evaluator", "check_config", "check_feasible", "config_from_dict",
           "load_config", "local_trainer", "root_trainer", "save_final_model", "secagg_encoding"]


def load_config(path: str | Path) -> Config:
    """:func:`securefl.config.load_config`, then :func:`check_config`; errors name the file."""
    config = _config.load_config(path)
    check_config(config, source=str(path))
    return config


def config_from_dict(table: Mapping[str, Any], *, source: str = "<config>") -> Config:
    """:func:`securefl.config.config_from_dict`, then :func:`check_config`."""
    config = _config.config_from_dict(table, source=source)
    check_config(config, source=source)
    return config


def check_config(config: Config, *, source: str = "<config>") -> None:
    """The rules of a config that need area code, as one-line :class:`ConfigError` naming
    ``source``, the table and the field: the aggregation rule and its options exist, and a
    protection that reveals only the sum (secure aggregation, HE) or noise added to the sum
    (DP-FedAvg) has a linear rule."""
    try:
        aggregator = _built(config)
        if not aggregator.linear and config.protection.kind != "plain":
            raise FieldError(
                "rule", f"{config.aggregation.rule!r} needs plaintext updates, but protection "
                f"{config.protection.kind!r} reveals only their sum; use rule = \"fedavg\"",
                "aggregation")
        if not aggregator.linear and config.privacy.mode == "dp_fedavg":
            raise FieldError(
                "mode", "\"dp_fedavg\" adds noise to the sum of updates and needs a linear "
                f"rule; [aggregation] rule {config.aggregation.rule!r} is not (use rule = "
                "\"fedavg\")", "privacy")
    except FieldError as exc:
        raise ConfigError(exc.located(source)) from None


def aggregator_for(config: Config) -> Aggregator:
    """The ``[aggregation]`` rule; a bad name or option is a :class:`ConfigError`."""
    try:
        return _built(config)
    except FieldError as exc:
        raise ConfigError(exc.located("<config>").removeprefix("<config>: ")) from None


def _built(config: Config) -> Aggregator:
    try:
        return _rule(config.aggregation.rule, **config.aggregation.options)
    except (TypeError, ValueError) as exc:
        raise FieldError("rule", f"{config.aggregation.rule!r}: {exc}", "aggregation") from exc


def secagg_encoding(config: Config, num_sites: int) -> Any:
    """The SecAgg+ encoding of ``config``: distributed DP's Skellam encoding under
    ``[privacy] mode = "distributed"``, else ``None`` (SecAgg+'s own fixed point)."""
    if config.privacy.mode != "distributed":
        return None
    from securefl.privacy import distributed_settings
    from securefl.privacy.distributed import SkellamEncoding

    return SkellamEncoding(distributed_settings(config, num_sites))


def build_protection(config: Config, client_ids: Sequence[str], *, layout: Layout | None = None
                     ) -> tuple[ServerProtection, Mapping[str, ClientProtection]]:
    """``(server half, {client id: client half})``; secrets live only in the client halves.

    ``layout`` lets HE encrypt only the configured layers (``[protection.he] layers``).
    """
    kind = config.protection.kind
    if kind == "secagg":
        from securefl.secagg import build_simulation

        return build_simulation(config.protection.secagg, client_ids,
                                encoding=secagg_encoding(config, len(client_ids)))
    if kind == "he":
        from securefl.he import build_simulation as build_he

        return build_he(config.protection.he, client_ids, layout=layout,
                        server_lr=config.server.lr)
    plain = Plain()
    return plain, dict.fromkeys(client_ids, plain)


class TestSetEvaluator:
    """Central evaluation of a parameter vector on the held-out test set (simulation only)."""

    def __init__(self, model: torch.nn.Module, test: Dataset) -> None:
        self.model, self.layout = model, Layout.of(model)
        self.features = torch.from_numpy(test.features)
        self.labels = torch.from_numpy(test.labels)

    def __call__(self, parameters: np.ndarray) -> tuple[int, float, float]:
        unflatten(self.model, parameters, self.layout)
        return evaluate_model(self.model, self.features, self.labels)


def local_trainer(config: Config, data: FederatedData, client_id: str, *,
                  model: OwnModel | None = None,
                  objective: Objective | None = None) -> LocalTrainer:
    """``client_id``'s trainer.  Simulation and deployment derive its seed the same way, from
    ``(seed, the client's index)``, so a networked run reproduces a simulated one.
    ``model``: the site's own (:func:`securefl.models.own_model`) instead of ``[model]``;
    ``objective``: its own loss and step (default: ``[client] loss`` and ``step``)."""
    seed, c = config.run.seed, config.client
    index = list(data.clients).index(client_id)
    shard = data.clients[client_id]
    return LocalTrainer(
        build_model(config.model, data.shape, data.num_classes, seed=seed, own=model),
        shard.train,
        shard.val, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, optimizer=c.optimizer,
        momentum=c.momentum, weight_decay=c.weight_decay, local_steps=c.local_steps,
        keep_momentum=c.keep_momentum,
        seed=derive_seed(seed, index),
        device=select_device(config.run.device), objective=objective or resolve(config),
        shared_masks=((seed, config.model.mask_period)
                      if config.model.dropout_masks == "shared" else None))


def central_evaluator(config: Config, data: FederatedData, *,
                      model: OwnModel | None = None) -> TestSetEvaluator:
    """The server's model, initialised from ``[run] seed``, with the held-out test set."""
    return TestSetEvaluator(build_model(config.model, data.shape, data.num_classes,
                                        seed=config.run.seed, own=model), data.test)


def build_server(config: Config, transport: Transport, protection: ServerProtection,
                 data: FederatedData, *, hooks: Sequence[ServerHook] = (),
                 timeout: float | None = None,
                 root_data: FederatedData | None = None,
                 evaluator: TestSetEvaluator | None = None,
                 run_id: bytes | None = None,
                 model: OwnModel | None = None,
                 aggregator: Aggregator | None = None,
                 objective: Objective | None = None,
                 num_clients: int | None = None) -> tuple[Server, TestSetEvaluator]:
    """The round loop and the central evaluator, as both simulation and deployment build it.

    The initial model comes from ``[run] seed`` (``evaluator``: one already made by
    :func:`central_evaluator`); rules that need the server's root-data update (FLTrust) get
    one from :func:`root_trainer` on ``root_data`` (default ``data``; pass the clean data when
    the clients' shards are poisoned).  ``num_clients``: the federation's size when it is not
    ``data``'s (a deployment's allowlist).
    """
    seed, s = config.run.seed, config.server
    aggregator = aggregator if aggregator is not None else aggregator_for(config)
    # a deployment's federation is its allowlist, not the server's own (test) data
    check_feasible(config, aggregator,
                   num_clients=len(data.clients) if num_clients is None else num_clients)
    evaluator = evaluator or central_evaluator(config, data, model=model)
    reference = None
    if aggregator.needs_reference:
        root = root_trainer(config, root_data or data,
                            count=cast(ReferenceRule, aggregator).root_examples, model=model,
                            objective=objective)
        reference = lambda params: root.fit(params, round=0)[0].delta  # noqa: E731
    optimizer = build_server_optimizer(s.optimizer, lr=s.lr, momentum=s.momentum,
                                       beta1=s.beta1, beta2=s.beta2, tau=s.tau)
    server = Server(
        transport, protection, aggregator, optimizer, reference_update=reference,
        parameters=flatten(evaluator.model), seed=seed,
        sampler=Sampler(count=s.clients_per_round, fraction=s.fraction),
        min_clients=s.min_clients, timeout=s.timeout or timeout,
        central_evaluator=evaluator if s.evaluate in ("central", "both") else None,
        federated_evaluation=s.evaluate in ("federated", "both"), hooks=hooks, run_id=run_id)
    return server, evaluator


def check_feasible(config: Config, aggregator: Aggregator, *, num_clients: int) -> None:
    """What the configuration decides about every round, checked before any training: the
    sampled clients must be enough for the rule's byzantine bound, ``min_clients`` and a
    secure-aggregation round (:func:`securefl.secagg.tolerance.round_problem`)."""
    per_round = config.server.per_round(num_clients)
    sampled = f"[server] samples {per_round} of the {num_clients} clients per round"
    need = aggregator.min_clients
    if per_round < need:
        raise ConfigError(f"[aggregation] rule {config.aggregation.rule!r} ({aggregator!r}) "
                          f"needs at least {need} updates per round, but {sampled}")
    if config.server.min_clients > per_round:
        raise ConfigError(f"[server] min_clients = {config.server.min_clients}, but {sampled}: "
                          "every round would abort")
    if config.protection.kind == "secagg":
        from securefl.secagg.tolerance import round_problem

        if (problem := round_problem(per_round, config.protection.secagg)) is not None:
            raise ConfigError(f"[protection] kind = \"secagg\": {problem}, but {sampled}: "
                              "every round would abort after the clients trained")


def root_trainer(config: Config, data: FederatedData, *, count: int,
                 model: OwnModel | None = None,
                 objective: Objective | None = None) -> LocalTrainer:
    """A trainer on the server's small clean root dataset (FLTrust, Cao et al. 2021).

    In simulation the root set is ``count`` examples drawn, with a seeded RNG, from the
    pooled client training data: the same distribution, as the paper assumes.
    """
    rng = np.random.default_rng([config.run.seed, 0x2007])
    pooled = [c.train for c in data.clients.values()]
    features = np.concatenate([d.features for d in pooled])
    labels = np.concatenate([d.labels for d in pooled])
    pick = np.sort(rng.choice(len(labels), size=min(count, len(labels)), replace=False))
    root = Dataset(features[pick], labels[pick], data.num_classes, "root")
    c = config.client
    net = build_model(config.model, data.shape, data.num_classes, seed=config.run.seed,
                      own=model)
    return LocalTrainer(net, root, root.subset(np.arange(0)), epochs=c.epochs,
                        batch_size=c.batch_size, lr=c.lr, optimizer=c.optimizer,
                        momentum=c.momentum, weight_decay=c.weight_decay,
                        local_steps=c.local_steps, seed=config.run.seed,
                        device=select_device(config.run.device),
                        objective=objective or resolve(config))


def save_final_model(run_dir: Path, config: Config, evaluator: TestSetEvaluator,
                     parameters: np.ndarray) -> Path:
    """``model.safetensors``: the final state dict, loadable with no code executed."""
    unflatten(evaluator.model, parameters, evaluator.layout)
    return save_model(run_dir / "model.safetensors",
                      {k: v.detach().cpu().numpy()
                       for k, v in evaluator.model.state_dict().items()},
                      metadata={"format": "pt-state-dict", "model": config.model.name})


@dataclass
class Simulation:
    """Everything a simulated federation is made of (:mod:`securefl.simulation` builds it,
    in-process or on Ray), exposed for harnesses and tests."""

    config: Config
    data: FederatedData
    trainers: dict[str, Trainer]
    clients: dict[str, Client]
    transport: Transport  # InProcessTransport, or RayTransport with [simulation] backend = "ray"
    server: Server
    evaluator: TestSetEvaluator
    privacy: Any = None
    #: the global model as the sites see it, when the server keeps it encrypted (HE)
    site_view: Callable[[], np.ndarray] | None = None

    def parameters(self) -> np.ndarray:
        """The current global model: the server's, or the one the sites decrypt."""
        return self.site_view() if self.site_view is not None else self.server.parameters

    @property
    def model(self) -> torch.nn.Module:  # the server's copy, used for central evaluation
        return self.evaluator.model

    @property
    def layout(self) -> Layout:
        return self.evaluator.layout
