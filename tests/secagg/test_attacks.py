"""A server that deviates from SecAgg+, played against the real client state machines
through the wire codec (issue: "SecAgg+ that holds against a malicious server").

Each test names the attack it defeats, asserts that the honest clients abort with the one
opaque ProtocolAbort, and counts what reached the server: never ``t`` shares of both the
self-mask seed ``b_V`` and every mask key needed to strip an honest ``V``.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from securefl.aggregation import FedAvg
from securefl.engine.client import Client
from securefl.engine.optim import build_server_optimizer
from securefl.engine.protection import Update
from securefl.engine.server import Server
from securefl.engine.session import RoundContext, model_digest
from securefl.engine.simulation import InProcessTransport
from securefl.errors import ProtocolAbort
from securefl.secagg import (
    SecAggClientProtection,
    SecAggConfig,
    SecAggServerProtection,
    build_simulation,
)
from securefl.secagg.keys import generate_identity, identity_public_bytes
from securefl.secagg.messages import (
    SecAggCommitments,
    SecAggConsistency,
    SecAggKeys,
    SecAggMaskedInput,
    SecAggUnmaskReply,
    SecAggUnmaskRequest,
    pack,
)

from .protocol_driver import FixedTrainer, conversation, drive, opened, wire


def answer(rounds, requests):
    """Each client's reply through the codec, or the ProtocolAbort it raised."""
    replies, aborted = {}, set()
    for cid, request in requests.items():
        try:
            replies[cid] = wire(rounds[cid].step(wire(request)))
        except ProtocolAbort:
            aborted.add(cid)
    return replies, aborted


def unmaskable(graph, t, replies):
    """Honest clients whose every mask the server can now strip from what it was given."""
    seeds = {v: sum(v in r.seed_shares for r in replies) for v in graph}
    keys = {v: sum(v in r.key_shares for r in replies) for v in graph}
    return [v for v in graph
            if seeds[v] >= t and (keys[v] >= t or all(keys[a] >= t for a in graph[v]))]


# ----------------------------------------------------------------------------- attack 1
def test_attack1_inconsistent_dropout_claims_at_n50_defaults(caplog):
    """V's neighbours are told V survived (they would reveal b_V); every other neighbour of
    each A in N(V) is told that A dropped (they would reveal s_A).  The consistency check
    makes each client reveal only with t neighbour signatures on its own survivor set."""
    ids = [f"c{i:02d}" for i in range(50)]
    for seed, victim in enumerate(("c00", "c17", "c42")):
        protocol, rounds, _ = drive(ids, exchanges=4, config=SecAggConfig(), seed=seed)
        graph, t = protocol.graph, protocol.threshold
        assert (len(graph[victim]), t) == (18, 10)  # the default degree and threshold, n = 50
        told_survived = set(graph[victim]) | {victim}
        everyone = SecAggConsistency(survivors=tuple(ids))
        without = SecAggConsistency(survivors=tuple(c for c in ids if c not in graph[victim]))
        lies = {c: everyone if c in told_survived else without for c in ids}
        signatures, refused = answer(rounds, lies)
        # the strongest relay: every neighbour signature there is, whatever set it signs
        unmask = {c: SecAggUnmaskRequest(signatures={
                      v: signatures[v].signature for v in graph[c] if v in signatures})
                  for c in signatures}
        caplog.clear()
        with caplog.at_level(logging.WARNING, "securefl.security"):
            replies, aborted = answer(rounds, unmask)
        assert aborted and "valid neighbour signatures on the survivor set" in caplog.text
        revealed = list(replies.values())
        assert unmaskable(graph, t, revealed) == []
        seeds = sum(victim in r.seed_shares for r in revealed)
        most = max(sum(a in r.key_shares for r in revealed) for a in graph[victim])
        assert seeds < t or most < t, (victim, seeds, most, len(refused))


