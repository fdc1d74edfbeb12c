"""examples/hospital: three sites' own CSV files, own model by import path, DP-SGD + SecAgg+."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from securefl.config import load_config
from securefl.simulation import run_simulation

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hospital"


@pytest.mark.slow  # about 15 s: 20 rounds of DP-SGD under SecAgg+ over the wire codec
def test_hospital_example_reaches_090_in_20_rounds_from_its_own_files(tmp_path):
    for name in ("hospital.toml", "model.py", "make_sites.py"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    spec = importlib.util.spec_from_file_location("make_sites", tmp_path / "make_sites.py")
    assert spec is not None and spec.loader is not None
    make_sites = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_sites)
    written = make_sites.main(tmp_path / "sites")
    assert [p.name for p in written] == ["site-a.csv", "site-b.csv", "site-c.csv", "test.csv"]

    config = load_config(tmp_path / "hospital.toml")
    assert (config.privacy.mode, config.protection.kind) == ("dp_sgd", "secagg")
    assert config.privacy.target_epsilon == 8.0
    result = run_simulation(config, out_dir=tmp_path / "run")
    assert len(result.history.rounds) == 20
    assert not any(r.aborted for r in result.history.rounds)
    assert result.history.final.accuracy >= 0.90
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert prov["model"]["source"] == "import model:tabular"
    rows = {f["name"]: f["rows"] for f in prov["data"]["files"]}
    assert rows == {"site-a.csv": 205, "site-b.csv": 150, "site-c.csv": 101, "test.csv": 113}
    assert sorted(prov["data"]["clients"]) == ["site-a", "site-b", "site-c"]
    smallest = min(c["train_rows"] for c in prov["data"]["clients"].values())
    assert config.privacy.delta < 1 / smallest
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert all(c["epsilon_rdp"] <= 8.0 for c in privacy["clients"].values())
