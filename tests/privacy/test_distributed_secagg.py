"""Distributed DP against the real SecAgg+ client code, every message through the wire codec:
what the server unmasks is always noised, no single party can remove the noise, and a round
below the minimum cohort aborts before anything is revealed."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from securefl.config import config_from_dict
from securefl.engine.messages import decode, encode
from securefl.engine.protection import Update, WeightedSum
from securefl.errors import ConfigError, ProtocolAbort
from securefl.privacy.distributed import DistributedSettings, SkellamEncoding
from securefl.secagg import SecAggConfig, build_simulation
from securefl.secagg.messages import (
    SecAggConsistency,
    SecAggMaskedInput,
    SecAggUnmaskReply,
    SecAggUnmaskRequest,
)
from tests.contracts.protection import ctx

D = 2048  # a multiple of the rotation's blocks: the rotated noise is i.i.d. per coordinate


class Recording(SkellamEncoding):
    """The real encoding, remembering each site's integers and noise share (test only)."""

    def __init__(self, settings: DistributedSettings) -> None:
        super().__init__(settings)
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.seeds: set[bytes] = set()

    def integers(self, delta, *, seed):
        self.seeds.add(seed)
        rounded = super().integers(delta, seed=seed)
        self.parts.append((rounded.copy(), np.zeros(0)))  # encode adds the noise into it
        return rounded

    def noise_share(self, dimension, *, add_to=None):
        share, seeds = super().noise_share(dimension)
        self.parts[-1] = (self.parts[-1][0], share)
        if add_to is None:
            return share, seeds
        add_to += share
        return add_to, seeds


def wire(message):
    return decode(encode(message))


def settings(*, min_cohort: int = 6, cohort: int = 8, colluding: int = 0) -> DistributedSettings:
    return DistributedSettings(target_epsilon=8.0, delta=1e-5, steps=6, clip_norm=1.0, bits=16,
                               expected_cohort=cohort, min_cohort=min_cohort,
                               colluding_sites=colluding)


def updates(ids, seed=0):
    rng = np.random.default_rng(seed)
    return {c: Update((rng.normal(0, 1, D) / math.sqrt(D)).astype(np.float32), 1.0)
            for c in ids}


def round_trip(ids, encoding, *, drop_at=None, tamper=None):
    """One round: ``drop_at[c] = e``: ``c`` stops answering at exchange ``e``; ``tamper(e,
    requests)`` lets a deviating server rewrite its requests before exchange ``e``."""
    server, clients = build_simulation(SecAggConfig(), ids, encoding=encoding)
    protocol = server.server_round(round=1, dimension=D)
    contexts = {c: ctx(1) for c in ids}
    rounds = {c: clients[c].client_round(round=1, context=contexts[c]) for c in ids}
    ups = updates(ids)
    requests = dict(protocol.open(ids))
    seen: list[tuple[int, str, object]] = []
    for exchange in range(6):
        if tamper is not None:
            requests = tamper(exchange, requests)
        replies, missed = {}, set()
        for cid, request in requests.items():
            if (drop_at or {}).get(cid, 99) <= exchange:
                missed.add(cid)
                continue
            reply = (rounds[cid].open(ups[cid], wire(request)) if exchange == 0
                     else rounds[cid].step(wire(request)))
            replies[cid] = wire(reply)
            seen.append((exchange, cid, replies[cid]))
        result = protocol.step(replies, missed)
        if isinstance(result, WeightedSum):
            return result, seen, contexts
        requests = dict(result)
    raise AssertionError("the round did not end")


def test_masked_words_travel_at_16_bits_and_the_sum_carries_the_noise():
    ids = [f"s{i}" for i in range(8)]
    encoding = Recording(settings())
    result, seen, _ = round_trip(ids, encoding)
    masked = [m for _, _, m in seen if isinstance(m, SecAggMaskedInput)]
    assert len(masked) == 8 and all(m.masked.dtype == np.dtype("<u2") for m in masked)
    assert all(m.masked.nbytes == 2 * D for m in masked)  # 0.5x the float32 update
    plan = encoding.settings.plan(D)
    (seed,) = encoding.seeds  # one public rotation for the round, the same at every site
    from securefl.privacy.rotation import unrotate

    exact = unrotate(sum(r for r, _ in encoding.parts) / plan.scale, seed=seed, dimension=D)
    residual = (result.total - exact) * plan.scale  # the server's view minus the true sum
    # the server's sum holds all 8 shares: variance 8 mu / 6 per coordinate
    assert residual.std() == pytest.approx(math.sqrt(8 * plan.share_variance), rel=0.08)
    assert result.total_weight == 8.0
    # no single site can take the noise off either: one share removed leaves 7
    own_rounded, own_noise = encoding.parts[0]
    site_view = residual - unrotate(own_noise.astype(np.float64), seed=seed, dimension=D)
    assert site_view.std() == pytest.approx(math.sqrt(7 * plan.share_variance), rel=0.08)
    # and no masked input alone is that site's integers: it is uniform noise mod 2^16
    words = masked[0].masked.astype(np.int64)
    assert abs(np.corrcoef(words, (own_rounded + own_noise) % 65536)[0, 1]) < 0.1


