"""Fixtures for the runtime tests: one certificate folder per session, in-thread federations."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pytest

from securefl.config.network import NetworkConfig
from securefl.runtime.client import SiteClient
from securefl.runtime.tls import init_certificates, issue_site_certificate
from securefl.runtime.transport import GrpcTransport

SITES = ("alpha", "beta", "gamma")


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """``(folder, allowlist)`` with a CA, a server certificate and the three SITES."""
    folder = tmp_path_factory.mktemp("certs")
    return folder, init_certificates(folder, SITES)


def network(certs, allowlist: Mapping[str, str] | None = None, **changes) -> NetworkConfig:
    folder, pinned = certs
    base = NetworkConfig(address="127.0.0.1:0", certs=str(folder),
                         allowlist=dict(pinned if allowlist is None else allowlist),
                         round_timeout=10.0, reconnect_timeout=1.0, chunk_bytes=1 << 16,
                         max_message_bytes=1 << 22)
    return dataclasses.replace(base, **changes)


def add_sites(certs, names) -> dict[str, str]:
    """Issue certificates for extra site names; returns the extended allowlist."""
    folder, pinned = certs
    extra = {n: issue_site_certificate(folder, n) for n in names if n not in pinned}
    pinned.update(extra)
    return dict(pinned)


def wait_connected(transport: GrpcTransport, site: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while site not in transport.connected():
        assert time.monotonic() < deadline, f"{site} did not connect"
        time.sleep(0.01)


class Federation:
    """A GrpcTransport plus site clients, each in its own thread."""

    def __init__(self, config: NetworkConfig, **options) -> None:
        self.transport = GrpcTransport(config, **options)
        self._stop_transport = self.transport.close
        self.client_config = dataclasses.replace(
            config, address=f"127.0.0.1:{self.transport.port}")
        self.threads: dict[str, threading.Thread] = {}
        self.clients: dict[str, SiteClient] = {}
        self.exit_codes: dict[str, int] = {}

    def join(self, handler, *, site: str | None = None, wait: bool = True,
             config: NetworkConfig | None = None, manifest=None) -> SiteClient:
        site = site or handler.client_id
        client = SiteClient(handler, config or self.client_config, site=site,
                            manifest=manifest)
        key = f"{site}#{len(self.threads)}"

        def run() -> None:
            self.exit_codes[key] = client.run()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads[key], self.clients[key] = thread, client
        if wait:
            wait_connected(self.transport, site)
        return client

    def wait_exit(self, key: str, timeout: float = 10.0) -> int | None:
        self.threads[key].join(timeout)
        return self.exit_codes.get(key)

    def close(self) -> None:
        self._stop_transport()
        for client in self.clients.values():
            client.stop()
        for thread in self.threads.values():
            thread.join(10)


@contextmanager
def federation(config: NetworkConfig, handlers=(), **options) -> Iterator[Federation]:
    fed = Federation(config, **options)
    try:
        for handler in handlers:
            fed.join(handler)
        yield fed
    finally:
        fed.close()
