"""A site's own files (CSV, .npz, image folder) and [model] factory, by TOML reference."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from PIL import Image

from securefl.config import load_config
from securefl.data import federate
from securefl.data.files import load_csv, load_image_folder, load_npz
from securefl.errors import ConfigError, DataError
from securefl.simulation import run_simulation

HEADER = "age,size,label\n"


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize(("body", "options", "pattern"), [
    (HEADER + "1,2,0\n", {"label": "outcome"}, r"no label column 'outcome' \(columns: age, "),
    (HEADER + "1,2,0\n", {"features": ("age", "weight")}, r"no column 'weight'"),
    (HEADER + "1,2,0\n40,big,1\n", {}, r"column 'size', row 3: 'big' is not a number"),
    (HEADER + "1,2,0\n40,,1\n", {}, r"column 'size', row 3: missing or non-finite value"),
    (HEADER + "1,nan,0\n", {}, r"column 'size', row 2: missing or non-finite value"),
    ("", {}, r"empty file \(no header row\)"),
    (HEADER, {}, r"no data rows below the header"),
    (HEADER + "1,2,0\n3,4,2\n", {"num_classes": 2}, r"label column 'label', row 3: label 2 is "
                                                    r"out of range 0\.\.1"),
    (HEADER + "1,2,0\n3,4,1.5\n", {}, r"row 3: 1\.5 is not an integer class code"),
    (HEADER + "1,2,0\n3,4\n", {}, r"row 3 has 2 fields, the header 3"),
])
def test_bad_csv_is_one_line_naming_file_and_column(tmp_path, body, options, pattern):
    path = write(tmp_path / "site.csv", body)
    with pytest.raises(DataError, match=pattern) as info:
        load_csv(path, **options)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_csv_reads_numbers_and_records_the_file(tmp_path):
    path = write(tmp_path / "site.csv", HEADER + "1,2.5,0\n3,4,1\n5,6,1\n")
    data, record = load_csv(path, features=("size",))
    np.testing.assert_array_equal(data.features, np.array([[2.5], [4], [6]], np.float32))
    np.testing.assert_array_equal(data.labels, [0, 1, 1])
    assert (record.name, record.rows, len(record.sha256)) == ("site.csv", 3, 64)
    assert data.features.dtype == np.float32 and data.num_classes == 2


def test_npz_float64_is_converted_and_bad_archives_are_one_line(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ok.npz", features=rng.normal(size=(30, 4)),  # float64
             labels=np.arange(30) % 3)
    data, record = load_npz(tmp_path / "ok.npz")
    assert data.features.dtype == np.float32 and data.num_classes == 3 and record.rows == 30
    np.savez(tmp_path / "keys.npz", x=np.zeros((2, 2)), y=np.zeros(2))
    with pytest.raises(DataError, match=r"keys.npz: needs arrays 'features' and 'labels'"):
        load_npz(tmp_path / "keys.npz")
    np.savez(tmp_path / "nan.npz", features=np.array([[1.0, np.nan]]), labels=np.array([1]))
    with pytest.raises(DataError, match=r"nan.npz: index \[1\], row 0: missing"):
        load_npz(tmp_path / "nan.npz")
    np.savez(tmp_path / "obj.npz", features=np.array([["a"]], dtype=object), labels=[0])
    with pytest.raises(DataError, match=r"obj.npz: not a readable .npz archive"):
        load_npz(tmp_path / "obj.npz")  # object arrays need pickle, which is refused
    write(tmp_path / "empty.npz", "")
    with pytest.raises(DataError, match=r"empty.npz: not a readable"):
        load_npz(tmp_path / "empty.npz")


def test_image_folder_one_sub_folder_per_class(tmp_path):
    for code, name in enumerate(("benign", "malignant")):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((6, 5), 40 * code + i, np.uint8)).save(
                tmp_path / name / f"{i}.png")
    data, record = load_image_folder(tmp_path)
    assert record.rows == 6 and len(record.sha256) == 64
    assert data.features.shape == (6, 1, 6, 5) and data.num_classes == 2
    np.testing.assert_array_equal(data.labels, [0, 0, 0, 1, 1, 1])
    assert data.features[4, 0, 0, 0] == pytest.approx(41 / 255)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "benign" / "odd.png")
    with pytest.raises(DataError, match=r"odd.png: shape \(1, 4, 4\) differs"):
        load_image_folder(tmp_path)
    (tmp_path / "benign" / "odd.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"odd.png: not a readable image"):
        load_image_folder(tmp_path)


FACTORY = '''
import torch

def tabular(in_shape, num_classes):
    return torch.nn.Sequential(torch.nn.Linear(in_shape[0], 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, num_classes))
'''


def site_config(tmp_path, *, factory="sitemodels:tabular", extra=""):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(160, 3))
    y = (x[:, 0] > 0).astype(int)
    (tmp_path / "data").mkdir(exist_ok=True)
    write(tmp_path / "data" / "site.csv", "a,b,c,outcome\n" + "".join(
        f"{r[0]},{r[1]},{r[2]},{t}\n" for r, t in zip(x, y, strict=True)))
    write(tmp_path / "sitemodels.py", FACTORY)
    return write(tmp_path / "site.toml", textwrap.dedent(f"""
        [run]
        rounds = 3
        [data]
        dataset = "csv"
        path = "data/site.csv"
        label = "outcome"
        num_classes = 2
        num_clients = 3
        partition = "iid"
        [model]
        factory = "{factory}"
        [client]
        lr = 0.2
        {extra}
    """))


def test_toml_csv_and_factory_resolve_from_the_config_folder(tmp_path, monkeypatch):
    path = site_config(tmp_path)
    monkeypatch.chdir(tmp_path / "data")  # paths resolve from the config, not the cwd
    config = load_config(path)
    assert config.model.name == "factory" and config.model.path == str(tmp_path)
    assert config.data.path == str(tmp_path / "data" / "site.csv")
    result = run_simulation(config, out_dir=tmp_path / "run")
    assert result.history.final.accuracy > 0.7
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert prov["model"]["source"] == "import sitemodels:tabular"
    assert prov["model"]["parameters"] == 3 * 16 + 16 + 16 * 2 + 2
    assert prov["data"]["files"][0]["name"] == "site.csv"
    assert prov["data"]["files"][0]["rows"] == 160 and len(prov["data"]["clients"]) == 3
    recorded = (tmp_path / "run" / "config.toml").read_text()
    assert 'factory = "sitemodels:tabular"' in recorded and 'dataset = "csv"' in recorded


@pytest.mark.parametrize(("factory", "pattern"), [
    ("nowhere:tabular", r"\[model\] factory 'nowhere:tabular': cannot import 'nowhere'"),
    ("sitemodels:missing", r"'sitemodels' has no 'missing'"),
])
def test_bad_factory_is_one_line(tmp_path, factory, pattern):
    config = load_config(site_config(tmp_path, factory=factory))
    with pytest.raises(ConfigError, match=pattern):
        run_simulation(config)


def test_factory_syntax_and_missing_path_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"\[model\] factory must be \"package.module:"):
        load_config(site_config(tmp_path, factory="sitemodels.tabular"))
    path = write(tmp_path / "nopath.toml", '[data]\ndataset = "csv"\n')
    with pytest.raises(ConfigError, match=r"nopath.toml: \[data\] path is required"):
        load_config(path)


def test_test_path_is_the_held_out_set(tmp_path):
    path = site_config(tmp_path)
    write(tmp_path / "data" / "test.csv", "a,b,c,outcome\n1,0,0,1\n-1,0,0,0\n")
    config = load_config(path)
    config = config.replace(data__test_path=str(tmp_path / "data" / "test.csv"))
    fed = federate(config.data, seed=0)
    assert len(fed.test) == 2 and [f.name for f in fed.files] == ["site.csv", "test.csv"]
    assert sum(len(c.train) + len(c.val) for c in fed.clients.values()) == 160


def test_one_file_per_site_makes_one_client_per_file(tmp_path):
    (tmp_path / "sites").mkdir()
    for name, rows in (("site-a", 30), ("site-b", 20), ("site-c", 10)):
        write(tmp_path / "sites" / f"{name}.csv", "a,b,label\n" + "".join(
            f"{i},{i % 3},{i % 2}\n" for i in range(rows)))
    path = write(tmp_path / "files.toml", textwrap.dedent("""
        [data]
        dataset = "csv"
        path = "sites/site-*.csv"
        partition = "files"
        num_clients = 3
        test_fraction = 0.2
    """))
    config = load_config(path)
    fed = federate(config.data, seed=0)
    assert sorted(fed.clients) == ["site-a", "site-b", "site-c"]
    sizes = {c: len(d.train) + len(d.val) for c, d in fed.clients.items()}
    assert sizes == {"site-a": 24, "site-b": 16, "site-c": 8} and len(fed.test) == 12
    assert [f.rows for f in fed.files] == [30, 20, 10]
    wrong = config.replace(data__num_clients=4)
    with pytest.raises(DataError, match=r"matches 3 files, but num_clients = 4"):
        federate(wrong.data, seed=0)
    with pytest.raises(ConfigError, match=r"\[data\] partition = \"files\" needs dataset"):
        load_config(write(tmp_path / "bad.toml", '[data]\npartition = "files"\n'))
