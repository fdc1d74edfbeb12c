"""End-to-end: the quickstart config through the CLI and the library."""

import json
import subprocess
import sys

from securefl.config import load_config
from securefl.simulation import run_simulation


def test_quickstart_reduced_rounds_reaches_accuracy_and_is_deterministic(tmp_path):
    config = load_config("examples/quickstart.toml").replace(run__rounds=10)
    first = run_simulation(config, out_dir=tmp_path / "a")
    run_simulation(config, out_dir=tmp_path / "b")
    assert first.history.final.accuracy >= 0.90
    rows, again = (_metrics(tmp_path / run) for run in ("a", "b"))
    assert len(rows) == 10
    assert [(r["accuracy"], r["loss"]) for r in rows] == [(r["accuracy"], r["loss"]) for r in again]
    assert {"round", "accuracy", "loss", "clients", "seconds"} <= set(rows[0])
    for name in ("config.toml", "model.safetensors", "summary.json", "accuracy.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    assert not list((tmp_path / "a").glob(".*.tmp"))


def test_saved_model_loads_without_code(tmp_path):
    from safetensors.numpy import load_file

    config = load_config("examples/quickstart.toml").replace(run__rounds=1)
    result = run_simulation(config, out_dir=tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert sum(v.size for v in tensors.values()) == result.parameters.size


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "securefl.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_cli_run_writes_run_directory(tmp_path):
    out = tmp_path / "run"
    proc = _cli("run", "examples/quickstart.toml", "--rounds", "2", "--seed", "3",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "round 2/2" in proc.stderr and "final accuracy" in proc.stdout
    assert "seed = 3" in (out / "config.toml").read_text()


def test_user_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[data]\nalpha = -1\n")
    cases = {
        "alpha must be > 0": bad,
        "dataset folder not found": _write(tmp_path / "m.toml",
                                           '[data]\ndataset = "mnist"\npath = "/nonexistent"\n'),
        "leaves client": _write(tmp_path / "e.toml", "[data]\nnum_clients = 1000\n"),
        "not valid TOML": _write(tmp_path / "t.toml", "[data\n"),
    }
    for number, (needle, path) in enumerate(cases.items()):
        proc = _cli("run", str(path), "--out", str(tmp_path / f"o{number}"))
        assert proc.returncode == 2, (needle, proc.stderr)
        assert needle in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _write(path, text):
    path.write_text(text)
    return path


def test_wire_format_and_worker_pool_do_not_change_results():
    base = load_config("examples/quickstart.toml").replace(run__rounds=3)
    plain = run_simulation(base)
    wired = run_simulation(base.replace(simulation__wire=True, simulation__workers=2))
    assert plain.history.metric("loss") == wired.history.metric("loss")
    assert (plain.parameters == wired.parameters).all()


def test_fltrust_gets_the_server_reference_update():
    config = load_config("examples/quickstart.toml").replace(run__rounds=3)
    config = config.replace(aggregation=type(config.aggregation).from_table(
        {"rule": "fltrust", "root_examples": 50}))
    result = run_simulation(config)
    assert not any(r.aborted for r in result.history.rounds)
    assert result.history.final.accuracy > 0.6
