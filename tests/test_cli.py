"""The command line as a user meets it: one clear line and a meaningful exit status for every
mistake, checks before any training, and run directories that cannot be mixed up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from securefl.cli import main
from securefl.config import clients_per_round, config_from_dict
from securefl.engine.history import History, RoundRecord
from securefl.engine.server import Sampler
from securefl.output import failure
from securefl.threat.facts import facts

ROOT = Path(__file__).parents[1]
QUICKSTART = (ROOT / "examples" / "quickstart.toml").read_text()


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_version_and_exit_codes_in_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("securefl ")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "exit status" in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [
    (["run", "{cfg}", "--rounds", "0"], "--rounds: must be >= 1"),
    (["privacy", "audit", "{cfg}", "--canaries", "0"], "--canaries: must be >= 2"),
    (["privacy", "audit", "{cfg}", "--confidence", "1.5"], "--confidence: must be in (0, 1)"),
])
def test_bad_arguments_are_usage_errors(tmp_path, capsys, argv, says):
    cfg = write(tmp_path, QUICKSTART)
    with pytest.raises(SystemExit) as done:
        main([a.format(cfg=cfg) for a in argv])
    assert done.value.code == 2 and says in one_line_error(capsys)


@pytest.mark.parametrize("edit, says", [
    (("rule = \"fedavg\"", "rule = \"krum\"\nnum_byzantine = 4"),
     "needs at least 11 updates per round, but [server] samples 10 of the 10 clients"),
    (("rule = \"fedavg\"", "rule = \"bulyan\"\nnum_byzantine = 3"), "needs at least 15"),
    (("rule = \"fedavg\"", "rule = \"krum\""), "needs option(s) num_byzantine in [aggregation]"),
    (("rule = \"fedavg\"", "rule = \"median\"\nscal = 4.0"), "unknown option(s) scal"),
    # a check that needs the loaded data: the CNN on tabular records
    (("dataset = \"digits\"", "dataset = \"breast_cancer\""),
     "[model] name = \"cnn\" needs image inputs"),
])
def test_config_mistakes_fail_before_any_training(tmp_path, capsys, edit, says):
    text = QUICKSTART.replace(*edit)
    if "breast_cancer" in text:
        text = text.replace("name = \"mlp\"", "name = \"cnn\"")
    cfg = write(tmp_path, text)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "-q"]) == 2
    line = one_line_error(capsys)
    assert says in line and str(cfg) in line
    assert not (out / "metrics.jsonl").exists()  # nothing was trained
    # and nothing claims otherwise: a refused config leaves no config.toml or ledger behind
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


def test_run_directories_are_never_mixed(tmp_path, capsys):
    cfg = write(tmp_path, QUICKSTART)
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    assert main(["run", str(cfg), "--out", str(a_file)]) == 2
    assert "is a file" in one_line_error(capsys)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.jsonl").write_text("{}\n")
    assert main(["run", str(cfg), "--out", str(earlier), "--rounds", "1"]) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert (earlier / "metrics.jsonl").read_text() == "{}\n"


def test_verbosity_flags_after_the_subcommand(tmp_path, capsys):
    cfg = write(tmp_path, QUICKSTART)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--rounds", "1", "--out", str(out), "-q", "-v"]) == 0
    assert (out / "summary.json").exists()


def test_a_run_in_which_no_round_aggregated_anything_fails():
    aborted = History([RoundRecord(round=1, aborted="cryptographic protocol aborted"),
                       RoundRecord(round=2, declined={"c": "budget 1.0 exceeded"})])
    reason = failure(aborted)
    assert reason is not None and "none of the 2 rounds" in reason and "budget" in reason
    assert failure(History([RoundRecord(round=1, clients=["a"])])) is None


def test_sampler_and_threat_checker_agree_on_clients_per_round():
    # ceil(0.28 * 25) is ceil(7.000000000000001) in floating point: the rule says 7
    assert clients_per_round(25, count=None, fraction=0.28) == 7
    ids = [f"c{i}" for i in range(25)]
    assert len(Sampler(fraction=0.28)(ids, np.random.default_rng(0))) == 7
    text = QUICKSTART.replace("num_clients = 10", "num_clients = 25").replace(
        "[server]\n", "[server]\nfraction = 0.28\n")
    import tomllib

    assert facts(config_from_dict(tomllib.loads(text))).clients_per_round == 7


def test_threat_checker_takes_secagg_degree_and_threshold_from_the_graph():
    # neighbours = 3 at n = 5: the Harary graph raises an odd k with odd n to k = 4, t = 3
    from securefl.secagg.graph import degree, threshold_for
    from securefl.threat.controls import secagg_share_threshold
    from securefl.threat.model import load_threat_model

    text = QUICKSTART.replace("num_clients = 10", "num_clients = 5")
    import tomllib

    table = tomllib.loads(text)
    table["protection"] = {"kind": "secagg", "secagg": {"neighbours": 3}}
    known = facts(config_from_dict(table))
    assert known.clients_per_round == 5
    model = load_threat_model("honest-but-curious-server")
    assert secagg_share_threshold(known, model) == (4, 3)
    assert (degree(5, neighbours=3), threshold_for(4, fraction=0.5)) == (4, 3)


def test_folders_that_are_not_runs_get_the_reason(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["privacy", "report", str(missing)]) == 2
    assert one_line_error(capsys) == f"securefl: error: {missing}: no such folder"
    assert main(["audit", "verify", str(missing)]) == 1
    assert capsys.readouterr().out.strip() == f"audit log FAILED: {missing}: no such folder"
    simulation = tmp_path / "sim"
    simulation.mkdir()
    (simulation / "summary.json").write_text("{}")
    assert main(["audit", "verify", str(simulation)]) == 1
    assert "only a networked server (securefl server) writes one; an in-process simulation " \
           "(securefl run) does not" in capsys.readouterr().out
