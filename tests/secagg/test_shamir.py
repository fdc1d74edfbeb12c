"""Shamir sharing of 256-bit secrets limb by limb over GF(2**31 - 1): correctness, perfect
hiding with t - 1 shares, the share codec."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefl.secagg import shamir
from securefl.secagg.shamir import PRIME


def _is_probable_prime(n: int, rounds: int = 40) -> bool:
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(rounds):
        x = pow(2 + secrets.randbelow(n - 3), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def test_modulus_is_the_mersenne_prime_and_limbs_hold_256_bits():
    assert PRIME == (1 << 31) - 1 and _is_probable_prime(PRIME)
    assert shamir.LIMBS * shamir.LIMB_BITS >= 256 and (1 << shamir.LIMB_BITS) < PRIME
    assert shamir.SHARE_BYTES == 4 * shamir.LIMBS == 36


@settings(max_examples=60, deadline=None)
@given(secret=st.integers(0, (1 << 256) - 1), threshold=st.integers(1, 8),
       extra=st.integers(0, 6), data=st.data())
def test_any_t_shares_recover_the_secret(secret, threshold, extra, data):
    largest = data.draw(st.sampled_from([10_000, PRIME - 1]))  # small: reduce every few steps
    xs = data.draw(st.lists(st.integers(1, largest), min_size=threshold + extra,
                            max_size=threshold + extra, unique=True))
    shares = dict(zip(xs, shamir.split(secret, threshold=threshold, xs=xs), strict=True))
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=threshold, max_size=threshold,
                                unique=True))
    assert shamir.combine({x: shares[x] for x in subset}, threshold=threshold) == secret


def test_fewer_than_t_shares_refuse():
    shares = dict(zip([1, 2, 3], shamir.split(5, threshold=3, xs=[1, 2, 3]), strict=True))
    with pytest.raises(ValueError, match="need 3 shares"):
        shamir.combine({1: shares[1], 2: shares[2]}, threshold=3)


def _interpolate_coefficients(points: list[tuple[int, int]]) -> list[int]:
    """Coefficients (constant first) of the unique polynomial through ``points`` over GF(p)."""
    result = [0] * len(points)
    for i, (x_i, y_i) in enumerate(points):
        basis, denominator = [1], 1
        for j, (x_j, _) in enumerate(points):
            if j != i:
                basis = [(a - x_j * b) % PRIME for a, b in zip([0, *basis], [*basis, 0],
                                                               strict=True)]
                denominator = denominator * (x_i - x_j) % PRIME
        scale = y_i * pow(denominator, -1, PRIME) % PRIME
        result = [(r + scale * b) % PRIME for r, b in zip(result, basis, strict=True)]
    return result


@pytest.mark.parametrize("threshold", [2, 3, 5])
def test_t_minus_1_shares_are_consistent_with_every_secret(threshold):
    """Perfect hiding: for the t - 1 shares the server holds, every other secret has exactly
    one set of nine limb polynomials producing the same shares, so the shares carry no
    information on b_u."""
    xs = list(range(1, threshold))
    secret = int.from_bytes(secrets.token_bytes(32), "big")
    seen = shamir.split(secret, threshold=threshold, xs=[*xs, 99])[:-1]
    seen_limbs = shamir._share_limbs(seen)  # seen_limbs[i][j]: limb j at xs[i]
    for other in (0, 1, secret ^ 1, (1 << 256) - 1):
        limbs = [(other >> (30 * j)) & ((1 << 30) - 1) for j in range(shamir.LIMBS)]
        per_limb = [_interpolate_coefficients([(0, limbs[j]),
                                               *((x, row[j]) for x, row in zip(xs, seen_limbs,
                                                                              strict=True))])
                    for j in range(shamir.LIMBS)]
        coefficients = [[per_limb[j][k] for j in range(shamir.LIMBS)]
                        for k in range(1, threshold)]
        # degree t-1 polynomials with these coefficients are a valid sharing of ``other``
        resplit = shamir._split_with(other, coefficients, [*xs, 99], threshold=threshold)
        assert resplit[:-1] == seen


def test_a_reconstruction_that_is_not_a_256_bit_secret_refuses():
    top = shamir.LIMBS - 1
    for limb, value in ((0, 1 << 30), (top, 1 << 16)):  # with t = 1 the share is the secret
        raw = bytearray(shamir.SHARE_BYTES)
        raw[4 * limb:4 * limb + 4] = value.to_bytes(4, "big")
        with pytest.raises(ValueError, match="256-bit"):
            shamir.combine({7: shamir.decode_share(bytes(raw))}, threshold=1)


def test_share_codec_rejects_malformed():
    largest = int.from_bytes((PRIME - 1).to_bytes(4, "big") * shamir.LIMBS, "big")
    assert shamir.decode_share(shamir.encode_share(largest)) == largest
    with pytest.raises(ValueError):
        shamir.decode_share(b"\x00" * (shamir.SHARE_BYTES - 1))
    with pytest.raises(ValueError):  # one limb is p itself, not a field element
        shamir.decode_share(bytes(32) + PRIME.to_bytes(4, "big"))
    with pytest.raises(ValueError):
        shamir.combine({1: 1 << (8 * shamir.SHARE_BYTES)}, threshold=1)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"threshold": 0, "xs": [1]}, "threshold"),
    ({"threshold": 3, "xs": [1, 2]}, "cannot hold"),
    ({"threshold": 2, "xs": [1, 1]}, "distinct"),
    ({"threshold": 2, "xs": [0, 1]}, "nonzero"),
    ({"threshold": 2, "xs": [1, PRIME]}, "below p"),
])
def test_split_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        shamir.split(7, **kwargs)
    with pytest.raises(ValueError, match="2\\*\\*256"):
        shamir.split(1 << 256, threshold=1, xs=[1])


def test_split_many_shares_each_secret_with_its_own_polynomials():
    first, second = (int.from_bytes(secrets.token_bytes(32), "big") for _ in range(2))
    xs = list(range(1, 19))
    together = shamir.split_many([first, second, first], threshold=10, xs=xs)
    assert len(together) == 3 and all(len(shares) == len(xs) for shares in together)
    for secret, shares in zip((first, second, first), together, strict=True):
        points = dict(zip(xs, shares, strict=True))
        assert shamir.combine(dict(list(points.items())[8:]), threshold=10) == secret
    assert together[0] != together[2]  # the same secret twice: fresh coefficients each time


def test_a_large_sharing_reconstructs_from_any_threshold_subset():
    """The benchmark's size: 500 parties, t = 251, so that Horner reduces every few steps
    and the slot sums of ``combine`` hold 251 products."""
    secret = (1 << 256) - 1 - secrets.randbelow(1 << 64)
    xs = list(range(1, 501))
    shares = dict(zip(xs, shamir.split(secret, threshold=251, xs=xs), strict=True))
    for _ in range(2):
        chosen = sorted(secrets.SystemRandom().sample(xs, 251))
        assert shamir.combine({x: shares[x] for x in chosen}, threshold=251) == secret


def test_power_tables_are_cached_only_up_to_their_bound_and_agree_with_the_direct_ones():
    """A server that asks for ever larger sharings cannot grow the cache of power tables
    past 256 tables of at most 65,536 values; a cached table equals the one made directly."""
    small = tuple(range(1, 19))  # a neighbourhood: cached
    large = tuple(range(1, 501))  # 500 parties, 251 rows: 125,500 values, made each call
    before = shamir._cached_powers.cache_info().currsize
    assert shamir._powers(large, 251).shape == (251, 500)
    assert shamir._cached_powers.cache_info().currsize == before
    cached = shamir._powers(small, 10)
    assert (cached == shamir._power_table(small, 10)).all()
    assert shamir._powers(small, 10) is cached and not cached.flags.writeable
    assert int(shamir._power_table(large, 251)[250, 499]) == pow(500, 250, PRIME)
    secret = secrets.randbits(256)
    shares = shamir.split(secret, threshold=251, xs=list(large))
    assert shamir.combine(dict(zip(large[249:], shares[249:], strict=True)),
                          threshold=251) == secret
