"""``[network]``: the gRPC runtime (addresses, TLS material, allowlist, deadlines, state).

One section serves both processes.  The server reads ``address`` (where it listens),
``certs`` (the folder written by ``securefl certs init``), ``allowlist`` (site -> SHA-256
fingerprint of the site's client certificate), the deadlines, ``max_message_bytes`` and
``state_dir``.  A client reads ``address`` (where it connects), ``certs``, ``site`` and
``client_state_dir`` (its own privacy ledger and keys, on its own disk).

Without TLS the server refuses to start unless ``insecure = true``, and then it binds to the
loopback interface only.

The limits on what a site may send (see :mod:`securefl.runtime.validate` and
docs/deployment.md) have defaults far beyond any honest run: ``hello_timeout`` (10 s to
send the first frame of a stream), ``max_inflight_bytes`` (4 GiB of partly received
payloads over all streams), ``max_value`` (1e6: the largest magnitude of any float a site
sends), ``max_weight`` (1e9: an update's aggregation weight, e.g. its example count),
``max_epsilon`` (1e6), ``max_string`` (2048 characters kept of any string) and
``warning_interval`` (1 s between repeated warnings about one site).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from securefl.config.parse import check

__all__ = ["NetworkConfig", "split_address"]

_SITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: the one description of a valid site name (it also names the site's files)
SITE_NAMES = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def valid_site_name(name: str) -> bool:
    """Whether ``name`` is a site name: :data:`SITE_NAMES`, so never a path."""
    return bool(_SITE.match(name))
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
    hello_timeout: float = 10.0
    max_inflight_bytes: int = 1 << 32
    max_value: float = 1e6
    max_weight: float = 1e9
    max_epsilon: float = 1e6
    max_string: int = 2048
    warning_interval: float = 1.0

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
            check(valid_site_name(site), "allowlist",
                  f"site names must be {SITE_NAMES}, got {site!r}")
            check(isinstance(fingerprint, str) and bool(_FINGERPRINT.match(fingerprint)),
                  "allowlist", f"entry {site!r} must be a 64-digit lowercase hex SHA-256 "
                  f"certificate fingerprint, got {fingerprint!r}")
        check(self.site is None or valid_site_name(self.site), "site",
              f"must be {SITE_NAMES}, got {self.site!r}")
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
        check(self.hello_timeout > 0, "hello_timeout",
              f"must be > 0 seconds, got {self.hello_timeout}")
        check(self.max_inflight_bytes >= self.max_message_bytes, "max_inflight_bytes",
              f"must be >= max_message_bytes ({self.max_message_bytes}), got "
              f"{self.max_inflight_bytes}")
        for name in ("max_value", "max_weight", "max_epsilon"):
            value = getattr(self, name)
            check(math.isfinite(value) and 0 < value <= 1e30, name,
                  f"must be finite, > 0 and <= 1e30, got {value}")
        check(64 <= self.max_string <= 1 << 20, "max_string",
              f"must be in [64, 1 MiB] characters, got {self.max_string}")
        check(self.warning_interval >= 0, "warning_interval",
              f"must be >= 0 seconds, got {self.warning_interval}")
