"""``[protection.he]``: CKKS homomorphic encryption parameters."""

from __future__ import annotations

from dataclasses import dataclass

from securefl.config.ckks import parameter_problem
from securefl.config.parse import check

__all__ = ["HEConfig"]


@dataclass(frozen=True)
class HEConfig:
    """CKKS ring and modulus chain, the smallest aggregate a site decrypts, and optional
    layer selection.

    ``coeff_modulus_bits`` lists the data primes, then SEAL's special prime; the total must
    meet 128-bit security (HE Standard).  Every site decrypts the encrypted global model
    itself (the server never receives a decryption), and refuses an aggregate of fewer than
    ``min_contributors`` distinct, validly signed uploads.  ``resum`` sends every site the
    contributors' uploads instead of their sum, so that each site adds them itself (no
    server can then substitute another combination of uploads; ``n`` uploads of download
    instead of one sum).  ``layers`` (parameter-name globs) encrypts only the matching
    parameters and sends the rest in the clear: a weaker setting.
    """

    poly_modulus_degree: int = 8192
    coeff_modulus_bits: tuple[int, ...] = (55, 40)
    scale_bits: int = 36
    min_contributors: int = 2
    resum: bool = False
    layers: tuple[str, ...] = ()

    def validate(self) -> None:
        problem = parameter_problem(self.poly_modulus_degree, self.coeff_modulus_bits,
                                    self.scale_bits)
        check(problem is None, *(problem or ("", "")))
        check(self.min_contributors >= 1, "min_contributors",
              f"must be >= 1, got {self.min_contributors}")
