"""The blind server against the real site code, through the wire codec: the server receives
no decryption, a re-sent or forged aggregate is refused before it is decrypted (also after a
restart), keys are per run, and every site failure is the one opaque ProtocolAbort."""

import dataclasses
import logging

import numpy as np
import pytest
import tenseal.sealapi as seal

from securefl.engine.messages import EvaluateRes, FitIns, FitRes, Message
from securefl.engine.session import RUN_ID_BYTES, ReleaseLog
from securefl.errors import ProtocolAbort
from securefl.he import HEClientProtection, HEConfig
from securefl.he.packing import pack
from securefl.he.statelog import DecryptionLog
from securefl.he.wire import HERoundOpen, HEState
from tests.he.federation import IDS, Federation, wire


def recovers_key(keys, ciphertext: bytes, values: np.ndarray) -> bool:
    """Li and Micciancio (EUROCRYPT 2021): re-encode ``values`` with the public parameters
    into ``m'``; if ``m' = c0 + c1 s`` exactly, then ``s = (m' - c0) / c1`` in NTT form, the
    secret key.  ``m' - c0 == c1 s`` holds iff ``(c0 - m', c1)`` decrypts to the zero
    polynomial, which the test checks with the real key."""
    public = keys.public()
    ct = public.load(ciphertext)
    plain = seal.Plaintext()
    chunk = next(pack(np.resize(values, keys.parameters.reals_per_ciphertext), 8192))
    seal.CKKSEncoder(public._context).encode(chunk.tolist(), ct.parms_id(),
                                             keys.parameters.scale, plain)
    public._evaluator.sub_plain_inplace(ct, plain)
    out = seal.Plaintext()
    keys._decryptor.decrypt(ct, out)
    return out.is_zero()


def floats_in(value) -> list[np.ndarray]:
    """Every float array or float the server received, as arrays."""
    if isinstance(value, np.ndarray):
        return [value.astype(np.float64)] if value.dtype.kind in "fc" and value.size else []
    if isinstance(value, float):
        return [np.array([value])]
    if isinstance(value, list | tuple):
        return [a for v in value for a in floats_in(v)]
    if isinstance(value, dict):
        return [a for v in value.values() for a in floats_in(v)]
    if isinstance(value, Message):
        return [a for f in dataclasses.fields(value) for a in floats_in(getattr(value, f.name))]
    return []


def test_the_server_receives_no_decryption_and_the_key_recovery_algebra_finds_nothing():
    fed = Federation(dimension=8192, federated=True)
    records = fed.server.run(3)
    assert [len(r.clients) for r in records.rounds] == [4, 4, 4]
    received = fed.transport.received
    # what reaches the server: uploads, training metrics, evaluation scores; no decryption
    kinds = {type(m).__name__ if not isinstance(m, FitRes) else type(m.payload).__name__
             for m in received}
    assert kinds == {"HEUpload", "EvaluateRes"}
    assert all(isinstance(m, FitRes | EvaluateRes) for m in received)
    uploads = [m.payload for m in received if isinstance(m, FitRes)]
    assert all(u.clear.size == 0 for u in uploads)  # no plaintext coordinate at all
    keys = fed.halves[IDS[0]].keys
    ciphertexts = [c for u in uploads for c in u.ciphertexts]
    ciphertexts += fed.server_half.state.ciphertexts + fed.server_half.previous.ciphertexts
    candidates = [a for m in received for a in floats_in(m)]
    candidates.append(np.concatenate(candidates))
    assert len(ciphertexts) == 14 and len(candidates) >= 20
    assert not any(recovers_key(keys, ct, values) for ct in ciphertexts for values in candidates)
    # control: the same algebra on one genuine decryption (what the old decryptor returned)
    # does give the key
    aggregate = fed.server_half.state.ciphertexts
    assert recovers_key(keys, aggregate[0], keys.decrypt(aggregate, 8192))


