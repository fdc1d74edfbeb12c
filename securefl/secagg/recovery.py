"""The server's Shamir recovery in SecAgg+'s unmask step (Bonawitz et al., CCS 2017, figure 4,
round 4): gather the shares each survivor returned, then rebuild each secret from ``t``.

A survivor ``h`` holds, for every neighbour ``v`` with ``h in N(v)``, the share of ``v``'s
secret at the point ``x = index of h in N(v) + 1``; :func:`collect_points` files the shares of
one reply under those points (nothing of a reply with one malformed share), and
:func:`reconstruct` interpolates the 256-bit secret from ``t`` points
(:func:`securefl.secagg.shamir.combine`).  The caller verifies each secret against its
commitment (``b_u``) or public key (``s_v^SK``).
"""

from __future__ import annotations

from collections.abc import Mapping

from securefl.errors import ProtocolAbort
from securefl.secagg import shamir, suspects
from securefl.secagg.messages import SecAggUnmaskReply

__all__ = ["collect_points", "reconstruct"]


def collect_points(graph: Mapping[str, tuple[str, ...]], holder: str, msg: SecAggUnmaskReply,
                   seed_points: dict[str, dict[int, int]],
                   key_points: dict[str, dict[int, int]], *, round: int) -> str | None:
    """File ``holder``'s shares of ``msg`` into ``seed_points`` / ``key_points`` (owners not
    listed there, or whose neighbourhood lacks ``holder``, are ignored), and report the
    neighbours ``holder`` names as having sent it unauthentic bundles.  Returns the owner of
    the first malformed share (then none of the reply's shares is used), else ``None``."""
    for sender in sorted(set(msg.withheld)):
        if sender in graph and holder in graph[sender]:
            suspects.report(round, suspect=sender, reporter=holder,
                            why="its share bundle failed authentication at the reporter")
    decoded: list[tuple[dict[int, int], int, int]] = []
    for kind, points in ((msg.seed_shares, seed_points), (msg.key_shares, key_points)):
        for owner, raw in kind.items():
            if owner not in points or holder not in graph[owner]:
                continue
            try:
                decoded.append((points[owner], graph[owner].index(holder) + 1,
                                shamir.decode_share(raw)))
            except ValueError:
                return owner
    for table, x, value in decoded:
        table[x] = value
    return None


def reconstruct(owner: str, points: Mapping[int, int], *, threshold: int, round: int) -> bytes:
    """``owner``'s 32-byte secret from ``threshold`` of its points; an unattributable
    :class:`~securefl.errors.ProtocolAbort` when fewer arrived."""
    try:
        return shamir.combine(points, threshold=threshold).to_bytes(32, "big")
    except ValueError:
        raise ProtocolAbort.because(
            f"round {round}: {len(points)} shares of {owner!r}, need {threshold}") from None
