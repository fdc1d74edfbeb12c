"""Differential privacy: sample-level DP-SGD (Opacus), user-level DP-FedAvg, per-client ledgers.

:func:`build_privacy` turns the ``[privacy]`` table into a :class:`PrivacySetup` that the
simulation wires in: :meth:`PrivacySetup.wrap_trainer` (once per client), ``client_hooks``,
``server_hooks`` and :meth:`PrivacySetup.finalize`, which writes ``privacy.json`` and
``epsilon.png`` into the run directory.  The ledger is ``privacy_ledger.sqlite`` in the run
directory (in memory without one).

``deployment=True`` (``securefl client`` and ``securefl server``) makes CSPRNG randomness the
default (``[privacy] secure_mode`` unset) and refuses ``sampling = "secret"``, since the
deployment's audit log records every round's participants.  A simulation keeps seeded,
reproducible randomness unless ``secure_mode = true``.
"""

from __future__ import annotations

import importlib
import logging
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securefl.config.privacy import PrivacyConfig, noise_levels_problem
from securefl.errors import ConfigError

if TYPE_CHECKING:
    from securefl.config import Config
    from securefl.engine.protection import Update
    from securefl.engine.trainer import LocalTrainer, Trainer
    from securefl.privacy.accounting import PrivacyEvent
    from securefl.privacy.ledger import PrivacyLedger

__all__ = [
    "LEDGER_FILE",
    "LedgerError",
    "PrivacyConfig",
    "PrivacyEvent",
    "PrivacyLedger",
    "PrivacySetup",
    "build_privacy",
    "epsilon",
]

_log = logging.getLogger(__name__)
# Opacus is loaded only on use
_LAZY = {"PrivacyEvent": "accounting", "epsilon": "accounting", "PrivacyLedger": "ledger",
         "LedgerError": "ledger", "LEDGER_FILE": "ledger"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"securefl.privacy.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'securefl.privacy' has no attribute {name!r}")


@dataclass
class PrivacySetup:
    """What the engine needs for one run: trainer wrappers, hooks, the ledger, the report.

    ``noise_multipliers`` holds each client's sigma (DP-SGD calibrates per client, since the
    sample rate depends on its data size; DP-FedAvg uses one ``z`` for all).
    """

    config: PrivacyConfig
    ledger: PrivacyLedger
    noise_multipliers: dict[str, float]
    events: dict[str, PrivacyEvent]
    client_hooks: tuple[Callable[[Update], Update], ...] = ()
    server_hooks: tuple[Any, ...] = ()
    wrapper: Callable[[str, Any], Any] | None = None
    #: DP randomness from the CSPRNG (True) or the seeded generators (False)
    secure: bool = False
    #: ``sampling = "secret"``: the server's sampling seed, drawn here from ``secrets``
    #: (never from the config); ``None`` when the sample is public
    sampling_seed: int | None = None
    #: DP-FedAvg's sampling rate m / N (for the report's epsilon under both sampling rules)
    sampling_rate: float | None = None
    #: extra settings for ``privacy.json`` (distributed DP: the mechanism's parameters)
    details: dict[str, Any] = field(default_factory=dict)
    _trainers: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def largest_epsilon(self) -> float:
        """The largest ε any client's ledger holds, at the configured δ (what an audit's
        lower bound is compared against)."""
        ledger = self.ledger
        return max((ledger.epsilon(cid, delta=self.config.delta) for cid in ledger.clients()),
                   default=0.0)

    def wrap_trainer(self, client_id: str, base: LocalTrainer) -> Trainer:
        """The private trainer of ``client_id``, built once and reused (same ``base``)."""
        if client_id not in self.noise_multipliers:
            raise ValueError(f"unknown client {client_id!r}: privacy was built for "
                             f"{sorted(self.noise_multipliers)}")
        if client_id in self._trainers:
            known_base, trainer = self._trainers[client_id]
            if known_base is not base:
                raise ValueError(f"{client_id!r} is already wrapped around another trainer; "
                                 f"wrapping again would lose its accountant history")
            return trainer
        if self.wrapper is None:
            raise ValueError("this privacy setup has no trainer wrapper")
        trainer = self.wrapper(client_id, base)
        self._trainers[client_id] = (base, trainer)
        return trainer

    def summary(self, *, rounds: int | None = None,
                clients: Sequence[str] | None = None) -> dict[str, Any]:
        """Per-client rounds, epsilon (RDP and PRV) at delta, budget left (``privacy.json``);
        ``rounds`` and ``clients`` as in :func:`securefl.privacy.report.summarise`."""
        from securefl.privacy.report import summarise

        sigmas = (self.noise_multipliers if clients is None
                  else {c: self.noise_multipliers[c] for c in clients})
        return summarise(self.ledger, mode=self.config.mode, noise_multipliers=sigmas,
                         secure_randomness=self.secure,
                         sampling=self.config.sampling if self.config.mode == "dp_fedavg"
                         else None, sampling_rate=self.sampling_rate, rounds=rounds,
                         clients=clients, **self.details)

    def public_record(self, row: dict[str, Any]) -> dict[str, Any]:
        """A ``metrics.jsonl`` row as the run directory may keep it: under secret sampling,
        without anything that names the round's participants (amplification by sampling
        holds only while nobody outside the server knows who took part)."""
        if self.sampling_seed is None:
            return row
        hidden = ("clients", "sampled", "dropped", "declined", "rejected", "client_metrics")
        return {k: v for k, v in row.items() if k not in hidden}

    def finalize(self, run_dir: str | Path) -> dict[str, Any]:
        """Write ``privacy.json`` and ``epsilon.png`` into ``run_dir``; return the summary."""
        from securefl.privacy.report import write_report

        return write_report(Path(run_dir), self.summary())


