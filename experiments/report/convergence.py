"""Whether a study's fits and its posterior reference converged, and why not, from its CSVs: each
fit's status, NUTS judged by :func:`elbolab.inference.mcmc.nuts.convergence` (R-hat and bulk/tail ESS; Vehtari
et al. 2021), and the sentences saying so (numbers against an unconverged reference are
provisional)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from elbolab.experiments.report.formatting import fit_labels, is_finite, is_true, num
from elbolab.inference import mcmc


def status(row: pd.Series, chains: int | None = None) -> str:
    """``yes``, or ``no: why`` (:func:`why_not`); "—" for a row without ``converged``."""
    if "converged" not in row:
        return "—"
    if is_true(row.get("converged")):
        return "yes (early-stopped)" if row.get("training_end") == "early-stopped" else "yes"
    return "no: " + why_not(row, chains)[1]


def why_not(row: pd.Series, chains: int | None = None) -> tuple[str, str]:
    """(kind, text) of why a fit did not converge, from its own columns: a divergence, how
    training ended, NUTS's R-hat / ESS against :func:`elbolab.inference.mcmc.nuts.convergence`'s rule
    (``chains``: NUTS chains, for the ESS it needs), SVI's projected gain over one more window
    when it stopped at its step cap, EM's or CAVI's iteration cap."""
    if is_true(row.get("diag_diverged")) or row.get("training_end") == "diverged":
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
    if is_finite(gain):
        return "gaining", (f"{num(steps, 6)}-step cap, still gaining {num(gain, 2)} ± "
                           f"{num(se, 2)} nats/datum per window")
    if row.get("engine") == "svi" and is_finite(steps):
        return "too-few", f"{num(steps, 6)} step(s), too few to judge"
    if row.get("engine") in ("em", "cavi") and is_finite(row.get("iterations")):
        return "iteration-cap", f"{num(row['iterations'], 6)}-iteration cap"
    return "other", "see the log"


def _nuts_why(r_hat, ess_bulk, ess_tail, chains) -> str:
    """The failed tests of NUTS's convergence rule, shortly (R-hat 1.012 > 1.01; bulk ESS ...)."""
    s = mcmc.Settings()
    parts = []
    if not is_finite(r_hat):
        parts.append("R-hat not computed (one chain)")
    elif float(r_hat) > s.rhat_max:
        parts.append(f"R-hat {float(r_hat):.3f} > {s.rhat_max}")
    if chains:
        need = s.ess_per_chain * chains
        for name, v in (("bulk", ess_bulk), ("tail", ess_tail)):
            if is_finite(v) and float(v) < need:
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
    why: str = ""  # the failed tests, in :func:`elbolab.inference.mcmc.nuts.convergence`'s words


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
    else :func:`elbolab.inference.mcmc.nuts.convergence` on the recorded R-hat and ESS."""
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
            recorded = bool(rows["ref_converged"].map(is_true).all())
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
                is_true(r["converged"]) if "converged" in r else None)
    mc = tables.get("mcmc.csv")
    diag = {}
    recorded = None
    if mc is not None and len(mc):
        r = mc.iloc[0]
        diag = {k: float(r.get(f"nuts_{k}", math.nan)) for k in
                ("r_hat_max", "ess_bulk_min", "ess_tail_min", "divergences")}
        recorded = is_true(r["nuts_converged"]) if "nuts_converged" in r else None
    per = tables.get("mcmc_diagnostics.csv")
    if per is not None and len(per):  # per quantity: the worst of each
        for key, col, pick in (("r_hat_max", "r_hat", np.nanmax), ("ess_bulk_min", "ess_bulk",
                               np.nanmin), ("ess_tail_min", "ess_tail", np.nanmin)):
            vals = per[col].to_numpy(dtype=np.float64) if col in per else np.array([])
            if not is_finite(diag.get(key)) and np.isfinite(vals).any():
                diag[key] = float(pick(vals))
    return diag, recorded


def reference_sentence(r: Reference, files: list[str], flagged=()) -> str:
    """What the reference's state means for ``files`` (the tables computed against it; those
    in ``flagged`` carry its ``ref_flag``)."""
    where = ", ".join(files) or "reference.csv"
    if r.exact:
        return f"Reference {r.name}: exact, so the comparisons against it in {where} need no caveat."
    div = (f"; {num(r.divergences, 6)} divergent transitions" if is_finite(r.divergences)
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


def convergence_sentences(summary: pd.DataFrame, chains: int | None = None) -> list[str]:
    """Which fits did not converge and why (:func:`why_not`), fits failing alike together."""
    if "converged" not in summary:
        return []
    labels = fit_labels(summary)
    groups: dict[str, list[tuple[str, pd.Series, str]]] = {}
    for lab, (_, r) in zip(labels, summary.iterrows()):
        if not is_true(r["converged"]):
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
