"""``securefl attack run --jobs N``: cells in parallel processes give the records the
sequential harness gives, and a cell process that fails or hands back a wrong record
becomes an error record that the next run redoes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from securefl.attacks import jobs
from securefl.attacks.harness import run_scenario
from securefl.attacks.scenario import load_scenario
from securefl.cli import main
from securefl.errors import ConfigError

from .test_harness import TINY, write

#: what differs between two runs of the same cell
TIMING = {"seconds"}
#: the tiny grid with one seed: 4 cells (a process each costs its imports)
ONE_SEED = TINY.replace("seeds = [0, 1]", "seeds = [0]")


def _stable(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {key: {k: v for k, v in r.items() if k not in TIMING} for key, r in records.items()}


def test_two_jobs_give_the_sequential_records(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, ONE_SEED))
    alone = run_scenario(scenario, tmp_path / "one")
    finished: list[int] = []
    parallel = run_scenario(scenario, tmp_path / "two", jobs=2,
                            report=lambda c, r, i, n: finished.append(i))
    assert len(alone) == 4 and _stable(parallel) == _stable(alone)
    assert sorted(finished) == [1, 2, 3, 4]
    assert any(r["status"] == "ok" for r in parallel.values())
    assert any(r["status"] == "error" for r in parallel.values())  # Krum at n = 4, f = 1
    lines = (tmp_path / "two" / "results.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["key"] for line in lines) == sorted(alone)
    assert not list((tmp_path / "two" / ".cells").iterdir())  # records and logs collected
    # resumed: only the cells that are not runnable run again, the same table
    again = run_scenario(scenario, tmp_path / "two", jobs=2)
    assert _stable(again) == _stable(alone)


def test_a_cell_process_that_fails_is_an_error_record_and_is_redone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that exits without a record, or with one for another cell, or with one that
    is not a JSON object, leaves an error record naming its exit code and log; the next run
    redoes exactly those cells."""
    scenario = load_scenario(write(tmp_path, ONE_SEED))
    cells = scenario.cells()
    bogus = {0: "exit 3", 1: "not an object", 3: "wrong key"}  # cell 2 runs as it should
    real = jobs._start

    def start(path: Path, cell: Any, index: int, work: Path) -> subprocess.Popen[bytes]:
        if index not in bogus:
            return real(path, cell, index, work)
        record = {"exit 3": None, "wrong key": {"key": "other", "fingerprint": "x"},
                  "not an object": [1, 2]}[bogus[index]]
        code = ("import sys; sys.exit(3)" if record is None else
                f"open({str(work / f'{index}.json')!r}, 'w').write({json.dumps(record)!r})")
        (work / f"{index}.log").write_text("cell log\n")
        return subprocess.Popen([sys.executable, "-c", code])

    monkeypatch.setattr(jobs, "_start", start)
    records = run_scenario(scenario, tmp_path / "out", jobs=2)
    for index, why in [(0, "exited with code 3 (no record"),
                       (1, "exited with code 0 (record is not a JSON object"),
                       (3, "exited with code 0 (record is for another cell")]:
        record = records[cells[index].key]
        assert record["status"] == "error" and why in record["error"]
        assert str(tmp_path / "out" / ".cells" / f"{index}.log") in record["error"]
    monkeypatch.setattr(jobs, "_start", real)
    redone: list[str] = []
    again = run_scenario(scenario, tmp_path / "out", jobs=2,
                         report=lambda c, r, i, n: r is not None and redone.append(c.key))
    # the bogus cells and the cells that are not runnable (Krum at n = 4, f = 1), no other
    assert sorted(redone) == sorted(k for k, r in records.items() if r["status"] != "ok")
    assert set(redone) == {cells[i].key for i in bogus} and records[cells[2].key]["status"] == "ok"
    assert _stable(again) == _stable(run_scenario(scenario, tmp_path / "seq"))


def test_a_cell_process_refuses_a_scenario_that_changed(tmp_path: Path) -> None:
    path = write(tmp_path, ONE_SEED)
    cell = load_scenario(path).cells()[0]
    out = tmp_path / "record.json"
    done = subprocess.run([sys.executable, "-m", "securefl.attacks.cell_process", str(path), "0",
                           cell.key, "0" * 16, str(out)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 2 and not out.exists()
    assert "changed while the grid ran" in done.stderr


@pytest.mark.parametrize("value", ["0", "-1"])
def test_jobs_below_one_is_a_one_line_error(tmp_path: Path, value: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, ONE_SEED)
    assert main(["attack", "run", str(path), "--out", str(tmp_path), "--jobs", value]) != 0
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--jobs must be a whole number >= 1, got {int(value)}")
    assert "\n" not in err
    with pytest.raises(ConfigError):
        jobs.check_jobs(True)  # type: ignore[arg-type]
