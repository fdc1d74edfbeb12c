"""A simulation whose sites live in Ray actors (``[simulation] backend = "ray"``).

The driver builds what the server has (the data's held-out test set, the central evaluator,
the server half of the protection, the round loop) exactly as in-process; the sites are
built by :class:`ConfigSites` inside each actor from the config's TOML text, so each site's
trainer, data shard and protection secrets exist only in its actor.  The actors start as
soon as Ray is up and the configuration's checks have passed: they import torch and build
their sites while the driver builds the server's part (``[privacy]``, the evaluator, the key
holder); then the key set-up (:mod:`securefl.ray_simulation.keys`) follows a deployment's.

Same seed, same result: every site is rebuilt from ``(config, [run] seed)`` as
:func:`securefl.build.local_trainer` builds it in-process, dropouts are injected in the
driver by the shared :class:`~securefl.engine.simulation.DropInjector`, and each actor runs
the in-process torch thread count per client.

``[privacy]``: each site's ledger lives in its actor, at the data holder, as at a deployed
site: the actor builds its sites' private trainers with :func:`securefl.privacy.
build_privacy`, exactly as in-process, and refuses a round over budget itself (the
``Decline`` crosses as a wire message).  The driver builds the server's part the same way
(DP-FedAvg's noise on the sum and its secret sampling seed, distributed DP's fixed
denominator) from its own setup, which never trains; the report (``privacy.json``) is the
actors' :meth:`~securefl.privacy.PrivacySetup.summary` of their own sites, plain JSON-able
data, merged (:class:`SitesPrivacy`).  The ledgers are in the actors' memory; at the end the
driver charges every site's charges again, through the ledger's own checks, into the run
directory's ledger file, which ``securefl privacy report RUN_DIR`` reads as an in-process
run's.

Not on this backend (each refuses with one line): DP-FedAvg's adaptive clipping (the
clipped-count bits would stay in the actors, as at deployed sites, so the bound could not
adapt as in-process), and the in-process options that carry Python objects into the sites
(``data``, ``client_hooks``, ``model``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securefl.aggregation import Aggregator
from securefl.config import Config, config_from_dict
from securefl.data import FederatedData, federate
from securefl.engine.client import Client
from securefl.engine.protection import ClientProtection, Plain
from securefl.engine.ray_backend import (
    RayTransport,
    claim_early_start,
    import_ray,
    init_ray,
    start_hosts,
)
from securefl.engine.simulation import DropInjector, DropSchedule
from securefl.engine.trainer import RoundRewind, Trainer
from securefl.errors import BudgetExceeded, ConfigError
from securefl.ray_simulation.keys import KeyHolder, he_site
from securefl.vector import Layout

if TYPE_CHECKING:
    from securefl.build import Simulation
    from securefl.privacy import PrivacySetup

__all__ = ["ConfigSites", "SitesPrivacy", "build_ray_simulation", "config_sites",
           "site_groups"]

FACTORY = "securefl.ray_simulation:config_sites"


def site_groups(client_ids: Sequence[str], *, actors: int, clients_per_actor: int
                ) -> list[list[str]]:
    """Contiguous groups of client ids, one per actor: ``actors`` of them, or
    ``ceil(n / clients_per_actor)`` when ``actors`` is 0 (never more groups than clients)."""
    n = len(client_ids)
    count = min(n, actors if actors > 0 else math.ceil(n / clients_per_actor))
    bounds = [round(i * n / count) for i in range(count + 1)]
    return [list(client_ids[a:b]) for a, b in itertools.pairwise(bounds)]


def build_ray_simulation(config: Config, *, run_dir: Path | None = None,
                         server_hooks: Sequence[Any] = (),
                         schedule: DropSchedule | None = None,
                         root_data: FederatedData | None = None,
                         aggregator: Aggregator | None = None,
                         **in_process_only: Any) -> Simulation:
    """The :class:`~securefl.build.Simulation` of ``config`` with its sites in Ray
    actors (nothing runs yet; ``simulation.transport.close()`` stops the actors, and Ray
    when this call started it).  ``trainers`` and ``clients`` are empty: they live in the
    actors."""
    from securefl.build import (
        Simulation,
        aggregator_for,
        build_server,
        central_evaluator,
        check_feasible,
    )

    unsupported = sorted(k for k, v in in_process_only.items() if v)
    if unsupported:
        raise ValueError(f"the Ray backend builds every site from the config in its actor; "
                         f"{', '.join(unsupported)} need backend = \"inprocess\"")
    if config.privacy.mode == "dp_fedavg" and config.privacy.adaptive_clipping:
        raise ConfigError("[simulation] backend = \"ray\" does not run [privacy] "
                          "adaptive_clipping = true: the clipped-count bits stay in the actors, "
                          "so the bound cannot adapt; set it false or use backend = "
                          "\"inprocess\"")
    del run_dir  # the run directory is the driver's; no site writes to it
    sim = config.simulation
    data = federate(config.data, seed=config.run.seed)
    ids = list(data.clients)
    aggregator = aggregator if aggregator is not None else aggregator_for(config)
    check_feasible(config, aggregator, num_clients=len(ids))  # before any actor
    groups = site_groups(ids, actors=sim.actors, clients_per_actor=sim.clients_per_actor)
    ray = import_ray()
    early = claim_early_start(sim.address)  # `securefl run` began it before its imports
    owns = early or not ray.is_initialized()
    if owns and not early:
        init_ray(sim.address)
    hosts: list[Any] = []
    transport: RayTransport | None = None
    try:
        # the actors import torch and build their sites from the config text while the
        # driver builds the server's part: [privacy], the evaluator, the key holder
        hosts = start_hosts(FACTORY, groups, {"config": config.to_toml()}, cpus=sim.cpus,
                            gpus=sim.gpus, threads=sim.torch_threads())
        privacy = _privacy_setup(config, data, ids)
        hooks = [*server_hooks, *(privacy.server_hooks if privacy is not None else ())]
        evaluator = central_evaluator(config, data)
        keys = KeyHolder(config, Layout.of(evaluator.model))
        transport = RayTransport(  # waits for the actors' start, once
            hosts, {cid: index for index, group in enumerate(groups) for cid in group},
            owns_ray=owns, drops=DropInjector(dropout=sim.dropout, schedule=schedule,
                                              seed=config.run.seed))
        directory = keys.exchange(hosts, ids)
        protection = keys.server(directory)
        server, evaluator = build_server(config, transport, protection, data,
                                         hooks=hooks, root_data=root_data,
                                         evaluator=evaluator, aggregator=aggregator)
    except BaseException:  # e.g. a [privacy] ConfigError: stop what was started
        if transport is not None:
            transport.close()
        else:
            for host in hosts:
                ray.kill(host)
            if owns:
                ray.shutdown()
        raise
    report = None
    if privacy is not None:
        report = SitesPrivacy(privacy, transport)
        if privacy.sampling_seed is not None:
            server.seed = privacy.sampling_seed  # DP-FedAvg's secret sample, as in-process
    view = keys.view(protection, directory, run=server.run_id, initial=server.parameters)
    if view is not None and server.central_evaluator is not None:
        server.central_evaluator = lambda _server_copy: evaluator(view())
    return Simulation(config, data, {}, {}, transport, server, evaluator, report, view)


def _privacy_setup(config: Config, data: FederatedData, peers: Sequence[str]
                   ) -> PrivacySetup | None:
    """The :class:`~securefl.privacy.PrivacySetup` of ``peers`` (``None`` without
    ``[privacy]``), as in-process; the ledgers in memory."""
    if config.privacy.mode == "none":
        return None
    from securefl.privacy import build_privacy

    return build_privacy(config, run_dir=None, client_ids=list(peers),
                         num_examples={c: len(data.clients[c].train) for c in peers})


class SitesPrivacy:
    """The driver's ``[privacy]`` on Ray (see the module doc): the server's hooks and secret
    sampling seed from the driver's own setup; the report from the sites' ledgers.

    Under secret sampling every round costs every site: in-process the server charges each
    round to every ledger, here each actor catches its sites up to the last round the
    driver's hook charged (:meth:`ConfigSites.settle_privacy`, the sites' own
    :meth:`~securefl.privacy.dp_fedavg.UserLevelTrainer.catch_up`) before reporting.
    """

    def __init__(self, setup: PrivacySetup, transport: RayTransport) -> None:
        self.setup, self.transport = setup, transport

    def public_record(self, row: dict[str, Any]) -> dict[str, Any]:
        return self.setup.public_record(row)

    def summary(self) -> dict[str, Any]:
        """The ``privacy.json`` document of the in-process run, from the actors (which must
        still run: :func:`securefl.simulation.run_simulation` reports before closing)."""
        from securefl.privacy.report import last_round

        ray, hosts = import_ray(), self.transport.hosts
        settled = last_round(self.setup.ledger)
        rounds = max(ray.get([h.ask.remote("settle_privacy", settled) for h in hosts]))
        docs = ray.get([h.ask.remote("privacy_summary", rounds) for h in hosts])
        merged = {**docs[0], "noise_multipliers": {}, "clients": {}}
        for doc in docs:
            merged["noise_multipliers"].update(doc["noise_multipliers"])
            merged["clients"].update(doc["clients"])
        merged["clients"] = dict(sorted(merged["clients"].items()))
        return merged

    def finalize(self, run_dir: Path) -> dict[str, Any]:
        """Write ``privacy.json`` and ``epsilon.png`` into ``run_dir``, and a copy of the
        sites' ledgers as the run's ledger file, which ``securefl privacy report RUN_DIR``
        reads as it reads an in-process run's; return the summary."""
        from securefl.privacy.accounting import PrivacyEvent
        from securefl.privacy.ledger import LEDGER_FILE, PrivacyLedger
        from securefl.privacy.report import write_report

        summary = self.summary()  # the actors settle their ledgers first
        ray, source = import_ray(), self.setup.ledger
        parts = ray.get([h.ask.remote("ledger_charges") for h in self.transport.hosts])
        rows = sorted((rnd, cid, index, event, release) for part in parts
                      for index, (cid, rnd, event, release) in enumerate(part))
        clients = sorted({row[1] for row in rows} | set(self.transport.client_ids()))
        # each charge again, through the ledger's own checks: the copy holds what the
        # actors' ledgers accepted, under the same budgets, or this raises
        with PrivacyLedger(Path(run_dir) / LEDGER_FILE, delta=source.delta,
                           accountant=source.accountant,
                           budgets={cid: source.budget(cid) for cid in clients}) as copy:
            for rnd, cid, _, event, release in rows:
                copy.charge(cid, PrivacyEvent(**event), round=rnd, release=release)
        return write_report(Path(run_dir), {**summary, "ledger": LEDGER_FILE})


