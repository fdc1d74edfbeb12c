"""The chunked envelope: round trips of any size, and every framing violation refused."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefl.engine.messages import PlainUpdate, decode, encode
from securefl.runtime.wire import ENVELOPE_VERSION, Assembler, Kind, WireError, split


def _assemble(frames, *, max_bytes=1 << 20, max_chunk_bytes=1 << 16):
    assembler = Assembler(max_bytes=max_bytes, max_chunk_bytes=max_chunk_bytes)
    out = [e for e in (assembler.feed(f) for f in frames) if e is not None]
    return out


@settings(max_examples=60, deadline=None)
@given(payload=st.binary(max_size=5000), chunk=st.integers(1, 700),
       round=st.integers(-5, 2**40), seq=st.integers(0, 2**64 - 1),
       client=st.text(min_size=1, max_size=20))
def test_split_then_assemble_is_identity(payload, chunk, round, seq, client):
    frames = list(split(Kind.REPLY, payload, round=round, seq=seq, client_id=client,
                        chunk_bytes=chunk))
    assert len(frames) == max(1, -(-len(payload) // chunk))
    (envelope,) = _assemble(frames, max_chunk_bytes=chunk)
    assert bytes(envelope.payload) == payload
    assert (envelope.kind, envelope.round, envelope.seq, envelope.client_id) == (
        Kind.REPLY, round, seq, client)


def test_engine_message_survives_chunking():
    update = np.linspace(-1, 1, 10_000, dtype=np.float32)
    frames = split(Kind.REQUEST, encode(PlainUpdate(update=update, weight=3.0)), round=2,
                   seq=9, client_id="site", chunk_bytes=4096)
    (envelope,) = _assemble(frames, max_chunk_bytes=4096)
    message = decode(envelope.payload, expect=PlainUpdate)
    np.testing.assert_array_equal(message.update, update)
    assert message.weight == 3.0


def _frames(payload=b"x" * 100, chunk=40):
    return list(split(Kind.REPLY, payload, round=1, seq=5, client_id="a", chunk_bytes=chunk))


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda f: [b"JUNK" + f[0][4:]], "bad magic"),
    (lambda f: [f[0][:4] + struct.pack("<H", ENVELOPE_VERSION + 1) + f[0][6:]],
     "unsupported envelope version 2"),
    (lambda f: [f[0][:6] + b"\x09" + f[0][7:]], "unknown frame kind 9"),
    (lambda f: [f[0][:10]], "truncated frame"),
    (lambda f: [f[1]], "does not continue"),
    (lambda f: [f[0], f[2]], "does not continue"),
    (lambda f: [f[0], f[0]], "a new payload started"),
    (lambda f: [f[0], _frames(b"y" * 100)[1][:17] + b"\x07" + _frames(b"y" * 100)[1][18:]],
     "does not continue"),
])
def test_framing_violations_are_refused(mutate, message):
    with pytest.raises(WireError, match=message):
        _assemble(mutate(_frames()))


def test_payload_over_the_limit_is_refused_from_its_first_chunk():
    frames = split(Kind.REPLY, b"z" * 1001, round=1, seq=1, client_id="a", chunk_bytes=100)
    assembler = Assembler(max_bytes=1000, max_chunk_bytes=100)
    with pytest.raises(WireError, match="payload of 1001 bytes exceeds the limit of 1000"):
        assembler.feed(next(frames))


def test_chunk_over_the_limit_is_refused():
    with pytest.raises(WireError, match="chunk of 200 bytes exceeds the limit of 100"):
        _assemble(split(Kind.REPLY, b"z" * 200, round=1, seq=1, client_id="a",
                        chunk_bytes=200), max_chunk_bytes=100)


def test_a_lying_total_is_refused():
    frame = bytearray(_frames(b"q" * 10, chunk=10)[0])
    frame[32:40] = (5).to_bytes(8, "little")  # announce 5 bytes, carry 10
    with pytest.raises(WireError, match="more bytes than the payload announced"):
        _assemble([bytes(frame)])


def test_assembler_recovers_after_a_violation():
    assembler = Assembler(max_bytes=1000, max_chunk_bytes=100)
    with pytest.raises(WireError):
        assembler.feed(b"garbage")
    (frame,) = split(Kind.HELLO, b"hi", round=0, seq=0, client_id="a", chunk_bytes=100)
    assert bytes(assembler.feed(frame).payload) == b"hi"
