"""The attack harness: scenario parsing, the byzantine-rows hook, resume, tables, and the
quick digits scenario end to end."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from securefl.attacks import harness
from securefl.attacks.harness import ByzantineRows, run_scenario
from securefl.attacks.poisoning import IPM, SignFlip
from securefl.attacks.results import (
    NOTES_BEGIN,
    NOTES_END,
    append_result,
    load_results,
    mean_sd,
    write_results_document,
)
from securefl.attacks.scenario import load_scenario
from securefl.cli import main
from securefl.engine.protection import Rows, WeightedSum
from securefl.errors import ConfigError

QUICK = Path(__file__).resolve().parents[2] / "attacks" / "poisoning" / "digits-quick.toml"

TINY = """
[scenario]
name = "tiny"
seeds = [0, 1]
byzantine_fractions = [0.25]

[base.run]
rounds = 2
[base.data]
dataset = "digits"
num_clients = 4
[base.model]
name = "logistic"
[base.client]
lr = 0.3

[[distributions]]
name = "iid"
partition = "iid"

[[attacks]]
name = "none"
[[attacks]]
name = "ipm"
update = "ipm"
options = { eps = 100.0 }

[[defenses]]
name = "fedavg"
rule = "fedavg"
[[defenses]]
name = "krum"
rule = "krum"
options = { num_byzantine = "$f" }
"""


def write(tmp_path: Path, text: str, name: str = "tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- scenarios
def test_cells_expand_the_grid_with_byzantine_count_substituted(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, TINY))
    cells = scenario.cells()
    assert len(cells) == 1 * 1 * 2 * 2 * 2
    krum = [c for c in cells if c.labels["defense"] == "krum" and c.labels["attack"] == "ipm"]
    assert krum[0].spec["config"]["aggregation"] == {"rule": "krum", "num_byzantine": 1}
    assert krum[0].spec["num_byzantine"] == 1
    none = [c for c in cells if c.labels["attack"] == "none"]
    assert all(c.spec["num_byzantine"] == 0 for c in none)  # nobody attacks ...
    clean_krum = [c for c in none if c.labels["defense"] == "krum"]
    assert clean_krum[0].spec["config"]["aggregation"]["num_byzantine"] == 1  # ... same defense
    assert len({c.key for c in cells}) == len(cells)
    assert cells[0].key == "poisoning/iid/0.25/none/fedavg/seed0"


def test_fingerprint_changes_with_the_config(tmp_path: Path) -> None:
    before = load_scenario(write(tmp_path, TINY)).cells()[0]
    after = load_scenario(write(tmp_path, TINY.replace("rounds = 2", "rounds = 3"))).cells()[0]
    assert before.key == after.key and before.fingerprint != after.fingerprint


@pytest.mark.parametrize(("text", "message"), [
    (TINY.replace('update = "ipm"', 'update = "nope"'), "unknown update attack 'nope'"),
    (TINY.replace("[[attacks]]\nname = \"none\"", "[[attacks]]\nname = \"none\"\nfoo = 1"),
     "foo is not a known key"),
    (TINY.replace("seeds = [0, 1]", "seeds = []"), "seeds must be"),
    (TINY.replace("byzantine_fractions = [0.25]", "byzantine_fractions = [0.6]"),
     "byzantine_fractions"),
    (TINY + "\n[extra]\n", "extra is not a known table"),
    (TINY.replace("rounds = 2", "rounds = 0"), "rounds must be >= 1"),
    (TINY + '\n[[cells]]\nname = "x"\nkind = "other"\n', 'kind must be "inference"'),
])
def test_bad_scenarios_are_one_line_config_errors(tmp_path: Path, text: str,
                                                  message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_scenario(write(tmp_path, text))


# ----------------------------------------------------------------------------- the hook
def rows(n: int = 5, d: int = 3) -> Rows:
    updates = np.arange(n * d, dtype=np.float32).reshape(n, d)
    return Rows(tuple(f"c{i}" for i in range(n)), updates, np.ones(n))


def test_hook_replaces_only_byzantine_rows_from_the_right_view() -> None:
    combined = rows()
    out = ByzantineRows(IPM(eps=1.0), {"c1", "c3"}).transform_combined(
        combined, round=1, rng=np.random.default_rng(0))
    honest_mean = combined.updates[[0, 2, 4]].mean(0)
    np.testing.assert_allclose(out.updates[[1, 3]], np.tile(-honest_mean, (2, 1)))
    np.testing.assert_array_equal(out.updates[[0, 2, 4]], combined.updates[[0, 2, 4]])
    # non-omniscient sign flip sees only the byzantine clients' own rows
    own = ByzantineRows(SignFlip(), {"c1", "c3"}).transform_combined(
        combined, round=1, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(own.updates[[1, 3]], -combined.updates[[1, 3]])
    np.testing.assert_array_equal(combined.updates, rows().updates)  # input untouched


def test_hook_passes_rounds_without_byzantine_participants() -> None:
    combined = rows()
    assert ByzantineRows(IPM(), {"zz"}).transform_combined(
        combined, round=1, rng=np.random.default_rng(0)) is combined


def test_hook_refuses_a_bare_sum() -> None:
    total = WeightedSum(("a",), np.zeros(3), 1.0)
    with pytest.raises(ConfigError, match="plain protection"):
        ByzantineRows(IPM(), {"a"}).transform_combined(total, round=1,
                                                       rng=np.random.default_rng(0))


# ----------------------------------------------------------------------------- results
def test_mean_sd_is_the_sample_standard_deviation() -> None:
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_sd([5.0]) == (5.0, 0.0)


def test_load_results_skips_a_torn_line_and_keeps_the_latest(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": "a", "v": 1}\n{"key": "a", "v": 2}\n{"key": "b", "v"')
    assert load_results(path) == {"a": {"key": "a", "v": 2}}


def test_append_result_writes_non_finite_metrics_as_null(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    append_result(path, {"key": "a", "loss": float("nan"), "curve": [np.float32(0.5), np.inf],
                         "metrics": {"auc": np.float64(0.75)}})
    assert load_results(path)["a"] == {"key": "a", "loss": None, "curve": [0.5, None],
                                       "metrics": {"auc": 0.75}}


def test_results_document_keeps_the_notes(tmp_path: Path) -> None:
    target = tmp_path / "RESULTS.md"
    target.write_text(f"old\n{NOTES_BEGIN}\nhand-written analysis\n{NOTES_END}\nold table\n")
    scenario = load_scenario(write(tmp_path, TINY))
    write_results_document(target, [(scenario, {}, tmp_path)])
    text = target.read_text()
    assert "hand-written analysis" in text and "old table" not in text
    assert ("securefl attack run attacks/poisoning/*.toml attacks/inference/*.toml "
            "--results attacks/RESULTS.md") in text


# ----------------------------------------------------------------------------- end to end
def test_tiny_grid_runs_resumes_and_reports_errors(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, TINY))
    out = tmp_path / "out"
    calls: list[bool] = []
    records = run_scenario(scenario, out, report=lambda c, r, i, n: calls.append(r is None))
    assert len(records) == 8 and not any(calls)
    # n = 4 clients, f = 1: Krum needs n > 2f + 2 = 4 -> not runnable, reported, not fatal
    krum = [r for r in records.values() if r["defense"] == "krum" and r["attack"] == "ipm"]
    assert all(r["status"] == "error" and "krum" in r["error"].lower() for r in krum)
    ipm = [r for r in records.values() if r["defense"] == "fedavg" and r["attack"] == "ipm"]
    clean = [r for r in records.values() if r["defense"] == "fedavg" and r["attack"] == "none"]
    # IPM with eps = 100 turns FedAvg's step around: far below the clean runs
    assert max(r["accuracy"] for r in ipm) < min(r["accuracy"] for r in clean) - 0.2
    assert (out / "results.md").exists() and (out / "heatmap.png").stat().st_size > 1000

    # resume: drop one finished cell and tear the file's end; only that cell reruns
    lines = (out / "results.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["key"] != clean[0]["key"]]
    (out / "results.jsonl").write_text("\n".join(kept) + '\n{"key": "torn')
    calls.clear()
    again = run_scenario(scenario, out, report=lambda c, r, i, n: calls.append(
        r is not None and r["status"] == "ok"))
    assert sum(calls) == 1
    assert again[clean[0]["key"]]["accuracy"] == clean[0]["accuracy"]  # deterministic


def test_inference_cells_call_the_inference_suite(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def run_cell(cell: dict[str, Any], *, rng: np.random.Generator) -> dict[str, float]:
        return {"auc": 0.5 + cell["seed"] / 10, "flag": True}

    fake = types.ModuleType("securefl.attacks.inference_suite")
    fake.run_cell = run_cell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "securefl.attacks.inference_suite", fake)
    text = TINY.split("[[distributions]]")[0] + (
        '\n[[cells]]\nname = "mia"\nkind = "inference"\nattack = "lira_offline"\n')
    scenario = load_scenario(write(tmp_path, text))
    records = run_scenario(scenario, tmp_path / "out")
    assert [r["metrics"]["auc"] for r in records.values()] == [0.5, 0.6]
    target = tmp_path / "RESULTS.md"
    write_results_document(target, [(scenario, records, tmp_path / "out")])
    assert "## Inference" in target.read_text()
    assert "| mia | 0.550 ± 0.071 |" in target.read_text()


def test_quick_scenario_shows_the_known_results(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The CI scenario end to end through the CLI: under 2 minutes, known outcomes."""
    status = main(["attack", "run", str(QUICK), "--out", str(tmp_path),
                   "--results", str(tmp_path / "RESULTS.md")])
    assert status == 0
    records = load_results(tmp_path / "digits-quick" / "results.jsonl")
    acc = {(r["attack"], r["defense"]): r["accuracy"] for r in records.values()}
    asr = {r["defense"]: r["attack_success_rate"] for r in records.values()
           if r["attack"] == "backdoor"}
    assert all(r["status"] == "ok" for r in records.values())
    assert acc[("none", "fedavg")] > 0.8
    for attack in ("sign_flip", "gaussian"):
        assert acc[(attack, "fedavg")] < 0.3          # FedAvg collapses
        assert acc[(attack, "median")] > 0.8          # the robust rules hold
        assert acc[(attack, "krum")] > 0.7
    assert asr["fedavg"] > 0.3 > max(asr["median"], asr["krum"])
    assert "digits-quick" in (tmp_path / "RESULTS.md").read_text()
    assert harness.__name__ in sys.modules


