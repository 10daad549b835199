"""The table of a gap decomposition (:mod:`elbolab.inference.evaluation.gaps`): per-point rows, a ``total`` and a
``mean`` row, the diagnostics of every estimate, and the flags that protect the reader.

Flags: a row is flagged when a gap (:data:`GAPS`) lies below zero by more than 3 standard errors
plus :data:`GAP_SLACK` nats per point (closed-form values have SE 0, and the error of the q*_F
optimizer is in no SE), or when a PSIS k-hat (of q's, q*_F's or the evidence estimator's log
weights) exceeds :data:`elbolab.inference.evaluation.diagnostics.KHAT_THRESHOLD` = 0.7. On the ``total`` and ``mean``
rows a k-hat is the largest over the points and an ESS the smallest; ``flags`` says how many
points exceed 0.7. A flagged decomposition raises a ``UserWarning`` naming the guide.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

from elbolab.inference.evaluation.psis import KHAT_THRESHOLD

QUANTITIES = (
    "log_evidence", "elbo_q_star", "elbo_amortized",
    "approximation_gap", "amortization_gap", "inference_gap",
)
GAPS = ("approximation_gap", "amortization_gap", "inference_gap")
#: per-point diagnostics columns: IS ESS and PSIS k-hat of q, q*_F and the evidence estimate
DIAGNOSTICS = ("ess_amortized", "khat_amortized", "ess_q_star", "khat_q_star",
               "log_evidence_ess", "log_evidence_khat")
#: nats per point a closed-form (SE 0) gap may fall below zero by before it is flagged
GAP_SLACK = 1e-6


def _summaries(terms) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """(total row, mean row, per-point values, per-point SEs) with the diagnostics summarized
    over points (largest k-hat, smallest ESS) and the flags of each summary row."""
    vals = {k: v.double().cpu().numpy() for k, v in terms.values.items()}
    ses = {k: v.double().cpu().numpy() for k, v in terms.se.items()}
    n = len(vals["log_evidence"])
    total = {"scope": "total", "index": -1}
    mean = {"scope": "mean", "index": -1}
    for q in QUANTITIES:
        var = float((ses[q] ** 2).sum())
        total[q], total[f"{q}_se"] = float(vals[q].sum()), math.sqrt(var)
        mean[q], mean[f"{q}_se"] = float(vals[q].mean()), math.sqrt(var) / n
        mean[f"{q}_se_points"] = float(vals[q].std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    counts = {}
    for k in DIAGNOSTICS:
        d = np.asarray(terms.diagnostics.get(k, np.full(n, np.nan)), dtype=np.float64)
        worst = _nan_max(d) if "khat" in k else _nan_min(d)
        total[k] = mean[k] = worst
        if "khat" in k:
            counts[k] = int((d > KHAT_THRESHOLD).sum())
    for row, slack in ((total, GAP_SLACK * n), (mean, GAP_SLACK)):
        row["flags"] = _row_flags(row, slack, counts, n)
        row["flagged"] = bool(row["flags"])
    return total, mean, vals, ses


def _nan_max(a):
    return math.nan if np.isnan(a).all() else float(np.nanmax(a))


def _nan_min(a):
    return float(np.nanmin(a)) if not np.isnan(a).all() else math.nan


def _row_flags(row: dict, slack: float, counts: dict | None = None, n: int = 1) -> str:
    """Why a row is suspect: a gap below zero by > 3 SE (+ ``slack``), or a k-hat > 0.7."""
    out = []
    for q in GAPS:
        v, se = row[q], row[f"{q}_se"]
        if v < -(3 * se + slack):
            out.append(f"{q} {v:.4g} is below 0 by {-v / se:.1f} SE" if se > 0
                       else f"{q} {v:.4g} is below 0 (closed form)")
    for k in DIAGNOSTICS:
        if "khat" in k and row[k] > KHAT_THRESHOLD:
            where = f" at {counts[k]} of {n} points" if counts else ""
            out.append(f"{k} {row[k]:.2f} > {KHAT_THRESHOLD}{where}")
    return "; ".join(out)


def warn_if_flagged(terms) -> None:
    _, mean, _, _ = _summaries(terms)
    if mean["flagged"]:
        s = terms.settings
        warnings.warn(f"gap decomposition of guide {s['amortized_guide']!r} (q* family "
                      f"{s['local_family']!r}, per data point): {mean['flags']}", stacklevel=3)


def frame(terms) -> pd.DataFrame:
    total, mean, vals, ses = _summaries(terms)
    n = len(vals["log_evidence"])
    cols = {"scope": ["point"] * n, "index": np.arange(n)}
    for q in QUANTITIES:
        cols[q], cols[f"{q}_se"] = vals[q], ses[q]
    for k in DIAGNOSTICS:
        cols[k] = np.asarray(terms.diagnostics.get(k, np.full(n, np.nan)), dtype=np.float64)
    df = pd.DataFrame(cols)
    df["flags"] = [_row_flags(r, GAP_SLACK) for r in df.to_dict("records")]
    df["flagged"] = df["flags"] != ""
    df = pd.concat([df, pd.DataFrame([total, mean])], ignore_index=True)
    df.attrs.update({**terms.settings, "evidence_method": terms.evidence_method, "n": n})
    return df


__all__ = ["DIAGNOSTICS", "GAPS", "GAP_SLACK", "QUANTITIES", "frame", "warn_if_flagged"]
