"""A site's own files: CSV and Parquet tables, NumPy ``.npz`` archives and image folders.

Each loader reads one source, checks it with :func:`securefl.data.own.as_dataset` (finite
numbers, integer labels in range) and returns the :class:`Dataset` with a
:class:`FileRecord` (file name, rows, SHA-256 of the bytes read) for the run directory's
provenance.  Problems are one :class:`~securefl.errors.DataError` line naming the file and
the column.

CSV: the first row is the header and rows are numbered as in the file (the header is row
1); ``label`` names the label column (integer class codes),
``features`` the feature columns (default: every other column).  Categorical columns are
not guessed: a non-numeric value is an error naming its row and column; encode categories
as numeric codes, the same at every site, before federating (codes a site computed from its
own file would differ between sites and silently mean different things).
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from securefl.data.datasets import Dataset
from securefl.data.own import as_dataset
from securefl.errors import DataError

__all__ = ["FileRecord", "load_csv", "load_image_folder", "load_npz", "load_parquet",
           "load_source"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


@dataclass(frozen=True)
class FileRecord:
    name: str
    rows: int
    sha256: str


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None


def _columns(path: Path, header: list[str], *, label: str,
             features: tuple[str, ...]) -> tuple[str, ...]:
    """The feature columns of a table with columns ``header`` (default: all but ``label``)."""
    if label not in header:
        raise DataError(f"{path}: no label column {label!r} (columns: {', '.join(header)})")
    chosen = tuple(features) or tuple(h for h in header if h != label)
    missing = [c for c in chosen if c not in header]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(header)})")
    if label in chosen:
        raise DataError(f"{path}: column {label!r} is the label; it cannot also be a feature")
    return chosen


def load_csv(path: str | Path, *, label: str = "label", features: tuple[str, ...] = (),
             num_classes: int | None = None) -> tuple[Dataset, FileRecord]:
    """A CSV table with a header row; see the module docstring for the rules."""
    path = Path(path)
    raw = _read(path)
    try:
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a UTF-8 CSV file ({exc})") from None
    while rows and not rows[-1]:  # trailing blank lines
        rows.pop()
    if not rows:
        raise DataError(f"{path}: empty file (no header row)")
    header = [h.strip() for h in rows[0]]
    chosen = _columns(path, header, label=label, features=features)
    body = rows[1:]
    if not body:
        raise DataError(f"{path}: no data rows below the header")
    index = [header.index(c) for c in (*chosen, label)]
    table = np.empty((len(body), len(index)), dtype=np.float64)
    for r, row in enumerate(body):
        if len(row) != len(header):
            raise DataError(f"{path}: row {r + 2} has {len(row)} fields, the header "
                            f"{len(header)}")
        for j, i in enumerate(index):
            text = row[i].strip()
            try:
                table[r, j] = float(text) if text else np.nan
            except ValueError:
                raise DataError(f"{path}: column {header[i]!r}, row {r + 2}: {text!r} is not "
                                "a number (encode categories as numeric codes)") from None
    data = as_dataset(table[:, :-1], table[:, -1], name=str(path), num_classes=num_classes,
                      columns=chosen, label_column=label, first_row=2)
    return data, FileRecord(path.name, len(data), hashlib.sha256(raw).hexdigest())


def load_parquet(path: str | Path, *, label: str = "label", features: tuple[str, ...] = (),
                 num_classes: int | None = None) -> tuple[Dataset, FileRecord]:
    """A Parquet table (needs pyarrow: ``pip install 'securefl[parquet]'``), with the CSV
    rules: ``label`` and ``features`` name columns, and every chosen column must hold numbers
    (integer, floating point or boolean; a string or dictionary-encoded, i.e. categorical,
    column is refused, as are nulls and NaN).  Rows are numbered from 0."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow; install it with "
                        "pip install 'securefl[parquet]'") from None
    path = Path(path)
    raw = _read(path)
    try:
        table = pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowException, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a readable Parquet file ({reason})") from None
    chosen = _columns(path, list(table.column_names), label=label, features=features)
    if table.num_rows == 0:
        raise DataError(f"{path}: no data rows (empty table)")
    columns = []
    for name in (*chosen, label):
        column = table.column(name)
        kind = column.type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)
                or pa.types.is_boolean(kind)):
            row = pc.index(pc.is_valid(column), True).as_py()
            value = column[row].as_py() if row >= 0 else None
            raise DataError(f"{path}: column {name!r}, row {max(row, 0)}: {str(value)[:40]!r} "
                            f"is not a number (the column holds {kind}; encode categories as "
                            "numeric codes)")
        columns.append(column.cast(pa.float64()).to_numpy(zero_copy_only=False))
    table_values = np.stack(columns, axis=1)
    data = as_dataset(table_values[:, :-1], table_values[:, -1], name=str(path),
                      num_classes=num_classes, columns=chosen, label_column=label)
    return data, FileRecord(path.name, len(data), hashlib.sha256(raw).hexdigest())


