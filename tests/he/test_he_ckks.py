"""CKKS keys and ciphertexts: key separation, error bound, sizes and bad input."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from securefl.errors import ProtocolAbort
from securefl.he import CKKSKeys
from securefl.he.packing import Selection, pack, unpack


@pytest.fixture(scope="module")
def keys():
    return CKKSKeys.generate()


def test_public_context_has_no_secret_key_and_cannot_decrypt(keys):
    public = keys.public()
    assert keys.is_private() and not public.is_private()
    assert public.key_id == keys.key_id and public.parameters == keys.parameters
    blob = keys.encrypt(np.ones(10))
    with pytest.raises(ValueError, match="without a secret key"):
        public.decrypt(blob, 10)
    with pytest.raises(ValueError, match="without a secret key"):
        public.encrypt(np.ones(10))
    # the serialized public context is a few hundred bytes: parameters and key id only
    assert len(public.to_bytes()) < 400 < 100_000 < len(keys.to_bytes())
    again = CKKSKeys.from_bytes(public.to_bytes())
    assert not again.is_private() and again.key_id == keys.key_id


def test_secret_context_round_trips_through_bytes(keys):
    copy = CKKSKeys.from_bytes(keys.to_bytes())
    x = np.linspace(-1, 1, 1000)
    np.testing.assert_allclose(copy.decrypt(keys.encrypt(x), 1000), x, atol=1e-7)


def test_malformed_context_bytes_are_a_value_error(keys):
    with pytest.raises(ValueError, match="not a serialized CKKS context"):
        CKKSKeys.from_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a serialized CKKS context"):
        CKKSKeys.from_bytes(keys.to_bytes()[:-50])  # truncated inside the secret key


def test_sum_error_within_the_stated_bound(keys):
    rng = np.random.default_rng(7)
    public = keys.public()
    n, d = 10, 3 * 8192 + 100
    rows = rng.normal(0, 0.05, (n, d)).astype(np.float32)
    weights = rng.integers(10, 100, n).astype(np.float64)
    totals = [None] * keys.ciphertext_count(d)
    for w, x in zip(weights, rows, strict=True):
        for j, blob in enumerate(keys.encrypt(w * x.astype(np.float64))):
            totals[j] = public.add_into(totals[j], public.load(blob))
    decrypted = keys.decrypt([public.dump(t) for t in totals], d)
    exact = weights @ rows.astype(np.float64)
    error = np.max(np.abs(decrypted - exact))
    assert error <= keys.parameters.error_bound(n) < 1e-6
    assert error > 0  # CKKS is approximate: a zero error would mean nothing was encrypted
    mean_error = np.max(np.abs(decrypted / weights.sum() - exact / weights.sum()))
    assert mean_error < 1e-9


def test_sizes_per_float32_upload_under_2x_aggregate_under_4x(keys):
    d = 16 * 8192
    x = np.random.default_rng(1).normal(0, 0.05, d)
    upload = keys.encrypt(x)
    assert len(upload) == 16
    upload_ratio = sum(map(len, upload)) / (4 * d)
    public = keys.public()
    aggregate = [public.dump(public.add_into(public.load(b), public.load(b))) for b in upload]
    aggregate_ratio = sum(map(len, aggregate)) / (4 * d)
    assert 1.8 < upload_ratio <= 2.0
    assert 3.6 < aggregate_ratio <= 4.0


@pytest.fixture(scope="module")
def blob(keys):
    return keys.encrypt(np.full(8192, 0.25))[0]


def test_truncated_ciphertext_is_a_protocol_abort(keys, blob):
    for cut in (0, 10, len(blob) // 2, len(blob) - 1):
        with pytest.raises(ProtocolAbort):
            keys.public().load(blob[:cut])


def test_ciphertext_of_other_parameters_is_a_protocol_abort(keys):
    other = CKKSKeys.generate(poly_modulus_degree=4096, coeff_modulus_bits=(50, 40),
                              scale_bits=36)
    with pytest.raises(ProtocolAbort):
        keys.public().load(other.encrypt(np.ones(5))[0])


def test_garbage_and_non_bytes_are_protocol_aborts(keys, blob):
    with pytest.raises(ProtocolAbort):
        keys.public().load(b"\x00" * len(blob))
    with pytest.raises(ProtocolAbort):
        keys.public().load("not bytes")  # type: ignore[arg-type]


def test_overflowing_sum_is_detected_at_decryption(keys):
    capacity = keys.parameters.capacity
    assert keys.decrypt(keys.encrypt(np.full(8, 0.9 * capacity)), 8) == pytest.approx(
        0.9 * capacity, rel=1e-9)
    public = keys.public()
    blob = keys.encrypt(np.full(8, 0.9 * capacity))[0]
    total = public.add_into(public.load(blob), public.load(blob))  # 1.8 x capacity wraps
    with pytest.raises(ProtocolAbort):
        keys.decrypt([public.dump(total)], 8)


def test_wrong_number_of_ciphertexts_is_refused(keys, blob):
    with pytest.raises(ProtocolAbort):
        keys.decrypt([blob], 8193)


def test_pack_puts_two_reals_per_complex_slot_and_pads():
    x = np.arange(10, dtype=np.float64)
    chunks = list(pack(x, 8))
    assert [c.size for c in chunks] == [4, 4]
    assert chunks[0][1] == 2 + 3j and chunks[1][1] == 0j  # 10 -> padded to 16
    np.testing.assert_array_equal(unpack(chunks, 10), x)
    with pytest.raises(ValueError):
        list(pack(x, 7))


def test_selection_splits_and_merges():
    sel = Selection(np.array([1, 3]), 5)
    secret, clear = sel.split(np.array([0.0, 1, 2, 3, 4]))
    np.testing.assert_array_equal(secret, [1, 3])
    np.testing.assert_array_equal(clear, [0, 2, 4])
    np.testing.assert_array_equal(sel.merge(secret, clear), [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="strictly increasing"):
        Selection(np.array([3, 1]), 5)
    with pytest.raises(ValueError, match="shape"):
        sel.split(np.zeros(4))


@given(st.lists(st.floats(-1e6, 1e6), min_size=0, max_size=40),
       st.sampled_from([2, 4, 8, 16]))
def test_pack_unpack_round_trip_property(values, per):
    x = np.asarray(values, dtype=np.float64)
    chunks = list(pack(x, per))
    assert len(chunks) == -(-x.size // per)
    assert all(c.dtype == np.complex128 and c.size == per // 2 for c in chunks)
    np.testing.assert_array_equal(unpack(chunks, x.size), x)


@given(st.sets(st.integers(0, 29)))
def test_selection_round_trip_property(chosen):
    sel = Selection(np.array(sorted(chosen), dtype=np.int64), 30)
    x = np.arange(30, dtype=np.float64) * 1.5
    secret, clear = sel.split(x)
    assert secret.size + clear.size == 30 and set(sel.encrypted) == chosen
    np.testing.assert_array_equal(sel.merge(secret, clear), x)
