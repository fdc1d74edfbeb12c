"""Removable excess noise (Dordis's XNoise, EuroSys 2024) against the real SecAgg+ client
code, every message through the wire codec: a site reveals the seeds of exactly the levels
at or below a verified survivor count and only then; the server's view after removal still
carries at least the calibrated noise; a malformed reveal is rejected naming its sender."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from scipy import stats

from securefl.config import config_from_dict
from securefl.engine.messages import decode, encode
from securefl.engine.protection import Update, WeightedSum
from securefl.errors import ConfigError, ProtocolAbort
from securefl.privacy.distributed import DistributedSettings, SkellamEncoding
from securefl.privacy.randomness import SecureRandom
from securefl.privacy.rotation import rotate
from securefl.secagg import SecAggConfig, build_simulation
from securefl.secagg.messages import SecAggConsistency, SecAggUnmaskRequest
from tests.contracts.protection import ctx
from tests.privacy.test_skellam import chi_square_p, fixed_source

D = 4096  # a multiple of the rotation's blocks: the rotated noise is i.i.d. per coordinate
IDS = [f"s{i}" for i in range(8)]


class Recording(SkellamEncoding):
    """The real encoding, remembering each site's integers, noise and seeds (test only)."""

    def __init__(self, settings: DistributedSettings) -> None:
        super().__init__(settings, source=fixed_source(b"recording"))
        self.parts: list[tuple[np.ndarray, np.ndarray, tuple[bytes, ...]]] = []

    def integers(self, delta, *, seed):
        rounded = super().integers(delta, seed=seed)
        self.parts.append((rounded.copy(), np.zeros(0), ()))  # encode adds the noise into it
        return rounded

    def noise_share(self, dimension, *, add_to=None):
        share, seeds = super().noise_share(dimension)
        self.parts[-1] = (self.parts[-1][0], share, seeds)
        if add_to is None:
            return share, seeds
        add_to += share
        return add_to, seeds


def settings(*, levels=(7, 8), colluding=1, min_cohort=6) -> DistributedSettings:
    return DistributedSettings(target_epsilon=8.0, delta=1e-5, steps=6, clip_norm=1.0, bits=16,
                               expected_cohort=8, min_cohort=min_cohort,
                               colluding_sites=colluding, levels=levels)


def wire(message):
    return decode(encode(message))


class Federation:
    """Eight real SecAgg+ clients of one round; the test plays the server (honest or not)."""

    def __init__(self, encoding: SkellamEncoding, *, contexts=None) -> None:
        self.server, clients = build_simulation(SecAggConfig(), IDS, encoding=encoding)
        self.protocol = self.server.server_round(round=1, dimension=D)
        self.contexts = {c: ctx(1) for c in IDS} | (contexts or {})
        self.rounds = {c: clients[c].client_round(round=1, context=self.contexts[c])
                       for c in IDS}
        rng = np.random.default_rng(0)
        self.updates = {c: Update((rng.normal(0, 1, D) / math.sqrt(D)).astype(np.float32), 1.0)
                        for c in IDS}
        self.sites = {c: i for i, c in enumerate(IDS)}  # encode order = IDS order

    def ask(self, exchange: int, requests) -> dict:
        return {cid: wire(self.rounds[cid].open(self.updates[cid], wire(request))
                          if exchange == 0 else self.rounds[cid].step(wire(request)))
                for cid, request in requests.items()}

    def run(self, *, drop_before_masking=(), forge=None) -> tuple[WeightedSum, dict]:
        """The honest server end to end; ``forge(cid, reply)`` rewrites an unmask reply."""
        requests = dict(self.protocol.open(IDS))
        for exchange in range(6):
            live = {c: r for c, r in requests.items()
                    if not (exchange >= 3 and c in drop_before_masking)}
            replies = self.ask(exchange, live)
            if exchange == 5 and forge is not None:
                replies = {c: wire(forge(c, r)) for c, r in replies.items()}
            result = self.protocol.step(replies, set(requests) - set(live))
            if isinstance(result, WeightedSum):
                return result, replies
            requests = dict(result)
        raise AssertionError("the round did not end")

    def to_consistency(self) -> dict:
        """Exchanges 0-3 with the honest server; the consistency requests it would send."""
        requests = dict(self.protocol.open(IDS))
        for exchange in range(4):
            requests = dict(self.protocol.step(self.ask(exchange, requests), set()))
        return requests