# ----------------------------------------------------------------------------- attack 2
def test_attack2_a_neighbourhood_of_one_or_a_low_threshold_is_refused(caplog):
    ids = [f"c{i}" for i in range(6)]
    for k, t in ((1, 1), (2, 1), (5, 2)):  # k = 1: the single share is the secret
        _, rounds, commitments = drive(ids, exchanges=1)
        honest = commitments["c0"]
        lie = SecAggCommitments(members=honest.members, commitments=honest.commitments,
                                neighbours=k, threshold=t)
        with caplog.at_level(logging.WARNING, "securefl.security"):
            replies, aborted = answer(rounds, dict.fromkeys(ids, lie))
        assert replies == {} and aborted == set(ids)  # nothing shared, nothing to redo
    assert "neighbourhood of 1 below this site's minimum 2" in caplog.text
    assert "threshold 2 below this site's minimum for k = 5" in caplog.text
    # a site may demand more than the default: min_neighbours = 4 refuses k = 3
    _, strict, commitments = drive(ids, exchanges=1, config=SecAggConfig(max_weight=100.0,
                                                                         min_neighbours=4))
    honest = commitments["c0"]
    with pytest.raises(ProtocolAbort):
        strict["c0"].step(wire(SecAggCommitments(members=honest.members,
                                                 commitments=honest.commitments,
                                                 neighbours=3, threshold=3)))


def test_attack2_a_forged_participant_count_is_caught_by_the_signed_list():
    """The server tells c0 that only three sites take part (n = 3, so k = 2, t = 2): the
    participant list is signed in every advertisement, so c0's neighbours' adverts fail."""
    ids = [f"c{i}" for i in range(6)]
    o = opened(ids, seed=3)
    small = type(o.requests["c0"])(round=1, participants=("c0", "c1", "c2"))
    adverts = {c: wire(o.rounds[c].open(o.updates[c], wire(small if c == "c0"
                                                            else o.requests[c])))
               for c in ids}
    commitments = o.protocol.step(adverts, set())
    assert "c0" in o.protocol.rejected  # the honest server sees the mismatch too
    small_set = ("c0", "c1", "c2")
    forwarded = SecAggCommitments(
        members=small_set, commitments=pack(small_set, {c: adverts[c].graph_commitment
                                                        for c in small_set}),
        neighbours=2, threshold=2)
    reveal = o.rounds["c0"].step(wire(forwarded))
    reveals = {"c0": reveal.value, **{c: o.rounds[c].step(wire(commitments[c])).value
                                      for c in ("c1", "c2")}}
    keys = SecAggKeys(reveals=pack(small_set, reveals),
                      advertisements={c: adverts[c].packed() for c in ("c1", "c2")})
    with pytest.raises(ProtocolAbort):
        o.rounds["c0"].step(wire(keys))


def test_attack2_the_quantizer_ignores_the_server_n():
    ids = [f"c{i}" for i in range(6)]
    o = opened(ids, config=SecAggConfig(max_weight=100.0, bits="auto"))
    # L comes from the directory (6 sites): the server announcing 3 participants changes
    # nothing, so 6 sites at the clip can never wrap the 32-bit sum
    assert o.protocol._encoding.quantizer.levels == (2**31 - 1) // 6


# ----------------------------------------------------------------------------- grinding
def test_grinding_the_graph_seed_is_refused():
    """After seeing the reveals the server would like another graph: it can neither drop a
    reveal, nor swap one, nor send a second commitment set, nor relay another neighbourhood."""
    ids = [f"c{i}" for i in range(8)]
    protocol, rounds, keys = drive(ids, exchanges=2, config=SecAggConfig(max_weight=100.0,
                                                                        neighbours=4))
    reveals = keys["c0"].reveals
    dropped = reveals[:-32]  # c7's reveal left out
    swapped = reveals[:-32] + bytes(32)
    others = [c for c in ids if c not in keys["c0"].advertisements and c != "c0"]
    moved = dict(keys["c0"].advertisements)
    moved.pop(next(iter(moved)))
    moved[others[0]] = keys[others[0]].advertisements[next(iter(keys[others[0]].advertisements))]
    for cid, bad in (("c0", SecAggKeys(reveals=dropped, advertisements=keys["c0"].advertisements)),
                     ("c1", SecAggKeys(reveals=swapped, advertisements=keys["c1"].advertisements)),
                     ("c2", SecAggCommitments(members=(), commitments=b"", neighbours=4,
                                              threshold=3)),
                     ("c3", SecAggKeys(reveals=reveals, advertisements=moved))):
        with pytest.raises(ProtocolAbort):
            rounds[cid].step(wire(bad))
    # the seed each client computes is the server's, and depends on every reveal
    assert len({protocol.graph[c] for c in ids}) == len(ids)


