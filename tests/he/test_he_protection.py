"""HE protection: the contract, key separation, bad uploads and decryptor failures."""

import dataclasses

import numpy as np
import pytest

from securefl.engine.messages import Decline
from securefl.engine.protection import Update, WeightedSum
from securefl.errors import ProtocolAbort
from securefl.he import CKKSKeys, HEClientProtection, HEConfig, HEServerProtection, Selection
from securefl.he import build_simulation as build_he
from securefl.he.protection import HEDecryptReply, HEDecryptRequest, HERoundOpen, HEUpload
from tests.contracts.protection import ProtectionContract, converse, ctx, plain_sum

IDS = [f"site-{i}" for i in range(4)]
D = 9000  # two ciphertexts, the second partly padded


class TestHEContract(ProtectionContract):
    tolerance = 1e-6
    num_clients = 5
    dimension = 9000

    def make(self, client_ids):
        return build_he(HEConfig(), client_ids)


def updates(seed=0, ids=IDS, d=D):
    rng = np.random.default_rng(seed)
    return {c: Update(rng.normal(0, 0.05, d).astype(np.float32), float(rng.integers(10, 100)))
            for c in ids}


def check_sum(result, ups, ids):
    """The sum is right and the FedAvg mean it gives is within 1e-6 of the exact one."""
    total, weight = plain_sum(ups, ids)
    assert isinstance(result, WeightedSum)
    assert sorted(result.client_ids) == sorted(ids)
    assert result.total_weight == weight
    assert np.max(np.abs(result.mean() - total / weight)) <= 1e-6
    assert 0 < np.max(np.abs(result.total - total)) <= 2e-4 * weight


class Rewrite:
    """A client half whose upload (or decryption reply) is rewritten in transit."""

    name = "he"

    def __init__(self, inner, *, upload=None, reply=None):
        self.inner, self.upload, self.reply = inner, upload, reply

    def client_round(self, *, round, context):
        inner, outer = self.inner.client_round(round=round, context=context), self

        class Round:
            def open(self, update, payload):
                msg = inner.open(update, payload)
                return outer.upload(msg) if outer.upload else msg

            def step(self, request):
                msg = inner.step(request)
                return outer.reply(msg) if outer.reply else msg
        return Round()


def flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


@pytest.fixture(scope="module")
def federation():
    return build_he(HEConfig(), IDS)


def test_server_holds_only_a_public_context(federation):
    server, clients = federation
    assert not server.context.is_private() and not server.reveals_rows
    assert all(c.keys.is_private() for c in clients.values())
    keys = clients[IDS[0]].keys
    with pytest.raises(ValueError, match="only the public CKKS context"):
        HEServerProtection(keys)
    with pytest.raises(ValueError, match="only the public CKKS context"):
        HEServerProtection.from_bytes(keys.to_bytes())
    with pytest.raises(TypeError):
        HEServerProtection(keys.to_bytes())
    with pytest.raises(ValueError, match="secret CKKS context"):
        HEClientProtection(keys.public(), client_id="x")


def test_sum_through_the_wire_matches_plaintext(federation):
    server, clients = federation
    ups = updates(1)
    check_sum(converse(server, clients, ups, dimension=D), ups, IDS)


@pytest.mark.parametrize("attack,reason", [
    (lambda m: dataclasses.replace(m, ciphertexts=[flip(m.ciphertexts[0], 4000),
                                                   *m.ciphertexts[1:]]), "signature"),
    (lambda m: dataclasses.replace(m, ciphertexts=[m.ciphertexts[0][:-100],
                                                   *m.ciphertexts[1:]]), "signature"),
    (lambda m: dataclasses.replace(m, ciphertexts=m.ciphertexts[:1]), "expected 2 ciphertexts"),
    (lambda m: dataclasses.replace(m, weight=m.weight * 2), "signature"),
    (lambda m: dataclasses.replace(m, unit_log2=m.unit_log2 + 1), "weight unit"),
    (lambda m: dataclasses.replace(m, signature=None), "not signed"),
    (lambda m: dataclasses.replace(m, weight=float("nan")), "weight"),
    (lambda m: Decline(reason="x"), "expected an HEUpload"),
])
def test_bad_upload_drops_that_client_and_the_round_goes_on(federation, attack, reason):
    server, clients = federation
    bad = IDS[1]
    tampered = {**clients, bad: Rewrite(clients[bad], upload=attack)}
    ups = updates(2)
    result = converse(server, tampered, ups, dimension=D)
    assert reason in result.rejected[bad]
    check_sum(result, ups, [c for c in IDS if c != bad])