def released_noise(federation: Federation, encoding: Recording, result: WeightedSum,
                   summed: list[str]) -> np.ndarray:
    """The server's view after removal less the data, as integers in the rotated domain."""
    plan = encoding.settings.plan(D)
    from securefl.secagg.encoding import shared_seed

    seed = shared_seed(federation.rounds[IDS[0]]._base)
    words = rotate(result.total.astype(np.float64) * plan.scale, seed=seed)
    data = sum(encoding.parts[federation.sites[c]][0] for c in summed)
    noise = words - data
    assert np.abs(noise - np.round(noise)).max() < 1e-6
    return np.round(noise).astype(np.int64)


def assert_variance(noise: np.ndarray, variance: float) -> None:
    """Chi-square bound on the sample variance (two-sided, 1e-4) and a goodness-of-fit test
    against ``Sk(variance)``."""
    statistic = noise.size * noise.var() / variance  # mean 0 is known
    low, high = stats.chi2.ppf([5e-5, 1 - 5e-5], noise.size)
    assert low <= statistic <= high, (statistic, low, high)
    assert chi_square_p(noise, stats.skellam(variance / 2, variance / 2).pmf) > 1e-4


# ------------------------------------------------------------------ (b), (c): what is revealed
@pytest.mark.parametrize(("dropped", "revealed"), [(0, 2), (1, 1), (2, 0)],
                         ids=["all-8-survive", "7-survive", "n_min-survive"])
def test_survivors_reveal_the_levels_at_or_below_u3_and_at_least_mu_is_left(dropped, revealed):
    encoding = Recording(settings())
    federation = Federation(encoding)
    gone = IDS[len(IDS) - dropped:]
    result, replies = federation.run(drop_before_masking=gone)
    summed = [c for c in IDS if c not in gone]
    assert sorted(result.client_ids) == summed
    for cid, reply in replies.items():  # exactly the first `revealed` seeds the site drew
        assert reply.excess == encoding.parts[federation.sites[cid]][2][:revealed]
        assert len(encoding.parts[federation.sites[cid]][2]) == 2
    plan = encoding.settings.plan(D)
    u, k = len(summed), 1
    expected = (u - k) * plan.variance / ((6, 7, 8)[revealed] - k)  # (u - k) mu / (l_J - k)
    assert expected == pytest.approx(plan.remaining_variance(u)) and expected >= plan.variance
    noise = released_noise(federation, encoding, result, summed)
    # the server's view: u shares left at mu / (l_J - k) each
    assert_variance(noise, u * plan.variance / ((6, 7, 8)[revealed] - k))
    # a colluding site subtracts its own remaining share: (u - 1) mu / (l_J - 1) >= mu is left
    _, share, seeds = encoding.parts[0]
    remaining = share - sum(encoding.excess(D, level=j, seed=s)
                            for j, s in enumerate(seeds[:revealed]))
    assert_variance(noise - remaining, expected)


def test_the_share_of_a_site_with_levels_is_the_share_without_levels():
    """Base plus excess components: exactly Sk(mu / (n_min - k)), the share of the old
    mechanism (variances telescope); the excess regenerates bit for bit from its seed."""
    encoding = SkellamEncoding(settings(), source=fixed_source(b"levels"))
    plan = encoding.settings.plan(D)
    assert plan.base_variance + sum(plan.excess_variances) == pytest.approx(
        plan.share_variance, rel=1e-12)
    draws = [encoding.noise_share(D) for _ in range(3)]
    assert_variance(np.concatenate([share for share, _ in draws]), plan.share_variance)
    # what the server regenerates from the seeds is what the site added: the rest is the base
    base = [share - sum(encoding.excess(D, level=j, seed=s) for j, s in enumerate(seeds))
            for share, seeds in draws]
    assert_variance(np.concatenate(base), plan.base_variance)
    assert len({s for _, seeds in draws for s in seeds}) == 6  # fresh 32-byte seeds
    assert all(len(s) == 32 for _, seeds in draws for s in seeds)


