"""DP-SGD cost on CPU: step time and peak memory, DP vs non-private, securefl vs raw Opacus.

For the reference MLP and CNN (:func:`securefl.models.build_model`, 1x28x28 inputs, 10
classes) at batch 64 and 256, and for every ``grad_sample_mode``:

* ``step``: one optimizer step on a fixed batch (forward, backward, clip + noise, update),
  timed for the non-private model, for raw Opacus (``PrivacyEngine.make_private`` on a fresh
  copy of the same model) and for securefl's :class:`~securefl.privacy.dp_sgd.DPSGDTrainer`
  (its wrapped module, optimizer and criterion driven the way its ``fit`` drives them).
  The three run interleaved in one loop so machine noise hits all of them alike; medians.
* ``round``: one local epoch over ``4 x batch`` examples: securefl's ``fit`` (ledger charge,
  Poisson loader, training, delta) against the loop a user writes around raw Opacus
  (``make_private`` with a ``TensorDataset`` loader) -- securefl's own overhead.
* ``fixed``: what securefl's ``fit`` adds around the Opacus loop, timed alone (ledger
  charge, loading the global vector, computing the delta), against raw Opacus's epoch.
* peak memory: the process's resident-set high-water mark during the steps, above the
  resident set before them (Linux ``VmHWM`` after resetting it through ``clear_refs``).
* ``csprng``: the secure sampler's cost per step, securefl with ``secure_mode = True``
  (AES-CTR noise, four summed Box-Muller Gaussians per coordinate,
  :mod:`securefl.privacy.randomness`) against the seeded default: the step on the fixed batch
  plus one Poisson mask over the ``4 x batch`` examples, interleaved with the other variants;
  and the two parts the CSPRNG replaces (one step's noise for every parameter, one mask)
  timed alone, whose difference over the seeded step (``extra_vs_seeded_step``) is the cost
  with less machine noise than the difference of two whole steps.

Prints one JSON document.  ``python benchmarks/dp.py --quick`` runs a reduced grid.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import platform
import re
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from securefl.config import ModelConfig
from securefl.data.datasets import Dataset
from securefl.engine.trainer import LocalTrainer
from securefl.models import build_model
from securefl.privacy.dp_sgd import GRAD_SAMPLE_MODES, DPSGDTrainer
from securefl.privacy.ledger import PrivacyLedger
from securefl.privacy.randomness import SecurePoissonSampler, SecureRandom
from securefl.vector import flatten, unflatten

SHAPE = (1, 28, 28)
CLASSES = 10
SIGMA, CLIP, LR = 1.0, 1.0, 0.05


def _kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def fix_mmap_threshold() -> None:
    """Serve every allocation over 128 KiB with its own mmap (glibc ``M_MMAP_THRESHOLD``), so
    tensors freed after a step leave the resident set and the next step's peak is visible;
    by default glibc raises the threshold and reuses already-resident heap memory."""
    name = ctypes.util.find_library("c")
    if name:
        ctypes.CDLL(name).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def peak_memory_mib(run: Callable[[], None]) -> float | None:
    """Resident-set growth (MiB) while ``run`` executes; ``None`` where Linux cannot tell."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _kib("VmRSS")
    run()
    return max(0, _kib("VmHWM") - before) / 1024


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn((n, *SHAPE), generator=generator)
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    return features, labels


def model(name: str) -> nn.Module:
    return build_model(ModelConfig(name=name), SHAPE, CLASSES, seed=0)  # type: ignore[arg-type]


def plain_step(net: nn.Module, optimizer: torch.optim.Optimizer,
               criterion: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor],
                                                                   None]:
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(net(x), y).backward()
        optimizer.step()
    return step


