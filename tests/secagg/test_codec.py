"""The SecAgg messages through the wire codec leave nothing for the garbage collector: a sent
masked input is freed as soon as its frame exists (no reference cycle keeps it alive); a model
decoded from a frame is hashed exactly as received."""

import gc
import hashlib
import sys

import numpy as np

from securefl.engine.messages import EvaluateIns, decode, encode
from securefl.engine.session import model_digest
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


def test_a_model_read_from_a_frame_is_hashed_as_received():
    """``model_digest`` hashes a broadcast frame's model once, and only that frame's bytes:
    every site of a simulation gets SHA-256 of exactly what it decoded."""
    first = np.linspace(-1, 1, 1000, dtype=np.float32)
    second = first.copy()
    second[500] += 1e-3
    digests = []
    for model in (first, first, second, first):
        frame = encode(EvaluateIns(round=1, parameters=model))
        for _ in range(3):  # three sites decode the same frame
            received = decode(frame, expect=EvaluateIns).parameters
            digests.append(model_digest(received))
        assert digests[-1] == hashlib.sha256(model.astype("<f4").tobytes()).digest()
    assert len(set(digests[:6])) == 1 and len(set(digests[6:9])) == 1
    assert digests[6] != digests[0] and digests[9] == digests[0]
    writable = first.copy()
    before = model_digest(writable)
    writable[0] = 7.0  # a model the site can change is hashed every time
    assert model_digest(writable) != before
