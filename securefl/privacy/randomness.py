"""DP randomness that the server cannot predict: a CSPRNG for Poisson sampling and noise.

Why: the seeded path (:class:`torch.Generator` seeded from ``[run] seed`` and the shard index)
is reproducible, and therefore predictable by anyone holding the shared config: a server that
builds a replica of a site (same config, same seed, same shard size, random data) records
every noise draw, subtracts them from the site's update and is left with the exact sum of
clipped per-example gradients.  Re-seeding a :class:`torch.Generator` per step from
``os.urandom`` does not fix this well either: ``manual_seed`` keeps 64 bits, and the
generator (Mersenne Twister on the CPU, Philox on CUDA) is a statistical generator, not a
cryptographic one.  So at a deployed site every random bit of DP-SGD comes from here:

* **Bits.**  :class:`SecureRandom` draws a fresh 256-bit key from ``os.urandom`` for every
  request (one Poisson mask, one noise vector) and expands it with AES-256-CTR from
  ``cryptography`` (NIST SP 800-90A's CTR_DRBG construction, without reseeding, since every
  key is fresh).  Nothing is stored: a key lives only while its request is served, so there is
  no generator state to recover, and nothing in the config reaches it.  A request may read
  its keystream in pieces (:class:`KeyStream`: distributed DP's sampler and rounding read a
  cache-sized block at a time); the pieces are the one stream of the request's key.
* **Seeded streams** (:meth:`SecureRandom.seeded`, distributed DP's removable noise only):
  the same AES-256-CTR, but the key of the ``i``-th request is
  ``HKDF-SHA256(ikm = seed, info = "securefl/privacy/seeded-stream/v1" || i)`` (RFC 5869;
  ``i`` as 8 big-endian bytes) for a 32-byte ``seed`` that itself comes from ``os.urandom``.
  The stream is a deterministic function of the seed, so whoever is later given the seed
  regenerates exactly the draws it fed, and nobody without it can predict them.
* **Uniforms.**  53-bit uniforms ``u = (w >> 11) 2^-53`` from 64-bit words: every double of
  the grid ``k 2^-53`` equally likely.
* **Gaussians, and the floating-point attack.**  A textbook floating-point Gaussian sampler
  does not output a Gaussian: its outputs lie on an irregular, sparse subset of the doubles,
  and which values are reachable depends on the exact computation.  Seeing ``f(D) + noise``
  an adversary can then tell ``f(D)`` from ``f(D')`` by whether ``x - f(D)`` is a reachable
  noise value at all (Mironov, CCS 2012, for the Laplace mechanism; Jin, McMurtry,
  Rubinstein and Ohrimenko, IEEE S&P 2022, for the Gaussian samplers of DP libraries,
  Opacus included, where they also show timing attacks on samplers with data-dependent run
  time).  The fix used here is Holohan and Braghin's (ESORICS 2021, section 5.1), the one
  Opacus's own ``secure_mode`` uses: sum ``2n = 4`` independent Gaussians of std ``sigma``
  and divide by ``2``.  The sum has exactly the std ``sigma``, and an attack must now invert
  a sum of four samples, which they bound at ``2^(p (2n - 1)) = 2^159`` work for ``p = 53``.
  Each Gaussian comes from Box-Muller on two 53-bit uniforms
  (``sqrt(-2 ln(1 - u1)) (cos, sin)(2 pi u2)``), in float64, rounded once to the gradient's
  dtype when added.
* **Timing.**  Box-Muller is branch-free and vectorised over the whole request (no rejection
  loop as in the polar or ziggurat methods), so the time taken depends on the number of
  coordinates only, never on the values drawn; the Poisson mask is one vectorised comparison.

This is the standard, not an exact, fix: an exact sampler on a grid (the discrete Gaussian,
Canonne, Kamath and Steinke, NeurIPS 2020) would also remove the float rounding of the final
addition; securefl does not implement one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch.utils.data import Sampler

__all__ = ["GAUSSIAN_SUMMANDS", "KeyStream", "SecurePoissonSampler", "SecureRandom",
           "use_secure_noise"]

#: Holohan and Braghin's 2n with n = 2: Gaussians summed per noise coordinate
GAUSSIAN_SUMMANDS = 4
_KEY_BYTES = 32
_ZERO_COUNTER = bytes(16)  # every key is fresh, so the counter may start at zero
_SEEDED_INFO = b"securefl/privacy/seeded-stream/v1"
_ZEROS = bytes(1 << 20)  # the plaintext of every keystream, a chunk at a time


class _SeededKeys:
    """The keys of :meth:`SecureRandom.seeded`: HKDF-SHA256 of the seed, request by request."""

    def __init__(self, seed: bytes) -> None:
        if not isinstance(seed, bytes) or len(seed) != _KEY_BYTES:
            raise ValueError(f"a stream seed is {_KEY_BYTES} bytes")
        self._seed, self._requests = seed, 0

    def __call__(self, size: int) -> bytes:
        info = _SEEDED_INFO + self._requests.to_bytes(8, "big")
        self._requests += 1
        return HKDF(algorithm=hashes.SHA256(), length=size, salt=None,
                    info=info).derive(self._seed)


class KeyStream:
    """The AES-256-CTR keystream of one key (counter from zero), read in pieces: successive
    :meth:`words` calls return successive words of the one stream, so a request can be
    served block by block from a cache-sized buffer and still be the stream of its key."""

    def __init__(self, key: bytes) -> None:
        self._cipher = Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()
        self._buffer = np.empty(0, np.uint8)

    def words(self, count: int) -> np.ndarray:
        """The next ``count`` 64-bit words, as a view of this stream's buffer: valid (and
        writable) until the next call, which reuses the buffer."""
        # AES-CTR over zeros, encrypted from one shared zero chunk; update_into needs
        # block_size - 1 spare bytes past each chunk (the next chunk overwrites them), and
        # every byte is written, so the buffer need not be zeroed first
        size = 8 * count
        if self._buffer.size < size + 15:
            self._buffer = np.empty(size + 15, np.uint8)
        view, zeros = self._buffer.data, memoryview(_ZEROS)
        for start in range(0, size, len(_ZEROS)):
            end = min(size, start + len(_ZEROS))
            self._cipher.update_into(zeros[:end - start], view[start:end + 15])
        return self._buffer[:size].view("<u8")


class SecureRandom:
    """Uniforms and Gaussians from AES-256-CTR under a fresh ``os.urandom`` key per request.

    ``entropy`` replaces ``os.urandom`` (known-answer tests, and :meth:`seeded`'s HKDF keys:
    a fixed source makes the output reproducible, which a deployment's noise must never be
    unless, as there, the seed is fresh and revealed on purpose).
    """

    def __init__(self, *, entropy: object = None) -> None:
        self._entropy = os.urandom if entropy is None else entropy

    @classmethod
    def seeded(cls, seed: bytes) -> SecureRandom:
        """The deterministic stream of a 32-byte ``seed`` (module docstring): request ``i``
        is keyed by ``HKDF-SHA256(seed, info = ... || i)``."""
        return cls(entropy=_SeededKeys(seed))

    def seed(self) -> bytes:
        """32 fresh bytes from the entropy source (``os.urandom``): a seed for :meth:`seeded`."""
        value = self._entropy(_KEY_BYTES)  # type: ignore[operator]
        if not isinstance(value, bytes) or len(value) != _KEY_BYTES:
            raise ValueError(f"the entropy source must return {_KEY_BYTES} bytes")
        return value

    def stream(self) -> KeyStream:
        """One request's keystream under a fresh key, to read piece by piece."""
        return KeyStream(self.seed())

    def words(self, count: int) -> np.ndarray:
        """``count`` uniform 64-bit words (little-endian) of one fresh keystream."""
        return self.stream().words(count)

    def uniform(self, count: int) -> np.ndarray:
        """``count`` doubles ``k 2^-53``, ``k`` uniform in ``[0, 2^53)``."""
        words = self.words(count)
        words >>= np.uint64(11)  # now below 2^53: exact as int64 and as float64
        out = np.empty(count, np.float64)
        return np.multiply(words.view(np.int64), 2.0 ** -53, out=out)

    def gaussian(self, count: int, std: float) -> torch.Tensor:
        """``count`` draws of ``N(0, std^2)`` (float64): ``std / 2 * (g1 + g2 + g3 + g4)``
        with every ``g`` from Box-Muller (see the module docstring)."""
        if count == 0:
            return torch.zeros(0, dtype=torch.float64)
        pairs = GAUSSIAN_SUMMANDS // 2 * count
        u = torch.from_numpy(self.uniform(2 * pairs))
        radius = torch.sqrt(-2.0 * torch.log1p(-u[:pairs]))
        angle = (2.0 * torch.pi) * u[pairs:]
        summed = ((radius * torch.cos(angle)).view(-1, count).sum(0)
                  + (radius * torch.sin(angle)).view(-1, count).sum(0))
        return summed * (std / np.sqrt(GAUSSIAN_SUMMANDS))