def test_sites_follow_fedavg_and_agree_on_the_model_they_decrypt():
    fed = Federation(lr=0.5)
    expected = fed.initial.astype(np.float64)
    for rnd in (1, 2, 3):
        fed.server.run_round(rnd)
        fits = [fed.trainers[c].fits[-1] for c in IDS]
        # every site trained from byte-identical parameters, which follow FedAvg (lr 0.5)
        assert all(np.array_equal(fits[0], f) for f in fits)
        assert np.max(np.abs(fits[0] - expected)) <= 2e-6
        deltas = [np.random.default_rng(i).normal(0, 0.05, (rnd, fed.dimension))[-1]
                  .astype(np.float32) for i in range(4)]
        weights = np.array([10.0, 15.0, 20.0, 25.0])
        expected = expected + 0.5 * (weights @ np.asarray(deltas, np.float64)) / weights.sum()
    np.testing.assert_array_equal(fed.server.parameters, fed.initial)  # the server's copy


def lone_state(fed, *, round: int, contributions) -> HEState:
    """A deviating server's 'aggregate': one site's upload under the given statements."""
    upload = fed.last_uploads[IDS[1]]
    return HEState(round=round, unit_log2=upload.unit_log2, contributions=tuple(contributions),
                   ciphertexts=list(upload.ciphertexts), parts=[], clear=upload.clear)


def run_two_rounds(fed):
    fed.server.run(2)
    fed.last_uploads = dict(fed.transport.uploads)


def resend(fed, site, state, round):
    opening = HERoundOpen(key_id=fed.halves[site].keys.key_id, unit_log2=state.unit_log2,
                          state=state)
    request = FitIns(run=fed.server.run_id, round=round, parameters=np.zeros(0, np.float32),
                     config={}, protection=opening)
    return fed.clients[site].handle(wire(request), round=round)


def count_decryptions(monkeypatch, half):
    calls = []
    original = half.keys.decrypt
    monkeypatch.setattr(half.keys, "decrypt", lambda *a: calls.append(1) or original(*a))
    return calls


def test_a_resent_aggregate_for_a_lone_upload_is_refused_also_after_restart(tmp_path,
                                                                           monkeypatch):
    site = IDS[0]
    fed = Federation(releases={site: ReleaseLog(tmp_path / "releases.sqlite")})
    fed.halves[site].log = DecryptionLog(tmp_path / "decrypted.sqlite")
    run_two_rounds(fed)
    fits = len(fed.trainers[site].fits)
    state = fed.server_half.previous  # the aggregate round 2 was sent
    # the deviating server re-sends round 2 with a lone upload under every real statement
    lone = lone_state(fed, round=1, contributions=state.contributions)
    calls = count_decryptions(monkeypatch, fed.halves[site])
    with pytest.raises(ProtocolAbort) as refused:
        resend(fed, site, lone, round=2)
    assert str(refused.value) == ProtocolAbort.MESSAGE and calls == []
    assert len(fed.trainers[site].fits) == fits
    # the site restarts: a new protection and client over the same files
    half = fed.halves[site]
    restarted = HEClientProtection(half.keys, client_id=site, signing_key=half.signing_key,
                                   verify_keys=half.verify_keys, dimension=fed.dimension,
                                   log=DecryptionLog(tmp_path / "decrypted.sqlite"))
    from securefl.engine.client import Client
    fed.clients[site] = Client(site, fed.trainers[site], restarted,
                               releases=ReleaseLog(tmp_path / "releases.sqlite"))
    calls = count_decryptions(monkeypatch, restarted)
    with pytest.raises(ProtocolAbort):
        resend(fed, site, lone, round=2)
    assert calls == [] and len(fed.trainers[site].fits) == fits
    # the lone upload under its own statement, in a later round: too few contributors
    own = next(c for c in state.contributions if c.client_id == IDS[1])
    with pytest.raises(ProtocolAbort):
        resend(fed, site, lone_state(fed, round=2, contributions=[own]), round=3)
    assert calls == [] and len(fed.trainers[site].fits) == fits


