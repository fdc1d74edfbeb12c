"""Build the server and client halves of the configured protection for a simulation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from securefl.config import Config
from securefl.engine.protection import ClientProtection, Plain, ServerProtection
from securefl.params import Layout

__all__ = ["build_protection", "secagg_encoding"]


def secagg_encoding(config: Config, num_sites: int) -> Any:
    """The SecAgg+ encoding of ``config``: distributed DP's Skellam encoding under
    ``[privacy] mode = "distributed"``, else ``None`` (SecAgg+'s own fixed point)."""
    if config.privacy.mode != "distributed":
        return None
    from securefl.privacy import distributed_settings
    from securefl.privacy.distributed import SkellamEncoding

    return SkellamEncoding(distributed_settings(config, num_sites))


def build_protection(config: Config, client_ids: Sequence[str], *, layout: Layout | None = None
                     ) -> tuple[ServerProtection, Mapping[str, ClientProtection]]:
    """``(server half, {client id: client half})``; secrets live only in the client halves.

    ``layout`` lets HE encrypt only the configured layers (``[protection.he] layers``).
    """
    kind = config.protection.kind
    if kind == "secagg":
        from securefl.secagg import build_simulation

        return build_simulation(config.protection.secagg, client_ids,
                                encoding=secagg_encoding(config, len(client_ids)))
    if kind == "he":
        from securefl.he import build_simulation as build_he

        return build_he(config.protection.he, client_ids, layout=layout,
                        server_lr=config.server.lr)
    plain = Plain()
    return plain, dict.fromkeys(client_ids, plain)
