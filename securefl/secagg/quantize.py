"""Fixed-point encoding of weighted updates into Z_{2**32} (Bonawitz et al., CCS 2017).

With ``L`` levels per client, clip ``c`` and public maximum weight ``W`` a client with weight
``w`` and update ``x`` sends the ``d + 1`` integers

    q_j = SR(L * (w / W) * clip(x_j, -c, c) / c)      (j < d),     q_d = SR(L * w / W)

where ``SR(v) = floor(v) + [u < v - floor(v)]`` is stochastic rounding with ``u`` uniform in
[0, 1) (unbiased: ``E[SR(v)] = v``).  The clip is applied in float64 after scaling, at
``B = L w / W`` itself (``B <= L`` because ``w <= W``), so ``|q_j| <= ceil(B) <= L`` exactly,
for every clip value (including those float32 cannot represent, such as 0.1).  Hence
``|q_j| <= L``, so the sum over ``n`` clients lies in
``[-n L, n L]``; choosing ``n L <= 2**31 - 1`` means the sum read as a signed 32-bit integer is
exact (no wrap-around).  The server decodes ``sum_i w_i x_i ~ (W c / L) * sum_i q_ij`` and
``sum_i w_i ~ (W / L) * sum_i q_id``; each client adds an error below ``W c / L`` per
coordinate (below ``W / L`` on the weight).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from securefl.secagg.prg import Keystream

__all__ = ["MAX_SUM", "Quantizer", "levels_for"]

MAX_SUM = (1 << 31) - 1
_CHUNK_WORDS = 1 << 15  # 256 KiB of float64 per chunk: the scratch stays in a 1 MiB L2


def levels_for(num_clients: int, *, bits: int | str) -> int:
    """Levels ``L`` per client: ``2**(bits-1) - 1``, or the largest with ``n L <= 2**31 - 1``.

    Raises ``ValueError`` if ``n`` clients at ``bits`` could wrap the 32-bit sum.
    """
    if num_clients < 1:
        raise ValueError(f"number of clients must be >= 1, got {num_clients}")
    if bits == "auto":
        levels = MAX_SUM // num_clients
    elif isinstance(bits, int) and 2 <= bits <= 31:
        levels = (1 << (bits - 1)) - 1
    else:
        raise ValueError(f"bits must be an integer in [2, 31] or \"auto\", got {bits!r}")
    if levels < 1 or num_clients * levels > MAX_SUM:
        raise ValueError(
            f"{num_clients} clients at {bits} quantization bits could overflow the 32-bit sum "
            f"(need n * (2**(bits-1) - 1) <= 2**31 - 1); lower bits or use bits = \"auto\"")
    return levels


class Quantizer:
    """Encode ``(x, w)`` into ``d + 1`` uint32 words and decode a sum of encodings."""

    def __init__(self, *, clip: float, max_weight: float, levels: int) -> None:
        if not (np.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be finite and > 0, got {clip}")
        if not (np.isfinite(max_weight) and max_weight > 0):
            raise ValueError(f"max_weight must be finite and > 0, got {max_weight}")
        if not 1 <= levels <= MAX_SUM:
            raise ValueError(f"levels must be in [1, 2**31 - 1], got {levels}")
        self.clip, self.max_weight, self.levels = float(clip), float(max_weight), int(levels)

    @property
    def step(self) -> float:
        """Per-client, per-coordinate error bound on the decoded weighted sum: ``W c / L``."""
        return self.max_weight * self.clip / self.levels

    @property
    def weight_step(self) -> float:
        """Per-client error bound on the decoded total weight: ``W / L``."""
        return self.max_weight / self.levels

    def check(self, delta: np.ndarray, weight: float) -> None:
        """``ValueError`` unless ``0 < weight <= W`` (finite) and ``delta`` is finite and 1-d."""
        if not (np.isfinite(weight) and 0 < weight <= self.max_weight):
            raise ValueError(f"weight must be finite and in (0, max_weight = {self.max_weight}]"
                             f", got {weight}; raise [protection.secagg] max_weight")
        if delta.ndim != 1 or not np.isfinite(delta).all():
            raise ValueError("update must be a finite 1-d vector")

    def encode(self, delta: np.ndarray, weight: float, dither: np.ndarray, *,
               in_place: bool = False) -> np.ndarray:
        """``d + 1`` words ``q mod 2**32``; ``dither`` holds ``d + 1`` uniform uint32 words.

        ``in_place=True`` writes the words over ``dither`` (each chunk of the dither is read
        before it is overwritten) and returns it: no second ``d``-sized buffer."""
        self.check(delta, weight)
        if dither.shape != (delta.shape[0] + 1,) or dither.dtype != np.uint32:
            raise ValueError("dither must be d + 1 uint32 words")
        if in_place and not dither.flags.writeable:
            raise ValueError("in_place needs a writeable dither")
        words = dither if in_place else np.empty(delta.shape[0] + 1, np.uint32)
        return self._rounded(delta, weight, dither, words, fill=None)

    def encode_keyed(self, delta: np.ndarray, weight: float, *, dither_key: bytes) -> np.ndarray:
        """``encode(delta, weight, keystream(dither_key, d + 1), in_place=True)``, bit for bit,
        with each chunk of the dither written just before it is rounded (while it is in
        cache) instead of all ``d + 1`` words first."""
        self.check(delta, weight)
        stream = Keystream(dither_key, delta.shape[0] + 1)
        return self._rounded(delta, weight, stream.words, stream.words, fill=stream.fill)

    def _rounded(self, delta: np.ndarray, weight: float, dither: np.ndarray, out: np.ndarray,
                 *, fill: Callable[[int], None] | None) -> np.ndarray:
        """The words into ``out`` (which may be ``dither``); ``fill(stop)``, if given, writes
        the dither up to word ``stop`` first."""
        bound = self.levels * (weight / self.max_weight)  # <= L, since w / W <= 1
        size = delta.shape[0]
        words = out.view(np.int32)
        # one cache-sized chunk at a time: no d-sized float64 temporaries (each would cost a
        # fresh, page-faulting allocation larger than the whole computation)
        scratch = _Scratch(min(size, _CHUNK_WORDS))
        for start in range(0, size + 1, _CHUNK_WORDS):
            stop = min(start + _CHUNK_WORDS, size)
            if fill is not None:
                fill(min(start + _CHUNK_WORDS, size + 1))
            if stop <= start:
                break
            scaled = scratch.scaled[:stop - start]
            # float64 first (clipping in float32 could exceed the clip), then clip at the
            # bound itself, after scaling: rounding can never push a coordinate past L,
            # whatever clip value float32 or float64 cannot represent
            np.multiply(delta[start:stop], bound / self.clip, out=scaled, dtype=np.float64)
            np.clip(scaled, -bound, bound, out=scaled)
            scratch.round_into(scaled, dither[start:stop], words[start:stop])
        scratch = _Scratch(1)
        scratch.scaled[0] = bound
        scratch.round_into(scratch.scaled, dither[size:], words[size:])
        return out

    def decode(self, total: np.ndarray) -> tuple[np.ndarray, float]:
        """``(sum_i w_i x_i, sum_i w_i)`` from the ``d + 1``-word sum of encodings."""
        signed = total.view(np.int32).astype(np.float64)
        weighted = signed[:-1] * (self.max_weight * self.clip / self.levels)
        return weighted, float(signed[-1]) * self.max_weight / self.levels


class _Scratch:
    """Chunk-sized buffers of :meth:`Quantizer.encode`."""

    def __init__(self, size: int) -> None:
        self.scaled = np.empty(size, np.float64)
        self.floor = np.empty(size, np.float64)
        self.up = np.empty(size, np.bool_)

    def round_into(self, scaled: np.ndarray, dither: np.ndarray, out: np.ndarray) -> None:
        """``out = SR(scaled)`` with ``u = dither / 2**32``; ``scaled`` is overwritten."""
        count = scaled.shape[0]
        floor, up = self.floor[:count], self.up[:count]
        np.floor(scaled, out=floor)
        scaled -= floor
        scaled *= 2.0 ** 32
        np.less(dither, scaled, out=up)  # before ``out``, which may be ``dither`` itself
        out[:] = floor  # |floor| <= L <= 2**31 - 1: exact in int32
        out += up  # SR(v) <= ceil(v) <= L: no overflow