@pytest.mark.parametrize("forge,detail", [
    (lambda cs: cs[:1], "min_contributors = 2"),
    (lambda cs: (cs[0], cs[0], *cs[1:]), "distinct"),
    (lambda cs: (dataclasses.replace(cs[0], client_id="site-9"), *cs[1:]), "unknown site"),
    (lambda cs: (dataclasses.replace(cs[0], weight=cs[0].weight * 100), *cs[1:]), "not signed"),
    (lambda cs: (dataclasses.replace(cs[0], signature=cs[1].signature), *cs[1:]), "not signed"),
    (lambda cs: (dataclasses.replace(cs[0], model=b"\x07" * 32), *cs[1:]), "different models"),
])
def test_a_forged_contributor_list_is_refused(monkeypatch, caplog, forge, detail):
    fed = Federation()
    run_two_rounds(fed)
    state = fed.server_half.state
    forged = dataclasses.replace(state, contributions=tuple(forge(list(state.contributions))))
    calls = count_decryptions(monkeypatch, fed.halves[IDS[0]])
    with caplog.at_level(logging.WARNING, logger="securefl.security"), \
            pytest.raises(ProtocolAbort):
        resend(fed, IDS[0], forged, round=3)
    assert calls == [] and detail in caplog.text
    # the honest aggregate is still accepted: the refusal recorded nothing
    reply = resend(fed, IDS[0], state, round=3)
    assert isinstance(reply, FitRes) and calls == [1]


def test_the_length_is_the_sites_own_and_statements_are_bound_to_round_and_key(monkeypatch):
    fed = Federation()
    run_two_rounds(fed)
    state = fed.server_half.state
    calls = count_decryptions(monkeypatch, fed.halves[IDS[0]])
    for bad in (dataclasses.replace(state, ciphertexts=state.ciphertexts[:1]),
                dataclasses.replace(state, ciphertexts=[*state.ciphertexts, state.ciphertexts[0]]),
                dataclasses.replace(state, clear=np.ones(3, np.float32)),
                dataclasses.replace(state, round=1),       # statements signed for round 2
                dataclasses.replace(state, unit_log2=state.unit_log2 + 1)):
        with pytest.raises(ProtocolAbort):
            resend(fed, IDS[0], bad, round=3)
    assert calls == []


def test_keys_are_fresh_per_run():
    log = DecryptionLog()
    log.admit(run=b"\x01" * RUN_ID_BYTES, round=1, key_id=b"k" * 16, state=b"s")
    with pytest.raises(ProtocolAbort):
        log.admit(run=b"\x02" * RUN_ID_BYTES, round=1, key_id=b"k" * 16, state=b"s")
    log.admit(run=b"\x02" * RUN_ID_BYTES, round=1, key_id=b"n" * 16, state=b"s")


def test_site_failures_are_opaque_protocol_aborts():
    fed = Federation()
    site, half = IDS[0], fed.halves[IDS[0]]
    bad_openings = [None, HERoundOpen(key_id=b"\x01" * 16, unit_log2=0, state=None),
                    HERoundOpen(key_id=half.keys.key_id, unit_log2=0, state=None)]
    for opening in bad_openings:  # the last one with a malformed initial model
        request = FitIns(run=fed.server.run_id, round=1, config={}, protection=opening,
                         parameters=np.zeros(5, np.float32))
        with pytest.raises(ProtocolAbort) as refused:
            fed.clients[site].handle(wire(request), round=1)
        assert str(refused.value) == ProtocolAbort.MESSAGE


def test_an_aggregate_no_site_can_use_names_its_contributors_and_falls_back(caplog):
    fed = Federation()
    fed.server.run(2)
    good = fed.server_half.previous
    spoilt = fed.server_half.state
    # a site flipped bytes of its ciphertext and re-signed it: the sum loads but wraps
    fed.server_half.state = dataclasses.replace(spoilt, ciphertexts=[
        spoilt.ciphertexts[0][:100] + bytes([spoilt.ciphertexts[0][100] ^ 1])
        + spoilt.ciphertexts[0][101:], *spoilt.ciphertexts[1:]])
    with caplog.at_level(logging.WARNING):
        record = fed.server.run_round(3)
    assert record.aborted and len(record.dropped) == 4
    assert "suspects (its contributors): site-0, site-1, site-2, site-3" in caplog.text
    assert fed.server_half.state is good
    assert len(fed.server.run_round(4).clients) == 4  # the federation goes on


