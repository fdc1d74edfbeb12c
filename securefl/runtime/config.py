"""``[network]``: the gRPC runtime (addresses, TLS material, allowlist, deadlines, state).

One section serves both processes.  The server reads ``address`` (where it listens),
``certs`` (the folder written by ``securefl certs init``), ``allowlist`` (site -> SHA-256
fingerprint of the site's client certificate), the deadlines, ``max_message_bytes`` and
``state_dir``.  A client reads ``address`` (where it connects), ``certs``, ``site`` and
``client_state_dir`` (its own privacy ledger and keys, on its own disk).

Without TLS the server refuses to start unless ``insecure = true``, and then it binds to the
loopback interface only.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from securefl.confparse import check

__all__ = ["NetworkConfig", "split_address"]

_SITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (IPv6 ``"[::1]:port"``; port 0 = any free port) -> ``(host, port)``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """True when ``host`` names only this machine (``localhost`` or a loopback IP)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class NetworkConfig:
    address: str = "127.0.0.1:50051"
    insecure: bool = False
    certs: str | None = None
    server_name: str | None = None
    allowlist: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    site: str | None = None
    round_timeout: float = 300.0
    connect_timeout: float = 120.0
    min_connected: int | None = None
    reconnect_timeout: float = 120.0
    max_message_bytes: int = 1 << 30
    chunk_bytes: int = 1 << 20
    state_dir: str = "server-state"
    client_state_dir: str | None = None
    data_shard: str | None = None
    audit: bool = True

    def validate(self) -> None:
        try:
            host, _ = split_address(self.address)
        except ValueError as exc:
            check(False, "address", f"must be host:port, got {self.address!r} ({exc})")
            return
        check(not self.insecure or is_loopback(host), "address",
              f"must be a loopback address (127.0.0.1, ::1 or localhost) when insecure = true,"
              f" got {self.address!r}")
        for site, fingerprint in self.allowlist.items():
            check(bool(_SITE.match(site)), "allowlist",
                  f"site names must be 1-64 letters, digits, '.', '_' or '-', got {site!r}")
            check(isinstance(fingerprint, str) and bool(_FINGERPRINT.match(fingerprint)),
                  "allowlist", f"entry {site!r} must be a 64-digit lowercase hex SHA-256 "
                  f"certificate fingerprint, got {fingerprint!r}")
        check(self.site is None or bool(_SITE.match(self.site)), "site",
              f"must be 1-64 letters, digits, '.', '_' or '-', got {self.site!r}")
        check(self.round_timeout > 0, "round_timeout",
              f"must be > 0 seconds, got {self.round_timeout}")
        check(self.connect_timeout > 0, "connect_timeout",
              f"must be > 0 seconds, got {self.connect_timeout}")
        check(self.reconnect_timeout >= 0, "reconnect_timeout",
              f"must be >= 0 seconds, got {self.reconnect_timeout}")
        check(self.min_connected is None or self.min_connected >= 1, "min_connected",
              f"must be >= 1, got {self.min_connected}")
        check(4096 <= self.chunk_bytes <= 16 << 20, "chunk_bytes",
              f"must be in [4096, 16 MiB], got {self.chunk_bytes}")
        check(self.max_message_bytes >= self.chunk_bytes, "max_message_bytes",
              f"must be >= chunk_bytes ({self.chunk_bytes}), got {self.max_message_bytes}")
