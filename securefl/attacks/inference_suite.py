"""Inference-attack suite cells: membership inference and gradient inversion against what a
securefl server (or anyone holding the final model) actually sees.

Every model here is trained by securefl's own pipeline
(:func:`securefl.simulation.build_simulation`: :class:`~securefl.engine.trainer.LocalTrainer`,
the configured protection, Opacus DP-SGD through ``[privacy]``); a server hook records the
last round's combined result, which is exactly the server's view of the clients' updates.

A scenario ``[[cells]]`` table with ``kind = "inference"`` is one cell; the harness calls
:func:`run_cell` once per seed.  Keys (all optional except ``attack`` and ``target``):

``attack``
    membership: ``"loss_threshold"``, ``"lira_offline"``, ``"lira_online"`` (a list runs
    several on the same trained models); inversion: ``"dlg"``, ``"idlg"``,
    ``"inverting_gradients"``.
``target``
    membership: ``"global_model"`` (the final model) or ``"client_update"`` (the model
    ``global + Δ_k`` of client ``k``'s last-round update); inversion: ``"client_update"`` (one
    client's plain update), ``"secagg_sum"`` (the secure-aggregation sum of ``clients``
    clients) or ``"dp_update"`` (one client's DP-SGD update at ``epsilon``).
``defense``
    membership only: ``"none"`` or ``"dp_sgd"`` (every client trains with DP-SGD at total
    ``epsilon``; shadows are trained the same way).
``epsilon``, ``delta``, ``max_grad_norm``
    the DP-SGD guarantee (defaults 1.0 / 1e-5 / 1.0; inversion ``dp_update`` default ε = 8).
``clients``, ``examples_per_client``, ``rounds``, ``epochs``, ``batch_size``, ``lr``, ``hidden``
    membership federation (defaults 5, 20, 15, 5, 10, 0.1, [128]); each client owns a pool of
    ``2 · examples_per_client`` candidates and trains on half of it.
``shadows``
    number of LiRA shadow federations (even; default 8).
``iterations``, ``lr_attack``, ``tv_weight``
    inversion optimiser settings (defaults 300 / 0.1 / 1e-4); inversion federations train one
    local SGD step of learning rate ``lr`` (default 0.1) on one image per client.
``out_dir``
    where to write ``roc.png`` / ``inversion.png`` (none written if absent).

:func:`summarize` turns the per-seed results into means with Student-t confidence intervals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from securefl.attacks import inversion, membership
from securefl.config import Config, DataConfig, config_from_dict
from securefl.data import ClientData, Dataset, FederatedData, load_dataset
from securefl.engine.history import RoundRecord
from securefl.engine.protection import Combined, Rows, WeightedSum
from securefl.models import build_model
from securefl.vector import unflatten

__all__ = [
    "INVERSION_ATTACKS",
    "INVERSION_TARGETS",
    "MEMBERSHIP_ATTACKS",
    "MEMBERSHIP_TARGETS",
    "Trained",
    "check_cell",
    "run_cell",
    "summarize",
    "train_federation",
]

MEMBERSHIP_ATTACKS = ("loss_threshold", "lira_offline", "lira_online")
MEMBERSHIP_TARGETS = ("global_model", "client_update")
INVERSION_ATTACKS = ("dlg", "idlg", "inverting_gradients")
INVERSION_TARGETS = ("client_update", "secagg_sum", "dp_update")
_BOUNDED_METRICS = {"auc": (0.0, 1.0), "tpr_at_1pct_fpr": (0.0, 1.0),
                    "tpr_at_01pct_fpr": (0.0, 1.0), "label_correct": (0.0, 1.0),
                    "ssim": (-1.0, 1.0)}
_KNOWN_KEYS = {"name", "kind", "seed", "scenario", "base", "attack", "target", "defense",
               "epsilon", "delta", "max_grad_norm", "clients", "examples_per_client", "rounds",
               "epochs", "batch_size", "lr", "hidden", "shadows", "iterations", "lr_attack",
               "tv_weight", "out_dir"}


# ----------------------------------------------------------------------------- training
@dataclass(frozen=True)
class Trained:
    """A finished federation: final and previous global vectors, the last round's combined
    updates as the server saw them, and the largest per-client accountant ε (``inf`` if
    non-private)."""

    parameters: np.ndarray
    previous: np.ndarray
    combined: Combined
    epsilon: float


class _LastCombined:
    """Server hook that keeps the most recent combined result and passes it on unchanged."""

    def __init__(self) -> None:
        self.combined: Combined | None = None

    def transform_combined(self, combined: Rows | WeightedSum, *, round: int,
                           rng: np.random.Generator) -> Rows | WeightedSum:
        self.combined = combined
        return combined


def train_federation(config: Config, data: FederatedData, *,
                     on_round: Callable[[RoundRecord], None] | None = None) -> Trained:
    """Run ``config`` on ``data`` with :func:`securefl.simulation.build_simulation`
    (``on_round``: called after each round, for progress)."""
    from securefl.simulation import build_simulation

    recorder = _LastCombined()
    simulation = build_simulation(config, data=data, server_hooks=[recorder])
    rounds = config.run.rounds
    try:
        simulation.server.run(rounds - 1, on_round=on_round)
        previous = simulation.server.parameters.copy()
        simulation.server.run(1, start=rounds, on_round=on_round)
    finally:
        simulation.transport.close()
    if recorder.combined is None:
        raise RuntimeError(f"round {rounds} produced no combined update (all clients failed)")
    return Trained(simulation.server.parameters.copy(), previous, recorder.combined,
                   accountant_epsilon(simulation))


def accountant_epsilon(simulation: Any) -> float:
    """The largest ε the run's ledgers hold; infinite for a run without DP."""
    privacy = simulation.privacy
    return float("inf") if privacy is None else float(privacy.largest_epsilon())