def test_dropouts_down_to_the_minimum_cohort_still_give_the_calibrated_noise():
    ids = [f"s{i}" for i in range(8)]
    encoding = Recording(settings(min_cohort=6))
    result, _, _ = round_trip(ids, encoding, drop_at={"s6": 3, "s7": 3})  # before masking
    assert sorted(result.client_ids) == ids[:6]
    plan = encoding.settings.plan(D)
    (seed,) = encoding.seeds
    from securefl.privacy.rotation import unrotate

    sent = [r for r, noise in encoding.parts]  # all 8 encoded; only 6 masked inputs summed
    exact = unrotate(sum(sent[:6]) / plan.scale, seed=seed, dimension=D)
    residual = (result.total - exact) * plan.scale
    # exactly n_min shares survive: the noise is Sk(mu), the variance epsilon is sized for
    assert residual.std() == pytest.approx(math.sqrt(plan.variance), rel=0.08)


def test_a_round_below_the_minimum_cohort_aborts_before_any_reveal(caplog):
    ids = [f"s{i}" for i in range(8)]
    with caplog.at_level(logging.WARNING, "securefl.security"), pytest.raises(ProtocolAbort):
        round_trip(ids, SkellamEncoding(settings(min_cohort=7)),
                   drop_at={"s6": 3, "s7": 3})
    assert "6 survivors, below the minimum cohort 7" in caplog.text
    assert "nothing is revealed" in caplog.text


def test_a_server_announcing_a_small_survivor_set_gets_no_signature_and_no_reveal(caplog):
    """A deviating server sums 8 inputs but tells the sites that only 5 survived (it would
    learn a sum noised by 5 of the 6 shares the noise is sized for): every site refuses to
    sign, so no unmask request can follow and nothing is released."""
    ids = [f"s{i}" for i in range(8)]

    def shrink(exchange, requests):
        if exchange == 4:  # the consistency request
            return {c: SecAggConsistency(survivors=tuple(ids[:5])) for c in ids[:5]}
        return requests

    caplog.set_level(logging.WARNING, "securefl.security")
    aborted = []
    server, clients = build_simulation(SecAggConfig(), ids,
                                       encoding=SkellamEncoding(settings(min_cohort=6)))
    protocol = server.server_round(round=1, dimension=D)
    contexts = {c: ctx(1) for c in ids}
    rounds = {c: clients[c].client_round(round=1, context=contexts[c]) for c in ids}
    ups = updates(ids)
    requests = dict(protocol.open(ids))
    for exchange in range(5):
        requests = shrink(exchange, requests)
        replies = {}
        for cid, request in requests.items():
            try:
                replies[cid] = wire(rounds[cid].open(ups[cid], wire(request)) if exchange == 0
                                    else rounds[cid].step(wire(request)))
            except ProtocolAbort:
                aborted.append(cid)
        if exchange < 4:
            requests = dict(protocol.step(replies, set()))
    assert sorted(aborted) == ids[:5] and not replies  # every site refused; none signed
    assert "bad survivor set: 5 survivors, below the minimum cohort 6" in caplog.text
    for cid in ids:
        assert contexts[cid].releases.released(run=contexts[cid].run,
                                               model=contexts[cid].model) is None
        with pytest.raises(ProtocolAbort):  # and an unmask request later is refused too
            rounds[cid].step(wire(SecAggUnmaskRequest(signatures={})))
    assert not any(isinstance(r, SecAggUnmaskReply) for r in replies.values())


def test_distributed_dp_needs_secure_aggregation():
    table = {"protection": {"kind": "plain"},
             "privacy": {"mode": "distributed", "target_epsilon": 8.0}}
    with pytest.raises(ConfigError) as error:
        config_from_dict(table, source="site.toml")
    assert str(error.value).startswith("site.toml: [privacy] mode \"distributed\"")
    assert "kind = \"secagg\"" in str(error.value)
    with pytest.raises(ConfigError, match=r"site.toml: \[privacy\] sampling must be"):
        config_from_dict({"protection": {"kind": "secagg"},
                          "privacy": {"mode": "distributed", "target_epsilon": 8.0,
                                      "sampling": "secret"}}, source="site.toml")
    with pytest.raises(ConfigError, match=r"\[privacy\] min_cohort must be > colluding"):
        config_from_dict({"protection": {"kind": "secagg"},
                          "privacy": {"mode": "distributed", "target_epsilon": 8.0,
                                      "min_cohort": 2, "colluding_sites": 2}}, source="s")


def test_the_federation_id_binds_the_distributed_dp_settings():
    from securefl.secagg import SecAggServerProtection
    from securefl.secagg.keys import generate_identity, identity_public_bytes

    directory = {f"s{i}": identity_public_bytes(generate_identity()) for i in range(4)}

    def federation(encoding):
        return SecAggServerProtection(directory=directory, config=SecAggConfig(),
                                      encoding=encoding).federation

    same = federation(SkellamEncoding(settings(min_cohort=6)))
    assert same == federation(SkellamEncoding(settings(min_cohort=6)))
    assert same != federation(SkellamEncoding(settings(min_cohort=5)))
    assert same != federation(None)  # and the default federation is unchanged by it
