"""One cell of a scenario grid in its own process, for ``securefl attack run --jobs N``
(:mod:`securefl.attacks.jobs`): ``python -m securefl.attacks.cell_process SCENARIO INDEX KEY
FINGERPRINT RECORD_PATH`` runs cell ``INDEX`` of the scenario file, with one torch and BLAS
thread, and writes its record as JSON to ``RECORD_PATH``; exit status 2 when that cell's key
or fingerprint is not the parent's (the file changed while the grid ran)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from threadpoolctl import threadpool_limits

from securefl.attacks.harness import mnist_fallback, run_cell
from securefl.attacks.results import record_json
from securefl.attacks.scenario import load_scenario
from securefl.engine.trainer import torch_threads
from securefl.output import atomic_write

__all__ = ["main"]


def main(argv: Sequence[str]) -> int:
    """Run the cell ``argv = (SCENARIO, INDEX, KEY, FINGERPRINT, RECORD_PATH)`` names."""
    scenario_path, index, key, fingerprint, out = argv
    cells = mnist_fallback(load_scenario(scenario_path)).cells()
    cell = cells[int(index)] if 0 <= int(index) < len(cells) else None
    if cell is None or (cell.key, cell.fingerprint) != (key, fingerprint):
        print(f"{scenario_path}: cell {index} is not {key} ({fingerprint}): the file "
              f"changed while the grid ran", file=sys.stderr)
        return 2
    with torch_threads(1), threadpool_limits(limits=1):
        record = run_cell(cell)
    atomic_write(Path(out), record_json(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
