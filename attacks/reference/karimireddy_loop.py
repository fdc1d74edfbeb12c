"""An independent reference loop of Karimireddy, He & Jaggi (ICLR 2022), exp3, on mnist5k.

Plain torch, none of securefl's engine, server, aggregators or attacks: only its data
loading (``securefl.data.federate``), so the honest shards and the test set are the ones
``attacks/poisoning/karimireddy2022.toml`` trains on.  One iteration as their code
(``codes/simulator.py``, ``codes/worker.py``, ``utils.py`` of
github.com/epfml/byzantine-robust-noniid-optimizer) does it:

1. every worker computes the gradient ``g_i`` of the mean cross-entropy of one minibatch of
   32 of its own shard (passes of a fresh permutation, the last partial batch dropped) at
   the shared model; honest workers keep ``m_i <- beta m_i + g_i`` (``m_i = g_i`` at the
   first step) and send ``m_i``; byzantine workers keep no momentum;
2. the byzantine rows: IPM ``-eps mean_h m_h`` (eps 0.1), ALIE ``mu - z std`` (unbiased
   std over the honest rows, z 0.2533), BF ``-g_b``, LF ``g_b`` of labels ``9 - y``;
3. the rule on the 25 gradient rows: CM (coordinate-wise median), Krum (their score: the
   sum of the ``n - f - 2`` smallest *squared* squared distances, m = 1), RFA (smoothed
   Weiszfeld from ``z = 0``, ``nu = 0.1``, T = 8);
4. the server step ``x <- x - lr * aggregate`` (SGD, lr 0.01, no weight decay).

Test accuracy on the held-out 1,000 images every 30 iterations and at the end.  Prints JSON.
Run: ``PYTHONPATH=$PWD python attacks/reference/karimireddy_loop.py --attack ipm --rule cm``
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from securefl.config.data import DataConfig
from securefl.data import federate

RULES = ("cm", "krum", "rfa", "mean")
ATTACKS = ("none", "ipm", "alie", "bf", "lf")


def mnist_mlp(*, hidden: int, generator: torch.Generator) -> nn.Sequential:
    """784 -> hidden -> 10 with ReLU; torch's default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
    init drawn from ``generator``."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    with torch.no_grad():
        for layer in (model[1], model[3]):
            bound = 1.0 / math.sqrt(layer.in_features)
            for p in (layer.weight, layer.bias):
                p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)
    return model


class Shard:
    """One worker's data: minibatches of ``batch`` from passes of fresh permutations."""

    def __init__(self, x: np.ndarray, y: np.ndarray, *, batch: int, seed: list[int]) -> None:
        self.x, self.y, self.batch = torch.from_numpy(x), torch.from_numpy(y), batch
        self.generator = torch.Generator().manual_seed(int(np.random.SeedSequence(seed)
                                                           .generate_state(1)[0]))
        self.order = torch.empty(0, dtype=torch.long)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.order) < self.batch:  # drop_last: a new pass
            self.order = torch.randperm(len(self.y), generator=self.generator)
        take, self.order = self.order[:self.batch], self.order[self.batch:]
        return self.x[take], self.y[take]


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]