def _config(cell: Mapping[str, Any], *, seed: int, rounds: int, clients: int, epochs: int,
            batch_size: int, privacy: Mapping[str, Any] | None = None,
            protection: str = "plain") -> Config:
    table: dict[str, Any] = {
        "run": {"name": str(cell.get("name", "inference")), "rounds": rounds, "seed": seed},
        "data": {"dataset": "digits", "num_clients": clients, "min_examples": 1},
        "model": {"name": "mlp", "hidden": list(cell.get("hidden", [128]))},
        "client": {"epochs": epochs, "batch_size": batch_size, "lr": float(cell.get("lr", 0.1))},
        "server": {"evaluate": "central"},
        "protection": {"kind": protection},
    }
    if privacy is not None:
        table["privacy"] = dict(privacy)
    return config_from_dict(table, source=f"inference cell {cell.get('name', '')}")


def _noise_multiplier(epsilon: float, delta: float, size: int, batch_size: int,
                      rounds: int, epochs: int) -> float:
    """DP-SGD sigma reaching ``epsilon`` for a client of ``size`` examples over the run, by
    the framework's own (cached) calibration."""
    from securefl.privacy.calibration import calibrate_noise_multiplier
    from securefl.privacy.dp_sgd import batches_per_epoch

    steps = batches_per_epoch(size, batch_size)
    return calibrate_noise_multiplier(target_epsilon=epsilon, delta=delta,
                                      sample_rate=1 / steps, steps=rounds * epochs * steps)


def _dp_table(cell: Mapping[str, Any], default_epsilon: float, *, size: int, batch_size: int,
              rounds: int, epochs: int) -> dict[str, Any]:
    """``[privacy]`` for DP-SGD at the cell's ε, calibrated for clients of ``size`` examples;
    the ledger then reports each client's actual ε."""
    epsilon = float(cell.get("epsilon", default_epsilon))
    delta = float(cell.get("delta", 1e-5))
    sigma = _noise_multiplier(epsilon, delta, size, batch_size, rounds, epochs)
    return {"mode": "dp_sgd", "noise_multiplier": sigma, "delta": delta,
            "max_grad_norm": float(cell.get("max_grad_norm", 1.0))}