def load_npz(path: str | Path, *, num_classes: int | None = None) -> tuple[Dataset, FileRecord]:
    """A ``.npz`` archive with arrays ``features`` (N, ...) and ``labels`` (N,), read with
    ``allow_pickle=False`` (no code from the file runs)."""
    path = Path(path)
    raw = _read(path)
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            names = set(archive.files)
            if not {"features", "labels"} <= names:
                raise DataError(f"{path}: needs arrays 'features' and 'labels', has "
                                f"{sorted(names)}")
            x, y = archive["features"], archive["labels"]
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from None
    data = as_dataset(x, y, name=str(path), num_classes=num_classes, label_column="labels")
    return data, FileRecord(path.name, len(data), hashlib.sha256(raw).hexdigest())


def load_image_folder(path: str | Path, *, size: tuple[int, int] | None = None,
                      max_images: int = 200_000) -> tuple[Dataset, FileRecord]:
    """One sub-folder per class (sorted names are classes 0, 1, ...), images as grey or RGB
    pixels in [0, 1], shape (N, channels, height, width).  Every image must have the first
    image's size and mode unless ``size`` (height, width) resizes them all."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: no such image folder")
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"{root}: needs one sub-folder per class (at least 2), found "
                        f"{len(classes)}")
    digest = hashlib.sha256()
    images: list[np.ndarray] = []
    labels: list[int] = []
    for code, folder in enumerate(classes):
        for file in sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
            raw = _read(file)
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + raw)
            try:
                with Image.open(io.BytesIO(raw)) as opened:
                    img = opened.convert("L" if opened.mode in ("1", "L", "I", "F") else "RGB")
                    if size is not None:
                        img = img.resize((size[1], size[0]))
                    pixels = np.asarray(img, dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"{file}: not a readable image ({exc})") from None
            pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
            if images and pixels.shape != images[0].shape:
                raise DataError(f"{file}: shape {pixels.shape} differs from the first image's "
                                f"{images[0].shape} (set size to resize)")
            images.append(pixels)
            labels.append(code)
            if len(images) > max_images:
                raise DataError(f"{root}: more than {max_images} images")
    if not images:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    data = as_dataset(np.stack(images), np.asarray(labels), name=str(root),
                      num_classes=len(classes), label_column="folder")
    return data, FileRecord(root.name, len(data), digest.hexdigest())


def load_source(kind: str, path: str | Path, *, label: str, features: tuple[str, ...],
                num_classes: int | None) -> tuple[Dataset, FileRecord]:
    """Dispatch on ``[data] dataset``: ``"csv"``, ``"parquet"``, ``"npz"`` or
    ``"image_folder"``."""
    if kind == "csv":
        return load_csv(path, label=label, features=features, num_classes=num_classes)
    if kind == "parquet":
        return load_parquet(path, label=label, features=features, num_classes=num_classes)
    if kind == "npz":
        return load_npz(path, num_classes=num_classes)
    return load_image_folder(path)
