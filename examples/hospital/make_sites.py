"""Write three hospitals' own CSV files (and the server's test file) for this example.

    python examples/hospital/make_sites.py        # writes examples/hospital/sites/*.csv

The records are the Wisconsin breast-cancer set that scikit-learn ships (569 patients, 30
measurements, ``benign`` = 1 or 0), held out 20 % (stratified) as the server's
``test.csv`` and split unevenly (45 %, 33 %, 22 %) over ``site-a``, ``site-b`` and
``site-c``.  Each file's measurement columns are standardised with that file's own mean
and standard deviation, as each hospital would do on its own records (no statistic leaves
a site).  Nothing is downloaded; the split is seeded, so the files are the same every time.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

SITES = {"site-a": 0.45, "site-b": 0.33, "site-c": 0.22}


def main(out: Path = Path(__file__).parent / "sites") -> list[Path]:
    from sklearn.datasets import load_breast_cancer

    table = load_breast_cancer()
    names = [n.replace(" ", "_") for n in table.feature_names]
    x, y = table.data, table.target
    rng = np.random.default_rng(19)
    test, rest = [], []
    for label in (0, 1):  # stratified 20 % test split
        idx = rng.permutation(np.flatnonzero(y == label))
        cut = round(0.2 * len(idx))
        test += list(idx[:cut])
        rest += list(idx[cut:])
    rest = list(rng.permutation(rest))
    cuts = np.cumsum([round(f * len(rest)) for f in SITES.values()])[:-1]
    parts = dict(zip(SITES, np.split(np.array(rest), cuts), strict=True))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, idx in {**parts, "test": np.array(test)}.items():
        features = x[idx]
        scaled = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-8)
        path = out / f"{name}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([*names, "benign"])
            for row, label in zip(scaled, y[idx], strict=True):
                writer.writerow([f"{v:.6g}" for v in row] + [int(label)])
        written.append(path)
        print(f"{path}: {len(idx)} records")
    return written


if __name__ == "__main__":
    main()