# ------------------------------------------------------------------ (d): end to end
@pytest.mark.parametrize(("levels", "ratio"), [((8,), 1.0), ((), 8 / 6)],
                         ids=["levels-remove-the-excess", "no-levels-old-noise"])
def test_the_decoded_sum_of_a_full_cohort_carries_the_central_noise(levels, ratio):
    """No collusion assumed (k = 0), so the central mechanism's noise is mu: with the level
    at the cohort the decoded sum (model units, rounding included) carries mu, without
    levels 8 / 6 mu; at n_min survivors both carry mu."""
    encoding = Recording(settings(levels=levels, colluding=0))
    plan = encoding.settings.plan(D)
    for gone, want in ((IDS[6:], 1.0), ((), ratio)):
        encoding.parts.clear()
        federation = Federation(encoding)
        result, _ = federation.run(drop_before_masking=gone)
        summed = [c for c in IDS if c not in gone]
        exact = sum(federation.updates[c].delta.astype(np.float64) for c in summed)
        error = (result.total - exact) * plan.scale  # integer units
        measured = float(np.mean(error ** 2)) / plan.variance
        # chi-square(D) / D at 1e-4 either side; rounding adds <= u / 4, negligible here
        low, high = stats.chi2.ppf([5e-5, 1 - 5e-5], D) / D
        assert want * low <= measured <= want * high, (measured, want)


# ------------------------------------------------------------------ (a): no seed without U3
@pytest.mark.parametrize("forgery", ["no-signatures", "two-survivor-sets"])
def test_no_seed_without_t_valid_signatures_on_the_same_survivor_set(forgery, caplog):
    federation = Federation(SkellamEncoding(settings()))
    consistency = federation.to_consistency()
    # the deviating server shows half the sites another (still large enough) survivor set
    other = SecAggConsistency(survivors=tuple(IDS[:7]))
    shown = {c: (other if c in IDS[:4] else request) for c, request in consistency.items()}
    signatures = {c: r.signature for c, r in federation.ask(4, shown).items()}
    forged = SecAggUnmaskRequest(signatures={} if forgery == "no-signatures" else signatures)
    caplog.set_level(logging.WARNING, "securefl.security")
    for cid in IDS:  # every site (k = 7: all others are neighbours) sees at most 4 - 1 valid
        with pytest.raises(ProtocolAbort):
            federation.rounds[cid].step(wire(forged))
        context = federation.contexts[cid]
        assert context.releases.released(run=context.run, model=context.model) is None
    assert "valid neighbour signatures on the survivor set, need t = 4" in caplog.text


def test_a_replayed_unmask_reveals_nothing_new_and_a_second_survivor_set_nothing(caplog):
    encoding = Recording(settings())
    federation = Federation(encoding)
    consistency = federation.to_consistency()
    signatures = {c: r.signature for c, r in federation.ask(4, consistency).items()}
    request = SecAggUnmaskRequest(signatures=signatures)
    first = federation.ask(5, {"s0": request})["s0"]
    again = federation.ask(5, {"s0": request})["s0"]
    assert first.excess == again.excess == encoding.parts[0][2]  # all 8 survive: both
    # a replaying server runs the round again at s0 (same run, round and model, so the same
    # ReleaseLog entry) and asks it to reveal for 7 survivors: refused, no seed leaves
    replay = Federation(SkellamEncoding(settings()),
                        contexts={"s0": federation.contexts["s0"]})
    replay.to_consistency()
    smaller = {c: SecAggConsistency(survivors=tuple(IDS[:7])) for c in IDS[:7]}
    signatures = {c: r.signature for c, r in replay.ask(4, smaller).items()}
    caplog.set_level(logging.WARNING, "securefl.security")
    with pytest.raises(ProtocolAbort):
        replay.rounds["s0"].step(wire(SecAggUnmaskRequest(signatures=signatures)))
    assert "of a model already revealed for survivors" in caplog.text
    context = federation.contexts["s0"]
    assert context.releases.released(run=context.run, model=context.model) == frozenset(IDS)


