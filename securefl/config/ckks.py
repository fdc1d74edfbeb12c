"""CKKS parameters: the 128-bit security table, capacity and the decryption-error bound.

Security follows the Homomorphic Encryption Standard (Albrecht et al., 2018, Table 1,
classical 128-bit security, ternary secret): for a ring of degree ``N`` the *total* bit
length of the coefficient modulus (every prime, SEAL's special key-switching prime included)
may not exceed ``MAX_COEFF_MODULUS_BITS[N]``.

Encoding (Cheon, Kim, Kim, Song, ASIACRYPT 2017) packs two reals per complex slot,
``z_k = x_{2k} + i x_{2k+1}``, so one ciphertext of ring degree ``N`` carries ``N`` reals.
The plaintext polynomial is ``m = round(Δ σ^{-1}(z))`` with ``|m_j| <= Δ max_k |z_k|``.
Ciphertexts live modulo ``Q``, the product of every prime but the last (the special
prime), so a sum decrypts correctly while ``Δ sqrt(2) max|x| + noise < Q / 2``.

Error of a decrypted sum of ``n`` fresh symmetric encryptions, per real coordinate::

    |x̃ - x| <= ( n N / 2  +  t(n) ) / Δ

``n N / 2`` bounds the encoding round-off in the worst case (``|r_j| <= 1/2`` per
coefficient, summed over ``N`` coefficients).  ``t(n)`` is Bernstein's inequality for the
RLWE noise: SEAL samples each error coefficient from a centred binomial distribution with
variance ``σ² = 10.5`` and ``|e_j| <= 21``; a coordinate is a sum of ``n N`` independent terms
``e_j cos θ_j`` with total variance ``V = n N σ² / 2``, so ``P(|noise| > t) <= 2^-40`` for
``t = (2 L M / 3 + sqrt((2 L M / 3)² + 8 L V)) / 2`` with ``L = 41 ln 2``, ``M = 21``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MAX_COEFF_MODULUS_BITS", "CKKSParameters", "parameter_problem"]

#: HE Standard, 128-bit classical security: ring degree -> max total coeff-modulus bits
MAX_COEFF_MODULUS_BITS: dict[int, int] = {
    1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881,
}
_NOISE_VARIANCE = 10.5  # SEAL's centred binomial error, sigma ~ 3.24
_NOISE_MAX = 21.0
_TAIL_LOG = 41 * math.log(2)  # two-sided tail 2^-40


def parameter_problem(poly_modulus_degree: int, coeff_modulus_bits: tuple[int, ...],
                      scale_bits: int) -> tuple[str, str] | None:
    """``(field, problem)`` for the first insecure or unusable choice, ``None`` if all good."""
    n = poly_modulus_degree
    if n not in MAX_COEFF_MODULUS_BITS:
        return ("poly_modulus_degree",
                f"must be one of {sorted(MAX_COEFF_MODULUS_BITS)}, got {n}")
    bits = tuple(coeff_modulus_bits)
    if len(bits) < 2:
        return ("coeff_modulus_bits", "needs at least two primes (data primes, then SEAL's "
                f"special prime), got {list(bits)}")
    if any(not 20 <= b <= 60 for b in bits):
        return ("coeff_modulus_bits", f"primes must have 20..60 bits, got {list(bits)}")
    limit = MAX_COEFF_MODULUS_BITS[n]
    if sum(bits) > limit:
        return ("coeff_modulus_bits",
                f"total {sum(bits)} bits exceeds the 128-bit security limit of {limit} bits "
                f"for poly_modulus_degree = {n} (HE Standard); use fewer or smaller primes "
                "or a larger ring")
    data_bits = sum(b - 1 for b in bits[:-1])  # every b-bit prime exceeds 2^(b-1)
    if not 20 <= scale_bits <= data_bits - 12:
        return ("scale_bits", f"must be in [20, {data_bits - 12}] so that sums of at least "
                f"2^10 in magnitude fit modulo the data primes, got {scale_bits}")
    return None


@dataclass(frozen=True)
class CKKSParameters:
    """Validated CKKS parameters (raises ``ValueError`` on an insecure or unusable choice)."""

    poly_modulus_degree: int = 8192
    coeff_modulus_bits: tuple[int, ...] = (55, 40)
    scale_bits: int = 36

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_modulus_bits", tuple(self.coeff_modulus_bits))
        problem = parameter_problem(self.poly_modulus_degree, self.coeff_modulus_bits,
                                    self.scale_bits)
        if problem is not None:
            raise ValueError(f"{problem[0]} {problem[1]}")

    @property
    def scale(self) -> float:
        return float(2 ** self.scale_bits)

    @property
    def slots(self) -> int:
        """Complex slots per ciphertext (``N / 2``)."""
        return self.poly_modulus_degree // 2

    @property
    def reals_per_ciphertext(self) -> int:
        """Reals per ciphertext: two per complex slot."""
        return self.poly_modulus_degree

    @property
    def capacity(self) -> float:
        """Largest ``|sum_i w_i x_i|`` per coordinate that decrypts without wrapping mod ``Q``.

        ``Q > 2^(sum(b - 1))`` over the data primes; a margin of ``2^-8 Q/2`` absorbs noise.
        """
        half_q = 2.0 ** (sum(b - 1 for b in self.coeff_modulus_bits[:-1]) - 1)
        return half_q * (1 - 2.0 ** -8) / (self.scale * math.sqrt(2))

    def error_bound(self, num_clients: int) -> float:
        """Per-coordinate bound on ``|decrypted sum - exact sum|`` for ``num_clients`` terms.

        Round-off is bounded in the worst case; the RLWE noise term holds except with
        probability ``2^-40`` per coordinate (module docstring).
        """
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        n, big_n = num_clients, self.poly_modulus_degree
        variance = n * big_n * _NOISE_VARIANCE / 2
        a = 2 * _TAIL_LOG * _NOISE_MAX / 3
        noise = (a + math.sqrt(a * a + 8 * _TAIL_LOG * variance)) / 2
        return (n * big_n / 2 + noise) / self.scale
