"""Report section: the privacy receipts the sites signed, each signature verified.

A networked server keeps no privacy ledger of its own; the ε of each site is what the site
signed in its receipts (:mod:`securefl.runtime.receipts`), read back from the audit log and
checked under the sites' pinned identity keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from securefl.report.render import Paragraph, Table

__all__ = ["receipt_blocks"]


def receipt_blocks(directory: Path) -> list[Any]:
    """Blocks of the audit-log section of a run directory that has an audit log."""
    from securefl.runtime.auditlog import receipts_of_run

    receipts, problems = receipts_of_run(directory)
    blocks: list[Any] = [Paragraph("Privacy receipts signed by the sites:")]
    if problems:
        blocks.append(Paragraph("FAILED: " + "; ".join(problems), status=False))
    elif receipts:
        blocks.append(Paragraph(f"VERIFIED: {sum(map(len, receipts.values()))} receipts of "
                                f"{len(receipts)} sites; every signature and chain checks out.",
                                status=True))
    else:
        blocks.append(Paragraph("The audit log holds no privacy receipts (no privacy "
                                "accounting in this run)."))
    rows = [[site, str(b["round"]), f"{b['epsilon_charged']:.4f}", f"{b['epsilon_total']:.4f}",
             f"{b['delta']:g}", ", ".join(sorted({e["mechanism"] for e in b["events"]}))]
            for site, bodies in sorted(receipts.items()) for b in bodies]
    if rows:
        blocks.append(Table(["site", "round", "ε charged", "ε total", "δ", "mechanism"], rows))
    return blocks
