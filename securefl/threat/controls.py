"""The controls a threat model can require, each checked against a run configuration.

A check reads :class:`~securefl.threat.facts.Facts`, the security-relevant facts of a
:class:`~securefl.config.Config`, and returns ``(passed, reason)``; the reason says what the
config does and, on failure, what the model needs instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from securefl.aggregation import Aggregator
from securefl.secagg.graph import degree, threshold_for
from securefl.threat.facts import Facts, known_rule

if TYPE_CHECKING:  # the model module looks controls up by name at load time
    from securefl.threat.model import ThreatModel

__all__ = ["CONTROLS", "Control", "byzantine_tolerance", "secagg_share_threshold"]

_PROTECTION_NAMES = {"plain": "plaintext updates", "secagg": "secure aggregation",
                     "he": "HE", "dp_sgd": "sample-level DP at each client (mode = \"dp_sgd\")"}


def byzantine_tolerance(rule: str, options: Mapping[str, Any], n: int, *,
                        aggregator: Aggregator | None = None) -> tuple[int, str]:
    """``(f, note)``: how many byzantine rows among ``n`` the rule is proven to withstand.

    Each rule states its own bound (:meth:`~securefl.aggregation.base.Aggregator.max_byzantine`,
    with the paper in its docstring); ``note`` is empty, or says why f is 0.  ``aggregator``
    is the run's own instance; without it the rule is built from ``rule`` and ``options``.  A
    rule the registry does not know counts its declared ``num_byzantine``, if any.
    """
    built = aggregator if aggregator is not None else known_rule(rule, options)
    if built is None:
        declared = options.get("num_byzantine")
        if isinstance(declared, int):
            return declared, ""
        return 0, f"the checker does not know the byzantine tolerance of rule {rule!r}"
    tolerated = built.max_byzantine(n)
    return tolerated, built.byzantine_note(n) if tolerated == 0 else ""


def _alternatives(accept: list[str]) -> str:
    names = [_PROTECTION_NAMES[a] for a in accept]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def update_secrecy(f: Facts, model: ThreatModel, accept: list[str]) -> tuple[bool, str]:
    """The server must not see an individual update: masked (Bonawitz et al. 2017), encrypted,
    or, where ``dp_sgd`` is accepted, released only with sample-level DP (Abadi et al. 2016).
    HE with layer selection (``[protection.he] layers``) sends the other layers in the clear."""
    if f.protection == "he" and f.he_layers and "he" in accept:
        return False, (f"HE encrypts only the layers matching {', '.join(f.he_layers)}; the "
                       "rest of each update reaches the server in the clear")
    if f.protection == "he" and "he" in accept:
        return True, ("HE with a blind server: the server sees no update and no sum; it adds "
                      "ciphertexts and each site decrypts the global model itself")
    if f.protection == "secagg" and "secagg" in accept:
        return True, ("secure aggregation reveals only the weighted sum, also to a server that "
                      "deviates from the protocol (SecAgg+ with the consistency check of "
                      "Bonawitz et al. 2017, section 4); inputs are not range-checked")
    if f.protection in accept and f.protection != "plain":
        return True, f"protection {f.protection!r} reveals only the weighted sum to the server"
    if "dp_sgd" in accept and f.privacy_mode == "dp_sgd":
        if (problem := _predictable_randomness(f)) is not None:
            return False, problem
        return True, ("each update leaves its client already protected by DP-SGD: the server "
                      "sees rows, but only through the sample-level ε")
    if not f.linear and f.protection == "plain":
        return False, (f"robust aggregation ({f.rule}) needs plaintext updates; this threat "
                       f"model requires {_alternatives(accept)}")
    return False, (f"protection {f.protection!r} shows every client's update to the server; "
                   f"this threat model requires {_alternatives(accept)}")


def he_key_separation(f: Facts, model: ThreatModel) -> tuple[bool, str]:
    """Under HE only key holders may decrypt; a server with the secret key sees every update.
    securefl's server also never receives a decryption, which it could re-encode into the key
    (Li and Micciancio, EUROCRYPT 2021): every site decrypts the global model itself."""
    if f.protection != "he":
        return True, f"not applicable: protection is {f.protection!r}"
    if f.he_key_on_server:
        return False, f"HE with the secret key on the server violates {model.name}"
    return True, ("who can decrypt: every site (each holds the run's secret key and decrypts "
                  "the global model itself); the server holds a public context without any "
                  "key and never receives a decryption; one site colluding with the server "
                  "decrypts every upload of the run")


def secagg_share_threshold(f: Facts, model: ThreatModel) -> tuple[int, int]:
    """``(k, t)`` of the worst neighbourhood, from the graph's own rules
    (:func:`securefl.secagg.graph.degree` and :func:`~securefl.secagg.graph.threshold_for`):
    a malicious server can show a site a commitment set so small that its graph has only
    the site's own ``min_neighbours``."""
    n = max(f.clients_per_round, 2)
    k = degree(n, neighbours=f.secagg_neighbours)
    if any(a.who == "server" and a.behaviour == "malicious" for a in model.adversaries):
        k = min(k, f.secagg_min_neighbours)
    return k, threshold_for(k, fraction=f.secagg_threshold)


