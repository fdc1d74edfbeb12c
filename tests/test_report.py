"""``securefl report RUN_DIR``: every section present, with the run's numbers, in HTML that a
headless Chromium renders (when installed) and in Markdown."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefl.cli import main
from securefl.config import load_config
from securefl.report import write_report

FIXTURES = Path(__file__).parent / "threat_configs"
SECTIONS = ["verdict", "summary", "threat-model", "protection", "participants", "privacy",
            "attacks", "audit-log", "empirical-audit"]


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A valid, uncompressed-filter RGB PNG (PNG spec, ISO/IEC 15948)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                               0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


EPSILON_PNG = png(4, 3, (200, 30, 30))
HEATMAP_PNG = png(5, 5, (30, 30, 200))


def full_run(directory: Path, *, network: bool = True) -> Path:
    """A run directory with every artefact a DP, attacked run leaves: networked (an audit log,
    ε in the sites' receipts) or simulated (ε in privacy.json, the ledgers' summary)."""
    directory.mkdir()
    config = load_config(FIXTURES / "hospital-consortium.toml").replace(
        run__threat_model="hospital-consortium")
    (directory / "config.toml").write_text(config.to_toml())
    rounds = [
        {"round": 1, "sampled": ["hospital-a", "hospital-b", "hospital-c"],
         "clients": ["hospital-a", "hospital-b", "hospital-c"], "dropped": {}, "declined": {},
         "rejected": {}, "aborted": None, "accuracy": 0.61, "loss": 1.2, "seconds": 3.5},
        {"round": 2, "sampled": ["hospital-a", "hospital-b", "hospital-c"],
         "clients": ["hospital-a", "hospital-b"], "dropped": {"hospital-c": "<b>deadline</b>"},
         "declined": {}, "rejected": {}, "aborted": None, "accuracy": 0.7321, "loss": 0.9,
         "seconds": 4.25},
    ]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds)
                                             + "{truncated\n")
    (directory / "summary.json").write_text(json.dumps({"name": "consortium", "rounds": 2}))
    if not network:
        (directory / "privacy.json").write_text(json.dumps({
            "delta": 1e-5, "accountant": "rdp",
            "clients": {"hospital-a": {"epsilon_rdp": 2.5, "epsilon_prv": 2.25, "budget": 8.0,
                                       "remaining": 5.5, "rounds": 2, "history": [[1, 1.5]]},
                        "hospital-b": {"epsilon_rdp": 8.0, "epsilon_prv": 7.5, "budget": 8.0,
                                       "remaining": 0.0, "rounds": 2,
                                       "history": [[1, 5.0]]}}}))
        (directory / "epsilon.png").write_bytes(EPSILON_PNG)
    (directory / "results.jsonl").write_text(
        json.dumps({"attack": "sign_flip", "defense": "krum", "accuracy": 0.913}) + "\n")
    (directory / "RESULTS.md").write_text("| attack | krum |\n|---|---|\n| sign_flip | 0.913 |\n")
    (directory / "heatmap.png").write_bytes(HEATMAP_PNG)
    if not network:
        return directory
    from securefl.runtime.auditlog import AuditLog

    log = AuditLog(directory, signing_key=Ed25519PrivateKey.generate())
    log.append("round_start", round=1, participants=["hospital-a", "hospital-b", "hospital-c"])
    log.append("round_end", round=1, model_hash="ab" * 32)
    return directory


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.headings: list[str] = []
        self.images: list[str] = []
        self.tags: set[str] = set()
        self.links: list[str] = []
        self.cells: list[str] = []
        self._where: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self.sections.append(a["id"] or "")
        elif tag == "img":
            self.images.append(a["src"] or "")
        elif tag == "a":
            self.links.append(a["href"] or "")
        self._where = tag if tag in ("h2", "td") else None

    def handle_data(self, data: str) -> None:
        if self._where == "h2":
            self.headings.append(data)
        elif self._where == "td":
            self.cells.append(data)


def parse(text: str) -> _Dom:
    dom = _Dom()
    dom.feed(text)
    return dom


def check_structure(text: str) -> _Dom:
    dom = parse(text)
    assert dom.sections == SECTIONS
    assert len(dom.headings) == len(SECTIONS)
    assert "script" not in dom.tags
    assert all(src.startswith("data:image/png;base64,") for src in dom.images)
    assert dom.links == [f"#{s}" for s in SECTIONS]
    return dom


def test_every_section_holds_the_runs_numbers(tmp_path: Path) -> None:
    run = full_run(tmp_path / "run", network=False)
    html_path, md_path = write_report(run)
    html = html_path.read_text()
    dom = check_structure(html)
    decoded = {base64.b64decode(src.split(",", 1)[1]) for src in dom.images}
    assert decoded == {EPSILON_PNG, HEATMAP_PNG}
    cells = dom.cells
    # verdict first: a simulation has no signed audit log, which hospital-consortium needs
    assert "Verdict: needs attention (Threat-model controls). Spent: at most ε = 8 per " \
           "client." in html
    v = cells.index("Threat-model controls")
    assert cells[v:v + 3] == ["Threat-model controls", "FAIL", "hospital-consortium: 6 of 7 "
                              "hold; failing: signed-audit-log (checked as a simulation run)"]
    p = cells.index("Privacy spent")
    assert cells[p:p + 3] == ["Privacy spent", "PASS", "largest ε 8 at δ = 1e-05 over 2 "
                              "clients, budget 8; from the clients' privacy ledgers"]
    assert "1 of 7 requirements FAIL" in html and "Checked as a simulation run" in html
    assert cells.count("PASS") == 6 + 2
    # protection and aggregator, in words; only the settings of the DP mode used
    assert ["Protection", "secure aggregation (SecAgg+)"] == cells[cells.index("Protection"):][:2]
    assert ["Aggregation rule", "fedavg"] == cells[cells.index("Aggregation rule"):][:2]
    assert "Per-example clip norm" in cells and "Per-client update clip norm" not in cells
    assert "Run name" in cells and "Privacy mode" in cells and "Noise multiplier" in cells
    assert not {"name", "privacy.mode", "privacy.noise_multiplier", "max_grad_norm"} & set(cells)
    # participants: round 2 sampled 3, aggregated 2, hospital-c dropped (escaped reason)
    assert "hospital-c: <b>deadline</b>" in cells
    assert "&lt;b&gt;deadline&lt;/b&gt;" in html and "<b>deadline" not in html
    assert "0.7321" in cells
    assert "metrics.jsonl: line 3 is not a JSON object, left out." in html
    # privacy: spent and left per client, the enforcing accountant first
    a, b = cells.index("hospital-a"), cells.index("hospital-b")
    assert cells[a:a + 6] == ["hospital-a", "2.5", "5.5", "2.25", "8", "2"]
    assert cells[b:b + 3] == ["hospital-b", "8", "0"]
    assert "Source of every ε in this report: the clients&#x27; privacy ledgers." in html
    assert "0.913" in cells and "sign_flip" in cells
    assert "no audit log" in html
    markdown = md_path.read_text()
    for heading in dom.headings:
        assert f"## {heading}" in markdown
    assert "![ε per round for each client, with the budget](epsilon.png)" in markdown
    assert "| hospital-a | 2.5 | 5.5 | 2.25 | 8 | 2 |" in markdown


def test_a_network_run_takes_epsilon_from_the_receipts_only(tmp_path: Path) -> None:
    html = write_report(full_run(tmp_path / "run"))[0].read_text()
    cells = check_structure(html).cells
    assert "All 7 requirements pass" in html and "Checked as a network run" in html
    assert "VERIFIED: 2 entries" in html
    assert "Source of every ε in this report: the privacy receipts signed by the sites" in html
    s = cells.index("Signed audit log")
    assert cells[s:s + 2] == ["Signed audit log", "PASS"]
    # the fixture's log has no receipts and its certs folder no identities: stated, failed
    p = cells.index("Privacy spent")
    assert cells[p + 1] == "FAIL" and "identity keys" in cells[p + 2]


def test_a_tampered_audit_log_is_reported_as_failed(tmp_path: Path) -> None:
    run = full_run(tmp_path / "run")
    log = run / "audit.log"
    log.write_text(log.read_text().replace('"round":1', '"round":7', 1))
    html = write_report(run)[0].read_text()
    assert "FAILED: line 1: content does not match its hash" in html
    assert "VERIFIED" not in html


def test_missing_data_is_stated_section_by_section(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "bare"
    run.mkdir()
    (run / "config.toml").write_text(load_config(FIXTURES / "quickstart.toml").to_toml())
    assert main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out
    html = (run / "report.html").read_text()
    check_structure(html)
    for sentence in ("No summary.json", "names no threat model", "No metrics.jsonl",
                     "No ε was accounted: the run used no differential privacy.",
                     "no attack-suite results", "no audit log", "No audit.json"):
        assert sentence in html
    assert "protection" in html and "plain" in html
    (run / "config.toml").write_text("[run\n")  # damaged
    html = write_report(run)[0].read_text()
    assert "No readable config.toml" in html
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"\xff\xd8")
    capsys.readouterr()
    assert main(["report", str(other)]) == 2
    assert "not a run directory (it holds none of config.toml" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["holiday.jpg"]


@pytest.mark.parametrize(("bound", "verdict"), [(0.41, "PASS"), (1.26, "FAIL")])
def test_the_empirical_audit_is_shown_beside_the_accountant(tmp_path: Path, bound: float,
                                                            verdict: str) -> None:
    run = full_run(tmp_path / "run")
    (run / "audit.json").write_text(json.dumps({
        "epsilon_lower_bound": bound, "accountant_epsilon": 0.9943, "delta": 1e-5,
        "confidence": 0.95, "method": "one_run", "num_canaries": 5000, "num_included": 2497,
        "num_guesses": 250, "num_correct": 180, "test_accuracy": 0.4, "canary": "client",
        "epsilon_estimate": 0.871, "gate": "pass"}))
    (run / "audit-scores.png").write_bytes(HEATMAP_PNG)
    html_path, md_path = write_report(run)
    html = html_path.read_text()
    cells = check_structure(html).cells
    at = cells.index("empirical ε lower bound (95% confidence)")
    assert cells[at + 1] == f"{bound:.3f}"
    assert cells[cells.index("accountant's ε (the audited run)") + 1] == "0.994"
    assert cells[cells.index("Gaussian-fit ε estimate (not a bound)") + 1] == "0.871"
    assert cells[cells.index("audit") + 1] == "user level, canary clients"
    section = html[html.index('id="empirical-audit"'):]
    assert f"{verdict}: the lower bound" in section and "canary scores" in section
    assert "canary scores, inserted against not inserted" in md_path.read_text()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(_chromium() is None,
                    reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run "
                    "installs it, so CI runs this)")
def test_the_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    run = full_run(tmp_path / "run", network=False)
    html_path, _ = write_report(run)
    browser = [str(_chromium()), "--headless", "--no-sandbox", "--disable-gpu",
               f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*browser, "--dump-dom", html_path.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    rendered = check_structure(dom)
    assert len(rendered.images) == 2
    # the verdict renders first, then the ε table with each client's numbers
    assert dom.index("Verdict: needs attention") < dom.index('id="summary"')
    cells = rendered.cells
    a = cells.index("hospital-a")
    assert cells[a:a + 4] == ["hospital-a", "2.5", "5.5", "2.25"]
    assert "ε spent (RDP, enforced)" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*browser, "--window-size=1000,3000", f"--screenshot={shot}",
                    html_path.resolve().as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_identical_clients_share_one_epsilon_line(tmp_path: Path) -> None:
    from securefl.privacy.report import distinct_curves, plot_epsilon

    same = {"history": [[1, 1.5], [2, 2.5]], "budget": 8.0}
    clients = {f"client-{i}": dict(same) for i in range(10)}
    clients["client-3"] = {"history": [[1, 2.0], [2, 3.0]], "budget": 8.0}
    curves = distinct_curves(clients)
    assert [ids for _, ids in curves] == [[f"client-{i}" for i in range(10) if i != 3],
                                          ["client-3"]]
    assert curves[0][0] == ((1, 1.5), (2, 2.5))
    path = plot_epsilon({"clients": clients, "delta": 1e-5, "accountant": "rdp"},
                        tmp_path / "epsilon.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