def aggregate(rule: str, rows: torch.Tensor, *, f: int) -> torch.Tensor:
    n = rows.shape[0]
    if rule == "mean":
        return rows.mean(0)
    if rule == "cm":
        return rows.median(0).values  # n odd here: the middle value
    if rule == "krum":
        sq = torch.cdist(rows.double(), rows.double()) ** 2
        quartic = sq ** 2  # their _compute_scores squares the squared distances again
        quartic.fill_diagonal_(float("inf"))
        scores = torch.sort(quartic, 1).values[:, :n - f - 2].sum(1)
        return rows[int(torch.argmin(scores))]
    z = torch.zeros_like(rows[0])  # RFA: smoothed Weiszfeld from 0, nu = 0.1, T = 8
    for _ in range(8):
        betas = (1.0 / n) / torch.clamp((rows - z).norm(dim=1), min=0.1)
        z = (betas[:, None] * rows).sum(0) / betas.sum()
    return z


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run(*, attack: str, rule: str, seed: int, rounds: int = 600, momentum: float = 0.0,
        honest: int = 20, byzantine: int = 5, hidden: int = 64, lr: float = 0.01,
        batch: int = 32, every: int = 30, normalize: bool = False) -> dict[str, object]:
    started, cpu = time.perf_counter(), time.process_time()
    config = DataConfig(dataset="mnist5k", num_clients=honest, partition="shards",
                        shards_per_client=1, val_fraction=0.0)
    data = federate(config, seed=seed)
    shards = [c.train for _, c in sorted(data.clients.items())]
    pooled_x = np.concatenate([s.features for s in shards])
    pooled_y = np.concatenate([s.labels for s in shards])
    rng = np.random.default_rng([seed, 0xB42])  # the harness's draw of the byzantine IID data
    size = max(1, round(len(pooled_y) / honest))
    byz = [np.sort(rng.choice(len(pooled_y), size=size, replace=False)) for _ in range(byzantine)]
    shift, scale = (0.1307, 0.3081) if normalize else (0.0, 1.0)
    norm = lambda a: ((a - shift) / scale).astype(np.float32)  # noqa: E731
    workers = [Shard(norm(s.features), s.labels, batch=batch, seed=[seed, r])
               for r, s in enumerate(shards)]
    workers += [Shard(norm(pooled_x[t]), pooled_y[t], batch=batch, seed=[seed, honest + j])
                for j, t in enumerate(byz)]
    test_x, test_y = torch.from_numpy(norm(data.test.features)), torch.from_numpy(data.test.labels)
    model = mnist_mlp(hidden=hidden, generator=torch.Generator().manual_seed(seed))
    attacked = attack != "none"
    buffers: list[torch.Tensor | None] = [None] * honest
    curve: list[float] = []
    for t in range(1, rounds + 1):
        rows = []
        for r in range(honest):
            g = gradient(model, *workers[r].next())
            prev = buffers[r]
            buffers[r] = g if prev is None else momentum * prev + g
            rows.append(buffers[r])
        good = torch.stack(rows)
        if attacked:
            for j in range(byzantine):
                x, y = workers[honest + j].next()
                if attack == "ipm":
                    rows.append(-0.1 * good.mean(0))
                elif attack == "alie":
                    rows.append(good.mean(0) - 0.2533 * good.std(0))
                elif attack == "bf":
                    rows.append(-gradient(model, x, y))
                else:  # lf
                    rows.append(gradient(model, x, 9 - y))
        agg = aggregate(rule, torch.stack(rows), f=byzantine if attacked else 0)
        with torch.no_grad():
            start = 0
            for p in model.parameters():
                p -= lr * agg[start:start + p.numel()].view_as(p)
                start += p.numel()
        if t % every == 0 or t == rounds:
            curve.append(round(accuracy(model, test_x, test_y), 4))
    return {"attack": attack, "rule": rule, "seed": seed, "momentum": momentum,
            "normalize": normalize, "rounds": rounds, "accuracy": curve[-1],
            "accuracy_curve": curve, "wall_s": round(time.perf_counter() - started, 2),
            "cpu_s": round(time.process_time() - cpu, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", choices=ATTACKS, nargs="+", default=["ipm"])
    parser.add_argument("--rule", choices=RULES, nargs="+", default=["cm"])
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--normalize", action="store_true",
                        help="their transform, (x - 0.1307) / 0.3081; securefl's mnist5k is x")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for attack in args.attack:
        for rule in args.rule:
            for seed in args.seed:
                print(json.dumps(run(attack=attack, rule=rule, seed=seed, rounds=args.rounds,
                                     momentum=args.momentum, normalize=args.normalize)),
                      flush=True)


if __name__ == "__main__":
    main()