def raw_opacus(name: str, mode: str, batch: int, n: int) -> tuple[Any, Any, Any, Any]:
    """``(module, optimizer, criterion, loader)`` from Opacus alone, as its tutorials do."""
    net = model(name)
    features, labels = data(n, seed=1)
    engine = PrivacyEngine(accountant="rdp")
    made = engine.make_private(
        module=net, optimizer=torch.optim.SGD(net.parameters(), lr=LR),
        criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(features, labels), batch_size=batch),
        noise_multiplier=SIGMA, max_grad_norm=CLIP, grad_sample_mode=mode,
        noise_generator=torch.Generator().manual_seed(2))
    if mode == "ghost":
        return made
    module, optimizer, loader = made
    return module, optimizer, nn.CrossEntropyLoss(), loader


def securefl_trainer(name: str, mode: str, batch: int, n: int, *,
                     secure_mode: bool = False) -> DPSGDTrainer:
    features, labels = data(n, seed=1)
    train = Dataset(features.numpy(), labels.numpy(), CLASSES, "bench")
    base = LocalTrainer(model(name), train, train, epochs=1, batch_size=batch, lr=LR, seed=2)
    return DPSGDTrainer(base.task(), client_id="bench",
                        ledger=PrivacyLedger(":memory:", delta=1e-5),
                        noise_multiplier=SIGMA, max_grad_norm=CLIP, grad_sample_mode=mode,
                        secure_mode=secure_mode)


