"""The SecAgg messages through the wire codec leave nothing for the garbage collector: a sent
masked input is freed as soon as its frame exists (no reference cycle keeps it alive); the
header's direct path writes the generic frames and reads them (malformed ones included) as the
generic path does; a model decoded from a frame is hashed exactly as received."""

import gc
import hashlib
import json
import struct
import sys

import numpy as np

from securefl.engine import layout, messages, plans
from securefl.engine.messages import EvaluateIns, FitIns, decode, encode
from securefl.engine.session import model_digest
from securefl.errors import MessageError
from securefl.secagg.messages import (
    SecAggMaskedInput,
    SecAggSetup,
    SecAggShares,
    SecAggUnmaskReply,
    SecAggUnmaskRequest,
)


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


def _generic_frame(msg) -> bytes:
    """The frame as the generic tree and JSON encoder write it."""
    blobs, arrays = [], []
    body = messages._tree(msg, blobs, arrays)
    sizes = [len(b) if isinstance(b, bytes) else b.nbytes for b in blobs]
    header = messages._HEADER.encode({"body": body, "arrays": arrays, "blobs": sizes}).encode()
    return struct.pack("<4sHI", b"SFLM", messages.WIRE_VERSION, len(header)) + header + b"".join(
        bytes(b) for b in blobs)


def _outcome(frame: bytes) -> tuple[str, object]:
    try:
        return "ok", encode(decode(frame))
    except MessageError as exc:
        return "error", str(exc)


def test_the_direct_header_path_writes_and_reads_the_generic_frames(monkeypatch):
    ids = ("c0001", "c0002", "é\n")
    samples = [SecAggShares(ciphertexts={c: bytes([i]) * 76 for i, c in enumerate(ids)}),
               SecAggUnmaskRequest(signatures={}),
               SecAggSetup(round=7, participants=ids),
               SecAggUnmaskReply(seed_shares={"c0001": b"s"}, key_shares={"c0002": b""},
                                 withheld=("c0003",), excess=(bytes(32),)),
               FitIns(run=bytes(32), round=2, parameters=np.arange(5, dtype=np.float32),
                      config={"lr": 0.5, "x": [1, None]},
                      protection=SecAggSetup(round=2, participants=ids))]
    bad_nodes = [None, 1, True, "x", [], {}, {"$b": 99}, {"$b": True}, {"$t": [1]},
                 {"$m": [[1, {"$b": 0}]]}, {"$m": [["k", {"$b": 0}, 1]]}, {"$a": 0},
                 {"$mb": ["k"], "b": 0}, {"$mb": ["k", "k"], "b": 0}, {"$mb": [1], "b": 0},
                 {"$mb": ["k"], "b": 99}, {"$mb": ["k"], "b": True}, {"$mb": ["k"], "b": -1},
                 {"$mb": "k", "b": 0}, {"$mb": ["k"]}, {"$mb": [], "b": 0, "x": 1}]
    frames = []
    for msg in samples:
        frame = encode(msg)
        assert frame == _generic_frame(msg)
        frames.append(frame)
        _, _, size = struct.unpack_from("<4sHI", frame)
        header, tail = json.loads(frame[10:10 + size]), frame[10 + size:]
        # each field, and each field of a nested message, replaced by each malformed node
        paths = [(field,) for field in header["body"]["f"]]
        paths += [(field, "f", inner) for field, node in header["body"]["f"].items()
                  if isinstance(node, dict) and "$msg" in node for inner in node["f"]]
        for path in paths:
            for node in bad_nodes:
                bad = json.loads(json.dumps(header))
                parent = bad["body"]["f"]
                for key in path[:-1]:
                    parent = parent[key]
                parent[path[-1]] = node
                raw = json.dumps(bad, separators=(",", ":")).encode()
                frames.append(struct.pack("<4sHI", b"SFLM", 1, len(raw)) + raw + tail)
    monkeypatch.setattr(plans, "_PLANS", {})
    monkeypatch.setattr(plans, "_SEEN", set())
    direct = [_outcome(frame) for frame in frames]
    assert [_outcome(frame) for frame in frames] == direct  # seen twice: planned now
    parsed, parse = [], plans.parse
    monkeypatch.setattr(plans, "parse", lambda *a, **k: parsed.append(1) or parse(*a, **k))
    planned = [_outcome(frame) for frame in frames]  # each header's plan from the first pass
    # every header that decoded is read from its plan: only the malformed ones are parsed
    assert len(parsed) == sum(kind == "error" for kind, _ in direct)
    monkeypatch.setattr(layout, "read_fields", lambda *args, **kwargs: None)
    monkeypatch.setattr(plans, "lookup", lambda *args: None)
    generic = [_outcome(frame) for frame in frames]
    assert direct == planned == generic
    assert sum(kind == "error" for kind, _ in direct) > len(frames) // 2


def test_a_planned_header_still_checks_the_frame_and_reads_its_own_blobs(monkeypatch):
    monkeypatch.setattr(plans, "_PLANS", {})
    monkeypatch.setattr(plans, "_SEEN", set())
    frames = [encode(SecAggShares(ciphertexts={"c0001": bytes([i]) * 76, "c0002": b"k" * 76}))
              for i in range(3)]
    assert len({f[:10 + struct.unpack_from("<I", f, 6)[0]] for f in frames}) == 1  # one header
    decoded = [decode(frame).ciphertexts for frame in frames]  # the second one planned it
    assert len(plans._PLANS) == 1
    assert [d["c0001"] for d in decoded] == [bytes([i]) * 76 for i in range(3)]
    assert decoded[2] is not decoded[1] and decode(frames[0]).ciphertexts == decoded[0]
    for bad in (frames[0] + b"x", frames[0][:-1]):
        try:
            decode(bad)
        except MessageError as exc:
            assert "length does not match" in str(exc)
        else:
            raise AssertionError("a frame longer or shorter than its header decoded")
