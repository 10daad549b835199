"""How the report writes a CSV's cells and rows: rounding noise shown as 0, numbers to
significant digits, each fit's row label; and how it reads a cell as true or finite."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

#: |v| below this fraction of the largest |v| of its column prints as 0 (float64 rounding
#: leaves ~1e-15 relative; a real difference this small would not be resolved by any estimate)
RELATIVE_NOISE = 1e-9
#: ... or below this fraction of the largest |v| of the whole table (a column of noise only)
TABLE_NOISE = 1e-12


def noise_tolerance(df: pd.DataFrame) -> dict[str, float]:
    """{float column: tolerance}: a value with 0 < |v| < tolerance is rounding noise, shown as
    0. tolerance = max(RELATIVE_NOISE x the column's largest |v|, TABLE_NOISE x the table's)."""
    floats = [c for c in df.columns if pd.api.types.is_float_dtype(df[c])]
    scale = {}
    for c in floats:
        v = np.abs(df[c].to_numpy(dtype=np.float64))
        v = v[np.isfinite(v)]
        scale[c] = float(v.max()) if v.size else 0.0
    table = max(scale.values(), default=0.0)
    return {c: max(RELATIVE_NOISE * s, TABLE_NOISE * table) for c, s in scale.items()}


def denoise(v, tol: float):
    """``v``, or 0.0 when it is rounding noise (0 < |v| < tol)."""
    if isinstance(v, float | np.floating) and math.isfinite(v) and 0 < abs(v) < tol:
        return 0.0
    return v


def num(v, digits: int = 4) -> str:
    """``v`` to ``digits`` significant digits ("0" for zero, "—" for NaN)."""
    if v is None or (isinstance(v, float | np.floating) and math.isnan(v)):
        return "—"
    if v == 0:
        return "0"
    return f"{v:.{digits}g}"


def fmt(v, zero_below: float = 0.0) -> str:
    """One cell: integers as such, floats to 7 significant digits (4 below 1), NaN as "—"; a
    float with 0 < |v| < ``zero_below`` is rounding noise and prints as 0
    (:func:`noise_tolerance` gives a table's tolerances)."""
    if v is None or (isinstance(v, float | np.floating) and math.isnan(v)):
        return "—"
    if isinstance(v, bool | np.bool_):
        return str(bool(v))
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        v = denoise(v, zero_below)
        if v == 0:
            return "0"
        return f"{v:.7g}" if abs(v) >= 1 else f"{v:.4g}"
    return str(v)


def fit_labels(summary: pd.DataFrame) -> list[str]:
    """One label per row: ``engine/guide``, ``[params]`` when the study varies the model's
    parameters (fixed at EM's, learned, ...), the model first on rows of another model than the
    first row's: the spelling of the figures' legends (:func:`elbolab.experiments.core.plots.label_of`)."""
    params = "params" in summary and summary["params"].nunique(dropna=True) > 1
    first = summary["model"].iloc[0] if "model" in summary and len(summary) else None
    out = []
    for _, r in summary.iterrows():
        text = f"{r.get('engine', '?')}/{r.get('guide', '?')}"
        if params and isinstance(r.get("params"), str):
            text += f" [{r['params']}]"
        if first is not None and r["model"] != first:
            text = f"{r['model']}: {text}"
        out.append(text)
    return out


def is_true(v) -> bool:
    return str(v).strip().lower() in ("true", "1", "1.0")


def is_finite(v) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