def build_privacy(config: Config, *, run_dir: Path | None, client_ids: Sequence[str],
                  num_examples: Mapping[str, int],
                  deployment: bool = False) -> PrivacySetup | None:
    """The :class:`PrivacySetup` of ``config`` (``None`` when ``[privacy] mode = "none"``).

    Checks at build time: delta below 1 / (protected dataset size) (each client's examples
    for DP-SGD, the number of clients for DP-FedAvg), a reachable ``target_epsilon``,
    and no secret sampling in a deployment (DP-FedAvg's linear rule is checked with the
    config, :func:`securefl.build.check_config`).
    """
    privacy = config.privacy
    if privacy.mode == "none":
        return None
    if not client_ids:
        raise ConfigError("[privacy] needs at least one client")
    from securefl.privacy.ledger import LEDGER_FILE

    path = ":memory:" if run_dir is None else Path(run_dir) / LEDGER_FILE
    budget = privacy.epsilon_budget
    secure = privacy.secure_mode if privacy.secure_mode is not None else (
        deployment or (privacy.mode == "dp_fedavg" and privacy.sampling == "secret"))
    if deployment and not secure:
        _log.warning("[privacy] secure_mode = false at a deployed party: DP noise comes from a "
                     "generator seeded by the shared config, which the server can replay")
    if privacy.mode == "dp_sgd":
        return _dp_sgd(config, path, client_ids, num_examples, budget, secure)
    if deployment and privacy.sampling == "secret":
        raise ConfigError("[privacy] sampling = \"secret\" is for simulations only: a "
                          "deployment's audit log records every round's participants, so the "
                          "sample is public; use sampling = \"public\" (q = 1 accounting)")
    if privacy.mode == "distributed":
        return _distributed(config, path, client_ids, budget)
    return _dp_fedavg(config, path, client_ids, budget, secure)


def _check_delta(delta: float, size: int, what: str) -> None:
    if delta >= 1 / size:
        raise ConfigError(f"[privacy] delta must be < 1 / ({what}) = 1/{size} = {1 / size:.3g}, "
                          f"got {delta:g}; a delta that large allows publishing a record "
                          f"outright, choose delta well below 1/{size}")


