"""Progress on long work: INFO lines in logs, a rich bar only on a terminal, nothing under -q;
WARNING only for what needs attention."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from securefl.engine.history import RoundRecord
from securefl.progress import bars_enabled, progress
from securefl.runtime.server import _report_round

ROOT = Path(__file__).parents[1]
_log = logging.getLogger("securefl.test")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_progress_is_info_lines(caplog) -> None:
    assert not bars_enabled()  # pytest's stderr is no terminal
    with caplog.at_level(logging.INFO, logger="securefl"), \
            progress("round", 3, log=_log) as bar:
        bar.advance(status="accuracy 0.5")
        bar.advance(log=False)
        bar.advance()
    assert not bar.drawn
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "round 1/3: accuracy 0.5"), (logging.INFO, "round 3/3")]


def test_on_a_terminal_a_bar_is_drawn_and_logs_go_above_it(monkeypatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    logger = logging.getLogger("securefl")
    level = logger.level
    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler(terminal)
    logging.getLogger().addHandler(handler)
    try:
        assert bars_enabled()
        with progress("round", 2, log=_log) as bar:
            assert bar.drawn
            with progress("waiting for sites", 3, log=_log) as inner:  # one bar at a time
                assert not inner.drawn
            bar.advance(status="accuracy 0.7")
            _log.warning("a site needs attention")
            assert handler.stream is not terminal  # through rich, above the bar
            bar.advance()
        assert handler.stream is terminal
        logger.setLevel(logging.ERROR)  # -q: no bar
        assert not bars_enabled()
    finally:
        logger.setLevel(level)
        logging.getLogger().removeHandler(handler)
    text = terminal.getvalue()
    assert "2/2" in text and "━" in text and "a site needs attention\n" in text


def test_a_normal_round_is_info_an_aborted_one_a_warning(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="securefl"), \
            progress("round", 2, log=_log) as bar:
        _report_round(bar, RoundRecord(round=1, clients=["a", "b"], accuracy=0.75))
        _report_round(bar, RoundRecord(round=2, aborted="only 1 usable updates"))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "round 1/2: 2 sites, accuracy 0.7500"),
        ("INFO", "round 2/2: 0 sites, accuracy n/a"),
        ("WARNING", "round 2 aborted: only 1 usable updates")]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "securefl.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("quiet", [False, True], ids=["default", "quiet"])
def test_the_run_logs_rounds_and_is_silent_under_quiet(tmp_path, quiet) -> None:
    proc = _cli("run", "examples/quickstart.toml", "--rounds", "2", "--out",
                str(tmp_path / "run"), *(["-q"] if quiet else []))
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stderr and "━" not in proc.stderr  # no bar in a log
    if quiet:
        assert proc.stderr == ""
    else:
        lines = [line for line in proc.stderr.splitlines() if ": round " in line]
        assert [line.split(": round ")[1].split(":")[0] for line in lines] == ["1/2", "2/2"]
        assert all(line.startswith("INFO ") for line in lines)