def _finite(value: float) -> float | None:
    """``None`` for a non-private run's infinite ε, so results stay standard JSON."""
    return value if np.isfinite(value) else None


def _federated(shards: Sequence[Dataset], test: Dataset) -> FederatedData:
    width = len(str(len(shards) - 1))
    empty = test.subset(np.zeros(0, dtype=np.int64))
    clients = {f"client-{i:0{width}d}": ClientData(shard, empty)
               for i, shard in enumerate(shards)}
    return FederatedData(clients, test, test.num_classes, test.shape)


def _model_at(config: Config, data: FederatedData, vector: np.ndarray) -> torch.nn.Module:
    model = build_model(config.model, data.shape, data.num_classes, seed=config.run.seed)
    unflatten(model, vector)
    return model


# ----------------------------------------------------------------------------- membership
def _membership(cell: Mapping[str, Any], attacks: Sequence[str], target: str,
                seed: int) -> dict[str, Any]:
    clients = int(cell.get("clients", 5))
    per_client = int(cell.get("examples_per_client", 20))
    shadows = int(cell.get("shadows", 8))
    defense = str(cell.get("defense", "none"))
    if clients < 1 or per_client < 1:
        raise ValueError("clients and examples_per_client must be >= 1")
    needs_shadows = any(a.startswith("lira") for a in attacks)
    rng = np.random.default_rng([seed, 0x4D49])
    train, test = load_dataset(DataConfig(dataset="digits"), rng=rng)
    pool_size = 2 * per_client
    if clients * pool_size > len(train):
        raise ValueError(f"clients * 2 * examples_per_client must be <= {len(train)}")
    pools = rng.permutation(len(train))[:clients * pool_size].reshape(clients, pool_size)
    candidates = train.subset(pools.reshape(-1))
    rounds, epochs = int(cell.get("rounds", 15)), int(cell.get("epochs", 5))
    batch_size = int(cell.get("batch_size", 10))
    privacy = (_dp_table(cell, 1.0, size=per_client, batch_size=batch_size, rounds=rounds,
                         epochs=epochs) if defense == "dp_sgd" else None)

    def confidences(mask: np.ndarray, run_seed: int) -> tuple[np.ndarray, float]:
        shards = [train.subset(pools[j][mask[j]]) for j in range(clients)]
        config = _config(cell, seed=run_seed, rounds=rounds, clients=clients, epochs=epochs,
                         batch_size=batch_size, privacy=privacy)
        data = _federated(shards, test)
        trained = train_federation(config, data)
        if target == "global_model":
            model = _model_at(config, data, trained.parameters)
            features = candidates.features
        else:
            if not isinstance(trained.combined, Rows):
                raise ValueError("target 'client_update' needs individual updates (plain)")
            row = trained.combined.client_ids.index(next(iter(data.clients)))
            model = _model_at(config, data, trained.previous + trained.combined.updates[row])
            features = candidates.features[:pool_size]
        logits = membership.model_outputs(model, features)
        return logits, trained.epsilon

    target_mask = np.stack([rng.permutation(np.arange(pool_size) < per_client)
                            for _ in range(clients)])
    logits, epsilon = confidences(target_mask, int(rng.integers(2**31)))
    truth = target_mask.reshape(-1) if target == "global_model" else target_mask[0]
    labels = candidates.labels[:len(truth)]
    phi = membership.logit_confidence(logits, labels)
    shadow_phi, shadow_in = None, None
    if needs_shadows:
        shadow_in = membership.balanced_membership(shadows, clients * pool_size, rng=rng)
        shadow_phi = np.stack([
            membership.logit_confidence(
                confidences(mask.reshape(clients, pool_size), int(rng.integers(2**31)))[0],
                labels)
            for mask in shadow_in])
        shadow_in = shadow_in[:, :len(truth)]
    results: dict[str, membership.MembershipMetrics] = {}
    for attack in attacks:
        if attack == "loss_threshold":
            scores = membership.loss_threshold_scores(logits, labels)
        else:
            if shadow_phi is None or shadow_in is None:
                raise ValueError(f"{attack} needs shadow models")
            scores = membership.lira_scores(phi, shadow_phi, shadow_in,
                                            online=attack == "lira_online")
        results[attack] = membership.evaluate_scores(scores, truth)
    out: dict[str, Any] = {"accountant_epsilon": _finite(epsilon), "num_candidates": len(truth)}
    for attack, metrics in results.items():
        out.update({f"{attack}.{k}": v for k, v in metrics.summary().items()})
    if cell.get("out_dir"):
        name = cell.get("name", f"{target}-{defense}")
        path = Path(str(cell["out_dir"])) / f"roc-{name}-seed{seed}.png"
        out["roc_plot"] = str(membership.plot_roc(path, results, title=f"{target}, {defense}"))
    return out


