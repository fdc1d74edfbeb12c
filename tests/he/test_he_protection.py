"""HE protection: the contract, key separation, bad uploads named and excluded, sizes."""

import dataclasses
import logging

import numpy as np
import pytest

from securefl.engine.messages import Decline
from securefl.engine.protection import Sealed, Update, WeightedSum
from securefl.errors import ConfigError, ProtocolAbort
from securefl.he import CKKSKeys, HEClientProtection, HEConfig, HEServerProtection, Selection
from securefl.he import build_simulation as build_he
from securefl.he.wire import HEUpload, statement, upload_digest
from tests.contracts.protection import RUN, ProtectionContract, converse, plain_sum

IDS = [f"site-{i}" for i in range(4)]
D = 9000  # two ciphertexts, the second partly padded


def opened(server, clients, result):
    """The round's sum as a site decrypts it: ``x = (u / W) Dec(S)`` from the zero model."""
    assert isinstance(result, Sealed) and server.state is not None
    site = next(iter(clients.values()))
    model = getattr(site, "inner", site).open_state(server.state, run=RUN)
    weight = sum(c.weight for c in server.state.contributions)
    return WeightedSum(result.client_ids, model.astype(np.float64) * weight, weight,
                       result.rejected)


class TestHEContract(ProtectionContract):
    tolerance = 1e-6
    num_clients = 5
    dimension = 9000

    def make(self, client_ids):
        self.halves = build_he(HEConfig(), client_ids, dimension=self.dimension)
        return self.halves

    def as_sum(self, result):
        return opened(*self.halves, result)


def updates(seed=0, ids=IDS, d=D):
    rng = np.random.default_rng(seed)
    return {c: Update(rng.normal(0, 0.05, d).astype(np.float32), float(rng.integers(10, 100)))
            for c in ids}


def run(server, clients, ups, **options):
    """One round from the zero model through the wire; the sum a site decrypts."""
    return opened(server, clients, converse(server, clients, ups, dimension=D, **options))


def check_sum(result, ups, ids):
    """The sum is right and the FedAvg mean it gives is within 1e-6 of the exact one."""
    total, weight = plain_sum(ups, ids)
    assert isinstance(result, WeightedSum)
    assert sorted(result.client_ids) == sorted(ids)
    assert result.total_weight == weight
    assert np.max(np.abs(result.mean() - total / weight)) <= 1e-6
    assert 0 < np.max(np.abs(result.total - total)) <= 1e-6 * weight


class Rewrite:
    """A client half whose upload (or decryption reply) is rewritten in transit."""

    name = "he"

    def __init__(self, inner, *, upload=None, reply=None):
        self.inner, self.upload, self.reply = inner, upload, reply

    def open_model(self, request):
        return self.inner.open_model(request)

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


@pytest.fixture
def federation():
    return build_he(HEConfig(), IDS, dimension=D)


def test_server_holds_only_a_public_context(federation):
    server, clients = federation
    assert not server.context.is_private() and not server.reveals_rows
    assert all(c.keys.is_private() for c in clients.values())
    keys = clients[IDS[0]].keys
    with pytest.raises(ValueError, match="only the public CKKS context"):
        HEServerProtection(keys, verify_keys={})
    with pytest.raises(ValueError, match="only the public CKKS context"):
        HEServerProtection.from_bytes(keys.to_bytes(), verify_keys={})
    with pytest.raises(TypeError):
        HEServerProtection(keys.to_bytes(), verify_keys={})
    with pytest.raises(ValueError, match="secret CKKS context"):
        HEClientProtection(keys.public(), client_id="x", signing_key=None, verify_keys={},
                           dimension=D)


def test_sum_through_the_wire_matches_plaintext(federation):
    server, clients = federation
    ups = updates(1)
    check_sum(run(server, clients, ups), ups, IDS)


