"""What a study's numbers say: the sentences that open its section of the report, written from
its CSVs (nothing is recomputed), and the short summary table beside them.

:func:`study_findings` reads ``summary.csv`` and, where the study wrote them, ``gaps.csv``,
``reference.csv``, ``mcmc.csv`` and ``mcmc_diagnostics.csv``:

* the log evidence each bound is measured against, and whether that is itself a bound;
* the tightest bound (smallest gap log p(x) - ELBO per data point), by how much, and whether it
  is distinguishable from the next at 2 standard errors; the loosest;
* the approximation and amortization gaps of Cremer, Li & Duvenaud (2018), from gaps.csv;
* the fits whose PSIS k-hat exceeds 0.7 (Yao et al. 2018);
* every fit that did not converge, and why (:func:`status`);
* whether the posterior reference can be trusted: exact, or NUTS judged by the rule of
  :func:`inference.mcmc.convergence` (R-hat and bulk/tail ESS; Vehtari et al. 2021). Numbers
  against an unconverged reference are called provisional.

Numbers are nats; a value below :data:`RELATIVE_NOISE` of its column's scale (or
:data:`TABLE_NOISE` of the table's) is floating-point rounding and is written as 0
(:func:`noise_tolerance`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from inference import mcmc

#: bound values that are lower bounds on log p(x) (their gap is an inference gap)
LOWER_BOUNDS = ("elbo", "elbo-collapsed", "iwae", "ais")
#: |v| below this fraction of the largest |v| of its column prints as 0 (float64 rounding
#: leaves ~1e-15 relative; a real difference this small would not be resolved by any estimate)
RELATIVE_NOISE = 1e-9
#: ... or below this fraction of the largest |v| of the whole table (a column of noise only)
TABLE_NOISE = 1e-12
#: evidence methods that are themselves lower bounds on log p(x)
BOUND_METHODS = ("iwae", "ais")

# ---------------------------------------------------------------------------- numbers


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


# ---------------------------------------------------------------------------- rows


def fit_labels(summary: pd.DataFrame) -> list[str]:
    """One label per row: ``engine/guide``, ``[params]`` when the study varies the model's
    parameters (fixed at EM's, learned, ...), the model first on rows of another model than the
    first row's: the spelling of the figures' legends (:func:`experiments.plots.label_of`)."""
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


def _true(v) -> bool:
    return str(v).strip().lower() in ("true", "1", "1.0")


def _finite(v) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def status(row: pd.Series, chains: int | None = None) -> str:
    """``yes``, or ``no: why`` (:func:`why_not`); "—" for a row without ``converged``."""
    if "converged" not in row:
        return "—"
    if _true(row.get("converged")):
        return "yes (early-stopped)" if row.get("training_end") == "early-stopped" else "yes"
    return "no: " + why_not(row, chains)[1]


def why_not(row: pd.Series, chains: int | None = None) -> tuple[str, str]:
    """(kind, text) of why a fit did not converge, from its own columns: a divergence, how
    training ended, NUTS's R-hat / ESS against :func:`inference.mcmc.convergence`'s rule
    (``chains``: NUTS chains, for the ESS it needs), SVI's projected gain over one more window
    when it stopped at its step cap, EM's or CAVI's iteration cap."""
    if _true(row.get("diag_diverged")) or row.get("training_end") == "diverged":
        return "diverged", "diverged"
    if row.get("engine") == "mcmc":
        return "mcmc", _nuts_why(row.get("diag_r_hat_max"), row.get("diag_ess_bulk_min"),
                                 row.get("diag_ess_tail_min"), chains)
    end = row.get("training_end")
    steps = row.get("training_steps", row.get("diag_steps", row.get("iterations")))
    if end == "early-stopped":
        return "early-stopped", "early-stopped (held-out ELBO no longer improving)"
    if end == "step-cap":
        return "step-cap", f"{num(steps, 6)}-step cap"
    gain, se = row.get("diag_projected_gain_per_datum"), row.get("diag_projected_gain_se")
    if _finite(gain):
        return "gaining", (f"{num(steps, 6)}-step cap, still gaining {num(gain, 2)} ± "
                           f"{num(se, 2)} nats/datum per window")
    if row.get("engine") == "svi" and _finite(steps):
        return "too-few", f"{num(steps, 6)} step(s), too few to judge"
    if row.get("engine") in ("em", "cavi") and _finite(row.get("iterations")):
        return "iteration-cap", f"{num(row['iterations'], 6)}-iteration cap"
    return "other", "see the log"


def _nuts_why(r_hat, ess_bulk, ess_tail, chains) -> str:
    """The failed tests of NUTS's convergence rule, shortly (R-hat 1.012 > 1.01; bulk ESS ...)."""
    s = mcmc.Settings()
    parts = []
    if not _finite(r_hat):
        parts.append("R-hat not computed (one chain)")
    elif float(r_hat) > s.rhat_max:
        parts.append(f"R-hat {float(r_hat):.3f} > {s.rhat_max}")
    if chains:
        need = s.ess_per_chain * chains
        for name, v in (("bulk", ess_bulk), ("tail", ess_tail)):
            if _finite(v) and float(v) < need:
                parts.append(f"{name} ESS {float(v):.0f} < {need}")
    return "; ".join(parts) or "see log"


# ---------------------------------------------------------------------------- the reference


@dataclass
class Reference:
    """The posterior reference of reference.csv, and whether it can be trusted."""

    name: str
    exact: bool
    converged: bool
    r_hat: float = math.nan
    ess_bulk: float = math.nan
    ess_tail: float = math.nan
    divergences: float = math.nan
    chains: int | None = None
    why: str = ""  # the failed tests, in :func:`inference.mcmc.convergence`'s words


def nuts_chains(tables: dict, meta: dict) -> int | None:
    """NUTS chains of the run: mcmc_diagnostics.csv's ``chains``, else run.json's settings."""
    diag = tables.get("mcmc_diagnostics.csv")
    if diag is not None and "chains" in diag and len(diag):
        return int(diag["chains"].iloc[0])
    settings = meta.get("settings") if isinstance(meta.get("settings"), dict) else {}
    for key in ("nuts_chains", "chains", "mcmc_chains"):
        if isinstance(settings.get(key), int):
            return settings[key]
    return None


def references(tables: dict, meta: dict) -> list[Reference]:
    """Each reference named in reference.csv (exact ones first), with NUTS's diagnostics from
    summary.csv's mcmc row, mcmc.csv or mcmc_diagnostics.csv, and its convergence: the
    recorded one (``ref_converged``, ``converged``, ``nuts_converged``) where there is one,
    else :func:`inference.mcmc.convergence` on the recorded R-hat and ESS."""
    ref = tables.get("reference.csv")
    if ref is None or "reference" not in ref or not len(ref):
        return []
    chains = nuts_chains(tables, meta)
    out = []
    for name in dict.fromkeys(ref["reference"].astype(str)):
        rows = ref[ref["reference"].astype(str) == name]
        if "mcmc" not in name and "nuts" not in name:
            out.append(Reference(name, exact=True, converged=True))
            continue
        diag, recorded = _nuts_diagnostics(tables)
        if "ref_converged" in rows and rows["ref_converged"].notna().all():
            recorded = bool(rows["ref_converged"].map(_true).all())
        settings = mcmc.Settings(num_chains=chains) if chains else mcmc.Settings()
        computed, why = mcmc.convergence(diag, settings)
        if not chains:  # the ESS it needs is unknown: judge by R-hat only, and say so
            why = _nuts_why(diag.get("r_hat_max"), math.nan, math.nan, None)
        converged = computed if recorded is None else recorded
        out.append(Reference(name, exact=False, converged=converged,
                             r_hat=diag.get("r_hat_max", math.nan),
                             ess_bulk=diag.get("ess_bulk_min", math.nan),
                             ess_tail=diag.get("ess_tail_min", math.nan),
                             divergences=diag.get("divergences", math.nan), chains=chains,
                             why="" if converged else why))
    return sorted(out, key=lambda r: not r.exact)


def _nuts_diagnostics(tables: dict) -> tuple[dict, bool | None]:
    """({r_hat_max, ess_bulk_min, ess_tail_min, divergences}, recorded convergence or None)."""
    summary = tables.get("summary.csv")
    if summary is not None and "engine" in summary and (summary["engine"] == "mcmc").any():
        r = summary[summary["engine"] == "mcmc"].iloc[0]
        return ({k: float(r.get(f"diag_{k}", math.nan)) for k in
                 ("r_hat_max", "ess_bulk_min", "ess_tail_min", "divergences")},
                _true(r["converged"]) if "converged" in r else None)
    mc = tables.get("mcmc.csv")
    diag = {}
    recorded = None
    if mc is not None and len(mc):
        r = mc.iloc[0]
        diag = {k: float(r.get(f"nuts_{k}", math.nan)) for k in
                ("r_hat_max", "ess_bulk_min", "ess_tail_min", "divergences")}
        recorded = _true(r["nuts_converged"]) if "nuts_converged" in r else None
    per = tables.get("mcmc_diagnostics.csv")
    if per is not None and len(per):  # per quantity: the worst of each
        for key, col, pick in (("r_hat_max", "r_hat", np.nanmax), ("ess_bulk_min", "ess_bulk",
                               np.nanmin), ("ess_tail_min", "ess_tail", np.nanmin)):
            vals = per[col].to_numpy(dtype=np.float64) if col in per else np.array([])
            if not _finite(diag.get(key)) and np.isfinite(vals).any():
                diag[key] = float(pick(vals))
    return diag, recorded


def reference_sentence(r: Reference, files: list[str], flagged=()) -> str:
    """What the reference's state means for ``files`` (the tables computed against it; those
    in ``flagged`` carry its ``ref_flag``)."""
    where = ", ".join(files) or "reference.csv"
    if r.exact:
        return f"Reference {r.name}: exact, so the comparisons against it in {where} need no caveat."
    div = (f"; {num(r.divergences, 6)} divergent transitions" if _finite(r.divergences)
           and r.divergences > 0 else "")
    if r.converged:
        s = mcmc.Settings()
        ess = (f", bulk/tail ESS {num(r.ess_bulk, 6)}/{num(r.ess_tail, 6)} >= "
               f"{s.ess_per_chain * r.chains}" if r.chains else "")
        return (f"Reference {r.name}: converged (R-hat {r.r_hat:.3f} <= "
                f"{s.rhat_max}{ess}{div}), so the comparisons in {where} can be trusted to its "
                "Monte Carlo error.")
    marked = [f for f in files if f in flagged]
    return (f"Reference {r.name}: NOT converged ({r.why}{div}); every number computed against it "
            f"({where}) is provisional" + (
                ", and is marked so there (column ref_flag)." if marked == files else
                f", marked so in {', '.join(marked)} (column ref_flag)." if marked else "."))


# ---------------------------------------------------------------------------- sentences


def study_findings(tables: dict[str, pd.DataFrame], meta: dict | None = None) -> list[str]:
    """The sentences that open a study's section (module docstring), from its tables
    ({CSV name: frame}) and run.json (``meta``); empty without summary.csv."""
    meta = meta or {}
    summary = tables.get("summary.csv")
    if summary is None or not len(summary):
        return []
    out = bound_sentences(summary)
    gaps = tables.get("gaps.csv")
    if gaps is not None and len(gaps):
        out += gap_sentences(gaps)
    out += khat_sentences(summary)
    out += convergence_sentences(summary, nuts_chains(tables, meta))
    # tables computed against the reference: reference.csv, and those that carry its mark
    flagged = [f for f in ("reference.csv", "posterior.csv", "mcmc.csv")
               if f in tables and "ref_flag" in tables[f]]
    refs = references(tables, meta)
    for r in refs:
        files = ["reference.csv"] + ([f for f in flagged if f != "reference.csv"] if not r.exact
                                     else [])
        out.append(reference_sentence(r, files, flagged))
    return out + worst_posterior_error(tables, refs)


def bound_sentences(summary: pd.DataFrame) -> list[str]:
    """The evidence, the tightest and loosest bounds, the bounds with nothing to compare with."""
    df = summary.copy()
    df["_label"] = fit_labels(df)
    tol = noise_tolerance(df)
    if "bound" not in df or "gap_per_datum" not in df:
        return []
    bounds = df[df["bound"].isin(LOWER_BOUNDS)]
    ranked = bounds[bounds["gap_per_datum"].notna()].copy()
    orphans = bounds[bounds["gap_per_datum"].isna()]
    out = []
    if len(ranked):
        ranked["_gap"] = [denoise(v, tol["gap_per_datum"]) for v in ranked["gap_per_datum"]]
        ranked = ranked.sort_values("_gap", kind="stable")
        n = ranked["n"].iloc[0] if "n" in ranked else math.nan
        method = str(ranked["log_evidence_method"].iloc[0]) if "log_evidence_method" in ranked else "?"
        is_bound = (method.split()[0].lower() in BOUND_METHODS
                    or ("evidence_note" in ranked and ranked["evidence_note"].astype(str)
                        .str.contains("lower bound").any()))
        caveat = (f" {method.split()[0].upper()} is itself a lower bound on log p(x), so the true "
                  "gaps are at least as large as these." if is_bound else "")
        if ranked["log_evidence"].nunique() == 1:
            ev = ranked["log_evidence"].iloc[0]
            se = ranked["log_evidence_se"].iloc[0] if "log_evidence_se" in ranked else math.nan
            se_text = f" ± {num(se)}" if _finite(se) and se > 0 else ""
            out.append(f"log p(x) = {num(ev, 7)}{se_text} nats ({num(ev / n, 5)} per data point, "
                       f"n = {num(n, 9)}), by {method}.{caveat}")
        else:
            out.append(f"Each row's gap is against log p(x) at its own parameters (column "
                       f"log_evidence, by {method}), so gaps compare across rows and ELBOs "
                       f"do not.{caveat}")
        best = ranked.iloc[0]
        gap_total = denoise(best["gap"], tol.get("gap", 0.0)) if "gap" in best else math.nan
        text = (f"Tightest bound: {best['_label']} ({best['bound']}), ELBO {num(best['elbo'], 7)} "
                f"nats, {num(gap_total)} nats below log p(x) ({num(best['_gap'])} per data point)")
        if best["_gap"] == 0:
            text += ", i.e. equal to it up to rounding"
        if len(ranked) > 1:
            nxt = ranked.iloc[1]
            margin = nxt["_gap"] - best["_gap"]
            se = math.sqrt(sum(float(r.get("elbo_se", 0) or 0) ** 2 for r in (best, nxt))) / n
            if margin > 2 * se:
                text += (f"; {num(margin)} nats per data point tighter than the next, "
                         f"{nxt['_label']} ({num(nxt['_gap'])})")
            else:
                text += (f"; not distinguishable at 2 standard errors ({num(2 * se, 2)} per data "
                         f"point) from the next, {nxt['_label']} ({num(nxt['_gap'])})")
        out.append(text + ".")
        if len(ranked) > 2:
            worst = ranked.iloc[-1]
            out.append(f"Loosest: {worst['_label']} ({worst['bound']}), {num(worst['_gap'])} nats "
                       "per data point below log p(x).")
        negative = ranked[ranked["_gap"] < 0]
        for _, r in negative.iterrows():
            se = math.sqrt(float(r.get("elbo_se", 0) or 0) ** 2
                           + float(r.get("log_evidence_se", 0) or 0) ** 2) / n
            if -r["_gap"] > 3 * se:
                out.append(f"{r['_label']}: its bound exceeds log p(x) by {num(-r['_gap'])} per "
                           f"data point, more than 3 standard errors: a bound cannot do that; "
                           "check this row.")
    if len(orphans):
        why = {}
        for _, r in orphans.iterrows():
            reason = next((str(r[c]) for c in ("evidence_note", "log_evidence_method")
                           if c in r and isinstance(r[c], str) and r[c]), "no log p(x) recorded")
            why.setdefault(reason, []).append(r["_label"])
        out.append("Not ranked, no log p(x) to compare with: " + "; ".join(
            f"{', '.join(labels)} ({reason})" for reason, labels in why.items()) + ".")
    return out


def gap_sentences(gaps: pd.DataFrame) -> list[str]:
    """Cremer et al. (2018): approximation gap log p(x) - L[q*], amortization gap L[q*] - L[q],
    per data point with their Monte Carlo SEs, from gaps.csv (FA's per-guide layout or the
    VAE's per trained encoder, split and q* family)."""
    tol = noise_tolerance(gaps)

    def pm(r, q):
        v = denoise(r[q], tol.get(q, 0.0))
        se = denoise(r.get(f"{q}_se", math.nan), tol.get(f"{q}_se", 0.0))
        return num(v) + (f" ± {num(se, 2)}" if _finite(se) and se > 0 else "")

    unit = str(gaps["unit"].iloc[0]) if "unit" in gaps else "nats per data point"
    head = f"Gaps (Cremer et al. 2018; {unit}, Monte Carlo ± SE): "
    out = []
    if "train_encoder" in gaps and "eval_family" in gaps:
        own = gaps[gaps["train_encoder"] == gaps["eval_family"]]
        parts = [f"{r['train_encoder']}-trained model on {r['split']} images, approximation "
                 f"{pm(r, 'approximation_gap')}, amortization {pm(r, 'amortization_gap')}"
                 for _, r in own.iterrows()]
        if parts:
            out.append(head + "; ".join(parts) + " (q* of the encoder's own family).")
    elif "guide" in gaps:
        amortized = gaps["amortized"].map(_true) if "amortized" in gaps else pd.Series(True, gaps.index)
        parts = [f"{r['guide']} (q* {r.get('local_family', '?')}): approximation "
                 f"{pm(r, 'approximation_gap')}, amortization {pm(r, 'amortization_gap')}"
                 for _, r in gaps[amortized].iterrows()]
        if parts:
            out.append(head + "; ".join(parts) + ".")
        local = gaps[~amortized]
        if len(local):
            out.append("For the non-amortized guides (" + ", ".join(local["guide"].astype(str))
                       + ") L[q*] - L[q] is what their optimizer left, not an amortization gap: "
                       + "; ".join(f"{r['guide']} {pm(r, 'amortization_gap')}"
                                   for _, r in local.iterrows()) + ".")
    if "flagged" in gaps and gaps["flagged"].map(_true).any():
        k = int(gaps["flagged"].map(_true).sum())
        out.append(f"{k} of {len(gaps)} gap rows are flagged (a k-hat above 0.7 or a gap below 0 "
                   "by more than 3 SE; the flags column of gaps.csv says which): their Monte "
                   "Carlo estimates are unreliable.")
    return out


def khat_sentences(summary: pd.DataFrame) -> list[str]:
    """Fits whose PSIS k-hat exceeds :data:`inference.diagnostics.KHAT_THRESHOLD` (Yao et al.
    2018): their q is no reliable importance proposal (its IWAE / IS estimates included)."""
    from inference.diagnostics import KHAT_THRESHOLD

    if "khat" not in summary:
        return []
    labels = pd.Series(fit_labels(summary), index=summary.index)
    high = summary[pd.to_numeric(summary["khat"], errors="coerce") > KHAT_THRESHOLD]
    if not len(high):
        return []
    listed = ", ".join(f"{labels[i]} {num(high.loc[i, 'khat'], 3)}" for i in high.index)
    return [f"PSIS k-hat above {KHAT_THRESHOLD} (Yao et al. 2018), so q is no reliable "
            f"importance-sampling proposal: {listed}."]


def convergence_sentences(summary: pd.DataFrame, chains: int | None = None) -> list[str]:
    """Which fits did not converge and why (:func:`why_not`), fits failing alike together."""
    if "converged" not in summary:
        return []
    labels = fit_labels(summary)
    groups: dict[str, list[tuple[str, pd.Series, str]]] = {}
    for lab, (_, r) in zip(labels, summary.iterrows()):
        if not _true(r["converged"]):
            kind, text = why_not(r, chains)
            groups.setdefault(kind, []).append((lab, r, text))
    bad = sum(len(g) for g in groups.values())
    if not bad:
        return [f"All {len(summary)} fits converged."]
    parts = []
    for kind, items in groups.items():
        names = ", ".join(lab for lab, _, _ in items)
        if kind == "gaining" and len(items) > 1:
            gains = [float(r["diag_projected_gain_per_datum"]) for _, r, _ in items]
            parts.append(f"{names} stopped at their step cap while still gaining "
                         f"{num(min(gains), 2)} to {num(max(gains), 2)} nats per data point "
                         "over one more window")
        elif kind == "step-cap" and len(items) > 1:
            parts.append(f"{names} stopped at their step cap ("
                         + ", ".join(f"{num(r.get('training_steps', r.get('iterations')), 6)}"
                                     for _, r, _ in items) + " steps)")
        else:
            parts += [f"{lab}: {text}" for lab, _, text in items]
    return [f"{bad} of {len(summary)} fits did not converge: " + "; ".join(parts)
            + ". Their numbers are where they stopped, not at an optimum."]


def worst_posterior_error(tables: dict, refs: list[Reference]) -> list[str]:
    """Per reference: the largest |posterior-mean error| against it, in its sds."""
    ref = tables.get("reference.csv")
    if ref is None or "mean_error_in_ref_sd" not in ref:
        return []
    out = []
    for r in refs:
        rows = ref[(ref["reference"].astype(str) == r.name) & ref["mean_error_in_ref_sd"].notna()]
        if not len(rows):
            continue
        w = rows.loc[rows["mean_error_in_ref_sd"].abs().idxmax()]
        out.append(f"Largest posterior-mean error against {r.name}: {w['method']} on "
                   f"{w['quantity']}, {num(abs(w['mean_error_in_ref_sd']), 3)} of its sds"
                   + (" (provisional: the reference did not converge)" if not r.converged
                      else "") + ".")
    return out


# ---------------------------------------------------------------------------- the short table

#: summary.csv columns of the report's main table, in order (others: the linked CSV)
SHORT_COLUMNS = ["bound", "elbo", "elbo_se", "log_evidence", "gap_per_datum", "khat", "seconds"]
#: the order in which the report keeps the main table's columns when not all fit the page
SHORT_PRIORITY = ["fit", "bound", "elbo", "gap_per_datum", "converged", "reference_flag",
                  "log_evidence", "elbo_se", "khat", "seconds"]


def short_summary(summary: pd.DataFrame, chains: int | None = None) -> pd.DataFrame:
    """The report's main table: ``fit`` (:func:`fit_labels`), :data:`SHORT_COLUMNS`,
    ``converged`` (:func:`status`) and, when any row has one, ``reference_flag`` shortened to
    "provisional" (the sentences and reference.csv say against what)."""
    out = pd.DataFrame({"fit": fit_labels(summary)}, index=summary.index)
    for c in SHORT_COLUMNS:
        if c in summary:
            out[c] = summary[c]
    if "converged" in summary:
        out["converged"] = [status(r, chains) for _, r in summary.iterrows()]
    if "reference_flag" in summary:
        flags = summary["reference_flag"].fillna("").astype(str)
        if (flags != "").any():
            out["reference_flag"] = ["provisional" if f else "" for f in flags]
    return out.reset_index(drop=True)


__all__ = ["LOWER_BOUNDS", "RELATIVE_NOISE", "SHORT_COLUMNS", "SHORT_PRIORITY", "TABLE_NOISE",
           "Reference",
           "bound_sentences", "convergence_sentences", "denoise", "fit_labels", "gap_sentences",
           "khat_sentences",
           "noise_tolerance", "num", "references", "short_summary", "status", "study_findings",
           "why_not"]