# ----------------------------------------------------------------------------- inversion
def _inversion(cell: Mapping[str, Any], attack: str, target: str, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, 0x494E])
    train, test = load_dataset(DataConfig(dataset="digits"), rng=rng)
    clients = int(cell.get("clients", 10)) if target == "secagg_sum" else 1
    chosen = rng.choice(len(train), size=clients, replace=False)
    originals = train.subset(chosen)
    privacy = (_dp_table(cell, 8.0, size=1, batch_size=1, rounds=1, epochs=1)
               if target == "dp_update" else None)
    config = _config(cell, seed=int(rng.integers(2**31)), rounds=1, clients=clients, epochs=1,
                     batch_size=1, privacy=privacy,
                     protection="secagg" if target == "secagg_sum" else "plain")
    data = _federated([originals.subset(np.array([i])) for i in range(clients)], test)
    trained = train_federation(config, data)
    combined = trained.combined
    if target == "secagg_sum" and isinstance(combined, Rows):
        raise ValueError("target 'secagg_sum' expects the protection to hide the rows")
    if not isinstance(combined, Rows | WeightedSum):
        raise ValueError("inversion needs a plaintext update or sum, not an encrypted one")
    delta = combined.updates[0] if isinstance(combined, Rows) else combined.mean()
    model = _model_at(config, data, trained.previous)
    gradients = inversion.gradients_from_update(delta, model, lr=config.client.lr)
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    options: dict[str, Any] = {"shape": data.shape, "num_classes": data.num_classes,
                               "generator": generator}
    iterations = int(cell.get("iterations", 300))
    labels = inversion.recover_labels(gradients, model)
    if attack == "dlg":
        result = inversion.DLG(iterations=iterations)(model, gradients, **options)
    elif attack == "idlg":
        result = inversion.DLG(iterations=iterations)(model, gradients, labels=labels, **options)
    else:
        attacker = inversion.InvertingGradients(
            iterations=iterations, lr=float(cell.get("lr_attack", 0.1)),
            tv_weight=float(cell.get("tv_weight", 1e-4)))
        result = attacker(model, gradients, labels=labels, **options)
    match, psnr = inversion.best_match(originals.features, result.images[0])
    ssim = float(inversion.ssim(originals.features[match:match + 1], result.images[:1])[0])
    # what an attacker gets without any update: the training-set mean image, scored the same way
    _, prior = inversion.best_match(originals.features, train.features.mean(axis=0))
    out: dict[str, Any] = {
        "psnr": psnr, "ssim": ssim, "psnr_mean_image": prior,
        "accountant_epsilon": _finite(trained.epsilon),
        "label_correct": float(result.labels[0] == originals.labels[match]),
        "clients": clients}
    if cell.get("out_dir"):
        name = cell.get("name", f"{target}-{attack}")
        path = Path(str(cell["out_dir"])) / f"inversion-{name}-seed{seed}.png"
        out["grid"] = str(inversion.save_grid(
            path, originals.features[match:match + 1], result.images[:1],
            titles=[f"{psnr:.1f} dB"]))
    return out