@pytest.mark.parametrize("attack,reason", [
    (lambda m: dataclasses.replace(m, ciphertexts=[flip(m.ciphertexts[0], 4000),
                                                   *m.ciphertexts[1:]]), "signature"),
    (lambda m: dataclasses.replace(m, ciphertexts=[m.ciphertexts[0][:-100],
                                                   *m.ciphertexts[1:]]), "signature"),
    (lambda m: dataclasses.replace(m, ciphertexts=m.ciphertexts[:1]), "expected 2 ciphertexts"),
    (lambda m: dataclasses.replace(m, weight=m.weight * 2), "signature"),
    (lambda m: dataclasses.replace(m, unit_log2=m.unit_log2 + 1), "weight unit"),
    (lambda m: dataclasses.replace(m, signature=b"\0" * 64), "signature"),
    (lambda m: dataclasses.replace(m, weight=float("nan")), "weight"),
    (lambda m: dataclasses.replace(m, model=b"\0" * 5), "model digest"),
    (lambda m: dataclasses.replace(m, model=b"\0" * 32), "signature"),
    (lambda m: Decline(reason="x"), "expected an HEUpload"),
])
def test_a_bad_upload_is_excluded_and_named_and_the_round_goes_on(federation, caplog, attack,
                                                                    reason):
    server, clients = federation
    bad = IDS[1]
    tampered = {**clients, bad: Rewrite(clients[bad], upload=attack)}
    ups = updates(2)
    with caplog.at_level(logging.WARNING):
        result = run(server, tampered, ups)
    assert reason in result.rejected[bad]
    assert f"HE round 1: upload of {bad} excluded: {result.rejected[bad]}" in caplog.text
    check_sum(result, ups, [c for c in IDS if c != bad])


def resign(inner, key):
    """A site that tampers with its own ciphertext and signs the result with its own key."""
    def rewrite(m):
        ciphertexts = [flip(m.ciphertexts[0], len(m.ciphertexts[0]) - 10), *m.ciphertexts[1:]]
        return dataclasses.replace(m, ciphertexts=ciphertexts, signature=key.sign(statement(
            run=m.run, round=1, client_id=IDS[2], key_id=m.key_id, unit_log2=m.unit_log2,
            weight=m.weight, model=m.model, upload=upload_digest(ciphertexts, m.clear))))
    return Rewrite(inner, upload=rewrite)


def test_a_tampered_and_re_signed_ciphertext_that_seal_rejects_is_named(federation):
    server, clients = federation
    ups = updates(3)
    bad = resign(clients[IDS[2]], clients[IDS[2]].signing_key)
    result = run(server, {**clients, IDS[2]: bad}, ups)
    assert "invalid ciphertext" in result.rejected[IDS[2]]
    check_sum(result, ups, [IDS[0], IDS[1], IDS[3]])


def test_ciphertexts_from_another_context_are_rejected(federation):
    server, clients = federation
    mine = clients[IDS[2]]
    other = HEClientProtection(CKKSKeys.generate(), client_id=IDS[2],
                               signing_key=mine.signing_key, verify_keys=mine.verify_keys,
                               dimension=D)

    class Stranger:  # opens the model with the right key, encrypts under another
        name = "he"

        def open_model(self, request):
            return mine.open_model(request)

        def client_round(self, *, round, context):
            other._opened = mine._opened
            inner = other.client_round(round=round, context=context)

            class Round:
                def open(self, update, payload):
                    return inner.open(update, payload)
            return Round()
    ups = updates(3)
    result = run(server, {**clients, IDS[2]: Stranger()}, ups)
    assert "different CKKS context" in result.rejected[IDS[2]]
    check_sum(result, ups, [IDS[0], IDS[1], IDS[3]])


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
    server.unit_log2 = 0  # the same unit as round 1: only the signed round differs
    result = converse(server, {**clients, IDS[0]: replay}, ups, round=2, dimension=D)
    assert "signature" in result.rejected[IDS[0]]


def test_too_few_valid_uploads_abort_naming_the_excluded(federation, caplog):
    server, clients = federation
    ups = updates(8)
    with caplog.at_level(logging.WARNING), pytest.raises(ProtocolAbort):
        converse(server, {**clients, IDS[1]: Rewrite(clients[IDS[1]], upload=lambda m: Decline(
            reason="x"))}, ups, dimension=D, drop=lambda exchange, cid: cid in IDS[2:])
    assert "1 valid uploads, min_contributors = 2; excluded: ['site-1']" in caplog.text