def collusion(f: Facts, model: ThreatModel) -> tuple[bool, str]:
    """Up to t clients may collude with the server.  SecAgg+ hides an honest update while the
    coalition holds fewer than the ``floor(threshold k) + 1`` shares needed to rebuild its
    mask secrets (Bell et al. 2020).  The check is worst case: all t colluders may be among
    one client's k neighbours, and against a malicious server k is the sites'
    ``min_neighbours``.  Under securefl's HE every site holds the secret key, so one
    site colluding with the server decrypts every upload of the run."""
    t = model.max_colluding(f.clients_per_round)
    if t == 0:
        return True, "not applicable: no client colludes with the server in this model"
    if f.protection == "he":
        return False, (f"every site holds the HE secret key, so one site (of the up to {t}) "
                       "colluding with the server decrypts every upload of the run; use "
                       "secure aggregation")
    if f.protection == "secagg":
        k, shares = secagg_share_threshold(f, model)
        if t >= shares:
            return False, (f"{t} colluding clients reach the {shares} of {k} shares that "
                           "rebuild a neighbour's mask; raise [protection.secagg] threshold "
                           "or neighbours")
        return True, (f"{t} colluding clients stay below the {shares} of {k} shares needed "
                      "to unmask a neighbour")
    return True, "not applicable: with plaintext rows collusion shows the server nothing new"


def _server_is_adversary(model: ThreatModel) -> bool:
    return any(a.who == "server" and a.behaviour != "none" for a in model.adversaries)


def _predictable_randomness(f: Facts) -> str | None:
    """Why the DP noise of a deployed site is predictable by the server, or ``None``."""
    if f.deployment == "network" and f.privacy_mode == "dp_sgd" and f.dp_secure_mode is False:
        return ("[privacy] secure_mode = false in a deployment: each site's Poisson sample and "
                "noise come from a generator seeded by [run] seed, which the server holds, so "
                "it can replay and subtract them; leave secure_mode unset (CSPRNG at the site)")
    return None


