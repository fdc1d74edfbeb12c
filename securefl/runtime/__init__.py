"""The networked runtime: gRPC with mutual TLS, durable server state, a signed audit log.

* :mod:`~securefl.runtime.tls` — ``securefl certs init``: CA, server and site certificates;
* :mod:`~securefl.runtime.wire` — the chunked envelope (version, round, sequence, limits);
* :mod:`~securefl.runtime.transport` — :class:`GrpcTransport`, the server's Transport;
* :mod:`~securefl.runtime.client` — :class:`SiteClient`, ``securefl client``;
* :mod:`~securefl.runtime.server` — :func:`serve`, ``securefl server [--resume]``;
* :mod:`~securefl.runtime.store` — SQLite rounds, atomic checkpoints, the ledger copy;
* :mod:`~securefl.runtime.auditlog` — hash-chained, Ed25519-signed log, ``securefl audit verify``;
* :mod:`~securefl.runtime.deploy` — protection key material and the two halves built from it;
* :mod:`~securefl.runtime.validate` — bounds on every value a site sends;
* :mod:`~securefl.runtime.throttle` — rate-limited repeated warnings;
* :mod:`~securefl.runtime.slots` — hello deadline, one waiting stream per certificate;
* :mod:`~securefl.runtime.evidence` — sites countersign each round; audit-verify checks;
* :mod:`~securefl.runtime.receipts` — the sites' signed privacy receipts.

Submodules are imported on use, so ``securefl.config`` (which reads
:class:`~securefl.config.network.NetworkConfig`) never pulls in gRPC.
"""

from securefl.config.network import NetworkConfig

__all__ = ["NetworkConfig"]
