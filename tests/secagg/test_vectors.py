"""Known-answer tests: RFC 7748 (X25519), NIST SP 800-38A (AES-CTR), and securefl's frozen
vectors for the PRG, mask derivation, share encryption, quantization and Shamir sharing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securefl.errors import ProtocolAbort
from securefl.secagg import keys, shamir
from securefl.secagg.prg import add_masks, info, keystream, prg_key, prg_words
from securefl.secagg.quantize import Quantizer
from securefl.secagg.scope import Scope

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "secagg.json").read_text())


def x25519(scalar: str, u: str) -> str:
    private = X25519PrivateKey.from_private_bytes(bytes.fromhex(scalar))
    return private.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(u))).hex()


# ----------------------------------------------------------------------------- RFC 7748
@pytest.mark.parametrize(("scalar", "u", "out"), [
    ("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
     "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
     "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
    ("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
     "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
     "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"),
])
def test_rfc7748_section_5_2(scalar, u, out):
    assert x25519(scalar, u) == out


def test_rfc7748_section_5_2_one_iteration():
    start = "09" + "00" * 31
    assert x25519(start, start) == (
        "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079")


def test_rfc7748_section_6_1_diffie_hellman():
    alice = X25519PrivateKey.from_private_bytes(bytes.fromhex(
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
    bob = X25519PrivateKey.from_private_bytes(bytes.fromhex(
        "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"))
    assert keys.public_bytes(alice).hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert keys.public_bytes(bob).hex() == (
        "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert keys.agree(alice, keys.public_bytes(bob), peer="bob").hex() == shared
    assert keys.agree(bob, keys.public_bytes(alice), peer="alice").hex() == shared


# ----------------------------------------------------------------------------- SP 800-38A
_PLAINTEXT = ("6bc1bee22e409f96e93d7e117393172a" "ae2d8a571e03ac9c9eb76fac45af8e51"
              "30c81c46a35ce411e5fbc1191a0a52ef" "f69f2445df4f9b17ad2b417be66c3710")
_COUNTER = "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"


@pytest.mark.parametrize(("key", "ciphertext"), [
    ("2b7e151628aed2a6abf7158809cf4f3c",  # F.5.1 CTR-AES128.Encrypt
     "874d6191b620e3261bef6864990db6ce" "9806f66b7970fdff8617187bb9fffdff"
     "5ae4df3edbd5d35e5b4f09020db03eab" "1e031dda2fbe03d1792170a0f3009cee"),
    ("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",  # F.5.5 AES256
     "601ec313775789a5b7a7f504bbf3d228" "f443e3ca4d62b59aca84e990cacaf5c5"
     "2b0930daa23de94ce87017ba2d84988d" "dfc9c58db67aada613c2dd08457941a6"),
])
def test_sp800_38a_ctr(key, ciphertext):
    encryptor = Cipher(algorithms.AES(bytes.fromhex(key)),
                       modes.CTR(bytes.fromhex(_COUNTER))).encryptor()
    assert (encryptor.update(bytes.fromhex(_PLAINTEXT)) + encryptor.finalize()).hex() == ciphertext


def test_keystream_is_aes128_ctr_from_zero_counter():
    key = bytes.fromhex(VECTORS["prg"]["key"])
    assert len(key) == 16
    reference = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(64))
    assert keystream(key, 16).tobytes() == reference
    with pytest.raises(ValueError, match="AES-128"):
        keystream(bytes(32), 4)


# ----------------------------------------------------------------------------- frozen
def scope(v: dict) -> Scope:
    return Scope(federation=bytes.fromhex(v["federation"]), run=bytes.fromhex(v["run"]),
                 round=v["round"], graph=bytes.fromhex(v["graph"]))


def test_info_encoding():
    for name in ("info", "info_pair"):
        v = VECTORS[name]
        s = scope(v["scope"])
        assert s.info(v["label"], *v["ids"]).hex() == v["hex"]
        spelled_out = (v["label"].encode() + b"\0" + s.federation + s.run
                       + s.round.to_bytes(8, "big") + bytes([len(s.graph)]) + s.graph
                       + b"".join(len(i).to_bytes(2, "big") + i.encode() for i in v["ids"]))
        assert spelled_out.hex() == v["hex"]
    assert info("a", b"", "bc") != info("a", b"", "b", "c")  # length prefixes separate ids


def test_scope_separates_federations_runs_rounds_and_graphs():
    base = scope(VECTORS["info"]["scope"])
    others = [dataclasses.replace(base, federation=bytes(32)),
              dataclasses.replace(base, run=bytes(32)),
              dataclasses.replace(base, round=base.round + 1), base.with_graph(b"\1" * 32)]
    infos = {s.info("self-mask", "alice") for s in [base, *others]}
    assert len(infos) == 5


def test_commitment_vector():
    v = VECTORS["commitment"]
    assert keys.commitment(scope(v["scope"]), v["label"], v["client_id"],
                           bytes.fromhex(v["value"])).hex() == v["hex"]


def test_prg_vector():
    v = VECTORS["prg"]
    secret, context = bytes.fromhex(v["secret"]), bytes.fromhex(v["context"])
    assert prg_key(secret, context).hex() == v["key"]
    # the documented construction, spelled out with cryptography's HKDF
    spelled_out = HKDF(algorithm=hashes.SHA256(), length=16, salt=None,
                       info=b"securefl/secagg/v3/" + context).derive(secret)
    assert spelled_out.hex() == v["key"]
    assert prg_words(secret, context, len(v["words"])).tolist() == v["words"]


def test_mask_derivation_vectors():
    v = VECTORS["self_mask"]
    assert keys.self_mask_key(bytes.fromhex(v["seed"]), scope=scope(v["scope"]),
                              client_id=v["client_id"]).hex() == v["key"]
    p = VECTORS["pairwise_mask"]
    alice = X25519PrivateKey.from_private_bytes(bytes.fromhex(p["alice_private"]))
    bob = X25519PrivateKey.from_private_bytes(bytes.fromhex(p["bob_private"]))
    shared = keys.agree(alice, keys.public_bytes(bob), peer="bob")
    assert shared.hex() == p["shared"]
    forward = keys.pairwise_mask_key(shared, scope=scope(p["scope"]), first="alice",
                                     second="bob")
    backward = keys.pairwise_mask_key(shared, scope=scope(p["scope"]), first="bob",
                                      second="alice")
    assert forward.hex() == backward.hex() == p["key"]
    assert keystream(forward, len(p["words"])).tolist() == p["words"]


def test_share_encryption_vector():
    v = VECTORS["share_encryption"]
    shared, nonce, s = bytes.fromhex(v["shared"]), bytes.fromhex(v["nonce"]), scope(v["scope"])
    pair = keys.channel_keys(shared, scope=s, first=v["sender"], second=v["receiver"])
    assert pair == keys.channel_keys(shared, scope=s, first=v["receiver"], second=v["sender"])
    # one 64-byte HKDF output, split by position, spelled out with cryptography's HKDF
    low, high = sorted((v["sender"], v["receiver"]))
    spelled_out = HKDF(algorithm=hashes.SHA256(), length=64, salt=None,
                       info=b"securefl/secagg/v3/" + s.info("share-keys", low, high)
                       ).derive(shared)
    assert (pair[0] + pair[1]).hex() == spelled_out.hex() == v["keys"]
    plaintext = bytes.fromhex(v["plaintext"])
    for sender, receiver, expected in ((v["sender"], v["receiver"], v["ciphertext"]),
                                       (v["receiver"], v["sender"], v["ciphertext_back"])):
        ciphertext = keys._encrypt_with_nonce(pair, plaintext, nonce, scope=s, sender=sender,
                                              receiver=receiver)
        assert ciphertext.hex() == expected
        assert keys.decrypt_shares(pair, ciphertext, scope=s, sender=sender,
                                   receiver=receiver) == plaintext
        with pytest.raises(ProtocolAbort):  # the other direction's key and aad refuse it
            keys.decrypt_shares(pair, ciphertext, scope=s, sender=receiver, receiver=sender)


def test_quantize_vector():
    v = VECTORS["quantize"]
    quantizer = Quantizer(clip=v["clip"], max_weight=v["max_weight"], levels=v["levels"])
    words = quantizer.encode(np.array(v["delta"], np.float32), v["weight"],
                             np.array(v["dither"], np.uint32))
    assert words.tolist() == v["words"]


def test_shamir_vector():
    v = VECTORS["shamir"]
    assert (v["prime"], v["limb_bits"], v["limbs"]) == (shamir.PRIME, shamir.LIMB_BITS,
                                                       shamir.LIMBS)
    secret, p = int(v["secret"], 16), v["prime"]
    shares = shamir._split_with(secret, v["coefficients"], v["xs"], threshold=v["threshold"])
    assert [shamir.encode_share(s).hex() for s in shares] == v["shares"]
    # the documented construction spelled out: limb j of share i is f_j(x_i) mod p
    limbs = [(secret >> (30 * j)) & ((1 << 30) - 1) for j in range(9)]
    for x, share in zip(v["xs"], v["shares"], strict=True):
        values = [sum(a * x**e for e, a in enumerate([limbs[j], *(c[j] for c in
                                                                  v["coefficients"])])) % p
                  for j in range(9)]
        assert b"".join(y.to_bytes(4, "big") for y in values).hex() == share
    points = dict(zip(v["xs"], shares, strict=True))
    assert shamir.combine(dict(list(points.items())[2:]), threshold=v["threshold"]) == secret


def test_add_masks_is_the_blockwise_sum_of_keystreams():
    keys = [(bytes([i]) * 16, sign) for i, sign in enumerate((1, -1, 1, -1, -1))]
    count = 2 * (1 << 16) + 123  # two whole blocks and a tail
    start = np.arange(count, dtype=np.uint32)
    expected = start.astype(np.int64)
    for key, sign in keys:
        expected += sign * keystream(key, count).astype(np.int64)
    accumulator = start.copy()
    add_masks(accumulator, keys)
    np.testing.assert_array_equal(accumulator, (expected % (1 << 32)).astype(np.uint32))
    with pytest.raises(ValueError, match="uint32"):
        add_masks(np.zeros(4, np.int64), keys)