def _dp_sgd(config: Config, path: Path | str, client_ids: Sequence[str],
            num_examples: Mapping[str, int], budget: float | None,
            secure: bool) -> PrivacySetup:
    from securefl.privacy.accounting import PrivacyEvent
    from securefl.privacy.calibration import calibrate_noise_multiplier
    from securefl.privacy.dp_sgd import DPSGDTrainer, batches_per_epoch
    from securefl.privacy.ledger import PrivacyLedger

    privacy, client = config.privacy, config.client
    sigmas: dict[str, float] = {}
    events: dict[str, PrivacyEvent] = {}
    for cid in client_ids:
        size = int(num_examples[cid])
        _check_delta(privacy.delta, size, f"examples of client {cid!r}")
        steps = batches_per_epoch(size, client.batch_size)
        rate = 1 / steps
        if privacy.noise_multiplier is not None:
            sigma = privacy.noise_multiplier
        else:
            sigma = calibrate_noise_multiplier(
                target_epsilon=float(privacy.target_epsilon),  # type: ignore[arg-type]
                delta=privacy.delta, sample_rate=rate,
                steps=config.run.rounds * client.epochs * steps, accountant=privacy.accountant)
        sigmas[cid] = sigma
        events[cid] = PrivacyEvent("dp_sgd", sigma, rate, client.epochs * steps)
    ledger = PrivacyLedger(path, delta=privacy.delta, budgets=dict.fromkeys(client_ids, budget),
                           accountant=privacy.accountant)

    def wrap(client_id: str, base: LocalTrainer) -> DPSGDTrainer:
        return DPSGDTrainer(base.task(), client_id=client_id, ledger=ledger,
                            noise_multiplier=sigmas[client_id],
                            max_grad_norm=privacy.max_grad_norm,
                            grad_sample_mode=privacy.grad_sample_mode,
                            secure_mode=secure, accountant=privacy.accountant,
                            fix_model=privacy.fix_model)

    return PrivacySetup(privacy, ledger, sigmas, events, wrapper=wrap, secure=secure)


def _dp_fedavg(config: Config, path: Path | str, client_ids: Sequence[str],
               budget: float | None, secure: bool) -> PrivacySetup:
    from securefl.privacy.accounting import PrivacyEvent
    from securefl.privacy.calibration import (
        calibrate_noise_multiplier,
        calibrated_participations,
    )
    from securefl.privacy.dp_fedavg import (
        ClipState,
        UserLevelNoise,
        UserLevelTrainer,
        update_noise_multiplier,
    )
    from securefl.privacy.ledger import PrivacyLedger
    from securefl.privacy.randomness import SecureRandom

    privacy = config.privacy
    total = len(client_ids)
    _check_delta(privacy.delta, total, "number of clients")
    per_round = config.server.per_round(total)
    rate = per_round / total
    secret = privacy.sampling == "secret"
    # public sample: q = 1 per round taken part in, calibrated for the expected number of them
    # or their participation_quantile (a client sampled more often is refused by its ledger)
    charged_rate, steps = (rate, config.run.rounds) if secret else (
        1.0, calibrated_participations(rounds=config.run.rounds, rate=rate,
                                       quantile=privacy.participation_quantile))
    if privacy.noise_multiplier is not None:
        z = privacy.noise_multiplier
    else:
        z = calibrate_noise_multiplier(
            target_epsilon=float(privacy.target_epsilon),  # type: ignore[arg-type]
            delta=privacy.delta, sample_rate=charged_rate, steps=steps,
            accountant=privacy.accountant)
    count_stddev = None
    if privacy.adaptive_clipping:
        count_stddev = (privacy.clipped_count_stddev if privacy.clipped_count_stddev is not None
                        else per_round / 20)
    z_update = update_noise_multiplier(z, count_stddev)
    event = PrivacyEvent("dp_fedavg", z, charged_rate, 1)
    ledger = PrivacyLedger(path, delta=privacy.delta, budgets=dict.fromkeys(client_ids, budget),
                           accountant=privacy.accountant)
    clip = ClipState(privacy.clip_norm, adaptive=privacy.adaptive_clipping,
                     target_quantile=privacy.target_quantile,
                     learning_rate=privacy.clip_learning_rate, count_stddev=count_stddev or 0.0)
    noise = UserLevelNoise(clip=clip, noise_multiplier=z, update_noise_multiplier=z_update,
                           expected_clients=per_round, ledger=ledger, client_ids=client_ids,
                           event=event, charge_every_round=secret,
                           source=SecureRandom() if secure else None)

    def wrap(client_id: str, base: Any) -> UserLevelTrainer:
        return UserLevelTrainer(base, client_id=client_id, ledger=ledger, event=event, clip=clip,
                                sampling=privacy.sampling)

    return PrivacySetup(privacy, ledger, dict.fromkeys(client_ids, z),
                        dict.fromkeys(client_ids, event), server_hooks=(noise,), wrapper=wrap,
                        secure=secure, sampling_seed=secrets.randbits(256) if secret else None,
                        sampling_rate=rate)


