"""Loading user data: CSV (header row, numeric columns), .npy and .npz arrays, read locally."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_array(path: str | Path, *, name: str = "data") -> np.ndarray:
    """Read a numeric array from ``.csv`` (one header row), ``.npy`` or ``.npz`` (first array).

    Errors name ``name`` and the path. NaN entries in a CSV (empty cells) are kept as NaN, for
    families that handle missing values; the families' own checks reject them otherwise.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".npy", ".npz", ".csv", ".txt"):
        raise ValueError(f"{name}: unsupported file type {suffix!r} (use .csv, .npy or .npz)")
    if not p.exists():
        raise FileNotFoundError(f"{name}: no such file {str(p)!r}")
    if suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
    elif suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            if not z.files:
                raise ValueError(f"{name}: {str(p)!r} holds no arrays")
            arr = z[z.files[0]]
    else:
        import pandas as pd

        df = pd.read_csv(p)
        bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
        if bad:
            raise ValueError(f"{name}: non-numeric column(s) {bad} in {str(p)!r}")
        arr = df.to_numpy(dtype=np.float64)
    if arr.size == 0:
        raise ValueError(f"{name}: {str(p)!r} is empty")
    return arr
