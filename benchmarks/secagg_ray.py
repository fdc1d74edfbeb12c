"""``benchmarks/secagg.py --backend ray``: one SecAgg+ round with its sites in Ray actors.

The actors import this module by name (the benchmarks folder is put on ``PYTHONPATH``
before Ray starts) and build the sites themselves: fixed updates, their own identity keys.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Mapping

import numpy as np
from secagg import FixedTrainer, bench_large_round

from securefl.aggregation.mean import FedAvg
from securefl.engine.client import Client
from securefl.engine.optim import build_server_optimizer
from securefl.engine.protection import Update
from securefl.engine.server import Server
from securefl.secagg import SecAggConfig


class FixedSecAggSites:
    r"""In a Ray actor: SecAgg+ sites with :class:`FixedTrainer`\ s, the update and weights
    of :func:`engine_rounds`; each site's identity key is made here, only its public half
    is announced."""

    def __init__(self, client_ids: list[str], setup: dict) -> None:
        from securefl.secagg.keys import generate_identity

        self.config = SecAggConfig(**setup["secagg"])
        base = np.random.default_rng(2).normal(0, 0.05, setup["d"]).astype(np.float32)
        self.trainers = {c: FixedTrainer(Update(base, float(1 + int(c[1:]) % 50)))
                         for c in client_ids}
        self.keys = {c: generate_identity() for c in client_ids}
        self.clients: dict[str, Client] = {}

    def announce(self) -> dict[str, bytes]:
        from securefl.secagg.keys import identity_public_bytes

        return {c: identity_public_bytes(k) for c, k in self.keys.items()}

    def attach(self, directory: Mapping[str, bytes]) -> None:
        from securefl.secagg import SecAggClientProtection

        self.clients = {c: Client(c, self.trainers[c], SecAggClientProtection(
            client_id=c, identity=k, directory=directory, config=self.config))
            for c, k in self.keys.items()}


class PeakMemory:
    """Peak of the machine's memory in use (MemTotal - MemAvailable) above its level at
    the start, sampled every 0.2 s: the driver and every actor together."""

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = self.used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.used())

    @staticmethod
    def used() -> int:
        fields = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        return 1024 * (int(fields["MemTotal"].split()[0]) - int(fields["MemAvailable"].split()[0]))

    @property
    def gib(self) -> float:
        return round((self.peak - self.base) / 2**30, 3)


def bench_ray_round(n: int, d: int, actors: int, *, in_process: bool) -> dict:
    """One SecAgg+ round of ``n`` fixed-update clients at ``d``: in ``actors`` Ray actors
    (every message as wire bytes), and (``in_process``) in this process without the codec."""
    import ray

    from securefl.engine.ray_backend import RayTransport, start_hosts
    from securefl.ray_simulation import site_groups
    from securefl.secagg import SecAggServerProtection

    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (here, os.path.dirname(here), os.environ.get("PYTHONPATH")) if p)
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    secagg = {"max_weight": 100.0}
    ids = [f"c{i:04d}" for i in range(n)]
    groups = site_groups(ids, actors=actors, clients_per_actor=n)
    started = time.perf_counter()
    hosts = start_hosts("secagg_ray:FixedSecAggSites", groups, {"d": d, "secagg": secagg},
                        cpus=2 / len(groups), gpus=0.0, threads=None)
    directory: dict[str, bytes] = {}
    for announced in ray.get([h.announce.remote() for h in hosts]):
        directory.update(announced)
    ray.get([h.attach.remote(directory) for h in hosts])
    setup_s = time.perf_counter() - started
    transport = RayTransport(hosts, {c: i for i, g in enumerate(groups) for c in g})
    server = Server(transport, SecAggServerProtection(directory=directory,
                                                      config=SecAggConfig(**secagg)),
                    FedAvg(), build_server_optimizer("fedavg", lr=1.0, momentum=0.0,
                                                     beta1=0.9, beta2=0.99, tau=1e-3),
                    parameters=np.zeros(d, np.float32), seed=0)
    with PeakMemory() as memory:
        record = server.run_round(1)
    transport.close()
    time.sleep(3)  # the actors' memory goes back before the next baseline
    row = {"n": n, "d": d, "actors": actors, "ray_setup_s": round(setup_s, 3),
           "ray_round_s": round(record.seconds, 3), "ray_contributors": len(record.clients),
           "ray_peak_memory_gib": memory.gib,
           "bytes_per_client": (transport.bytes_sent + transport.bytes_received) // n}
    if in_process:
        with PeakMemory() as memory:
            large = bench_large_round(n, d)
        row.update(inprocess_round_s=round(large["round_s"], 3),
                   inprocess_peak_memory_gib=memory.gib,
                   ray_over_inprocess=round(record.seconds / large["round_s"], 3))
    print(json.dumps(row), file=sys.stderr, flush=True)  # progress; stdout: one document
    return row


def server_costs(d: int, thresholds: tuple[int, ...] = (16, 21, 26, 31), repeat: int = 200
                 ) -> dict:
    """What the SecAgg+ server does once per site (or per dropped site's neighbour), timed
    here to extrapolate a round to 10^4-10^6 sites: an Ed25519 verification, a Shamir
    reconstruction from ``t`` shares, one AES-128-CTR mask stream of ``d + 1`` words added
    into the sum, and adding one masked input into the sum."""
    from secagg_floor import median_seconds

    from securefl.secagg import shamir
    from securefl.secagg.keys import generate_identity, identity_public_bytes, sign, verify
    from securefl.secagg.prg import add_masks

    key = generate_identity()
    public, body = identity_public_bytes(key), b"x" * 200
    signature = sign(key, body)
    verify_s = median_seconds(lambda: [verify(public, signature, body, signer="c", what="bench")
                                       for _ in range(repeat)], 5) / repeat
    secret = int.from_bytes(os.urandom(32), "big")
    combine, cold = {}, {}
    for t in thresholds:
        xs = list(range(1, 2 * t))
        shares = dict(zip(xs, shamir.split(secret, threshold=t, xs=xs), strict=True))
        chosen = dict(list(shares.items())[:t])
        combine[str(t)] = median_seconds(lambda c=chosen, t=t: shamir.combine(c, threshold=t),
                                         21)

        def uncached(c: dict = chosen, t: int = t) -> None:
            shamir._lagrange_at_zero.cache_clear()  # points never seen before
            shamir.combine(c, threshold=t)

        cold[str(t)] = median_seconds(uncached, 21)
    total = np.zeros(d + 1, np.uint32)
    row = np.ones(d + 1, np.uint32)
    stream_s = median_seconds(lambda: add_masks(total, [(os.urandom(16), 1)]), 21)
    add_s = median_seconds(lambda: np.add(total, row, out=total), 21)
    return {"d": d, "ed25519_verify_s": verify_s, "shamir_combine_s_by_threshold": combine,
            "shamir_combine_new_points_s_by_threshold": cold,
            "mask_stream_and_add_s": stream_s, "add_masked_input_s": add_s}
