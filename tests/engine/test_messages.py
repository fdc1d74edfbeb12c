import json
import pickle
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefl.engine import messages as m
from securefl.errors import MessageError

RUN = b"\x07" * 32


def same(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, m.Message):
        return type(a) is type(b) and all(
            same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


SAMPLES = [
    m.FitIns(run=RUN, round=3, parameters=np.linspace(-1, 1, 7, dtype=np.float32),
             config={"lr": 0.1, "name": "x", "nested": [1, 2]},
             protection=m.Decline(reason="inner")),
    m.FitIns(run=RUN, round=0, parameters=np.zeros(0, np.float32), config={}, protection=None),
    m.FitRes(payload=m.PlainUpdate(update=np.ones(4, np.float32), weight=2.5),
             metrics={"train_loss": 0.25}),
    m.EvaluateIns(round=1, parameters=np.arange(6, dtype=np.float32)),
    m.EvaluateRes(num_examples=10, loss=0.5, accuracy=0.9),
    m.Decline(reason="budget exhausted: ε 8.1 > 8"),
    m.PlainUpdate(update=np.array([1.5, -2.0], np.float32), weight=3.0),
]


def test_every_engine_message_type_has_a_sample():
    engine_types = {n for n, c in m.registered().items() if c.__module__ == m.__name__}
    assert engine_types == {type(s).__name__ for s in SAMPLES}


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_round_trip(msg):
    frame = m.encode(msg)
    assert frame[:4] == b"SFLM"
    assert same(m.decode(frame), msg)
    assert same(m.decode(bytearray(frame)), msg)


def test_nested_containers_and_int_keys_round_trip():
    @m.message
    class _Nested(m.Message):
        shares: dict[int, bytes]
        pairs: tuple[tuple[str, int], ...]
        arrays: list[np.ndarray]

    msg = _Nested(shares={1: b"\x00\xff", 7: b""}, pairs=(("a", 1), ("b", 2)),
                  arrays=[np.eye(2), np.arange(3, dtype=np.uint32)])
    assert same(m.decode(m.encode(msg)), msg)


def test_arrays_are_read_only_views():
    out = m.decode(m.encode(m.EvaluateIns(round=1, parameters=np.ones(3, np.float32))))
    with pytest.raises(ValueError):
        out.parameters[0] = 5


@pytest.mark.parametrize("frame", [
    b"", b"SFLM", b"XXXX\x01\x00\x00\x00\x00\x00",
    pickle.dumps({"a": 1}),
    struct.pack("<4sHI", b"SFLM", 99, 2) + b"{}",
    struct.pack("<4sHI", b"SFLM", 1, 100) + b"{}",
])
def test_malformed_frames_raise_message_error(frame):
    with pytest.raises(MessageError):
        m.decode(frame)


def _frame(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<4sHI", b"SFLM", 1, len(header)) + header + body


@pytest.mark.parametrize("header,body", [
    (b'{"body":{"$msg":"Nope","f":{}},"arrays":[],"blobs":[]}', b""),
    (b'{"body":{"$msg":"Decline","f":{"reason":5}},"arrays":[],"blobs":[]}', b""),
    (b'{"body":{"$msg":"Decline","f":{"reason":"x","extra":1}},"arrays":[],"blobs":[]}', b""),
    (b'{"body":{"$msg":"Decline","f":{}},"arrays":[],"blobs":[]}', b""),
    (b'{"body":{"$msg":"EvaluateIns","f":{"round":1,"parameters":{"$a":0}}},'
     b'"arrays":[{"blob":0,"dtype":"|O","shape":[1]}],"blobs":[8]}', b"\x00" * 8),
    (b'{"body":{"$msg":"EvaluateIns","f":{"round":1,"parameters":{"$a":0}}},'
     b'"arrays":[{"blob":0,"dtype":"<f4","shape":[3]}],"blobs":[8]}', b"\x00" * 8),
    (b'{"body":{"$msg":"EvaluateIns","f":{"round":1,"parameters":{"$a":0}}},'
     b'"arrays":[{"blob":0,"dtype":"<f4","shape":[2]}],"blobs":[9]}', b"\x00" * 8),
    (b'{"body":{"$msg":"Decline","f":{"reason":"x"}},"arrays":[],"blobs":[]}', b"junk"),
])
def test_hostile_headers_raise(header, body):
    with pytest.raises(MessageError):
        m.decode(_frame(header, body))


def test_size_limit_and_expected_type():
    frame = m.encode(m.EvaluateIns(round=1, parameters=np.ones(100, np.float32)))
    with pytest.raises(MessageError, match="exceeds"):
        m.decode(frame, max_bytes=len(frame) - 1)
    with pytest.raises(MessageError, match="expected Decline"):
        m.decode(frame, expect=m.Decline)
    assert m.decode(frame, expect=m.EvaluateIns).round == 1


def test_object_arrays_cannot_be_encoded():
    with pytest.raises(MessageError):
        m.encode(m.EvaluateIns(round=1, parameters=np.array([object()])))


def test_registering_twice_is_refused():
    with pytest.raises(TypeError):
        @m.message
        class Decline(m.Message):
            reason: str


def _evaluate_ins_with_shape(shape) -> bytes:
    header = json.dumps({"body": {"$msg": "EvaluateIns", "f": {"round": 1,
                                                             "parameters": {"$a": 0}}},
                         "arrays": [{"blob": 0, "dtype": "<f4", "shape": shape}],
                         "blobs": [0]}).encode()
    return _frame(header)


@pytest.mark.parametrize("frame", [
    _evaluate_ins_with_shape([2**32, 2**32]),     # int64 product wraps to 0 = the blob's size
    _evaluate_ins_with_shape([2**64, 0]),
    _evaluate_ins_with_shape([1] * 33),           # more dimensions than numpy allows
    _evaluate_ins_with_shape([1.5]),
    _evaluate_ins_with_shape([True]),
    _frame(b'{"body":' + b"[" * 100_000 + b"]" * 100_000 + b',"arrays":[],"blobs":[]}'),
    _frame(b'{"body":{"$msg":"Decline","f":{"reason":' + b'{"$t":[' * 40 + b"1"
           + b"]}" * 40 + b'}},"arrays":[],"blobs":[]}'),
    _frame(b'{"body":{"$msg":"Decline","f":{"reason":"x"}},"arrays":[],"blobs":[1e400]}'),
    _frame(b'{"body":{"$msg":"Decline","f":{"reason":"x"}},"arrays":{},"blobs":["1"]}'),
])
def test_hostile_shapes_and_nesting_raise_only_message_error(frame):
    with pytest.raises(MessageError) as caught:
        m.decode(frame)
    assert type(caught.value) is MessageError


def test_header_size_is_capped_before_parsing():
    frame = m.encode(m.Decline(reason="x" * 5000))
    with pytest.raises(MessageError, match="header of"):
        m.decode(frame, max_header_bytes=4096)
    assert m.decode(frame, max_header_bytes=8192).reason == "x" * 5000
    assert m.MAX_HEADER_BYTES == 1 << 20 and m.MAX_DEPTH == 32


def test_error_messages_do_not_echo_long_attacker_strings():
    frame = _frame(json.dumps({"body": {"$msg": "N" * 100_000, "f": {}}, "arrays": [],
                               "blobs": []}).encode())
    with pytest.raises(MessageError) as caught:
        m.decode(frame)
    assert len(str(caught.value)) < 200


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_after_a_valid_prefix_only_raise_message_error(tail):
    frame = m.encode(m.EvaluateIns(round=1, parameters=np.ones(2, np.float32)))
    for cut in (10, 30, len(frame) - 4):
        try:
            m.decode(frame[:cut] + tail)
        except MessageError:
            pass
