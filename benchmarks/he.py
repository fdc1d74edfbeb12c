"""Benchmark securefl's CKKS aggregation against TenSEAL's default context, side by side.

securefl: N = 8192, primes [55, 40], scale 2^36, two reals per complex slot, seeded symmetric
encryption (clients upload half a ciphertext).  TenSEAL default (most tutorials):
N = 8192, primes [60, 40, 40, 60], scale 2^40, one real per slot, public-key encryption.

For each: encrypt (encoding included), load (parse one client's upload on the server), add
(one client's ciphertexts into a running sum), serialize, decrypt (loading and decoding
included): seconds per 1M parameters (median of ``--repeats``; encryption also in CPU
seconds, the per-core rate on a shared host), and bytes per parameter uploaded and sent
back (float32 = 4 bytes).
Single-threaded.  Prints one JSON object.

``blind_server`` times what the blind-server protocol adds, per round, through the real
protection code: the server's check of one upload (signature over the upload's digest and
SEAL validation), and a site's check of the encrypted global model before it decrypts it
(``--sites`` signed statements, the SHA-256 of the encoded state for its decryption record)
and the local decryption itself; and the wire sizes of one upload and of the ``FitIns``
payload that carries the encrypted model (also with ``resum``: every upload), against
float32.

    python benchmarks/he.py [--dimension 1048576] [--repeats 3] [--sites 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import tenseal as ts

from securefl.engine.messages import FitIns, encode
from securefl.engine.protection import Update
from securefl.engine.session import RoundContext, model_digest
from securefl.he import CKKSKeys, HEConfig
from securefl.he import build_simulation as build_he
from securefl.he.wire import HEPart


def _median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_securefl(x: np.ndarray, repeats: int) -> dict[str, float]:
    keys = CKKSKeys.generate(poly_modulus_degree=8192, coeff_modulus_bits=(55, 40),
                             scale_bits=36)
    public = keys.public()
    d = x.size
    encrypt_s, upload = _median_seconds(lambda: keys.encrypt(x), repeats)
    cpu = time.process_time()
    keys.encrypt(x)
    encrypt_cpu_s = time.process_time() - cpu
    loaded = [public.load(b) for b in upload]
    load_s, _ = _median_seconds(lambda: [public.load(b) for b in upload], repeats)
    total = [public.load(b) for b in upload]

    def add() -> None:
        for t, c in zip(total, loaded, strict=True):
            public.add_into(t, c)
    add_s, _ = _median_seconds(add, repeats)
    serialize_s, aggregate = _median_seconds(lambda: [public.dump(t) for t in total], repeats)
    decrypt_s, values = _median_seconds(lambda: keys.decrypt(aggregate, d), repeats)
    expected = x * (1 + repeats)  # the sum holds x once plus ``repeats`` additions of x
    return {**_per_million(d, encrypt=encrypt_s, add=add_s, load=load_s, serialize=serialize_s,
                           decrypt=decrypt_s, upload=sum(map(len, upload)),
                           aggregate=sum(map(len, aggregate)),
                           max_abs_error=float(np.max(np.abs(values - expected)))),
            # CPU time of this single-threaded process: per-core throughput on a shared host
            "encrypt_params_per_cpu_s": d / encrypt_cpu_s}


def bench_blind_server(x: np.ndarray, repeats: int, sites: int) -> dict[str, float]:
    """Checks and sizes of one blind-server round (module docstring), per 1M parameters."""
    d = x.size
    ids = [f"site-{i}" for i in range(sites)]
    server, clients = build_he(HEConfig(), ids, dimension=d)
    run = b"\x01" * 32
    protocol = server.server_round(round=1, dimension=d)
    opening = protocol.open(ids)[ids[0]]
    delta = (x * 0.1).astype(np.float32)
    uploads = {}
    for cid in ids:
        clients[cid].open_model(FitIns(run=run, round=1, parameters=np.zeros(d, np.float32),
                                       config={}, protection=opening))
        context = RoundContext.standalone(round=1, run=run,
                                          model=model_digest(np.zeros(d, np.float32)))
        uploads[cid] = clients[cid].client_round(round=1, context=context).open(
            Update(delta, 10.0), opening)
    check_s, _ = _median_seconds(lambda: protocol._check(ids[0], uploads[ids[0]]), repeats)
    protocol.step(uploads, set())
    state = server.state
    site = clients[ids[0]]
    site_check_s, _ = _median_seconds(
        lambda: (site._check_state(state, run), hashlib.sha256(encode(state)).digest()),
        repeats)
    decrypt_s, model = _median_seconds(lambda: site._decrypt(state), repeats)
    scale = 1e6 / d
    next_open = server.server_round(round=2, dimension=d).open(ids)[ids[0]]
    parts = [HEPart(ciphertexts=list(u.ciphertexts), clear=u.clear) for u in uploads.values()]
    resummed = dataclasses.replace(next_open, state=dataclasses.replace(
        state, ciphertexts=[], parts=parts))
    return {"sites": sites,
            "server_check_upload_s_per_1M": check_s * scale,
            "site_check_state_s_per_1M": site_check_s * scale,
            "site_decrypt_state_s_per_1M": decrypt_s * scale,
            "upload_x_float32": len(encode(uploads[ids[0]])) / (4 * d),
            "aggregate_download_x_float32": len(encode(next_open)) / (4 * d),
            "resum_download_x_float32": len(encode(resummed)) / (4 * d),
            "max_abs_error_of_the_model": float(np.max(np.abs(model - delta)))}


def bench_tenseal_default(x: np.ndarray, repeats: int) -> dict[str, float]:
    context = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60],
                         n_threads=1)
    context.global_scale = 2.0 ** 40
    slots = 4096
    chunks = [x[i:i + slots].tolist() for i in range(0, x.size, slots)]
    encrypt_s, vectors = _median_seconds(
        lambda: [ts.ckks_vector(context, c) for c in chunks], repeats)
    total = [v.copy() for v in vectors]

    def add_plus() -> None:
        for i, v in enumerate(vectors):
            total[i] = total[i] + v
    add_s, _ = _median_seconds(add_plus, repeats)
    probe = vectors[: max(1, len(vectors) // 16)]  # add_ is slow: time a slice, scale up

    def add_inplace() -> None:
        for t, v in zip(total, probe, strict=False):
            t.add_(v)
    add_inplace_s, _ = _median_seconds(add_inplace, 1)
    add_inplace_s *= len(vectors) / len(probe)
    serialize_s, blobs = _median_seconds(lambda: [v.serialize() for v in vectors], repeats)
    load_s, _ = _median_seconds(lambda: [ts.ckks_vector_from(context, b) for b in blobs],
                                repeats)
    aggregate = [t.serialize() for t in total]

    def decrypt() -> np.ndarray:
        out = [ts.ckks_vector_from(context, b).decrypt() for b in aggregate]
        return np.concatenate([np.asarray(o) for o in out])[: x.size]
    decrypt_s, values = _median_seconds(decrypt, repeats)
    expected = x * (1 + repeats + 1)  # ``repeats`` adds with ``+``, one with ``add_`` on a slice
    error = float(np.max(np.abs(values[: probe[0].size()] - expected[: probe[0].size()])))
    return {**_per_million(x.size, encrypt=encrypt_s, add=add_s, load=load_s,
                           serialize=serialize_s, decrypt=decrypt_s,
                           upload=sum(map(len, blobs)), aggregate=sum(map(len, aggregate)),
                           max_abs_error=error),
            "add_inplace_s_per_1M": add_inplace_s * 1e6 / x.size}


def _per_million(d: int, *, encrypt: float, add: float, load: float, serialize: float,
                 decrypt: float, upload: int, aggregate: int,
                 max_abs_error: float) -> dict[str, float]:
    scale = 1e6 / d
    return {
        "encrypt_s_per_1M": encrypt * scale,
        "encrypt_params_per_s": d / encrypt,
        "add_s_per_1M": add * scale,
        "load_s_per_1M": load * scale,
        "serialize_s_per_1M": serialize * scale,
        "decrypt_s_per_1M": decrypt * scale,
        "upload_bytes_per_param": upload / d,
        "upload_x_float32": upload / (4 * d),
        "aggregate_bytes_per_param": aggregate / d,
        "aggregate_x_float32": aggregate / (4 * d),
        "max_abs_error": max_abs_error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dimension", type=int, default=1 << 20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sites", type=int, default=10)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    x = np.random.default_rng(0).normal(0, 0.05, args.dimension)
    ours = bench_securefl(x, args.repeats)
    blind = bench_blind_server(x, args.repeats, args.sites)
    peer = bench_tenseal_default(x, args.repeats)
    ratios = {f"{key}_tenseal_over_securefl": peer[key] / ours[key]
              for key in ("encrypt_s_per_1M", "add_s_per_1M", "load_s_per_1M",
                          "serialize_s_per_1M",
                          "decrypt_s_per_1M", "upload_bytes_per_param",
                          "aggregate_bytes_per_param")}
    print(json.dumps({"dimension": args.dimension, "repeats": args.repeats,
                      "load_average_before_after": [load, os.getloadavg()[0]],
                      "tenseal": ts.__version__, "securefl": ours, "blind_server": blind,
                      "tenseal_default": peer,
                      "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
