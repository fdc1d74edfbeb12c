"""The cryptographic floor of a SecAgg+ round, and the timing helpers of the SecAgg+ benchmarks.

:class:`CryptoFloor` is what ``benchmarks/secagg.py``'s round is compared with
(``round.secagg_over_crypto_floor``): the public-key and AES-CTR operations a round must run,
timed alone, counted as the protocol counts them.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securefl.secagg import shamir
from securefl.secagg.graph import threshold_for
from securefl.secagg.prg import PRG_KEY_BYTES, derive_key


def median_seconds(fn: Callable[[], object], repeat: int,
                   clock: Callable[[], float] = time.perf_counter) -> float:
    """Median over ``repeat`` calls; ``clock=time.thread_time`` counts the calling thread's
    CPU time only, which a machine shared with other busy processes disturbs far less."""
    times = []
    for _ in range(repeat):
        started = clock()
        fn()
        times.append(clock() - started)
    return statistics.median(times)


def raw_ctr_stream(key: bytes, zeros: bytes, buffer: bytearray) -> None:
    """One AES-CTR keystream straight from ``cryptography``: no securefl code at all."""
    Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update_into(zeros, buffer)


class CryptoFloor:
    """What one round's cryptography costs on its own, from per-operation medians.

    A round with no dropout must run at least: ``2 n + n k + n t`` Ed25519 verifications
    (the server checks each advertisement and each consistency signature, every neighbour
    each advertisement, every client ``t`` consistency signatures), ``2 n`` signatures
    (advertisement, survivor set), ``2 n k`` X25519 agreements (``c`` for the share channel,
    ``s`` for the pairwise mask), ``2 n`` X25519 key generations, and ``n (k + 3)``
    AES-128-CTR streams of ``d + 1`` words (per client: one self mask, ``k`` pairwise masks
    and the rounding dither; the server: one self mask per survivor).

    ``not_in_floor`` times the symmetric cryptography the round also runs but the floor
    leaves out (as the issue defines it): ``2 n k + 3 n + 1`` HKDF derivations (per client one
    self-mask key, ``k`` pairwise-mask keys, ``k`` share-channel key pairs and the shared
    randomness; the server one self-mask key per survivor), ``2 n k`` AES-256-GCM share
    bundles (sealed and opened), ``n^2 + 4 n`` SHA-256 commitments (every client opens all
    ``n`` graph commitments) and ``n`` SHA-256 model digests of ``4 d`` bytes (each deployed
    site hashes the model it received; the sites of one simulated process decode one broadcast
    frame and hash it once).  It is reported beside the floor, never added to it.

    Each :meth:`sample` times every operation ``repeat`` times (the AES streams and model
    digests a twentieth as often), on both clocks at once and after a few untimed calls that
    bring its operands back into the caches; :meth:`report` takes the medians over every
    sample so far.  ``bench_round`` samples between its rounds, so the floor and
    the round it is compared with are timed over the same minutes: a burst of other work on
    a shared machine then moves both, instead of only the one it happens to hit (timed once
    before or after the rounds, the floor alone moved by 25% between runs).  What is timed is
    the same as before: the same operations, counted the same way.
    """

    def __init__(self, n: int, d: int, k: int) -> None:
        self.n, self.d, self.k = n, d, k
        identity = Ed25519PrivateKey.generate()
        public, message = identity.public_key().public_bytes_raw(), os.urandom(96)
        signature = identity.sign(message)
        mine, theirs = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        peer = theirs.public_key().public_bytes_raw()
        zeros, buffer = bytes(4 * (d + 1)), bytearray(4 * (d + 1) + 15)
        key = os.urandom(PRG_KEY_BYTES)
        aad, bundle = os.urandom(120), os.urandom(2 * shamir.SHARE_BYTES)
        model = np.zeros(d, np.float32)
        # name -> (operation, True for the d-sized ones, timed a twentieth as often)
        self._ops: dict[str, tuple[Callable[[], object], bool]] = {
            "ed25519_verify_s": (
                lambda: Ed25519PublicKey.from_public_bytes(public).verify(signature, message),
                False),
            "ed25519_sign_s": (lambda: identity.sign(message), False),
            "x25519_agree_s": (
                lambda: mine.exchange(X25519PublicKey.from_public_bytes(peer)), False),
            "x25519_keygen_s": (
                lambda: X25519PrivateKey.generate().public_key().public_bytes_raw(), False),
            "aes128_ctr_stream_s": (lambda: raw_ctr_stream(key, zeros, buffer), True),
        }
        self._extra: dict[str, tuple[Callable[[], object], bool]] = {
            "hkdf_sha256_s": (lambda: derive_key(key * 2, aad, length=64), False),
            "aes256_gcm_bundle_s": (lambda: AESGCM(key * 2).encrypt(bytes(12), bundle, aad),
                                    False),
            "sha256_commitment_s": (lambda: hashlib.sha256(aad + key * 2).digest(), False),
            "sha256_model_s": (lambda: hashlib.sha256(model.data).digest(), True),
        }
        self._wall: dict[str, list[float]] = {name: [] for name in (*self._ops, *self._extra)}
        self._cpu: dict[str, list[float]] = {name: [] for name in self._wall}
        t = threshold_for(k, fraction=0.5)
        self.counts = {"ed25519_verify_s": 2 * n + n * k + n * t, "ed25519_sign_s": 2 * n,
                       "x25519_agree_s": 2 * n * k, "x25519_keygen_s": 2 * n,
                       "aes128_ctr_stream_s": n * (k + 3)}
        self.extra_counts = {"hkdf_sha256_s": 2 * n * k + 3 * n + 1,
                             "aes256_gcm_bundle_s": 2 * n * k,
                             "sha256_commitment_s": n * n + 4 * n, "sha256_model_s": n}

    def sample(self, repeat: int) -> None:
        """Time every operation ``repeat`` times (the d-sized ones ``repeat / 20``, >= 3),
        each after a few untimed calls: between two rounds the operands have left the caches
        (the 400 KB of a stream above all), and the floor is the warm, tight-loop cost."""
        for name, (operation, large) in (*self._ops.items(), *self._extra.items()):
            wall, cpu = self._wall[name], self._cpu[name]
            for _ in range(2 if large else 5):
                operation()
            for _ in range(max(3, repeat // 20) if large else repeat):
                started, started_cpu = time.perf_counter(), time.thread_time()
                operation()
                cpu.append(time.thread_time() - started_cpu)
                wall.append(time.perf_counter() - started)

    def report(self, *, cpu: bool = False) -> dict:
        """The floor from the medians of every sample (``cpu``: of the thread's CPU time)."""
        samples = self._cpu if cpu else self._wall
        per_op = {name: statistics.median(samples[name]) for name in self._ops}
        extra_op = {name: statistics.median(samples[name]) for name in self._extra}
        floor_s = sum(per_op[name] * c for name, c in self.counts.items())
        # Not in the floor (the target keeps the definition above), reported so that the rest
        # of the round can be told apart: the symmetric cryptography the protocol also runs.
        extra_s = sum(extra_op[name] * c for name, c in self.extra_counts.items())
        return {"k": self.k, "per_operation_s": per_op,
                "operations": {name.removesuffix("_s"): c for name, c in self.counts.items()},
                "samples_per_operation": {name: len(samples[name]) for name in self._ops},
                "floor_s": floor_s,
                "not_in_floor": {"per_operation_s": extra_op,
                                 "operations": {name.removesuffix("_s"): c
                                                for name, c in self.extra_counts.items()},
                                 "total_s": extra_s}}