def differential_privacy(f: Facts, model: ThreatModel, modes: list[str]) -> tuple[bool, str]:
    """Membership inference (Shokri et al. 2017) on what is released is bounded only by DP.
    Against a server adversary only noise the sites add themselves counts (DP-SGD), and only
    while the server cannot predict it (CSPRNG randomness at every deployed site)."""
    if f.privacy_mode == "none":
        return False, "no DP: membership inference is in scope"
    if f.privacy_mode == "dp_fedavg" and _server_is_adversary(model):
        return False, ("DP-FedAvg's noise is added by the server after it has seen the exact "
                       f"sum, and {model.name}'s adversary includes the server; use DP-SGD "
                       "at the sites (mode = \"dp_sgd\")")
    if f.privacy_mode not in modes:
        return False, (f"privacy mode {f.privacy_mode!r} does not protect against this model's "
                       f"adversaries; it needs mode {' or '.join(map(repr, modes))}")
    if (problem := _predictable_randomness(f)) is not None:
        return False, problem
    if f.privacy_mode == "distributed":
        return _distributed_dp(f, model)
    if f.privacy_mode == "dp_fedavg":
        return True, ("user-level DP-FedAvg: the released model is DP per site (the server "
                      "adds the noise, so it is not protected from the server itself)")
    randomness = ("CSPRNG sampling and noise" if f.deployment == "network"
                  or f.dp_secure_mode else "seeded sampling and noise (simulation)")
    return True, f"DP-SGD at every client ({randomness}): each update is DP per training example"


def _distributed_dp(f: Facts, model: ThreatModel) -> tuple[bool, str]:
    """Distributed Skellam DP (Agarwal et al. 2021): the server unmasks only the noisy sum, and
    the noise holds while the colluders cannot subtract more shares than it was sized for."""
    t = model.max_colluding(f.clients_per_round)
    if t > f.dp_colluding_sites:
        return False, (f"up to {t} sites may collude with the server and subtract their noise "
                       f"shares, but [privacy] colluding_sites = {f.dp_colluding_sites}")
    return True, ("distributed Skellam DP: each site adds its own CSPRNG share of integer noise "
                  "before SecAgg+ masks it, so no party sees the sum without its noise; user-"
                  "level ε per site while min_cohort sites survive (fewer: the round aborts)")


def privacy_budget(f: Facts, model: ThreatModel, max_epsilon: float,
                   max_delta: float) -> tuple[bool, str]:
    """Each client's ledger refuses a round that would take it past its budget ε at δ."""
    if f.privacy_mode == "none":
        return False, "no DP, so no per-client ε budget is enforced"
    if f.epsilon_budget is None:
        return False, ("no per-client ε budget ([privacy] budget or target_epsilon): "
                       "nothing stops a client from spending without limit")
    if f.epsilon_budget > max_epsilon:
        return False, (f"per-client budget ε = {f.epsilon_budget:g} is above this model's "
                       f"maximum {max_epsilon:g}")
    if f.delta is None or f.delta > max_delta:
        return False, f"δ = {f.delta} is above this model's maximum {max_delta:g}"
    return True, (f"each client's ledger refuses rounds past ε = {f.epsilon_budget:g} "
                  f"at δ = {f.delta:g}")


def robust_aggregation(f: Facts, model: ThreatModel) -> tuple[bool, str]:
    """The rule must withstand the model's f byzantine clients among those of a round."""
    n = f.clients_per_round
    wanted = model.max_byzantine(n)
    if not f.linear and f.protection != "plain":
        return False, (f"robust aggregation ({f.rule}) needs plaintext updates, but protection "
                       f"{f.protection!r} reveals only their sum")
    tolerated, note = byzantine_tolerance(f.rule, f.options, n, aggregator=f.aggregator)
    if tolerated < wanted or (wanted and note):
        why = note or f"{f.rule} withstands {tolerated} of {n} clients per round"
        extra = "" if f.protection == "plain" else (
            f"; robust rules need plaintext rows, which protection {f.protection!r} hides")
        return False, (f"{why}; this threat model needs a rule that withstands {wanted} "
                       f"byzantine clients{extra}")
    return True, (f"{f.rule} withstands {tolerated} byzantine of {n} clients per round "
                  f"(model: up to {wanted})")