# ------------------------------------------------------------------ (e): malformed reveals
@pytest.mark.parametrize("excess", [lambda s: s[:1], lambda s: (*s, s[0]),
                                    lambda s: (s[0], s[1][:31])],
                         ids=["too-few", "too-many", "short-seed"])
def test_a_malformed_reveal_is_rejected_naming_its_sender(excess, caplog):
    encoding = Recording(settings())
    federation = Federation(encoding)

    def forge(cid, reply):
        if cid != "s3":
            return reply
        return dataclasses.replace(reply, excess=excess(reply.excess))

    caplog.set_level(logging.WARNING, "securefl.security")
    result, _ = federation.run(forge=forge)
    assert set(result.rejected) == {"s3"} and "excess seeds" in result.rejected["s3"]
    assert "suspect 's3' reported by 'server': unmask reply with" in caplog.text
    # its excess stays in the sum: more noise, never less
    plan = encoding.settings.plan(D)
    noise = released_noise(federation, encoding, result, IDS)
    assert_variance(noise, 7 * plan.variance / 7 + plan.share_variance)


# ------------------------------------------------------------------ config and the stream
def test_noise_levels_are_validated_in_one_line_naming_the_field():
    base = {"protection": {"kind": "secagg"},
            "privacy": {"mode": "distributed", "target_epsilon": 8.0, "expected_cohort": 20,
                        "min_cohort": 16, "colluding_sites": 1}}
    for levels in ([16], [18, 17], [21], [17, 17]):
        table = {**base, "privacy": {**base["privacy"], "noise_levels": levels}}
        with pytest.raises(ConfigError) as error:
            config_from_dict(table, source="site.toml")
        message = str(error.value)
        assert message.startswith("site.toml: [privacy] noise_levels must increase strictly")
        assert "\n" not in message and "(16, 20]" in message
    config = config_from_dict({**base, "privacy": {**base["privacy"],
                                                   "noise_levels": [18, 20]}})
    assert config.privacy.noise_levels == (18, 20)
    from securefl.privacy import distributed_settings

    default = distributed_settings(config_from_dict(base).replace(server__clients_per_round=20),
                                   100)
    assert default.levels == (20,)  # default: the expected cohort
    no_dropouts = config_from_dict({**base, "privacy": {**base["privacy"], "min_cohort": 20}})
    assert distributed_settings(no_dropouts, 100).levels == ()  # nothing above min_cohort
    # the levels are part of what every party must agree on (the SecAgg+ federation id)
    assert SkellamEncoding(settings()).agreed != SkellamEncoding(settings(levels=(8,))).agreed


def test_the_seeded_stream_is_aes_ctr_under_hkdf_keys_per_request():
    seed = bytes(range(32))
    source = SecureRandom.seeded(seed)
    first, second = source.words(4), source.words(4)
    for index, words in enumerate((first, second)):
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=b"securefl/privacy/seeded-stream/v1" + index.to_bytes(8, "big")
                   ).derive(seed)
        stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        assert words.tobytes() == stream.update(bytes(32))
    assert np.array_equal(SecureRandom.seeded(seed).words(4), first)
    # a request of several keystream chunks (1 MiB each) is one continuous CTR stream
    long = SecureRandom.seeded(seed).words(300_001)
    stream = Cipher(algorithms.AES(HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                                        info=b"securefl/privacy/seeded-stream/v1" + bytes(8)
                                        ).derive(seed)), modes.CTR(bytes(16))).encryptor()
    assert long.tobytes() == stream.update(bytes(8 * 300_001))
    with pytest.raises(ValueError, match="32 bytes"):
        SecureRandom.seeded(b"short")
