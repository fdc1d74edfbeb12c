"""``securefl privacy report RUN_DIR``: the ledger of a simulation or a site, or the signed
receipts of a deployed server (which keeps no ledger: the sites account for themselves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from securefl.privacy.ledger import LEDGER_FILE
from securefl.privacy.report import command as ledger_command
from securefl.runtime.auditlog import receipts_command

__all__ = ["command"]


def command(args: Any) -> int:
    run_dir = Path(args.run_dir)
    if (run_dir.is_dir() and not (run_dir / LEDGER_FILE).is_file()
            and (run_dir / "audit.log").is_file()):
        return receipts_command(args)
    return ledger_command(args)