def coherent_pairing(f: Facts, model: ThreatModel) -> tuple[bool, str]:
    """Robust rules read individual rows, which secure aggregation and HE exist to hide."""
    if not f.linear and f.protection != "plain":
        return False, (f"robust aggregation ({f.rule}) needs plaintext updates, but protection "
                       f"{f.protection!r} reveals only their sum")
    return True, f"aggregation {f.rule!r} runs on what protection {f.protection!r} reveals"


def transport_encryption(f: Facts, model: ThreatModel) -> tuple[bool, str]:
    """A network eavesdropper reads every message unless the transport is encrypted (TLS)."""
    if f.insecure:
        return False, "[network] insecure = true: an eavesdropper reads every message"
    return True, "[network] insecure = false: TLS protects every message on the network"


def mutual_tls(f: Facts, model: ThreatModel) -> tuple[bool, str]:
    """Server and sites authenticate each other with certificates from one CA (mTLS)."""
    if f.insecure:
        return False, "[network] insecure = true: no TLS, so neither side is authenticated"
    if not f.certs:
        return False, ("no certificates ([network] certs): mutual TLS needs the CA, server and "
                       "site certificates of `securefl certs init`")
    return True, f"mutual TLS with the certificates in {f.certs!r}"


def site_allowlist(f: Facts, model: ThreatModel) -> tuple[bool, str]:
    """Only enrolled sites, pinned by certificate fingerprint, may join a round."""
    if not f.allowlist:
        return False, ("no site allowlist ([network] allowlist): any certificate the CA "
                       "signed could join as a site")
    return True, f"{len(f.allowlist)} sites pinned by certificate fingerprint"


def signed_audit_log(f: Facts, model: ThreatModel) -> tuple[bool, str]:
    """A hash-chained log of every round, each entry signed with the server's Ed25519 key;
    only the networked server keeps one."""
    if f.deployment == "simulation":
        return False, ("a simulation (securefl run) writes no audit log; only the networked "
                       "server (securefl server) signs its rounds")
    if not f.audit:
        return False, "[network] audit = false: no signed audit log of the rounds"
    return True, "every round is recorded in the hash-chained, Ed25519-signed audit log"


def simulation_only(f: Facts, model: ThreatModel) -> tuple[bool, str]:
    """A model without network controls holds only while everything runs in one process."""
    if f.deployment != "simulation":
        return False, (f"{model.name} has no network controls; run it in-process "
                       "(securefl run), not as a networked deployment")
    return True, "in-process simulation: no network, no remote party"


@dataclass(frozen=True)
class Control:
    check: Callable[..., tuple[bool, str]]
    #: parameter name -> validator returning the parsed value or raising ValueError
    params: Mapping[str, Callable[[Any], Any]]


def _choices(allowed: tuple[str, ...]) -> Callable[[Any], list[str]]:
    def parse(value: Any) -> list[str]:
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, str) and v in allowed for v in value)):
            raise ValueError(f"must be a non-empty list drawn from {', '.join(allowed)}")
        return list(value)
    return parse


def _positive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError("must be a number > 0")
    return float(value)


CONTROLS: dict[str, Control] = {
    "update_secrecy": Control(update_secrecy, {"accept": _choices(("secagg", "he", "dp_sgd"))}),
    "he_key_separation": Control(he_key_separation, {}),
    "collusion": Control(collusion, {}),
    "differential_privacy": Control(differential_privacy,
                                    {"modes": _choices(("dp_sgd", "dp_fedavg", "distributed"))}),
    "privacy_budget": Control(privacy_budget, {"max_epsilon": _positive,
                                               "max_delta": _positive}),
    "robust_aggregation": Control(robust_aggregation, {}),
    "coherent_pairing": Control(coherent_pairing, {}),
    "transport_encryption": Control(transport_encryption, {}),
    "mutual_tls": Control(mutual_tls, {}),
    "site_allowlist": Control(site_allowlist, {}),
    "signed_audit_log": Control(signed_audit_log, {}),
    "simulation_only": Control(simulation_only, {}),
}