# ----------------------------------------------------------------------------- cells
def check_cell(cell: Mapping[str, Any]) -> tuple[str, list[str], str]:
    """Validate a cell without running it: ``(family, attacks, target)`` with family
    ``"membership"`` or ``"inversion"``; a ValueError says what is wrong and what is allowed."""
    unknown = sorted(set(cell) - _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"inference cell: unknown key {unknown[0]!r} (allowed: "
                         f"{', '.join(sorted(_KNOWN_KEYS))})")
    attack = cell.get("attack")
    attacks = [attack] if isinstance(attack, str) else list(attack or [])
    target = str(cell.get("target"))
    if attacks and all(a in MEMBERSHIP_ATTACKS for a in attacks):
        if target not in MEMBERSHIP_TARGETS:
            raise ValueError(f"membership target must be one of {MEMBERSHIP_TARGETS}, "
                             f"got {target!r}")
        if cell.get("defense", "none") not in ("none", "dp_sgd"):
            raise ValueError(f"membership defense must be 'none' or 'dp_sgd', "
                             f"got {cell.get('defense')!r}")
        shadows = cell.get("shadows", 8)
        if any(a.startswith("lira") for a in attacks) and (
                not isinstance(shadows, int) or shadows < 2 or shadows % 2):
            raise ValueError(f"shadows must be an even int >= 2, got {shadows!r}")
        return "membership", attacks, target
    if len(attacks) == 1 and attacks[0] in INVERSION_ATTACKS:
        if target not in INVERSION_TARGETS:
            raise ValueError(f"inversion target must be one of {INVERSION_TARGETS}, "
                             f"got {target!r}")
        if "defense" in cell:
            raise ValueError("inversion cells choose the server's view with target "
                             "(client_update, secagg_sum, dp_update), not defense")
        return "inversion", attacks, target
    raise ValueError(f"inference attack must be one or more of {MEMBERSHIP_ATTACKS} or one of "
                     f"{INVERSION_ATTACKS}, got {attack!r}")


def run_cell(cell: Mapping[str, Any], *, rng: np.random.Generator) -> dict[str, Any]:
    """Run one inference cell (keys in the module docstring) and return its metrics.

    Membership metrics are ``<attack>.auc``, ``<attack>.tpr_at_1pct_fpr`` and
    ``<attack>.tpr_at_01pct_fpr``; inversion metrics are ``psnr`` (dB, against the closest
    original), ``ssim``, ``label_correct`` and ``psnr_mean_image`` (the PSNR of the
    training-set mean image scored the same way: the no-leakage baseline).  Both report
    ``accountant_epsilon``: the largest per-client ε in the privacy ledger, ``None`` without
    DP.  ``cell["seed"]`` fixes the run; without it a seed is drawn from ``rng``.
    """
    family, attacks, target = check_cell(cell)
    seed = int(cell["seed"]) if "seed" in cell else int(rng.integers(2**31))
    if family == "membership":
        return _membership(cell, attacks, target, seed)
    return _inversion(cell, attacks[0], target, seed)


def summarize(results: Sequence[Mapping[str, Any]], *,
              confidence: float = 0.95) -> dict[str, dict[str, float]]:
    """Mean and two-sided Student-t interval of every numeric metric over seeds.

    ``{metric: {"mean", "low", "high", "n"}}``; with one seed the interval is the point.
    Intervals of bounded metrics (AUC, TPR, label accuracy in [0, 1]; SSIM in [-1, 1]) are
    clipped to their range.
    """
    keys = sorted({k for r in results for k, v in r.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)})
    out = {}
    for key in keys:
        values = np.array([float(r[key]) for r in results if key in r])
        mean = float(values.mean())
        half = 0.0
        if len(values) > 1 and np.isfinite(values).all():
            sem = float(values.std(ddof=1) / np.sqrt(len(values)))
            half = float(stats.t.ppf((1 + confidence) / 2, len(values) - 1) * sem)
        low, high = mean - half, mean + half
        floor, ceiling = _BOUNDED_METRICS.get(key.rsplit(".", 1)[-1], (-np.inf, np.inf))
        low, high = max(low, floor), min(high, ceiling)
        out[key] = {"mean": mean, "low": low, "high": high, "n": float(len(values))}
    return out
