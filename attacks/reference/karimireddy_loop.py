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
   std over the honest rows, z 0.2533), BF ``-g_b``, LF ``g_b`` of labels ``9 - y``, mimic
   their ``MimicVariantAttacker`` with warm-up 1 (at the first iteration ``z`` is one power
   step from a standard normal ``z0`` on the centred honest rows, the target the honest
   worker with the largest ``<m_i, z>``; every byzantine row a copy of the target's row);
3. the rule on the 25 rows: CM (coordinate-wise median), Krum (their score: the sum of the
   ``n - f - 2`` smallest *squared* squared distances, m = 1), RFA (smoothed Weiszfeld
   from ``z = 0``, ``nu = 0.1``, T = 8);
4. the server step ``x <- x - lr * aggregate`` (SGD, lr 0.01, no weight decay).

``--model cnn`` is their network (``Net`` of their ``codes/tasks/mnist.py``, the PyTorch
MNIST example): ``Conv(1->32, 3) -> ReLU -> Conv(32->64, 3) -> MaxPool(2) -> Dropout2d(0.25)
-> Linear(9216->128) -> ReLU -> Dropout2d(0.5) -> Linear(128->10)``, their inputs
``(x - 0.1307) / 0.3081``.  (No ReLU after the second convolution, as in their file;
securefl's ``mnist_cnn`` is this network with ``variant = "karimireddy2022"``, and has the ReLU
and no dropout with the default ``variant = "plain"``; securefl draws independent masks per
site and step, this loop's ``--dropout independent``.)  Their first dropout drops whole
channels per example, the second single units (``Dropout2d`` of the torch of 2021 on a 2-D
input).  ``--dropout`` says how the masks are drawn: ``none``; ``shared``, as their
simulator does (it saves torch's RNG state before every worker's call and restores it
after, and nothing else draws from it within an epoch of 30 iterations, so every worker in
every iteration of an epoch gets the same masks; they change when the evaluation's data
loader draws its seed); ``independent``, fresh masks for every worker and iteration.
Masks come from seeded ``torch.Generator`` objects, never the global RNG.

Test accuracy (eval mode, no dropout) on the held-out 1,000 images every 30 iterations and
at the end.  ``--log-at`` records at the given iterations the geometry that decides which
row Krum and RFA return (:func:`capture`).  Prints JSON.
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
ATTACKS = ("none", "ipm", "alie", "bf", "lf", "mimic")
DROPOUT = ("none", "shared", "independent")


def uniform_init(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """torch's default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for every Linear and Conv
    weight and bias, drawn from ``generator``."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.Linear | nn.Conv2d):
                bound = 1.0 / math.sqrt(layer.weight[0].numel())
                for p in (layer.weight, layer.bias):
                    p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)
    return model


def mnist_mlp(*, hidden: int, generator: torch.Generator) -> nn.Module:
    """784 -> hidden -> 10 with ReLU."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    return uniform_init(model, generator)


class TheirNet(nn.Module):
    """``Net`` of their ``codes/tasks/mnist.py``; ``masks`` are the two dropout masks
    (already scaled by ``1 / (1 - p)``), shapes ``(B, 64, 1, 1)`` and ``(B, 128)``."""

    P = (0.25, 0.5)

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3), nn.Conv2d(32, 64, 3)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor,
                masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = F.max_pool2d(self.conv2(F.relu(self.conv1(x))), 2)
        if masks is not None:
            x = x * masks[0][:len(x)]
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        if masks is not None:
            x = x * masks[1][:len(x)]
        return self.fc2(x)

    @classmethod
    def draw_masks(cls, batch: int, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        keep = [1.0 - p for p in cls.P]
        first = (torch.rand((batch, 64, 1, 1), generator=generator) < keep[0]) / keep[0]
        second = (torch.rand((batch, 128), generator=generator) < keep[1]) / keep[1]
        return first.float(), second.float()


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


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = model(x) if masks is None else model(x, masks)
    F.cross_entropy(out, y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]


def next_masks(mode: str, shared: tuple[torch.Tensor, torch.Tensor] | None, batch: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The dropout masks of one worker's call: none, the epoch's shared ones, or fresh."""
    if mode == "none":
        return None
    return shared if mode == "shared" else TheirNet.draw_masks(batch, generator)


def krum_scores(rows: torch.Tensor, *, f: int) -> torch.Tensor:
    """Their ``_compute_scores``: the ``n - f - 2`` smallest squared squared distances."""
    quartic = (torch.cdist(rows.double(), rows.double()) ** 2) ** 2
    quartic.fill_diagonal_(float("inf"))
    return torch.sort(quartic, 1).values[:, :rows.shape[0] - f - 2].sum(1)


def weiszfeld(rows: torch.Tensor, *, iterations: int = 8, nu: float = 0.1
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Their RFA: smoothed Weiszfeld from ``z = 0``, ``beta_i = (1/n) / max(||z - x_i||, nu)``,
    ``z <- sum beta_i x_i / sum beta_i``.  Returns ``z`` and the last normalised weights."""
    n = rows.shape[0]
    z = torch.zeros_like(rows[0])
    weights = torch.full((n,), 1.0 / n)
    for _ in range(iterations):
        betas = (1.0 / n) / torch.clamp((rows - z).norm(dim=1), min=nu)
        weights = betas / betas.sum()
        z = (weights[:, None] * rows).sum(0)
    return z, weights


def aggregate(rule: str, rows: torch.Tensor, *, f: int) -> torch.Tensor:
    if rule == "mean":
        return rows.mean(0)
    if rule == "cm":
        return rows.median(0).values  # n odd here: the middle value
    if rule == "krum":
        return rows[int(torch.argmin(krum_scores(rows, f=f)))]
    return weiszfeld(rows)[0]


def capture(rows: torch.Tensor, *, honest: int, f: int) -> dict[str, object]:
    """Why Krum and RFA return the byzantine rows (rows ``honest:`` are byzantine).

    * distances: honest rows' pairwise squared distances (mean, min), honest-to-byzantine
      (mean, min), byzantine among themselves (max), the honest rows' mean norm and the
      norm of their mean (the component they share);
    * Krum (their quartic score): the least score of the rows at the byzantine point ``b``
      (the byzantine rows, and under mimic the copied honest row) and of the other rows, and
      which the rule returns;
    * geometric median: for the byzantine point ``b`` held by ``k`` identical rows,
      ``S = ||sum_{x_i != b} (x_i - b) / ||x_i - b|| ||``; ``b`` is the exact geometric
      median iff ``S <= k`` (the subgradient condition at a point of mass ``k``);
    * RFA: the weight its last Weiszfeld step gives the byzantine rows, and ``||z - b||``
      against ``||b||``.
    """
    rows = rows.double()
    good, bad = rows[:honest], rows[honest:]
    dist = torch.cdist(rows, rows) ** 2
    hh = dist[:honest, :honest][~torch.eye(honest, dtype=torch.bool)]
    hb = dist[:honest, honest:]
    scores = krum_scores(rows, f=f)
    b = bad[0]
    same = (rows - b).norm(dim=1) <= 1e-9 * max(float(b.norm()), 1e-30)
    chosen = int(torch.argmin(scores))
    others = rows[~same] - b
    s_value = float((others / others.norm(dim=1, keepdim=True)).sum(0).norm())
    z, weights = weiszfeld(rows.float())
    return {"honest_sq_dist_mean": float(hh.mean()), "honest_sq_dist_min": float(hh.min()),
            "honest_byz_sq_dist_mean": float(hb.mean()), "honest_byz_sq_dist_min": float(hb.min()),
            "byz_sq_dist_max": float(dist[honest:, honest:].max()),
            "honest_norm_mean": float(good.norm(dim=1).mean()),
            "honest_mean_norm": float(good.mean(0).norm()), "byz_norm": float(b.norm()),
            "krum_best_at_b": float(scores[same].min()),
            "krum_best_other": float(scores[~same].min()),
            "krum_choice": "b" if bool(same[chosen]) else
            ("honest" if chosen < honest else "byzantine"),
            "gm_rows_at_b": int(same.sum()), "gm_S": round(s_value, 3),
            "gm_b_is_median": bool(s_value <= int(same.sum())),
            "rfa_byz_weight": round(float(weights[same].sum()), 4),
            "rfa_dist_to_b_over_norm_b": round(float((z.double() - b).norm() / b.norm()), 4)}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def mimic_target(good: torch.Tensor, *, seed: int = 0) -> int:
    """Their ``MimicVariantAttacker`` at its first (warm-up 1: only) iteration."""
    mu = good.mean(0)
    z0 = torch.randn(good.shape[1], generator=torch.Generator().manual_seed(seed))
    centred = good - mu
    z = (centred @ z0) @ centred
    return int(torch.argmax(good @ (z / z.norm())))


def run(*, attack: str, rule: str, seed: int, rounds: int = 600, momentum: float = 0.0,
        honest: int = 20, byzantine: int = 5, hidden: int = 64, lr: float = 0.01,
        batch: int = 32, every: int = 30, normalize: bool = False, model_name: str = "mlp",
        dropout: str = "none", class_count: int | None = None,
        log_at: tuple[int, ...] = ()) -> dict[str, object]:
    started, cpu = time.perf_counter(), time.process_time()
    normalize = normalize or model_name == "cnn"  # their network's inputs are always scaled
    counts = None if class_count is None else (class_count,) * 10
    config = DataConfig(dataset="mnist5k", num_clients=honest, partition="shards",
                        shards_per_client=1, val_fraction=0.0, class_counts=counts)
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
    init = torch.Generator().manual_seed(seed)
    model = TheirNet() if model_name == "cnn" else mnist_mlp(hidden=hidden, generator=init)
    if model_name == "cnn":
        uniform_init(model, init)
    masks_rng = torch.Generator().manual_seed(seed * 1000 + 0xD0)
    use_masks = model_name == "cnn" and dropout != "none"
    attacked = attack != "none"
    buffers: list[torch.Tensor | None] = [None] * honest
    curve: list[float] = []
    diagnostics: list[dict[str, object]] = []
    target: int | None = None
    shared = None
    for t in range(1, rounds + 1):
        model.train()
        if use_masks and dropout == "shared" and (t - 1) % every == 0:
            shared = TheirNet.draw_masks(batch, masks_rng)  # one draw per epoch of 30
        mode = dropout if use_masks else "none"
        rows = []
        for r in range(honest):
            g = gradient(model, *workers[r].next(), next_masks(mode, shared, batch, masks_rng))
            prev = buffers[r]
            buffers[r] = g if prev is None else momentum * prev + g
            rows.append(buffers[r])
        good = torch.stack(rows)
        if attacked:
            if attack == "mimic" and target is None:
                target = mimic_target(good)
            for j in range(byzantine):
                x, y = workers[honest + j].next()
                drop = next_masks(mode, shared, batch, masks_rng)
                if attack == "ipm":
                    rows.append(-0.1 * good.mean(0))
                elif attack == "alie":
                    rows.append(good.mean(0) - 0.2533 * good.std(0))
                elif attack == "bf":
                    rows.append(-gradient(model, x, y, drop))
                elif attack == "lf":
                    rows.append(gradient(model, x, 9 - y, drop))
                else:  # mimic
                    rows.append(good[target])
        stacked = torch.stack(rows)
        f = byzantine if attacked else 0
        if t in log_at and attacked:
            diagnostics.append({"iteration": t, **capture(stacked, honest=honest, f=f)})
        agg = aggregate(rule, stacked, f=f)
        with torch.no_grad():
            start = 0
            for p in model.parameters():
                p -= lr * agg[start:start + p.numel()].view_as(p)
                start += p.numel()
        if t % every == 0 or t == rounds:
            model.eval()
            curve.append(round(accuracy(model, test_x, test_y), 4))
    return {"attack": attack, "rule": rule, "seed": seed, "momentum": momentum,
            "normalize": normalize, "model": model_name, "dropout": dropout,
            "train_images": len(pooled_y), "rounds": rounds,
            "accuracy": curve[-1], "accuracy_curve": curve, "diagnostics": diagnostics,
            "wall_s": round(time.perf_counter() - started, 2),
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
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--dropout", choices=DROPOUT, default="none",
                        help="the CNN's dropout masks (see the module docstring)")
    parser.add_argument("--class-count", type=int, default=None,
                        help="training images kept per class (mnist5k: at most 400)")
    parser.add_argument("--log-at", type=int, nargs="*", default=[],
                        help="iterations at which to record the capture geometry")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for attack in args.attack:
        for rule in args.rule:
            for seed in args.seed:
                print(json.dumps(run(attack=attack, rule=rule, seed=seed, rounds=args.rounds,
                                     momentum=args.momentum, normalize=args.normalize,
                                     model_name=args.model, dropout=args.dropout,
                                     class_count=args.class_count,
                                     log_at=tuple(args.log_at))), flush=True)


if __name__ == "__main__":
    main()
