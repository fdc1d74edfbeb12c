"""Cells of a scenario grid in parallel processes: ``securefl attack run FILE --jobs N``.

The cells of a grid are independent runs, each seeded from its own ``seed``, so a grid
gives the same ``results.jsonl`` records (all but ``seconds``) whether its cells run one
after another or up to ``N`` at once.  Each pending cell runs in a fresh child process
(``python -m securefl.attacks.cell_process``, one torch and BLAS thread, like the sequential
harness), which:

* reads the same scenario file (with the same MNIST fallback) and picks the cell by its
  index, refusing to run when the cell's key or fingerprint is not the parent's;
* writes its one record as JSON to ``<out>/.cells/<index>.json`` and its log to
  ``<index>.log`` beside it.

The parent alone appends to ``results.jsonl``, in the order cells finish, after checking
that the record is a JSON object for that cell's key and fingerprint; a child that exits
without one (killed, out of memory) becomes an ``error`` record naming its exit code and
log, so the next run redoes it.  Nothing crosses between the processes but file names on
the command line and JSON files: no pickle.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from securefl.attacks.scenario import Cell
from securefl.errors import ConfigError

__all__ = ["MAX_RECORD_BYTES", "check_jobs", "run_parallel"]

#: the largest record a cell's process may hand back (a record is a few KB: its curves)
MAX_RECORD_BYTES = 16 << 20
#: seconds between looks at the running cells
POLL_SECONDS = 0.2

Report = Callable[[Cell, dict[str, Any], int], None]


def check_jobs(jobs: int) -> int:
    """``--jobs``: a whole number of processes, at least 1."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs must be a whole number >= 1, got {jobs!r}")
    return jobs


def run_parallel(scenario_path: Path, cells: Sequence[Cell], pending: Sequence[int],
                 out_dir: Path, *, jobs: int, append: Callable[[dict[str, Any]], None],
                 report: Report | None = None) -> None:
    """Run the cells ``cells[i]`` for ``i`` in ``pending``, at most ``jobs`` at once, each in
    its own process; ``append(record)`` keeps each record as its cell finishes, and
    ``report(cell, record, finished)`` is called after it."""
    check_jobs(jobs)
    work = out_dir / ".cells"
    work.mkdir(parents=True, exist_ok=True)
    queue = list(pending)
    running: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
    finished = 0
    try:
        while queue or running:
            while queue and len(running) < jobs:
                index = queue.pop(0)
                running[index] = (_start(scenario_path, cells[index], index, work),
                                  time.perf_counter())
            time.sleep(POLL_SECONDS)
            for index, (process, started) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[index]
                record = _collect(cells[index], index, work, code,
                                  seconds=round(time.perf_counter() - started, 3))
                append(record)
                finished += 1
                if report is not None:
                    report(cells[index], record, finished)
    finally:
        for process, _ in running.values():  # interrupted: stop what was started
            process.kill()
            process.wait()


def _start(scenario_path: Path, cell: Cell, index: int, work: Path) -> subprocess.Popen[bytes]:
    for stale in (work / f"{index}.json", work / f"{index}.log"):
        stale.unlink(missing_ok=True)
    with open(work / f"{index}.log", "wb") as log:
        return subprocess.Popen(  # noqa: S603 (this interpreter, this module, our own paths)
            [sys.executable, "-m", "securefl.attacks.cell_process", str(scenario_path), str(index),
             cell.key, cell.fingerprint, str(work / f"{index}.json")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def _collect(cell: Cell, index: int, work: Path, code: int, *,
             seconds: float) -> dict[str, Any]:
    """The record the cell's process wrote, checked; otherwise an ``error`` record."""
    path, log = work / f"{index}.json", work / f"{index}.log"
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            raise ValueError(f"record larger than {MAX_RECORD_BYTES} bytes")
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("record is not a JSON object")
        if (record.get("key"), record.get("fingerprint")) != (cell.key, cell.fingerprint):
            raise ValueError("record is for another cell")
    except (OSError, ValueError) as exc:
        reason = "no record" if isinstance(exc, FileNotFoundError) else str(exc)
        return {"key": cell.key, "fingerprint": cell.fingerprint, "kind": cell.kind,
                "seed": cell.seed, **cell.labels, "status": "error", "seconds": seconds,
                "error": f"cell process exited with code {code} ({reason}; log {log})"}
    path.unlink()
    log.unlink(missing_ok=True)
    return record