# ----------------------------------------------------------------------------- attack 4
def test_attack4_a_wrong_share_aborts_instead_of_a_wrong_sum(caplog):
    ids = [f"c{i}" for i in range(6)]  # complete graph, k = 5, t = 3
    protocol, rounds, unmask = drive(ids, exchanges=5)
    replies = {c: wire(rounds[c].step(wire(unmask[c]))) for c in ids}
    holder = protocol.graph["c5"][0]  # share point 1: always among the t used
    bad = dict(replies[holder].seed_shares)
    value = int.from_bytes(bad["c5"], "big") + 1
    bad["c5"] = value.to_bytes(len(bad["c5"]), "big")
    replies[holder] = SecAggUnmaskReply(seed_shares=bad, key_shares=replies[holder].key_shares,
                                        withheld=())
    with caplog.at_level(logging.WARNING, "securefl.security"), pytest.raises(ProtocolAbort):
        protocol.step(replies, set())
    assert "reconstructed seed of 'c5' does not match its commitment" in caplog.text


def test_attack4_a_malformed_share_excludes_its_holder_by_name(caplog):
    ids = [f"c{i}" for i in range(6)]
    protocol, rounds, unmask = drive(ids, exchanges=5)
    replies = {c: wire(rounds[c].step(wire(unmask[c]))) for c in ids}
    replies["c1"] = SecAggUnmaskReply(seed_shares={"c0": b"\x01"}, key_shares={}, withheld=())
    with caplog.at_level(logging.WARNING, "securefl.security"):
        result = protocol.step(replies, set())
    assert sorted(result.client_ids) == ids and "c1" in result.rejected
    assert "suspect 'c1' reported by 'server': malformed share" in caplog.text


def test_attack4_a_weight_out_of_range_aborts(caplog):
    ids = [f"c{i}" for i in range(4)]
    protocol, rounds, relay = drive(ids, exchanges=3)
    masked = {c: wire(rounds[c].step(wire(relay[c]))) for c in ids}
    words = masked["c0"].masked.copy()
    words[-1:] -= np.uint32(1 << 31)  # a site (or the server) pushes the weight word negative
    masked["c0"] = type(masked["c0"])(masked=words)
    consistency = protocol.step(masked, set())
    unmask = protocol.step({c: wire(rounds[c].step(wire(consistency[c]))) for c in ids}, set())
    replies = {c: wire(rounds[c].step(wire(unmask[c]))) for c in ids}
    with caplog.at_level(logging.WARNING, "securefl.security"), pytest.raises(ProtocolAbort):
        protocol.step(replies, set())
    assert "decoded total weight" in caplog.text


# ----------------------------------------------------------------------------- attack 6
def _federation(identities, config):
    directory = {c: identity_public_bytes(k) for c, k in identities.items()}
    return (SecAggServerProtection(directory=directory, config=config),
            {c: SecAggClientProtection(client_id=c, identity=k, directory=directory,
                                       config=config) for c, k in identities.items()})


@pytest.mark.parametrize("other", ["federation", "run"])
def test_attack6_a_message_of_another_federation_or_run_is_rejected(other, caplog):
    """Same identities, same round number; c3's advertisement (and reveal) come from the
    other federation (another protection config) or the other run of this one."""
    ids = [f"c{i}" for i in range(4)]
    identities = {c: generate_identity() for c in ids}
    here = _federation(identities, SecAggConfig(max_weight=100.0))
    there = (_federation(identities, SecAggConfig(max_weight=100.0, clip=0.5))
             if other == "federation" else here)
    run_there = b"\x01" * 32 if other == "federation" else b"\x02" * 32
    a = opened(ids, protections=here)
    b = opened(ids, protections=there, contexts={
        c: RoundContext.standalone(round=1, run=run_there) for c in ids})
    assert (here[0].federation != there[0].federation) == (other == "federation")
    adverts = {c: wire(a.rounds[c].open(a.updates[c], wire(a.requests[c]))) for c in ids}
    foreign = {c: wire(b.rounds[c].open(b.updates[c], wire(b.requests[c]))) for c in ids}
    foreign_reveal = b.rounds["c3"].step(wire(b.protocol.step(foreign, set())["c3"])).value
    with caplog.at_level(logging.WARNING, "securefl.security"):
        a.protocol.step({**adverts, "c3": foreign["c3"]}, set())
    assert "c3" in a.protocol.rejected  # the honest server excludes it by name
    assert "suspect 'c3' reported by 'server'" in caplog.text
    mixed = {**adverts, "c3": foreign["c3"]}  # a server that relays it anyway
    members = tuple(ids)
    commitments = SecAggCommitments(
        members=members, neighbours=3, threshold=2,
        commitments=pack(members, {c: m.graph_commitment for c, m in mixed.items()}))
    reveals = {c: a.rounds[c].step(wire(commitments)).value for c in ids[:3]}
    keys = SecAggKeys(reveals=pack(members, {**reveals, "c3": foreign_reveal}),
                      advertisements={c: m.packed() for c, m in mixed.items()})
    caplog.clear()
    with caplog.at_level(logging.WARNING, "securefl.security"):
        for cid in ids[:3]:
            with pytest.raises(ProtocolAbort):
                a.rounds[cid].step(wire(SecAggKeys(
                    reveals=keys.reveals,
                    advertisements={v: r for v, r in keys.advertisements.items() if v != cid})))
    # the graph commitment is scoped too: c3's foreign reveal does not open it here
    assert caplog.text.count("the reveals do not open the commitment set") == 3


