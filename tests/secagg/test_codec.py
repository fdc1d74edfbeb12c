"""The SecAgg messages through the wire codec leave nothing for the garbage collector: a sent
masked input is freed as soon as its frame exists (no reference cycle keeps it alive)."""

import gc
import sys

import numpy as np

from securefl.engine.messages import decode, encode
from securefl.secagg.messages import SecAggMaskedInput, SecAggShares, SecAggUnmaskRequest


def test_encoding_a_masked_input_keeps_no_reference_to_it():
    words = np.arange(100_001, dtype=np.uint32)
    before = sys.getrefcount(words)
    frame = encode(SecAggMaskedInput(masked=words))
    assert sys.getrefcount(words) == before  # nothing but the caller holds the words
    assert np.array_equal(decode(frame, expect=SecAggMaskedInput).masked, words)


def test_encode_and_decode_create_no_cyclic_garbage():
    ids = [f"c{i:04d}" for i in range(18)]
    messages = [SecAggMaskedInput(masked=np.zeros(1001, np.uint32)),
                SecAggShares(ciphertexts={c: bytes(76) for c in ids}),
                SecAggUnmaskRequest(signatures={c: bytes(64) for c in ids})]
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for msg in messages:
            decoded = decode(encode(msg))
            assert type(decoded) is type(msg)
            del decoded
        assert gc.collect() == 0
    finally:
        if enabled:
            gc.enable()
