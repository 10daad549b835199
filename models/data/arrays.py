"""Loading user data: CSV / text tables and .npy / .npz arrays, read locally, never unpickled.

Rules (each violation is an error whose message starts with the field name, ``name``):

* the path must be an existing, readable regular file ending in ``.csv``, ``.txt``, ``.npy`` or
  ``.npz`` (``OSError`` subclasses for missing, directory and unreadable; ``ValueError`` else);
* ``.csv`` is comma-separated, ``.txt`` separated by commas and/or whitespace. The first row is a
  header when at least one of its fields is not a number; a first row of numbers is data (it is
  never dropped as a header). Every other row must have as many fields as the first (a ragged
  table is an error, not missing values) and hold numbers; empty cells and ``NA``/``NaN``/``null``
  are missing values (NaN). Complex numbers are an error (never a dropped imaginary part);
* ``.npy`` must hold a real numeric or boolean array (no pickles, object, string, structured or
  complex arrays); ``.npz`` must hold exactly one such array once ``exclude`` is set aside, or
  one named ``key``, ``"x"`` or ``"data"``;
* infinite values are an error; NaN only when ``allow_nan``; an empty table is an error.
"""

from __future__ import annotations

import csv
import math
import os
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SUFFIXES = (".csv", ".txt", ".npy", ".npz")
#: cell texts read as a missing value (case-insensitive), besides the empty cell
MISSING = frozenset({"", "na", "nan", "n/a", "null", "none", "-nan"})
#: names picked from an .npz holding several arrays
DATA_KEYS = ("x", "data")