class SecurePoissonSampler(Sampler[list[int]]):
    """Opacus's ``UniformWithReplacementSampler`` with CSPRNG bits: each of ``steps``
    batches takes every example independently with probability ``sample_rate``
    (``u_i < q`` on 53-bit uniforms), the sampling that the accountant's ``q`` assumes."""

    def __init__(self, *, num_samples: int, sample_rate: float, steps: int,
                 source: SecureRandom) -> None:
        if num_samples < 1 or steps < 1 or not 0 < sample_rate <= 1:
            raise ValueError(f"need num_samples >= 1, steps >= 1 and 0 < sample_rate <= 1, "
                             f"got {num_samples}, {steps} and {sample_rate}")
        self.num_samples, self.sample_rate, self.steps = num_samples, sample_rate, steps
        self.source = source

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = self.source.uniform(self.num_samples) < self.sample_rate
            yield np.flatnonzero(mask).tolist()


def use_secure_noise(optimizer: object, source: SecureRandom) -> None:
    """Make an Opacus ``DPOptimizer`` (any clipping, ghost included) draw its noise from
    ``source``: ``p.grad = summed_grad + N(0, (sigma C)^2)`` for every parameter, one
    request for all of them.

    Opacus takes noise only from a :class:`torch.Generator` (or from ``torchcsprng``, which
    does not build against current PyTorch), so its ``add_noise`` step is replaced on this
    one optimizer instance; clipping, accumulation, scaling and accounting stay Opacus's."""
    params: Sequence[Any] = optimizer.params  # type: ignore[attr-defined]

    def add_noise() -> None:
        std = optimizer.noise_multiplier * optimizer.max_grad_norm  # type: ignore[attr-defined]
        sizes = [p.summed_grad.numel() for p in params]
        noise = source.gaussian(sum(sizes), std)
        for p, chunk in zip(params, torch.split(noise, sizes), strict=True):
            _check_processed_flag(p.summed_grad)
            grad = p.summed_grad
            noisy = grad.to(torch.float64) + chunk.view(grad.shape).to(grad.device)
            p.grad = noisy.to(grad.dtype).view_as(p)  # rounded once, after the addition
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise  # type: ignore[attr-defined]