def test_ciphertexts_from_another_context_are_rejected(federation):
    server, clients = federation
    other = HEClientProtection(CKKSKeys.generate(), client_id=IDS[2],
                               signing_key=clients[IDS[2]].signing_key)

    class Stranger:  # ignores the server's opening (an honest client would refuse it)
        name = "he"

        def client_round(self, *, round, context):
            inner = other.client_round(round=round, context=context)

            class Round:
                def open(self, update, payload):
                    return inner.open(update, None)
            return Round()
    ups = updates(3)
    result = converse(server, {**clients, IDS[2]: Stranger()}, ups, dimension=D)
    assert "different CKKS context" in result.rejected[IDS[2]]
    check_sum(result, ups, [IDS[0], IDS[1], IDS[3]])


def test_without_signatures_seal_validation_still_rejects_truncation():
    keys = CKKSKeys.generate()
    server = HEServerProtection(keys.public())
    clients = {c: HEClientProtection(keys, client_id=c) for c in IDS}
    truncate = Rewrite(clients[IDS[0]], upload=lambda m: dataclasses.replace(
        m, ciphertexts=[m.ciphertexts[0][:len(m.ciphertexts[0]) // 2], *m.ciphertexts[1:]]))
    ups = updates(4)
    result = converse(server, {**clients, IDS[0]: truncate}, ups, dimension=D)
    assert "invalid ciphertext" in result.rejected[IDS[0]]
    check_sum(result, ups, IDS[1:])


def test_upload_replayed_in_a_later_round_is_rejected(federation):
    server, clients = federation
    recorded = {}

    def record(msg):
        recorded["upload"] = msg
        return msg
    ups = updates(5)
    converse(server, {**clients, IDS[0]: Rewrite(clients[IDS[0]], upload=record)}, ups,
             round=1, dimension=D)
    replay = Rewrite(clients[IDS[0]], upload=lambda m: recorded["upload"])
    result = converse(server, {**clients, IDS[0]: replay}, ups, round=2, dimension=D)
    assert "signature" in result.rejected[IDS[0]]


def test_silent_decryptor_is_replaced_by_the_next_contributor(federation):
    server, clients = federation
    ups = updates(6)
    # the first decryptor (sorted order) vanishes after uploading
    result = converse(server, clients, ups, dimension=D,
                      drop=lambda exchange, cid: exchange == 1 and cid == IDS[0])
    check_sum(result, ups, IDS)


def test_two_decryptors_must_agree():
    server, clients = build_he(HEConfig(decryptors=2), IDS)
    ups = updates(7)
    check_sum(converse(server, clients, ups, dimension=D), ups, IDS)
    liar = Rewrite(clients[IDS[1]], reply=lambda m: HEDecryptReply(total=m.total + 1e-3))
    with pytest.raises(ProtocolAbort):
        converse(server, {**clients, IDS[1]: liar}, ups, dimension=D)


def test_too_few_contributors_aborts_and_decryptors_refuse_small_sums(federation):
    server, clients = federation
    ups = updates(8)
    with pytest.raises(ProtocolAbort):
        converse(server, clients, ups, dimension=D,
                 drop=lambda exchange, cid: exchange == 0 and cid != IDS[0])
    keys = clients[IDS[0]].keys
    request = HEDecryptRequest(key_id=keys.key_id, contributors=(IDS[0], IDS[0]), length=5,
                               ciphertexts=keys.encrypt(np.ones(5)))
    reply = clients[IDS[0]].client_round(round=1, context=ctx(1)).step(request)
    assert isinstance(reply, Decline) and "min_contributors = 2" in reply.reason
    foreign = dataclasses.replace(request, key_id=b"\x00" * 16, contributors=tuple(IDS))
    assert isinstance(clients[IDS[0]].client_round(round=1, context=ctx(1)).step(foreign), Decline)


def test_a_decryptor_decrypts_at_most_once_per_round(federation):
    _, clients = federation
    keys = clients[IDS[0]].keys
    request = HEDecryptRequest(key_id=keys.key_id, contributors=tuple(IDS), length=5,
                               ciphertexts=keys.encrypt(np.arange(5.0)))
    protocol = clients[IDS[0]].client_round(round=1, context=ctx(1))
    first = protocol.step(request)
    assert isinstance(first, HEDecryptReply)
    np.testing.assert_allclose(first.total, np.arange(5.0), atol=1e-7)
    second = protocol.step(request)
    assert isinstance(second, Decline) and "already decrypted" in second.reason


def test_layer_selection_encrypts_only_the_chosen_coordinates():
    keys = CKKSKeys.generate()
    selection = Selection(np.arange(100, 5000), D)
    server = HEServerProtection(keys.public(), selection=selection)
    clients = {c: HEClientProtection(keys, client_id=c, selection=selection) for c in IDS}
    seen = {}

    def spy(msg):
        seen["upload"] = msg
        return msg
    ups = updates(9)
    result = converse(server, {**clients, IDS[0]: Rewrite(clients[IDS[0]], upload=spy)}, ups,
                      dimension=D)
    check_sum(result, ups, IDS)
    upload = seen["upload"]
    assert isinstance(upload, HEUpload) and len(upload.ciphertexts) == 1
    # the weaker setting: the server sees this client's unselected coordinates as they are
    np.testing.assert_array_equal(upload.clear, ups[IDS[0]].delta[selection.clear])
    with pytest.raises(ValueError, match="covers 9000 parameters"):
        server.server_round(round=1, dimension=D + 1)


def test_build_simulation_selects_layers_from_a_layout():
    from torch import nn

    from securefl.params import Layout

    layout = Layout.of(nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)))
    server, _ = build_he(HEConfig(layers=("1.*",)), IDS, layout=layout)
    np.testing.assert_array_equal(server.selection.encrypted, np.arange(36, 46))
    with pytest.raises(ValueError, match="needs the model layout"):
        build_he(HEConfig(layers=("1.*",)), IDS)


def test_wire_frames_upload_under_2x_and_aggregate_under_4x_float32(federation):
    from securefl.engine.messages import encode

    server, clients = federation
    d = 16 * 8192
    rng = np.random.default_rng(10)
    ups = {c: Update(rng.normal(0, 0.05, d).astype(np.float32), 50.0) for c in IDS}
    protocol = server.server_round(round=1, dimension=d)
    openings = protocol.open(IDS)
    uploads = {c: clients[c].client_round(round=1, context=ctx(1)).open(ups[c], openings[c])
               for c in IDS}
    requests = protocol.step(uploads, set())
    upload_ratio = len(encode(uploads[IDS[0]])) / (4 * d)
    aggregate_ratio = len(encode(next(iter(requests.values())))) / (4 * d)
    assert 1.8 < upload_ratio <= 2.0
    assert 3.6 < aggregate_ratio <= 4.0


def test_weight_unit_follows_the_mean_weight_so_large_weights_do_not_overflow():
    server, clients = build_he(HEConfig(), IDS)
    rng = np.random.default_rng(11)
    # example counts of a large dataset: sum w x ~ 4e6 * 0.05 * 4 sigma >> capacity 9.2e4
    ups = {c: Update(rng.normal(0, 0.05, D).astype(np.float32), float(rng.integers(9e5, 11e5)))
           for c in IDS}
    assert server.unit_log2 == 0
    with pytest.raises(ProtocolAbort):  # the first round wraps modulo Q; decryptors refuse
        converse(server, clients, ups, dimension=D)
    mean_weight = np.mean([u.weight for u in ups.values()])
    assert server.unit_log2 == round(np.log2(mean_weight)) == 20
    assert server.server_round(round=2, dimension=D).open(IDS)[IDS[0]].unit_log2 == 20
    check_sum(converse(server, clients, ups, round=2, dimension=D), ups, IDS)


def test_client_refuses_an_opening_for_another_key(federation):
    _, clients = federation
    opening = HERoundOpen(key_id=b"\x01" * 16, unit_log2=0)
    with pytest.raises(ValueError, match="different CKKS key"):
        clients[IDS[0]].client_round(round=1, context=ctx(1)).open(updates()[IDS[0]], opening)
    with pytest.raises(ValueError, match="out of range"):
        clients[IDS[0]].client_round(round=1, context=ctx(1)).open(
            updates()[IDS[0]], HERoundOpen(key_id=clients[IDS[0]].keys.key_id, unit_log2=99))