def load_array(
    path: str | os.PathLike,
    *,
    name: str = "data",
    key: str | None = None,
    exclude: Sequence[str] = (),
    allow_nan: bool = True,
    ndim: int | Sequence[int] | None = None,
) -> np.ndarray:
    """Read a real numeric array from ``path`` (see the module docstring for the rules).

    ``key``: the array of an ``.npz`` to read; ``exclude``: names of an ``.npz`` set aside (e.g.
    labels); ``ndim``: the allowed numbers of dimensions. CSV/text tables come back as float64
    ``(rows, columns)``; arrays keep their dtype (booleans become float64).
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{name}: expected a file path, got {type(path).__name__}")
    p = Path(path)
    if str(path) == "":
        raise ValueError(f"{name}: empty file path")
    if p.is_dir():
        raise IsADirectoryError(f"{name}: {str(p)!r} is a directory, expected a .csv, .npy or .npz file")
    if not p.exists():
        raise FileNotFoundError(f"{name}: no such file {str(p)!r}")
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        kind = f"type {suffix!r}" if suffix else "name without an extension"
        raise ValueError(f"{name}: unsupported file {kind} for {str(p)!r} (use .csv, .txt, .npy or .npz)")
    if not p.is_file():
        raise ValueError(f"{name}: {str(p)!r} is not a regular file")
    try:
        if suffix in (".csv", ".txt"):
            arr = _read_table(p, name, suffix)
        else:
            arr = _read_numpy(p, name, suffix, key, tuple(exclude))
    except PermissionError as exc:
        raise PermissionError(f"{name}: cannot read {str(p)!r} (permission denied)") from exc
    except IsADirectoryError as exc:  # pragma: no cover - raced with the check above
        raise IsADirectoryError(f"{name}: {str(p)!r} is a directory") from exc
    return _check(arr, p, name, allow_nan, ndim)


def _check(arr: np.ndarray, p: Path, name: str, allow_nan: bool, ndim) -> np.ndarray:
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float64)
    if np.iscomplexobj(arr):
        raise ValueError(f"{name}: {str(p)!r} holds complex values (dtype {arr.dtype}); "
                         "store the real and imaginary parts as separate columns")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name}: {str(p)!r} holds non-numeric values (dtype {arr.dtype})")
    if arr.size == 0:
        raise ValueError(f"{name}: {str(p)!r} is empty (shape {arr.shape})")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if arr.ndim not in allowed:
            want = " or ".join(map(str, allowed))
            raise ValueError(f"{name}: expected {want} dimensions, {str(p)!r} holds shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        inf = np.isinf(arr)
        if inf.any():
            where = np.argwhere(inf)[0].tolist()
            raise ValueError(f"{name}: {str(p)!r} holds {int(inf.sum())} infinite value(s) "
                             f"(first at index {where})")
        if not allow_nan and np.isnan(arr).any():
            where = np.argwhere(np.isnan(arr))[0].tolist()
            raise ValueError(f"{name}: {str(p)!r} holds {int(np.isnan(arr).sum())} NaN value(s) "
                             f"(first at index {where})")
    return arr


# ----------------------------------------------------------------------------- numpy files


def _read_numpy(p: Path, name: str, suffix: str, key, exclude) -> np.ndarray:
    try:
        obj = np.load(p, allow_pickle=False)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
        if isinstance(exc, PermissionError):
            raise
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ValueError(f"{name}: {str(p)!r} is not a numeric {suffix} file ({reason})") from exc
    if isinstance(obj, np.ndarray):
        if suffix == ".npz":  # an .npy payload under an .npz name: one array, unambiguous
            return obj
        return _structured(obj, p, name)
    with obj as z:
        files = list(z.files)
        if key is not None:
            if key not in files:
                raise ValueError(f"{name}: {str(p)!r} holds no array named {key!r} (it holds {files})")
            chosen = key
        else:
            candidates = [f for f in files if f not in exclude]
            if not candidates:
                raise ValueError(f"{name}: {str(p)!r} holds no data array (it holds {files})")
            named = [f for f in DATA_KEYS if f in candidates]
            if len(candidates) == 1:
                chosen = candidates[0]
            elif named:
                chosen = named[0]
            else:
                raise ValueError(
                    f"{name}: {str(p)!r} holds several arrays {candidates}; keep one, or name the "
                    f"data array {DATA_KEYS[0]!r}")
        try:
            arr = z[chosen]
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            reason = str(exc).splitlines()[0][:120]
            raise ValueError(f"{name}: array {chosen!r} of {str(p)!r} cannot be read ({reason})") from exc
    return _structured(arr, p, name)


def _structured(arr: np.ndarray, p: Path, name: str) -> np.ndarray:
    if arr.dtype.names is not None:
        raise ValueError(f"{name}: {str(p)!r} holds a structured array (fields {arr.dtype.names}); "
                         "save a plain numeric array")
    return arr


# ----------------------------------------------------------------------------- tables


def _read_table(p: Path, name: str, suffix: str) -> np.ndarray:
    try:
        with open(p, encoding="utf-8-sig", newline="") as f:
            if suffix == ".csv":
                rows = [(i, r) for i, r in enumerate(csv.reader(f, skipinitialspace=True), 1)]
            else:
                rows = [(i, re.split(r"[,\s]+", line.strip())) for i, line in enumerate(f, 1)]
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name}: {str(p)!r} is not a UTF-8 text table") from exc
    except csv.Error as exc:
        raise ValueError(f"{name}: {str(p)!r} is not a readable CSV table ({exc})") from exc
    rows = [(i, r) for i, r in rows if any(c.strip() for c in r)]  # blank lines
    if not rows:
        raise ValueError(f"{name}: {str(p)!r} is empty")
    first_line, first = rows[0]
    width = len(first)
    for line, r in rows:
        if len(r) != width:
            raise ValueError(f"{name}: {str(p)!r} is ragged: line {line} has {len(r)} field(s), "
                             f"line {first_line} has {width}")
    parsed_first = [_cell(c) for c in first]
    for c, v in zip(first, parsed_first):  # a complex number is data, never a column name
        if v is None and "complex" in _why(c):
            raise ValueError(f"{name}: {str(p)!r} line {first_line}: {_why(c)}")
    header = any(v is None for v in parsed_first)
    columns = [c.strip() for c in first] if header else [str(j) for j in range(width)]
    body = rows[1:] if header else rows
    if not body:
        raise ValueError(f"{name}: {str(p)!r} has a header row ({', '.join(columns)[:80]}) but no "
                         "data rows")
    out = np.empty((len(body), width), dtype=np.float64)
    for r_i, (line, r) in enumerate(body):
        for j, c in enumerate(r):
            v = _cell(c)
            if v is None:
                raise ValueError(f"{name}: {str(p)!r} line {line}, column {columns[j]!r}: "
                                 f"{_why(c)}")
            out[r_i, j] = v
    return out


def _cell(text: str) -> float | None:
    """The number in a cell (NaN for a missing value), or None if it is not a real number."""
    t = text.strip()
    if t.lower() in MISSING:
        return math.nan
    try:
        return float(t)
    except ValueError:
        return None


def _why(text: str) -> str:
    t = text.strip()
    try:
        if not any(ch.isdigit() for ch in t):
            raise ValueError
        complex(t.replace(" ", "").replace("i", "j"))
    except ValueError:
        return f"{t[:40]!r} is not a number"
    return f"{t[:40]!r} is a complex number; only real values are supported"


__all__ = ["DATA_KEYS", "MISSING", "SUFFIXES", "load_array"]