class ConfigSites:
    """In an actor: the sites ``client_ids`` of the config in ``setup["config"]`` (TOML text),
    with trainers exactly as in-process and fresh identity keys of their own."""

    def __init__(self, client_ids: Sequence[str], setup: Mapping[str, Any]) -> None:
        from securefl.build import local_trainer

        config = config_from_dict(tomllib.loads(setup["config"]), source="<ray actor config>")
        data = federate(config.data, seed=config.run.seed)
        self.config = config
        self._he_secret = b""  # under HE, the key holder's, handed before attach
        self._sites = len(data.clients)
        local = {cid: local_trainer(config, data, cid) for cid in client_ids}
        self._layout = next(iter(local.values())).layout
        # DP-SGD accounts per site; DP-FedAvg and distributed DP over the whole federation
        self.privacy = _privacy_setup(config, data, client_ids if config.privacy.mode ==
                                      "dp_sgd" else list(data.clients))
        self._trainers: dict[str, Trainer] = {
            cid: RoundRewind(trainer) if self.privacy is None
            else self.privacy.wrap_trainer(cid, trainer) for cid, trainer in local.items()}
        self._keys: dict[str, Any] = {}
        self.clients: dict[str, Client] = {}
        kind = config.protection.kind
        if kind == "secagg":
            from securefl.secagg.keys import generate_identity

            self._keys = {cid: generate_identity() for cid in client_ids}
        elif kind == "he":
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            self._keys = {cid: Ed25519PrivateKey.generate() for cid in client_ids}
        else:
            self._build(dict.fromkeys(client_ids, Plain()))

    def hold_he_secret(self, secret: bytes) -> None:
        """Keep the experimenter's CKKS secret context (the driver holds the keys) for
        :meth:`attach`."""
        self._he_secret = bytes(secret)

    def announce(self) -> dict[str, bytes]:
        """The public halves of the sites' identity keys (none for plain sites, which then
        import no cryptography)."""
        if not self._keys:
            return {}
        from securefl.secagg.keys import identity_public_bytes

        return {cid: identity_public_bytes(key) for cid, key in self._keys.items()}

    def attach(self, directory: Mapping[str, bytes]) -> None:
        kind = self.config.protection.kind
        if kind == "secagg":
            from securefl.build import secagg_encoding
            from securefl.secagg import SecAggClientProtection

            encoding = secagg_encoding(self.config, self._sites)
            self._build({cid: SecAggClientProtection(
                client_id=cid, identity=key, directory=directory,
                config=self.config.protection.secagg, encoding=encoding)
                for cid, key in self._keys.items()})
        elif kind == "he":
            self._build({cid: he_site(self.config, self._he_secret, cid, key, directory,
                                       self._layout)
                         for cid, key in self._keys.items()})

    def _build(self, protections: Mapping[str, ClientProtection]) -> None:
        evaluate = self.config.server.evaluate in ("federated", "both")
        hooks = list(self.privacy.client_hooks) if self.privacy is not None else []
        self.clients = {cid: Client(cid, self._trainers[cid], protection, evaluate=evaluate,
                                    update_hooks=hooks)
                        for cid, protection in protections.items()}

    def settle_privacy(self, rounds: int) -> int:
        """Charge each site every round up to ``rounds`` that secret sampling makes it pay
        and its ledger has not yet (while it fits its budget); return the last round any of
        the ledgers here was charged for."""
        from securefl.privacy.dp_fedavg import UserLevelTrainer
        from securefl.privacy.report import last_round

        privacy = self._private()
        for trainer in self._trainers.values():
            if isinstance(trainer, UserLevelTrainer):
                with contextlib.suppress(BudgetExceeded):
                    trainer.catch_up(rounds + 1)
        return last_round(privacy.ledger)

    def privacy_summary(self, rounds: int) -> dict[str, Any]:
        """The :meth:`~securefl.privacy.PrivacySetup.summary` of this actor's sites."""
        return self._private().summary(rounds=rounds, clients=list(self._trainers))

    def ledger_charges(self) -> list[tuple[str, int, dict[str, Any], bytes | None]]:
        """Every charge of this actor's sites, ``(client, round, event fields, release)``,
        in each site's order (for the run directory's ledger file)."""
        ledger = self._private().ledger
        return [(cid, rnd, dataclasses.asdict(event), release) for cid in self._trainers
                for rnd, event, release in ledger.charges(cid)]

    def _private(self) -> PrivacySetup:
        if self.privacy is None:
            raise ValueError("this federation has no [privacy]")
        return self.privacy


def config_sites(client_ids: Sequence[str], setup: Mapping[str, Any]) -> ConfigSites:
    """The factory a :class:`~securefl.engine.ray_backend.SiteHost` calls (:data:`FACTORY`)."""
    return ConfigSites(client_ids, setup)