# ----------------------------------------------------------------------------- attack 3
def test_attack3_a_round_rerun_with_another_cohort_reveals_nothing():
    """Sum of {c0..c4} minus sum of {c0..c3} would be c4's update: the second reveal for the
    same (run, model) is refused by every site's persisted ReleaseLog."""
    ids = [f"c{i}" for i in range(5)]
    server, protections = build_simulation(SecAggConfig(max_weight=100.0), ids)
    rng = np.random.default_rng(11)
    sites = {c: Client(c, FixedTrainer(Update(rng.normal(0, 0.1, 8).astype(np.float32), 10.0)),
                       protections[c]) for c in ids}
    run, parameters = b"\x07" * 32, np.zeros(8, np.float32)
    first, aborted = conversation(server, sites, ids, run=run, round=1, parameters=parameters)
    assert first is not None and sorted(first.client_ids) == ids and not aborted
    second, aborted = conversation(server, sites, ids[:4], run=run, round=1,
                                    parameters=parameters)
    assert second is None and aborted == dict.fromkeys(ids[:4], 5)  # all refuse to unmask
    assert all(sites[c].releases.released(run=run, model=model_digest(parameters))
               == frozenset(ids) for c in ids)
    # the identical round may be redone with the same survivor set: same sum, nothing new
    again, aborted = conversation(server, sites, ids, run=run, round=1, parameters=parameters)
    assert again is not None and not aborted
    np.testing.assert_allclose(again.total, first.total, atol=5 * 100.0 / ((2**31 - 1) // 5))


class _NegativeWeight:
    """A site's protection whose masked input pushes the weight word negative."""

    name = "secagg"

    def __init__(self, inner) -> None:
        self.inner = inner

    def client_round(self, *, round, context):
        inner = self.inner.client_round(round=round, context=context)
        outer = self

        class Round:
            def open(self, update, payload):
                return inner.open(update, payload)

            def step(self, request):
                reply = inner.step(request)
                if isinstance(reply, SecAggMaskedInput) and round == outer.round:
                    words = reply.masked.copy()
                    words[-1:] -= np.uint32(1 << 31)
                    reply = SecAggMaskedInput(masked=words)
                return reply

        return Round()

    round = 1


def test_attack4_the_engine_records_an_invalid_sum_as_aborted_and_goes_on():
    ids = [f"c{i}" for i in range(4)]
    server_half, protections = build_simulation(SecAggConfig(max_weight=100.0), ids)
    protections["c0"] = _NegativeWeight(protections["c0"])
    rng = np.random.default_rng(12)
    clients = {c: Client(c, FixedTrainer(Update(rng.normal(0, 0.1, 8).astype(np.float32), 10.0)),
                         protections[c]) for c in ids}
    transport = InProcessTransport(clients, wire=True)
    server = Server(transport, server_half, FedAvg(),
                    build_server_optimizer("fedavg", lr=1.0, momentum=0.0, beta1=0.9,
                                           beta2=0.99, tau=1e-3),
                    parameters=np.zeros(8, np.float32), seed=0)
    try:
        first, second = server.run_round(1), server.run_round(2)
    finally:
        transport.close()
    assert first.aborted == ProtocolAbort.MESSAGE and first.clients == []
    assert second.aborted is None and sorted(second.clients) == ids