def time_interleaved(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin."""
    for fn in steps.values():  # warm-up
        fn()
        fn()
    samples: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for key, fn in steps.items():
            start = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_case(name: str, mode: str, batch: int, repeats: int) -> dict[str, Any]:
    n = 4 * batch
    x, y = data(batch, seed=3)
    plain_net = model(name)
    plain = plain_step(plain_net, torch.optim.SGD(plain_net.parameters(), lr=LR),
                       nn.CrossEntropyLoss())
    module, optimizer, criterion, loader = raw_opacus(name, mode, batch, n)
    raw = plain_step(module, optimizer, criterion)
    trainer = securefl_trainer(name, mode, batch, n)
    ours = plain_step(trainer.module, trainer.optimizer, trainer.criterion)
    secure = securefl_trainer(name, mode, batch, n, secure_mode=True)
    secure_step = plain_step(secure.module, secure.optimizer, secure.criterion)
    generator = torch.Generator().manual_seed(4)
    sampler = SecurePoissonSampler(num_samples=n, sample_rate=trainer.sample_rate, steps=1,
                                   source=SecureRandom())

    def seeded() -> None:  # what Opacus's seeded Poisson loader and noise do per step
        (torch.rand(n, generator=generator) < trainer.sample_rate).nonzero()
        ours(x, y)

    def csprng() -> None:
        next(iter(sampler))
        secure_step(x, y)

    step = time_interleaved({"plain": lambda: plain(x, y), "opacus": lambda: raw(x, y),
                             "securefl": lambda: ours(x, y), "seeded": seeded,
                             "csprng": csprng}, repeats)
    sampling = {key: step.pop(key) for key in ("seeded", "csprng")}
    size = sum(p.numel() for p in trainer.module.parameters() if p.requires_grad)
    source = SecureRandom()
    parts = time_interleaved({
        "seeded_noise": lambda: torch.normal(0.0, SIGMA * CLIP, size=(size,),
                                             generator=generator),
        "csprng_noise": lambda: source.gaussian(size, SIGMA * CLIP),
        "seeded_mask": lambda: (torch.rand(n, generator=generator) < 0.25).nonzero(),
        "csprng_mask": lambda: next(iter(sampler))}, repeats)
    extra_per_step = (parts["csprng_noise"] + parts["csprng_mask"]
                      - parts["seeded_noise"] - parts["seeded_mask"])
    memory = {
        "plain": peak_memory_mib(lambda: [plain(x, y) for _ in range(3)]),
        "opacus": peak_memory_mib(lambda: [raw(x, y) for _ in range(3)]),
        "securefl": peak_memory_mib(lambda: [ours(x, y) for _ in range(3)]),
    }

    def raw_round() -> None:
        module.train()
        for features, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            criterion(module(features), labels).backward()
            optimizer.step()

    parameters = flatten(trainer.model)
    counter = iter(range(1, 1 << 30))

    def securefl_round() -> None:  # a new global model each time: a repeat is not retrained
        rnd = next(counter)
        trainer.fit(parameters + np.float32(rnd * 1e-6), round=rnd)

    rounds = time_interleaved({"opacus": raw_round, "securefl": securefl_round},
                              max(3, repeats // 4))

    def fixed() -> None:
        """What securefl's fit adds around the Opacus loop: charge, load, flatten."""
        trainer.ledger.charge("bench", trainer.round_event(), round=next(counter))
        unflatten(trainer.model, parameters, trainer.layout)
        flatten(trainer.model) - parameters
    extra = time_interleaved({"fixed": fixed}, repeats)["fixed"]
    return {
        "model": name, "grad_sample_mode": mode, "batch": batch,
        "step_ms": {k: round(v * 1e3, 3) for k, v in step.items()},
        "peak_mib": {k: None if v is None else round(v, 1) for k, v in memory.items()},
        "round_ms": {k: round(v * 1e3, 3) for k, v in rounds.items()},
        "ratio_dp_vs_plain": round(step["securefl"] / step["plain"], 3),
        "ratio_opacus_vs_plain": round(step["opacus"] / step["plain"], 3),
        "overhead_step_vs_opacus": round(step["securefl"] / step["opacus"] - 1, 4),
        "overhead_round_vs_opacus": round(rounds["securefl"] / rounds["opacus"] - 1, 4),
        "securefl_fixed_ms_per_round": round(extra * 1e3, 3),
        "overhead_fixed_vs_opacus_round": round(extra / rounds["opacus"], 4),
        "csprng": {"step_ms": {k: round(v * 1e3, 3) for k, v in sampling.items()},
                   "overhead_vs_seeded": round(sampling["csprng"] / sampling["seeded"] - 1, 4),
                   "parameters": size, "parts_ms": {k: round(v * 1e3, 4)
                                                    for k, v in parts.items()},
                   "extra_ms_per_step": round(extra_per_step * 1e3, 4),
                   "extra_vs_seeded_step": round(extra_per_step / sampling["seeded"], 4)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--modes", nargs="+", default=list(GRAD_SAMPLE_MODES))
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="cnn, batch 64, 10 repeats")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batches, args.repeats = ["cnn"], [64], 10
    torch.set_num_threads(args.threads)
    fix_mmap_threshold()
    warnings.filterwarnings("ignore")
    cases = [bench_case(m, mode, b, args.repeats)
             for m in args.models for b in args.batches for mode in args.modes]
    ghost_cnn = [c["ratio_dp_vs_plain"] for c in cases
                 if c["model"] == "cnn" and c["grad_sample_mode"] == "ghost"]
    print(json.dumps({
        "benchmark": "dp_sgd_step", "device": "cpu", "threads": args.threads,
        "torch": torch.__version__, "opacus": __import__("opacus").__version__,
        "python": platform.python_version(), "sigma": SIGMA, "max_grad_norm": CLIP,
        "cases": cases,
        "targets": {
            "ghost_cnn_dp_vs_plain_max": max(ghost_cnn) if ghost_cnn else None,
            "ghost_cnn_dp_vs_plain_target": 2.0,
            "overhead_vs_opacus_step_max": max(c["overhead_step_vs_opacus"] for c in cases),
            "overhead_vs_opacus_round_max": max(c["overhead_round_vs_opacus"] for c in cases),
            "overhead_fixed_vs_opacus_round_max": max(c["overhead_fixed_vs_opacus_round"]
                                                      for c in cases),
            "overhead_vs_opacus_target": 0.05,
            "csprng_vs_seeded_step_max": max(c["csprng"]["overhead_vs_seeded"] for c in cases),
            "csprng_extra_vs_seeded_step_max": max(c["csprng"]["extra_vs_seeded_step"]
                                                   for c in cases),
            "csprng_vs_seeded_step_target": 0.05,
        },
    }, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
