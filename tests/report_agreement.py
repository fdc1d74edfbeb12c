"""Read what the compliance report, ``privacy report``, ``audit verify`` and ``check`` say
about one run, so a test can assert that they agree."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest

from securefl.cli import main


class _Tables(HTMLParser):
    """Every table of the report as rows of cell texts, by section id; and its paragraphs."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[list[str]]]] = {}
        self.paragraphs: dict[str, list[str]] = {}
        self._section = ""
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._para: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "section":
            self._section = dict(attrs)["id"] or ""
        elif tag == "table":
            self.tables.setdefault(self._section, []).append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "p":
            self._para = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._section][-1].append(self._row)
            self._row = None
        elif tag == "p" and self._para is not None:
            self.paragraphs.setdefault(self._section, []).append("".join(self._para))
            self._para = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        elif self._para is not None:
            self._para.append(data)


def compliance_report(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> _Tables:
    """``securefl report RUN_DIR``, parsed."""
    assert main(["report", str(run_dir)]) == 0
    capsys.readouterr()
    parsed = _Tables()
    parsed.feed((run_dir / "report.html").read_text(encoding="utf-8"))
    return parsed


def verdict(report: _Tables) -> dict[str, tuple[str, str]]:
    """``{check: (PASS|FAIL|—, details)}`` of the verdict table."""
    rows = report.tables["verdict"][0][1:]
    return {check: (result, details) for check, result, details in rows}


def report_epsilon(report: _Tables) -> dict[str, float]:
    """The ε per client of the report's Privacy section (its per-client table)."""
    table = next(t for t in report.tables["privacy"] if t[0][0] in ("client", "site"))
    return {row[0]: float(row[1]) for row in table[1:]}


def requirement_results(report: _Tables) -> dict[str, str]:
    table = next(t for t in report.tables["threat-model"] if t[0][0] == "requirement")
    return {row[0]: row[1] for row in table[1:]}


def privacy_report(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, float]:
    """``securefl privacy report RUN_DIR``: ε per client from its printed table (the column
    after the client's name and counts: epsilon spent, or epsilon by the enforcing
    accountant)."""
    assert main(["privacy", "report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "┃" in line)
    names = [h.strip() for h in header.strip("┃ ").split("┃")]
    wanted = names.index("epsilon spent" if "epsilon spent" in names else
                         next(n for n in names if n.startswith("epsilon (")))
    values = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if "│" in line and len(cells) == len(names):
            values[cells[0]] = float(cells[wanted])
    return values


def check_results(config: Path, model: str, deployment: str,
                  capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    main(["check", str(config), "--threat-model", model, "--deployment", deployment])
    out = capsys.readouterr().out
    return {line.split()[1].rstrip(":"): line.split()[0] for line in out.splitlines()
            if line.startswith(("PASS", "FAIL"))}


def audit_verify(run_dir: Path, capsys: pytest.CaptureFixture[str], *args: str
                 ) -> tuple[int, str]:
    code = main(["audit", "verify", str(run_dir), *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err