def test_suite_files_load_and_a_missing_folder_dataset_is_skipped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = sorted(QUICK.parent.glob("*.toml"))
    scenarios = {p.stem: load_scenario(p) for p in suite}
    assert {"digits", "digits-backdoor", "digits-quick", "mnist", "karimireddy2022"} \
        <= set(scenarios)
    from securefl.aggregation import RULES
    from securefl.attacks.registry import ATTACKS

    # every attack and every rule is in a suite scenario (mimic and bucketing: the paper's)
    full = [scenarios[name] for name in ("digits", "digits-backdoor", "karimireddy2022",
                                         "karimireddy2022-bucketing")]
    assert {a.get("update") for s in full for a in s.attacks} - {None} == set(ATTACKS)
    assert {d["rule"] for s in full for d in s.defenses} == set(RULES)
    cifar = tmp_path / "cifar.toml"
    cifar.write_text(QUICK.read_text().replace(
        'dataset = "digits"', 'dataset = "cifar10"\npath = "no/such/folder"'))
    assert "not found" in (harness.missing_folder(load_scenario(cifar)) or "")
    status = main(["attack", "run", str(cifar), "--out", str(tmp_path),
                   "--results", str(tmp_path / "R.md")])
    assert status == 0 and "skipped" in capsys.readouterr().out
    assert "Not run here (cifar.toml)" in (tmp_path / "R.md").read_text()