def test_the_initial_model_cannot_be_swapped_for_an_aggregate_or_brought_back(monkeypatch):
    fed = Federation()
    fed.server.run_round(1)
    state = fed.server_half.state
    with pytest.raises(ProtocolAbort):  # round 1 was entered with the initial model
        resend(fed, IDS[0], state, round=1)
    assert isinstance(resend(fed, IDS[0], state, round=2), FitRes)
    # a server that sends the sites back to a plaintext model of its choosing is refused
    opening = HERoundOpen(key_id=fed.halves[IDS[0]].keys.key_id, unit_log2=0, state=None)
    chosen = FitIns(run=fed.server.run_id, round=3, config={}, protection=opening,
                    parameters=np.ones(fed.dimension, np.float32))
    with pytest.raises(ProtocolAbort):
        fed.clients[IDS[0]].handle(wire(chosen), round=3)


def test_min_contributors_is_the_sites_rule():
    fed = Federation(config=HEConfig(min_contributors=5))
    record = fed.server.run_round(1)
    assert record.aborted  # only 4 sites: the server cannot build an aggregate sites accept


def test_the_encrypted_model_survives_a_server_restart_and_a_redone_round():
    from securefl.engine.messages import encode
    from securefl.he import HEServerProtection

    fed = Federation()
    fed.server.run(2)
    saved = fed.server_half.save_state()
    fresh = HEServerProtection(fed.server_half.context, verify_keys=fed.server_half.verify_keys)
    fresh.load_state(saved)
    assert encode(fresh.state) == saved and fresh.unit_log2 == fed.server_half.unit_log2 == 4
    fed.server.protection = fresh
    assert len(fed.server.run_round(3).clients) == 4
    # the server crashed after round 3's uploads: resumed, it redoes round 3 identically
    fresh.load_state(saved)
    assert len(fed.server.run_round(3).clients) == 4
    assert len(fed.server.run_round(4).clients) == 4


def test_without_resum_a_first_substituted_aggregate_is_decrypted_with_resum_refused(
        monkeypatch):
    """The one gap of the default, measured: a fresh round whose 'aggregate' is one upload
    under every genuine statement decrypts (to that site's scaled model, at the site only);
    with resum the site adds the uploads itself and a substitution fails the statements."""
    fed = Federation()
    run_two_rounds(fed)
    state = fed.server_half.state
    lone = lone_state(fed, round=2, contributions=state.contributions)
    assert isinstance(resend(fed, IDS[0], lone, round=3), FitRes)  # documented residual

    fed = Federation(config=HEConfig(resum=True))
    run_two_rounds(fed)
    state = fed.server_half.state
    assert state.ciphertexts == [] and len(state.parts) == 4
    honest = fed.halves[IDS[2]].open_state(state, run=fed.server.run_id)
    deltas = [np.random.default_rng(i).normal(0, 0.05, (2, fed.dimension))[-1]
              .astype(np.float32) for i in range(4)]
    weights = np.array([10.0, 15.0, 20.0, 25.0])
    expected = fed.trainers[IDS[2]].fits[-1] + (weights @ np.asarray(deltas, np.float64)) / 70
    assert np.max(np.abs(honest - expected)) <= 1e-6
    lone_parts = dataclasses.replace(state, parts=[state.parts[1]] * 4)
    aggregate = dataclasses.replace(state, parts=[], ciphertexts=lone.ciphertexts)
    calls = count_decryptions(monkeypatch, fed.halves[IDS[0]])
    for bad in (lone_parts, aggregate):
        with pytest.raises(ProtocolAbort):
            resend(fed, IDS[0], bad, round=3)
    assert calls == []
    assert isinstance(resend(fed, IDS[0], state, round=3), FitRes) and calls == [1]