def distributed_settings(config: Config, num_clients: int) -> Any:
    """The :class:`~securefl.privacy.distributed.DistributedSettings` of ``config`` for a
    federation of ``num_clients`` sites, calibrated for the ``participation_quantile``
    (default :data:`~securefl.privacy.calibration.PARTICIPATION_QUANTILE`) of the rounds a
    site takes part in (:func:`~securefl.privacy.calibration.calibrated_participations`)."""
    from securefl.privacy.calibration import PARTICIPATION_QUANTILE, calibrated_participations
    from securefl.privacy.distributed import DistributedSettings

    privacy = config.privacy
    per_round = config.server.per_round(num_clients)
    expected = privacy.expected_cohort or per_round
    minimum = privacy.min_cohort or expected
    if minimum > per_round:
        raise ConfigError(f"[privacy] min_cohort = {minimum}, but [server] samples {per_round} "
                          f"of the {num_clients} clients per round: every round would abort")
    if minimum > expected:
        raise ConfigError(f"[privacy] min_cohort = {minimum} must be <= expected_cohort "
                          f"({expected})")
    levels = (privacy.noise_levels if privacy.noise_levels is not None
              else (expected,) if expected > minimum else ())
    problem = noise_levels_problem(levels, low=minimum, high=expected)
    if problem is not None:
        raise ConfigError(f"[privacy] noise_levels {problem}")
    quantile = privacy.participation_quantile
    steps = calibrated_participations(
        rounds=config.run.rounds, rate=per_round / num_clients,
        quantile=PARTICIPATION_QUANTILE if quantile is None else quantile)
    return DistributedSettings(
        target_epsilon=float(privacy.target_epsilon),  # type: ignore[arg-type]
        delta=privacy.delta, steps=steps, clip_norm=privacy.clip_norm, bits=privacy.bits,
        expected_cohort=expected, min_cohort=minimum, colluding_sites=privacy.colluding_sites,
        levels=tuple(levels))


def _distributed(config: Config, path: Path | str, client_ids: Sequence[str],
                 budget: float | None) -> PrivacySetup:
    """Distributed Skellam DP: each site's trainer clips and charges its own ledger; the noise
    share is added by its SecAgg+ encoding (:func:`securefl.build.build_protection`);
    the server only divides the unmasked noisy sum by the expected cohort."""
    from securefl.privacy.distributed import DistributedMean
    from securefl.privacy.dp_fedavg import ClipState, UserLevelTrainer
    from securefl.privacy.ledger import PrivacyLedger

    privacy = config.privacy
    num_clients = max(len(client_ids), len(config.network.allowlist))
    _check_delta(privacy.delta, num_clients, "number of clients")
    settings = distributed_settings(config, num_clients)
    ledger = PrivacyLedger(path, delta=privacy.delta, budgets=dict.fromkeys(client_ids, budget),
                           accountant=privacy.accountant)
    clip = ClipState(privacy.clip_norm, adaptive=False)
    setup = PrivacySetup(privacy, ledger, dict.fromkeys(client_ids, math.nan), {},
                         server_hooks=(DistributedMean(expected_cohort=settings.expected_cohort),),
                         secure=True)

    def wrap(client_id: str, base: Any) -> UserLevelTrainer:
        # the mechanism depends on the model's size, known once the site has its model
        plan = settings.plan(base.layout.size)
        event = plan.event()
        setup.details.update(
            mechanism="distributed Skellam (Agarwal, Kairouz and Liu 2021) under SecAgg+",
            bits=settings.bits, expected_cohort=settings.expected_cohort,
            min_cohort=settings.min_cohort, colluding_sites=settings.colluding_sites,
            noise_levels=list(settings.levels), calibrated_rounds=settings.steps,
            skellam_scale=plan.scale,
            skellam_variance=plan.variance, l1_sensitivity=plan.l1, l2_sensitivity=plan.l2,
            overflow_bound=plan.overflow)
        setup.events[client_id] = event
        setup.noise_multipliers[client_id] = event.noise_multiplier
        return UserLevelTrainer(base, client_id=client_id, ledger=ledger, event=event,
                                clip=clip, sampling="public")

    setup.wrapper = wrap
    return setup
