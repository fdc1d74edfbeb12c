"""Secure aggregation (SecAgg+) benchmarks: prints one JSON object.

    python benchmarks/secagg.py            # every measurement
    python benchmarks/secagg.py --quick    # smaller sizes, for a smoke run
    python benchmarks/secagg.py --backend ray [--clients 1000 5000] [--dimension 100000]
                                           # one round in 2 Ray actors vs in-process

Times are medians (seconds) on this machine.  With ``flwr`` installed, Flower's SecAgg+
primitives (``flwr.common.secure_aggregation``: quantize, pseudo_rand_gen, the ndarray
arithmetic, Shamir ``create_shares``) run side by side at the same n, d and k, and each
``*_ratio`` is securefl time / Flower time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from collections.abc import Callable, Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from secagg_floor import CryptoFloor, median_seconds, raw_ctr_stream

from securefl.aggregation.mean import FedAvg
from securefl.engine.client import Client
from securefl.engine.messages import Message, encode
from securefl.engine.optim import build_server_optimizer
from securefl.engine.protection import (
    ClientProtection,
    Plain,
    Rows,
    ServerProtection,
    Update,
    WeightedSum,
)
from securefl.engine.server import Server
from securefl.engine.session import RoundContext
from securefl.engine.simulation import InProcessTransport
from securefl.secagg import SecAggConfig, build_simulation, shamir
from securefl.secagg.graph import degree, graph_seed, harary_graph, neighbourhood, threshold_for
from securefl.secagg.keys import (
    commitment,
    consistency_body,
    pairwise_mask_key,
    participants_digest,
    self_mask_key,
    sign,
    verify,
)
from securefl.secagg.messages import SecAggMaskedInput
from securefl.secagg.prg import PRG_KEY_BYTES, add_masks, keystream, prg_key
from securefl.secagg.quantize import Quantizer, levels_for
from securefl.secagg.scope import Scope

try:
    from flwr.common.secure_aggregation.crypto.shamir import create_shares
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        parameters_addition,
        parameters_mod,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import quantize as flwr_quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    HAVE_FLWR = True
except ImportError:  # pragma: no cover - optional peer
    HAVE_FLWR = False


SCOPE = Scope(federation=bytes(32), run=bytes(32), round=1)


def ratio(ours: float, theirs: float | None) -> float | None:
    return None if theirs is None else round(ours / theirs, 3)


# ----------------------------------------------------------------------------- primitives
def bench_shamir(parties: int, threshold: int, repeat: int) -> dict:
    secret = int.from_bytes(os.urandom(32), "big")
    xs = list(range(1, parties + 1))
    ours = median_seconds(lambda: shamir.split(secret, threshold=threshold, xs=xs), repeat)
    ours_cpu = median_seconds(lambda: shamir.split(secret, threshold=threshold, xs=xs), repeat,
                              clock=time.thread_time)  # what a shared machine disturbs less
    theirs = (median_seconds(lambda: create_shares(os.urandom(32), threshold, parties), 3)
              if HAVE_FLWR else None)
    return {"parties": parties, "threshold": threshold, "securefl_s": ours,
            "securefl_cpu_s": ours_cpu, "flwr_s": theirs, "ratio": ratio(ours, theirs)}


def bench_client_masking(d: int, k: int, repeat: int) -> dict:
    """Self mask + k pairwise masks on a quantized vector (key agreement excluded on both
    sides: the X25519 secrets are given)."""
    seed, secrets_ = os.urandom(32), [os.urandom(32) for _ in range(k)]
    encoded = np.zeros(d, np.uint32)

    def ours() -> np.ndarray:
        masked = encoded.copy()
        masks = [(self_mask_key(seed, scope=SCOPE, client_id="u"), 1)]
        for index, shared in enumerate(secrets_):
            key = pairwise_mask_key(shared, scope=SCOPE, first="u", second=f"v{index}")
            masks.append((key, 1 if index % 2 else -1))
        add_masks(masked, masks)
        return masked

    def flower() -> list:
        masked = [encoded.astype(np.int64)]
        masked = parameters_addition(masked, pseudo_rand_gen(seed, 1 << 32, [(d,)]))
        for index, shared in enumerate(secrets_):
            mask = pseudo_rand_gen(shared, 1 << 32, [(d,)])
            masked = (parameters_addition if index % 2 else parameters_subtraction)(masked, mask)
        return parameters_mod(masked, 1 << 32)

    ours_s = median_seconds(ours, repeat)
    theirs = median_seconds(flower, repeat) if HAVE_FLWR else None
    buffer, zeros = bytearray(4 * d + 15), bytes(4 * d)

    floor_keys = [os.urandom(PRG_KEY_BYTES) for _ in range(1 + k)]

    def floor() -> None:  # raw AES-128-CTR of the same 1 + k streams, nothing else
        for key in floor_keys:
            raw_ctr_stream(key, zeros, buffer)

    floor_s = median_seconds(floor, repeat)
    return {"d": d, "k": k, "securefl_s": ours_s, "flwr_s": theirs,
            "ratio": ratio(ours_s, theirs), "aes_ctr_keystream_floor_s": floor_s}


def bench_quantize(d: int, repeat: int) -> dict:
    x = np.random.default_rng(0).normal(0, 0.1, d).astype(np.float32)
    quantizer = Quantizer(clip=1.0, max_weight=1e4, levels=levels_for(10, bits="auto"))
    def ours() -> np.ndarray:
        dither = keystream(prg_key(os.urandom(32), SCOPE.info("dither", "u")), d + 1)
        return quantizer.encode(x, 100.0, dither)

    ours_s = median_seconds(ours, repeat)
    theirs = (median_seconds(lambda: flwr_quantize([x], 1.0, 1 << 22), repeat)
              if HAVE_FLWR else None)
    return {"d": d, "securefl_s": ours_s, "flwr_s": theirs, "ratio": ratio(ours_s, theirs)}


def bench_upload(d: int) -> dict:
    ours = len(encode(SecAggMaskedInput(masked=np.zeros(d + 1, np.uint32)))) / (4 * d)
    theirs = None
    if HAVE_FLWR:
        masked = parameters_mod([np.zeros(d, np.int64)], 1 << 32)
        theirs = sum(a.nbytes for a in masked) / (4 * d)
    return {"d": d, "securefl_bytes_per_float32_byte": round(ours, 5),
            "flwr_bytes_per_float32_byte": theirs}


# ----------------------------------------------------------------------------- protocol
def drive(server: ServerProtection, clients: Mapping[str, ClientProtection],
          updates: Mapping[str, Update], *, dimension: int, drop_after_shares: set[str],
          timings: dict[str, float]) -> WeightedSum:
    """One round in-process; ``timings`` gets each server step (4: summing the masked inputs,
    6: unmasking).  The replies go to ``step`` as one batch, so step 4 does all the summing
    (in the engine the server adds each masked input as it arrives, ``receive``)."""
    protocol = server.server_round(round=1, dimension=dimension)
    rounds = {c: clients[c].client_round(round=1, context=RoundContext.standalone(round=1))
              for c in updates}
    requests: Mapping[str, Message | None] = protocol.open(list(updates))
    replies = {c: rounds[c].open(updates[c], requests[c]) for c in updates}
    for exchange in range(1, 7):
        started = time.perf_counter()
        result = protocol.step(replies, set())
        timings[f"server_step_{exchange}_s"] = time.perf_counter() - started
        if isinstance(result, WeightedSum):
            return result
        replies = {c: rounds[c].step(m) for c, m in result.items()
                   if not (exchange == 3 and c in drop_after_shares)}
    raise RuntimeError("the round did not finish in 6 exchanges")


def bench_server_unmask(n: int, d: int, dropout: float, neighbours: int | str,
                        repeat: int) -> dict:
    """Two server steps, medians over ``repeat`` whole rounds: summing the masked inputs
    (step 4) and unmasking (step 6), against a plaintext float32 sum of the same rows."""
    config = SecAggConfig(max_weight=100.0, neighbours=neighbours)
    ids = [f"c{i:04d}" for i in range(n)]
    base = np.random.default_rng(1).normal(0, 0.05, d).astype(np.float32)
    updates = {c: Update(base, float(1 + i % 50)) for i, c in enumerate(ids)}
    server, clients = build_simulation(config, ids)
    dropped = set(ids[: round(dropout * n)])
    unmask, summing, error = [], [], 0.0
    weight = sum(updates[c].weight for c in ids if c not in dropped)
    for _ in range(repeat):
        timings: dict[str, float] = {}
        result = drive(server, clients, updates, dimension=d, drop_after_shares=dropped,
                       timings=timings)
        unmask.append(timings["server_step_6_s"])
        summing.append(timings["server_step_4_s"])
        error = max(error, float(np.abs(result.total - weight * base.astype(np.float64)).max()))
    rows = [base.copy() for _ in range(n)]

    def plain_sum() -> np.ndarray:
        total = np.zeros(d, np.float32)
        for row in rows:
            np.add(total, row, out=total)
        return total

    plain = median_seconds(plain_sum, 2 * repeat + 1)
    weights = np.array([updates[c].weight for c in ids])
    engine_plain = median_seconds(  # what the Plain protection does: stack, weighted sum
        lambda: Rows(tuple(ids), np.stack(rows), weights).weighted_sum(), 3)
    unmask_s, summing_s = statistics.median(unmask), statistics.median(summing)
    return {"n": n, "d": d, "dropout": dropout, "neighbours": neighbours, "repeat": repeat,
            "server_unmask_s": unmask_s, "server_sum_masked_inputs_s": summing_s,
            "plaintext_sum_s": plain, "unmask_over_plaintext_sum": round(unmask_s / plain, 3),
            "sum_and_unmask_over_plaintext_sum": round((unmask_s + summing_s) / plain, 3),
            "plain_protection_weighted_sum_s": engine_plain,
            "sum_and_unmask_over_plain_protection": round((unmask_s + summing_s) / engine_plain,
                                                          3),
            "max_abs_error": error}


class FixedTrainer:
    """Returns the same update every round: measures the protocol, not training."""

    def __init__(self, update: Update) -> None:
        self.update = update

    def fit(self, parameters: np.ndarray, *, round: int) -> tuple[Update, dict[str, float]]:
        return self.update, {}

    def evaluate(self, parameters: np.ndarray) -> tuple[int, float, float]:
        return 1, 0.0, 0.0


def engine_rounds(server_protection: ServerProtection,
                  client_protections: Mapping[str, ClientProtection], d: int, rounds: int,
                  *, wire: bool, cpu: list[float] | None = None,
                  faults: list[int] | None = None,
                  between: Callable[[], None] | None = None) -> tuple[list[float], list[int]]:
    """Wall seconds and contributors per round; ``cpu`` (if given) gets each round's CPU
    seconds in this thread (the in-process transport runs every client in it), ``faults``
    each round's minor page faults (fresh memory the round touched); ``between`` (if given)
    runs before every round and after the last, outside the timed rounds."""
    base = np.random.default_rng(2).normal(0, 0.05, d).astype(np.float32)
    clients = {c: Client(c, FixedTrainer(Update(base, float(1 + i % 50))), p)
               for i, (c, p) in enumerate(client_protections.items())}
    transport = InProcessTransport(clients, wire=wire)
    server = Server(transport, server_protection, FedAvg(),
                    build_server_optimizer("fedavg", lr=1.0, momentum=0.0, beta1=0.9,
                                           beta2=0.99, tau=1e-3),
                    parameters=np.zeros(d, np.float32), seed=0)
    seconds, contributors = [], []
    for r in range(1, rounds + 1):
        if between is not None:
            between()
        started, faulted = time.thread_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        record = server.run_round(r)
        if cpu is not None:
            cpu.append(time.thread_time() - started)
        if faults is not None:
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted)
        seconds.append(record.seconds)
        contributors.append(len(record.clients))
    if between is not None:
        between()
    transport.close()
    return seconds, contributors


def malicious_server_checks(n: int, k: int, repeat: int = 20) -> dict:
    """What the defences against a malicious server cost, per client and for the server:
    the commit-then-reveal graph (``n`` commitment checks, the seed, the own neighbourhood)
    and the consistency check (one signature, ``t`` verifications); the server verifies
    ``n`` reveals and ``n`` signatures and builds the graph."""
    ids = [f"c{i:04d}" for i in range(n)]
    t = threshold_for(k, fraction=0.5)
    coins = {c: os.urandom(32) for c in ids}
    commitments = {c: commitment(SCOPE, "graph", c, r) for c, r in coins.items()}
    identity = Ed25519PrivateKey.generate()
    public = identity.public_key().public_bytes_raw()
    body = consistency_body(SCOPE, client_id="c0000", survivors=participants_digest(ids))
    signature = sign(identity, body)

    def graph_checks() -> None:
        assert all(commitment(SCOPE, "graph", c, r) == commitments[c] for c, r in coins.items())
        seed = graph_seed(SCOPE.info("graph-seed"), coins)
        neighbourhood(ids, ids[0], num_neighbours=k, seed=seed)

    def consistency() -> None:
        digest = participants_digest(ids)
        sign(identity, consistency_body(SCOPE, client_id="c0000", survivors=digest))
        for _ in range(t):
            verify(public, signature, consistency_body(SCOPE, client_id="c0000",
                                                       survivors=digest), signer="c", what="c")

    def server() -> None:
        assert all(commitment(SCOPE, "graph", c, r) == commitments[c] for c, r in coins.items())
        harary_graph(ids, num_neighbours=k, seed=graph_seed(SCOPE.info("graph-seed"), coins))
        for _ in range(n):
            verify(public, signature, body, signer="c", what="c")

    per_graph = median_seconds(graph_checks, repeat)
    per_consistency = median_seconds(consistency, repeat)
    server_s = median_seconds(server, max(3, repeat // 4))
    return {"n": n, "k": k, "t": t, "client_graph_checks_s": per_graph,
            "client_consistency_check_s": per_consistency,
            "client_total_s": per_graph + per_consistency, "server_s": server_s,
            "round_total_s": n * (per_graph + per_consistency) + server_s}


def bench_round(n: int, d: int, rounds: int, neighbours: int | str = "auto") -> dict:
    ids = [f"c{i:04d}" for i in range(n)]
    plain = Plain()
    plain_s, _ = engine_rounds(plain, dict.fromkeys(ids, plain), d, rounds, wire=True)
    server, clients = build_simulation(SecAggConfig(max_weight=100.0, neighbours=neighbours),
                                       ids)
    load = os.getloadavg()[0]
    secure_cpu: list[float] = []
    faults: list[int] = []
    k = degree(n, neighbours=neighbours)
    sampler = CryptoFloor(n, d, k)  # timed between the rounds (CryptoFloor's docstring)
    slice_repeat = -(-200 // (rounds + 1))
    secure_s, contributors = engine_rounds(server, clients, d, rounds, wire=True,
                                           cpu=secure_cpu, faults=faults,
                                           between=lambda: sampler.sample(slice_repeat))
    plain_median, secure_median = statistics.median(plain_s), statistics.median(secure_s)
    floor = sampler.report()
    floor_cpu = sampler.report(cpu=True)["floor_s"]
    checks = malicious_server_checks(n, k)
    added = checks["round_total_s"] / (secure_median - checks["round_total_s"])
    return {"n": n, "d": d, "neighbours": neighbours, "wire": True,
            "plain_round_s": plain_median,
            "secagg_round_s": secure_median,
            "secagg_over_plain": round(secure_median / plain_median, 3),
            "crypto_floor": floor,
            "crypto_floor_over_plain": round(floor["floor_s"] / plain_median, 3),
            "secagg_over_crypto_floor": round(secure_median / floor["floor_s"], 3),
            # beside the target: the round over the floor plus the symmetric cryptography it
            # leaves out (HKDF, AES-GCM, SHA-256), i.e. what remains is not cryptography
            "secagg_over_floor_and_symmetric_crypto": round(
                secure_median / (floor["floor_s"] + floor["not_in_floor"]["total_s"]), 3),
            # the same ratio in CPU time (round and per-operation medians), for a busy machine
            "secagg_round_cpu_s": statistics.median(secure_cpu),
            "crypto_floor_cpu_s": floor_cpu,
            "secagg_over_crypto_floor_cpu": round(statistics.median(secure_cpu) / floor_cpu, 3),
            "load_average": round(load, 2),
            # rounds after the first: memory that later rounds touch afresh (page faults)
            "minor_page_faults_per_round": statistics.median(faults[1:] or faults),
            "malicious_server_checks": checks,
            "checks_added_to_round": round(added, 3),
            "contributors": contributors}


def bench_large_round(n: int, d: int) -> dict:
    ids = [f"c{i:04d}" for i in range(n)]
    server, clients = build_simulation(SecAggConfig(max_weight=100.0), ids)
    seconds, contributors = engine_rounds(server, clients, d, 1, wire=False)
    return {"n": n, "d": d, "round_s": seconds[0], "contributors": contributors[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, smoke run")
    parser.add_argument("--backend", choices=("inprocess", "ray"), default="inprocess",
                        help="ray: only the SecAgg+ round in Ray actors vs in-process")
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--dimension", type=int, default=100_000)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--inprocess-up-to", type=int, default=1000,
                        help="also time in-process for n up to this")
    args = parser.parse_args()
    if args.backend == "ray":
        from secagg_ray import bench_ray_round, server_costs

        print(json.dumps({"machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
                          "server_costs": server_costs(args.dimension),
                          "ray_round": [bench_ray_round(n, args.dimension, args.actors,
                                                        in_process=n <= args.inprocess_up_to)
                                        for n in args.clients]}, indent=1))
        return
    quick = args.quick
    big_d = 100_000 if quick else 1_000_000
    report = {
        "machine": {"cpus": os.cpu_count()},
        "flwr": HAVE_FLWR,
        "shamir_share": bench_shamir(500, 251, 5 if quick else 21),
        "client_masking": bench_client_masking(big_d, 10, 5 if quick else 21),
        "quantize": bench_quantize(big_d, 5 if quick else 21),
        "upload": bench_upload(big_d),
        "server_unmask": bench_server_unmask(20 if quick else 100, big_d, 0.0, "auto",
                                             3 if quick else 5),
        "server_unmask_10pct_dropout": bench_server_unmask(20 if quick else 100, big_d, 0.1,
                                                           "auto", 3 if quick else 5),
        "round": bench_round(10 if quick else 50, 10_000 if quick else 100_000,
                             3 if quick else 5),
        "round_k10": bench_round(20 if quick else 50, 10_000 if quick else 100_000,
                                 3 if quick else 5, neighbours=10),
        "large_round": bench_large_round(100 if quick else 1000, 10_000 if quick else 100_000),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
