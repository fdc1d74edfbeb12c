import tomllib

import pytest

from securefl.build import config_from_dict, load_config
from securefl.config import Config
from securefl.errors import ConfigError


def err(table, source="x.toml"):
    with pytest.raises(ConfigError) as info:
        config_from_dict(table, source=source)
    return str(info.value)


def test_examples_load():
    cfg = load_config("examples/quickstart.toml")
    assert cfg.data.dataset == "digits" and cfg.data.num_clients == 10
    assert cfg.data.alpha == 0.5 and cfg.run.rounds == 20


def test_error_names_file_table_field_and_allowed():
    assert err({"data": {"alpha": -1}}) == "x.toml: [data] alpha must be > 0, got -1.0"
    assert err({"data": {"partition": "x"}}).startswith(
        "x.toml: [data] partition must be one of 'iid', 'dirichlet', 'shards'")
    assert err({"client": {"epochs": "two"}}) == "x.toml: [client] epochs must be int, got 'two'"


def test_unknown_keys_and_tables_are_errors():
    assert "alpah is not a known key" in err({"data": {"alpah": 0.5}})
    assert "[] dat" not in err({"dat": {}}) and "dat is not a known key" in err({"dat": {}})


def test_robust_rule_with_hidden_updates_is_refused():
    message = err({"protection": {"kind": "secagg"}, "aggregation": {"rule": "median"}})
    assert "[aggregation]" in message


def test_unknown_rule():
    assert "unknown rule 'nope'" in err({"aggregation": {"rule": "nope"}})


def test_missing_folder_dataset_needs_path():
    assert "[data] path is required" in err({"data": {"dataset": "mnist"}})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nrounds = 2")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_resolved_toml_round_trips():
    cfg = config_from_dict({"data": {"alpha": 0.3}, "model": {"hidden": [8, 4]}})
    assert config_from_dict(tomllib.loads(cfg.to_toml())) == cfg
    assert Config().replace(run__rounds=3).run.rounds == 3
