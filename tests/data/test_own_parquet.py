"""A site's own Parquet table: the CSV loader's rules, and a loud line without pyarrow."""

from __future__ import annotations

import builtins
import textwrap

import numpy as np
import pytest

from securefl.config import load_config
from securefl.data import federate
from securefl.data.files import load_parquet
from securefl.errors import DataError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def write(path, **columns):
    pq.write_table(pa.table(columns), path)
    return path


def good(rows: int = 6) -> dict:
    return {"age": np.arange(rows, dtype=np.int64), "size": np.linspace(0, 1, rows),
            "label": np.arange(rows) % 2}


@pytest.mark.parametrize(("columns", "options", "pattern"), [
    (good(), {"label": "outcome"}, r"no label column 'outcome' \(columns: age, size, label\)"),
    (good(), {"features": ("age", "weight")}, r"no column 'weight'"),
    ({**good(3), "size": ["1", "big", "3"]}, {},
     r"column 'size', row 0: '1' is not a number \(the column holds string; encode"),
    ({**good(3), "size": pa.array(["a", "b", "a"]).dictionary_encode()}, {},
     r"column 'size', row 0: 'a' is not a number \(the column holds dictionary"),
    ({**good(3), "size": pa.array([1.0, None, 2.0])}, {},
     r"column 'size', row 1: missing or non-finite value"),
    ({**good(3), "age": pa.array([1, 2, None])}, {},
     r"column 'age', row 2: missing or non-finite value"),
    ({**good(3), "size": [1.0, float("nan"), 2.0]}, {},
     r"column 'size', row 1: missing or non-finite value"),
    ({k: v[:0] for k, v in good().items()}, {}, r"no data rows \(empty table\)"),
    ({**good(3), "label": [0, 1, 2]}, {"num_classes": 2},
     r"label column 'label', row 2: label 2 is out of range 0\.\.1"),
    ({**good(3), "label": [0.0, 1.5, 1.0]}, {}, r"row 1: 1\.5 is not an integer class code"),
], ids=["label", "column", "string", "categorical", "null", "int-null", "nan", "empty",
        "range", "fraction"])
def test_bad_parquet_is_one_line_naming_file_and_column(tmp_path, columns, options, pattern):
    path = write(tmp_path / "site.parquet", **columns)
    with pytest.raises(DataError, match=pattern) as info:
        load_parquet(path, **options)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_parquet_converts_float64_and_ints_and_records_the_file(tmp_path):
    path = write(tmp_path / "site.parquet", **good(6))
    data, record = load_parquet(path)
    assert data.features.dtype == np.float32 and data.labels.dtype == np.int64
    np.testing.assert_allclose(data.features[:, 1], np.linspace(0, 1, 6), rtol=1e-6)
    np.testing.assert_array_equal(data.features[:, 0], np.arange(6))
    np.testing.assert_array_equal(data.labels, [0, 1, 0, 1, 0, 1])
    assert (record.name, record.rows, len(record.sha256)) == ("site.parquet", 6, 64)
    chosen, _ = load_parquet(path, features=("size",))
    assert chosen.shape == (1,)


def test_not_parquet_and_missing_file_are_one_line(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"age,size,label\n1,2,0\n")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable Parquet file") as info:
        load_parquet(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"no such data file"):
        load_parquet(tmp_path / "absent.parquet")


def test_without_pyarrow_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    real = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.split(".")[0] == "pyarrow":
            raise ImportError("No module named 'pyarrow'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(DataError, match=r"site.parquet: reading Parquet needs pyarrow; install "
                                        r"it with pip install 'securefl\[parquet\]'"):
        load_parquet(tmp_path / "site.parquet")


def test_toml_parquet_one_file_per_site(tmp_path):
    rng = np.random.default_rng(0)
    for site in ("a", "b"):
        x = rng.normal(size=(40, 3))
        write(tmp_path / f"site-{site}.parquet", f0=x[:, 0], f1=x[:, 1], f2=x[:, 2],
              label=(x[:, 0] > 0).astype(np.int8))
    (tmp_path / "run.toml").write_text(textwrap.dedent("""
        [data]
        dataset = "parquet"
        path = "site-*.parquet"
        partition = "files"
        num_clients = 2
        num_classes = 2
    """))
    data = federate(load_config(tmp_path / "run.toml").data, seed=0)
    assert sorted(data.clients) == ["site-a", "site-b"] and data.shape == (3,)
    assert [f.rows for f in data.files] == [40, 40]
