"""SecAgg+ protocol: correctness under dropouts at every phase, and the safety properties."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from securefl.engine.messages import encode
from securefl.errors import ProtocolAbort
from securefl.secagg import SecAggConfig, build_simulation
from securefl.secagg.messages import (
    SecAggKeys,
    SecAggMaskedInput,
    SecAggRelay,
    SecAggUnmaskRequest,
)
from tests.contracts.protection import ProtectionContract, ctx

from .protocol_driver import (
    Transcript,
    expected_survivors,
    make_updates,
    plain_clipped_sum,
    quantizer,
    run,
)


class TestSecAggContract(ProtectionContract):
    tolerance = 1e-5
    num_clients = 6

    def make(self, client_ids):
        return build_simulation(SecAggConfig(max_weight=100.0), client_ids)


# ----------------------------------------------------------------------------- correctness
drop_phase = st.one_of(st.none(), st.none(), st.none(), st.none(), st.none(), st.none(),
                       st.integers(0, 3))


@settings(max_examples=280, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(3, 12), neighbours=st.sampled_from(["auto", 2, 4]),
       seed=st.integers(0, 2**32 - 1), data=st.data())
def test_secure_sum_equals_plain_sum_under_random_dropouts(n, neighbours, seed, data):
    ids = [f"c{i:02d}" for i in range(n)]
    drop_at = {c: data.draw(drop_phase, label=c) for c in ids}
    config = SecAggConfig(clip=1.0, max_weight=100.0, neighbours=neighbours)
    updates = make_updates(ids, 16, np.random.default_rng(seed))
    transcript = Transcript()
    try:
        result = run(config, updates, drop_at=drop_at, transcript=transcript)
    except ProtocolAbort:
        assert expected_survivors(transcript.setups, drop_at) is None
        event("aborted")
        return
    event("summed")
    survivors = expected_survivors(transcript.setups, drop_at)
    assert survivors is not None and sorted(result.client_ids) == survivors
    total, weight = plain_clipped_sum(config, updates, survivors)
    q = quantizer(config, n)
    assert np.abs(result.total - total).max() <= len(survivors) * q.step
    assert abs(result.total_weight - weight) <= len(survivors) * q.weight_step


def test_dropouts_at_each_phase_recover_exactly_the_surviving_sum():
    ids = [f"c{i:02d}" for i in range(10)]
    config = SecAggConfig(max_weight=100.0)  # complete graph: k = 9, t = 5
    updates = make_updates(ids, 32, np.random.default_rng(0))
    drop_at = {"c01": 0, "c02": 1, "c03": 2, "c04": 3}
    result = run(config, updates, drop_at=drop_at)
    survivors = [c for c in ids if c not in ("c01", "c02", "c03")]
    assert sorted(result.client_ids) == survivors  # c04 sent its input, then dropped
    total, weight = plain_clipped_sum(config, updates, survivors)
    assert np.abs(result.total - total).max() <= 7 * quantizer(config, 10).step
    assert result.total_weight == pytest.approx(weight, abs=7 * quantizer(config, 10).weight_step)


# ----------------------------------------------------------------------------- aborts
def test_fewer_than_t_masked_inputs_abort_before_any_secret_is_requested():
    ids = [f"c{i}" for i in range(6)]  # complete graph, k = 5, t = 3
    transcript = Transcript()
    with pytest.raises(ProtocolAbort):
        run(SecAggConfig(max_weight=100.0), make_updates(ids, 8, np.random.default_rng(1)),
            drop_at={c: 2 for c in ids[:4]}, transcript=transcript)
    assert transcript.setups["c0"].threshold == 3
    assert not any(isinstance(m, SecAggUnmaskRequest)
                   for batch in transcript.requests for m in batch.values())


def test_t_minus_1_shares_cannot_unmask(caplog):
    ids = [f"c{i}" for i in range(6)]  # t = 3: the two unmask replies give 2 shares each
    transcript = Transcript()
    with caplog.at_level(logging.WARNING, "securefl.security"), pytest.raises(ProtocolAbort) as e:
        run(SecAggConfig(max_weight=100.0), make_updates(ids, 8, np.random.default_rng(2)),
            drop_at={c: 3 for c in ids[:4]}, transcript=transcript)
    assert str(e.value) == ProtocolAbort.MESSAGE  # opaque to the caller ...
    assert "2 shares of 'c0', need 3" in caplog.text  # ... detailed in the operator log


# ----------------------------------------------------------------------------- double reveal
def test_late_masked_input_is_never_unmasked_twice():
    ids = [f"c{i}" for i in range(8)]
    config = SecAggConfig(max_weight=100.0)
    updates = make_updates(ids, 16, np.random.default_rng(3))
    transcript = Transcript()
    # c5's masked input arrives after the deadline: it is reported dropped, reply present.
    result = run(config, updates, late={"c5": 2}, transcript=transcript)
    assert "c5" not in result.client_ids
    unmask = transcript.requests[-1]
    assert all("c5" not in r.survivors for r in unmask.values())
    assert sum("c5" in r.dropped for r in unmask.values()) >= transcript.setups["c0"].threshold
    survivors = [c for c in ids if c != "c5"]
    total, _ = plain_clipped_sum(config, updates, survivors)
    assert np.abs(result.total - total).max() <= 7 * quantizer(config, 8).step


def _opened(ids, *, round, seed):
    """A fresh 4-dimensional round opened for ``ids``: (server round, client rounds,
    updates, the server's opening payloads)."""
    server, clients = build_simulation(SecAggConfig(max_weight=100.0), ids)
    protocol = server.server_round(round=round, dimension=4)
    rounds = {c: clients[c].client_round(round=round, context=ctx(round)) for c in ids}
    updates = make_updates(ids, 4, np.random.default_rng(seed))
    return protocol, rounds, updates, protocol.open(ids)


def _client_at_unmask(ids):
    protocol, rounds, updates, requests = _opened(ids, round=4, seed=4)
    replies = {c: rounds[c].open(updates[c], requests[c]) for c in ids}
    for _ in range(2):
        requests = protocol.step(replies, set())
        replies = {c: rounds[c].step(requests[c]) for c in ids}
    return rounds


def test_client_refuses_to_reveal_both_secrets_of_one_peer():
    ids = [f"c{i}" for i in range(5)]
    client = _client_at_unmask(ids)["c0"]
    others = ("c1", "c2", "c3", "c4")
    first = client.step(SecAggUnmaskRequest(survivors=others[:3], dropped=("c4",)))
    assert set(first.seed_shares) == {"c1", "c2", "c3"} and set(first.key_shares) == {"c4"}
    with pytest.raises(ProtocolAbort):  # now asks for c4's seed: c4's key share is out
        client.step(SecAggUnmaskRequest(survivors=others, dropped=()))
    with pytest.raises(ProtocolAbort):  # and the other way round
        client.step(SecAggUnmaskRequest(survivors=others[:2], dropped=("c3", "c4")))
    again = client.step(SecAggUnmaskRequest(survivors=others[:3], dropped=("c4",)))
    assert again.seed_shares == first.seed_shares  # a repeated request reveals nothing new


def test_client_refuses_one_request_naming_a_peer_twice():
    client = _client_at_unmask([f"c{i}" for i in range(5)])["c1"]
    with pytest.raises(ProtocolAbort):
        client.step(SecAggUnmaskRequest(survivors=("c0", "c2", "c3"), dropped=("c3",)))


# ----------------------------------------------------------------------------- privacy
def _arrays(value):
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _arrays(item)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            yield from _arrays(getattr(value, name))


def test_server_view_contains_no_unmasked_update():
    ids = [f"c{i}" for i in range(6)]
    config = SecAggConfig(max_weight=100.0)
    d = 4096
    updates = make_updates(ids, d, np.random.default_rng(5), scale=0.3)
    transcript = Transcript()
    run(config, updates, drop_at={"c2": 3}, transcript=transcript)
    q = quantizer(config, len(ids))
    frames = b"".join(encode(m) for _, _, m in transcript.view)
    arrays = [a for _, _, m in transcript.view for a in _arrays(m)]
    assert len(arrays) == 6  # exactly one array per client: its masked input
    for update in updates.values():
        assert update.delta.tobytes()[:64] not in frames
        expected = np.round(np.clip(update.delta, -1, 1) * q.levels * update.weight / 100.0)
        for array in arrays:
            signed = array.view(np.int32)[:d].astype(np.float64)
            assert np.mean(np.abs(signed - expected) <= 1) < 0.01
            assert abs(np.corrcoef(signed, update.delta)[0, 1]) < 0.1


def test_masked_input_is_uniform_chi_square():
    from scipy.stats import chisquare

    ids = [f"c{i}" for i in range(4)]
    d = 1 << 15
    zero = {c: u.__class__(np.zeros(d, np.float32), 1.0) for c, u in
            make_updates(ids, 1, np.random.default_rng(0)).items()}
    transcript = Transcript()
    run(SecAggConfig(max_weight=100.0), zero, transcript=transcript)
    masked = next(m.masked for _, _, m in transcript.view if isinstance(m, SecAggMaskedInput))
    for shift in (0, 24):  # low and high byte of every word, 256 bins each
        counts = np.bincount((masked >> shift) & 0xFF, minlength=256)
        assert chisquare(counts).pvalue > 1e-4
    unmasked = np.zeros(d + 1, np.uint32)  # what q(0) looks like without masks: rejected
    assert chisquare(np.bincount(unmasked & 0xFF, minlength=256) + 1).pvalue < 1e-100


def test_upload_is_at_most_1_01_bytes_per_float32_byte():
    d = 100_000
    frame = encode(SecAggMaskedInput(masked=np.zeros(d + 1, np.uint32)))
    assert len(frame) / (4 * d) <= 1.01


# ----------------------------------------------------------------------------- tampering
def test_tampered_share_ciphertext_aborts_the_receiver():
    ids = [f"c{i}" for i in range(4)]
    protocol, rounds, updates, opening = _opened(ids, round=1, seed=6)
    keys = protocol.step({c: rounds[c].open(updates[c], opening[c]) for c in ids}, set())
    relay = protocol.step({c: rounds[c].step(keys[c]) for c in ids}, set())
    bad = bytearray(relay["c0"].ciphertexts["c1"])
    bad[-1] ^= 1  # the server alters c1's share bundle on its way to c0
    tampered = SecAggRelay(ciphertexts={**relay["c0"].ciphertexts, "c1": bytes(bad)})
    masked = {c: rounds[c].step(tampered if c == "c0" else relay[c]) for c in ids}
    unmask = protocol.step(masked, set())
    with pytest.raises(ProtocolAbort):
        rounds["c0"].step(unmask["c0"])
    assert set(rounds["c2"].step(unmask["c2"]).seed_shares) == {"c0", "c1", "c3"}


def test_forged_advertisement_is_rejected_by_server_and_neighbours():
    ids = [f"c{i}" for i in range(4)]
    protocol, rounds, updates, opening = _opened(ids, round=1, seed=7)
    adverts = {c: rounds[c].open(updates[c], opening[c]) for c in ids}
    forged = adverts["c3"].__class__(c_public=adverts["c2"].c_public,
                                     s_public=adverts["c3"].s_public,
                                     signature=adverts["c3"].signature)
    keys = protocol.step({**adverts, "c3": forged}, set())
    assert "c3" not in keys and "c3" in protocol.rejected
    with pytest.raises(ProtocolAbort):  # a truncated advertisement
        rounds["c1"].step(SecAggKeys(advertisements={**keys["c1"].advertisements,
                                                     "c3": adverts["c3"].packed()[:-1]}))
    with pytest.raises(ProtocolAbort):  # a server relaying the forgery is caught by clients
        rounds["c0"].step(SecAggKeys(advertisements={**keys["c0"].advertisements,
                                                     "c3": forged.packed()}))


def test_client_rejects_inconsistent_setup():
    ids = [f"c{i}" for i in range(6)]
    server, clients = build_simulation(SecAggConfig(max_weight=100.0), ids)
    opening = server.server_round(round=2, dimension=4).open(ids)
    update = make_updates(["x"], 4, np.random.default_rng(8))["x"]
    setup = opening["c0"]
    for bad in (setup.__class__(round=3, num_participants=6, neighbours=setup.neighbours,
                                threshold=setup.threshold),
                setup.__class__(round=2, num_participants=6, neighbours=setup.neighbours,
                                threshold=1),
                setup.__class__(round=2, num_participants=6, neighbours=("c0", "c1"),
                                threshold=1)):
        with pytest.raises(ProtocolAbort):
            clients["c0"].client_round(round=2, context=ctx(2)).open(update, bad)
    with pytest.raises(ProtocolAbort):  # a relay before the keys are shared
        clients["c0"].client_round(round=2, context=ctx(2)).step(SecAggRelay(ciphertexts={}))


def test_too_many_clients_for_the_bits_raise_value_error():
    ids = [f"c{i}" for i in range(257)]  # 257 * (2**23 - 1) > 2**31 - 1
    server, _ = build_simulation(SecAggConfig(bits=24), ids)
    with pytest.raises(ValueError, match="overflow"):
        server.server_round(round=1, dimension=4).open(ids)
    assert server.server_round(round=1, dimension=4).open(ids[:256])  # 256 fit exactly


@pytest.mark.slow
def test_thousand_clients_sparse_graph_with_dropouts():
    ids = [f"c{i:04d}" for i in range(1000)]
    config = SecAggConfig(max_weight=100.0)
    updates = make_updates(ids, 256, np.random.default_rng(9))
    drop_at = {c: (0, 1, 2, 3)[i % 4] for i, c in enumerate(ids[:40])}
    transcript = Transcript()
    result = run(config, updates, drop_at=drop_at, transcript=transcript, wire=False)
    assert len(transcript.setups["c0999"].neighbours) == 30
    survivors = expected_survivors(transcript.setups, drop_at)
    assert survivors is not None and sorted(result.client_ids) == survivors
    assert len(survivors) == 1000 - 30
    total, weight = plain_clipped_sum(config, updates, survivors)
    q = quantizer(config, 1000)
    assert np.abs(result.total - total).max() <= len(survivors) * q.step
    assert abs(result.total_weight - weight) <= len(survivors) * q.weight_step