def test_layer_selection_encrypts_only_the_chosen_coordinates():
    keys = CKKSKeys.generate()
    selection = Selection(np.arange(100, 5000), D)
    server, clients = build_he(HEConfig(), IDS, dimension=D)
    server.selection = selection
    for c in clients.values():
        c.selection = selection
    seen = {}

    def spy(msg):
        seen["upload"] = msg
        return msg
    ups = updates(9)
    result = run(server, {**clients, IDS[0]: Rewrite(clients[IDS[0]], upload=spy)}, ups)
    check_sum(result, ups, IDS)
    upload = seen["upload"]
    assert isinstance(upload, HEUpload) and len(upload.ciphertexts) == 1
    # the weaker setting: the server sees this site's unselected local coordinates as they are
    np.testing.assert_array_equal(upload.clear, ups[IDS[0]].delta[selection.clear])
    with pytest.raises(ValueError, match="covers 9000 parameters"):
        server.server_round(round=1, dimension=D + 1)
    assert keys.is_private()


def test_build_simulation_selects_layers_from_a_layout():
    from torch import nn

    from securefl.vector import Layout

    layout = Layout.of(nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)))
    server, _ = build_he(HEConfig(layers=("1.*",)), IDS, layout=layout)
    np.testing.assert_array_equal(server.selection.encrypted, np.arange(36, 46))
    with pytest.raises(ValueError, match="needs the model layout"):
        build_he(HEConfig(layers=("1.*",)), IDS, dimension=46)
    with pytest.raises(ConfigError, match=r"^\[protection.he\] layers: layer pattern 'fc.0.\*' "
                       r"matches no parameter \(parameters: 0.weight, 0.bias, 1.weight, "
                       r"1.bias\)$"):
        build_he(HEConfig(layers=("fc.0.*",)), IDS, layout=layout)


def test_wire_frames_upload_under_2x_and_aggregate_under_4x_float32():
    from securefl.engine.messages import encode

    d = 16 * 8192
    server, clients = build_he(HEConfig(), IDS, dimension=d)
    rng = np.random.default_rng(10)
    ups = {c: Update(rng.normal(0, 0.05, d).astype(np.float32), 50.0) for c in IDS}
    seen = {}

    def spy(msg):
        seen["upload"] = msg
        return msg
    converse(server, {**clients, IDS[0]: Rewrite(clients[IDS[0]], upload=spy)}, ups,
             dimension=d)
    opening = server.server_round(round=2, dimension=d).open(IDS)[IDS[0]]
    upload_ratio = len(encode(seen["upload"])) / (4 * d)
    aggregate_ratio = len(encode(opening)) / (4 * d)  # FitIns' payload: the encrypted model
    assert 1.8 < upload_ratio <= 2.0
    assert 3.6 < aggregate_ratio <= 4.0


def test_weight_unit_follows_the_mean_weight_so_large_weights_do_not_overflow(caplog):
    server, clients = build_he(HEConfig(), IDS, dimension=D)
    rng = np.random.default_rng(11)
    # example counts of a large dataset: sum w x ~ 4e6 * 0.5 >> capacity 9.2e4
    ups = {c: Update(rng.normal(0, 0.05, D).astype(np.float32), float(rng.integers(9e5, 11e5)))
           for c in IDS}
    assert server.unit_log2 == 0
    result = converse(server, clients, ups, dimension=D)
    with pytest.raises(ProtocolAbort):  # the first round wrapped modulo Q: sites refuse it
        clients[IDS[0]].open_state(server.state, run=RUN)
    mean_weight = np.mean([u.weight for u in ups.values()])
    assert server.unit_log2 == round(np.log2(mean_weight)) == 20
    assert server.server_round(round=2, dimension=D).open(IDS)[IDS[0]].unit_log2 == 20
    assert isinstance(result, Sealed)


def test_sites_refuse_an_opening_for_another_key_opaquely(federation):
    from securefl.engine.messages import FitIns
    from securefl.he.wire import HERoundOpen

    _, clients = federation
    for opening in (HERoundOpen(key_id=b"\x01" * 16, unit_log2=0, state=None), None):
        with pytest.raises(ProtocolAbort) as refused:
            clients[IDS[0]].open_model(FitIns(run=RUN, round=1, config={}, protection=opening,
                                              parameters=np.zeros(D, np.float32)))
        assert str(refused.value) == ProtocolAbort.MESSAGE
