"""Bucketing, a pre-aggregation for any rule (Karimireddy, He & Jaggi, ICLR 2022)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np

from securefl.aggregation.base import Aggregator, as_rows
from securefl.aggregation.registry import Wrapper

__all__ = ["Bucketing"]


class Bucketing(Wrapper):
    """Bucketing (Karimireddy, He & Jaggi, "Byzantine-robust learning on heterogeneous
    datasets via bucketing", ICLR 2022, Algorithm 1), composed with an inner rule.

    Each call draws a uniformly random permutation ``pi`` of the ``n`` rows and averages
    them in ``m = ceil(n / s)`` buckets of ``s`` consecutive rows,
    ``y_i = mean{x_pi(k) : k = (i - 1) s + 1, ..., min(i s, n)}``; returns
    ``inner(y, c)`` with ``c_i`` the size of bucket ``i`` (the last may be smaller).  Rows
    are averaged without their weights, as in the paper.  Averaging shrinks the spread of
    heterogeneous honest rows by about ``sqrt(s)`` while ``f`` byzantine rows still reach at
    most ``f`` buckets, so the inner rule must tolerate ``f`` of ``m``:
    :meth:`max_byzantine` is ``inner.max_byzantine(m)``.  Config: ``rule = "bucketing"``,
    ``bucket_size = s``, ``inner = "krum"`` (or an inline table), ``num_byzantine = f``
    (passed on to an inner rule given by name that takes it; the paper keeps Krum's ``f``).

    The permutation comes from ``rng``; by default a generator seeded from the operating
    system's CSPRNG, so clients cannot predict their buckets.
    """

    def __init__(self, *, bucket_size: int, inner: Aggregator | str | Mapping[str, Any],
                 num_byzantine: int = 0, rng: np.random.Generator | None = None) -> None:
        if isinstance(bucket_size, bool) or not isinstance(bucket_size, int | np.integer):
            raise TypeError(f"bucket_size must be an int, got {bucket_size!r}")
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
        self.bucket_size = int(bucket_size)
        self._wrap(inner, num_byzantine, outer="bucketing")
        self.rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))

    def buckets(self, n: int) -> int:
        """``m = ceil(n / s)``, the number of rows the inner rule sees."""
        return -(-n // self.bucket_size)

    @property
    def min_clients(self) -> int:
        """The fewest rows that make at least ``inner.min_clients`` buckets."""
        return self.bucket_size * (self.inner.min_clients - 1) + 1

    def max_byzantine(self, n: int) -> int:
        """``inner.max_byzantine(ceil(n / s))``: each byzantine row spoils at most one bucket."""
        return self.inner.max_byzantine(self.buckets(n))

    def byzantine_note(self, n: int) -> str:
        note = self.inner.byzantine_note(self.buckets(n))
        return f"with buckets of {self.bucket_size}, {note}" if note else ""

    def bucket(self, updates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One draw of the bucket means ``y`` (float32 ``(m, d)``) and the bucket sizes."""
        rows = np.asarray(updates)
        n, s = rows.shape[0], self.bucket_size
        order = self.rng.permutation(n)
        work = np.float32 if rows.dtype == np.float32 else np.float64
        means = np.empty((self.buckets(n), rows.shape[1]), dtype=work)
        sizes = np.empty(self.buckets(n))
        for i, start in enumerate(range(0, n, s)):
            members = order[start:start + s]
            means[i] = rows[members].astype(work, copy=False).mean(axis=0)
            sizes[i] = len(members)
        return means.astype(np.float32, copy=False), sizes

    def __call__(self, updates: np.ndarray, weights: np.ndarray | None = None,
                 **context: Any) -> Any:
        rows, _ = as_rows(updates, weights)
        means, sizes = self.bucket(rows)
        return self.inner(means, sizes, **context)

    def __repr__(self) -> str:
        return (f"Bucketing(bucket_size={self.bucket_size}, "
                f"num_byzantine={self.num_byzantine}, inner={self.inner!r})")
