"""The sentences that open a study's section of the report, written from its CSVs (nothing is
recomputed): its bounds and gaps here, convergence and the reference from
:mod:`elbolab.experiments.report.convergence`; and the short summary table beside them."""

from __future__ import annotations

import math

import pandas as pd

from elbolab.experiments.report.convergence import (
    Reference,
    convergence_sentences,
    nuts_chains,
    reference_sentence,
    references,
    status,
    why_not,
    worst_posterior_error,
)
from elbolab.experiments.report.formatting import (
    RELATIVE_NOISE,
    TABLE_NOISE,
    denoise,
    fit_labels,
    is_finite,
    is_true,
    noise_tolerance,
    num,
)

#: bound values that are lower bounds on log p(x) (their gap is an inference gap)
LOWER_BOUNDS = ("elbo", "elbo-collapsed", "iwae", "ais")
#: evidence methods that are themselves lower bounds on log p(x)
BOUND_METHODS = ("iwae", "ais")


def study_findings(tables: dict[str, pd.DataFrame], meta: dict | None = None) -> list[str]:
    """The sentences that open a study's section, from its tables ({CSV name: frame}) and
    run.json (``meta``); empty without summary.csv. They read ``summary.csv`` and, where the
    study wrote them, ``gaps.csv``, ``reference.csv``, ``mcmc.csv`` and ``mcmc_diagnostics.csv``:

    * the log evidence each bound is measured against, and whether that is itself a bound;
    * the tightest bound (smallest gap log p(x) - ELBO per data point), by how much, and whether
      it is distinguishable from the next at 2 standard errors; the loosest;
    * the approximation and amortization gaps of Cremer, Li & Duvenaud (2018), from gaps.csv;
    * the fits whose PSIS k-hat exceeds 0.7 (Yao et al. 2018);
    * every fit that did not converge, and why (:func:`elbolab.experiments.report.convergence.status`);
    * whether the posterior reference can be trusted: exact, or NUTS judged by the rule of
      :func:`elbolab.inference.mcmc.nuts.convergence` (R-hat and bulk/tail ESS; Vehtari et al. 2021).
      Numbers against an unconverged reference are called provisional.

    Numbers are nats; rounding noise is written as 0
    (:func:`elbolab.experiments.report.formatting.noise_tolerance`)."""
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
            # a quadrature's SE of 1e-10 nats is rounding noise: not shown (as in the tables)
            se_text = (f" ± {num(se)}" if is_finite(se) and se > RELATIVE_NOISE * abs(ev)
                       else "")
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
        return num(v) + (f" ± {num(se, 2)}" if is_finite(se) and se > 0 else "")

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
        amortized = gaps["amortized"].map(is_true) if "amortized" in gaps else pd.Series(True, gaps.index)
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
    if "flagged" in gaps and gaps["flagged"].map(is_true).any():
        k = int(gaps["flagged"].map(is_true).sum())
        out.append(f"{k} of {len(gaps)} gap rows are flagged (a k-hat above 0.7 or a gap below 0 "
                   "by more than 3 SE; the flags column of gaps.csv says which): their Monte "
                   "Carlo estimates are unreliable.")
    return out


def khat_sentences(summary: pd.DataFrame) -> list[str]:
    """Fits whose PSIS k-hat exceeds :data:`elbolab.inference.evaluation.diagnostics.KHAT_THRESHOLD` (Yao et al.
    2018): their q is no reliable importance proposal (its IWAE / IS estimates included)."""
    from elbolab.inference.evaluation.diagnostics import KHAT_THRESHOLD

    if "khat" not in summary:
        return []
    labels = pd.Series(fit_labels(summary), index=summary.index)
    high = summary[pd.to_numeric(summary["khat"], errors="coerce") > KHAT_THRESHOLD]
    if not len(high):
        return []
    listed = ", ".join(f"{labels[i]} {num(high.loc[i, 'khat'], 3)}" for i in high.index)
    return [f"PSIS k-hat above {KHAT_THRESHOLD} (Yao et al. 2018), so q is no reliable "
            f"importance-sampling proposal: {listed}."]


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
