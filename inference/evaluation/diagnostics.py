"""Diagnostics that read the same for every engine: the PSIS k-hat of a fit's q
(:func:`psis_khat`; the estimator and its reading are in :mod:`elbolab.inference.evaluation.psis`),
rebuilding q from a CAVI state (:func:`cavi_guide`), and one table row per fit. Comparisons with a
reference posterior and MCMC checks per quantity are in :mod:`elbolab.inference.evaluation.reference`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist

from elbolab.inference.evaluation.psis import (  # the estimators, re-exported
    DATA,
    KHAT_THRESHOLD,
    ImportanceWeights,
    evidence_weight_diagnostics,
    importance_ess,
    importance_log_weights,
    pareto_khat,
    reason,
    tightest_evidence,
)
from elbolab.inference.result import FitResult
from elbolab.models.capabilities import ClosedFormCAVI, LocalDensities


class NotVariational(ValueError):
    """The fit has no variational distribution q to diagnose (EM, NUTS)."""


@dataclass
class PsisDiagnostic:
    """k-hat of the joint weights (overall) and, for local latents, per data point."""

    khat: float
    khat_points: np.ndarray | None
    ess: float
    num_samples: int
    note: str = ""
    threshold: float = KHAT_THRESHOLD

    @property
    def reliable(self) -> bool:
        return bool(self.khat <= self.threshold)

    @property
    def khat_max_point(self) -> float:
        return float(np.max(self.khat_points)) if self.khat_points is not None else math.nan

    @property
    def frac_points_above(self) -> float:
        if self.khat_points is None:
            return math.nan
        return float(np.mean(self.khat_points > self.threshold))

    def row(self) -> dict:
        """Columns for a summary table."""
        return {"khat": self.khat, "khat_max_point": self.khat_max_point,
                "khat_frac_points_above": self.frac_points_above, "is_ess": self.ess,
                "psis_samples": self.num_samples}


def psis_khat(fit, x, *, family=None, num_samples: int = 1000, seed: int = 0,
              max_plate_nesting: int | None = None) -> PsisDiagnostic:
    """PSIS diagnostic of a variational fit on data ``x`` (module docstring).

    ``fit``: an SVI :class:`FitResult` (its fitted pair, ``result.fitted()``), a CAVI FitResult
    with ``family=`` (the q that CAVI's state describes: a mean-field guide for the GMM's state,
    a local diagonal Gaussian from ``posterior['<site>_loc' / '<site>_scale']``), or a
    ``(model, guide)`` pair read in the current param store. EM and NUTS fits have no q:
    :class:`NotVariational`.
    """
    if isinstance(fit, FitResult):
        return _psis_result(fit, x, family, num_samples, seed)
    if isinstance(fit, tuple) and len(fit) == 2 and all(callable(f) for f in fit):
        nest = max_plate_nesting or (family.max_plate_nesting if family is not None else 1)
        if family is not None:
            x = family.check_data(x)
        return _diagnose(*fit, x, num_samples, nest, seed)
    raise TypeError(f"fit: expected a FitResult or a (model, guide) pair, got {type(fit).__name__}")


def psis_row(fit, x, **options) -> dict:
    """:meth:`PsisDiagnostic.row` of :func:`psis_khat`, or NaNs with the reason (``psis_note``)
    for a fit without q (EM, NUTS, a CAVI state no guide is built from) and for a model PSIS
    cannot apply to (the weights cannot be computed: "PSIS not computed: ..." with the whole
    cause), so that an optional diagnostic never stops a table or a study."""
    nan = PsisDiagnostic(math.nan, None, math.nan, 0).row()
    try:
        d = psis_khat(fit, x, **options)
    except NotVariational as exc:
        return {**nan, "psis_note": str(exc).split(": ", 1)[-1]}
    except (ValueError, RuntimeError, IndexError) as exc:
        return {**nan, "psis_note": f"PSIS not computed: {reason(exc, limit=600)}"}
    return {**d.row(), "psis_note": d.note}


def psis_frame(results, x, *, family_of=None, num_samples: int = 1000,
               seed: int = 0) -> pd.DataFrame:
    """One :func:`psis_row` per result, in order (columns to put beside a summary table).
    ``family_of(result)``: the family a CAVI fit ran on (None: that row is not diagnosed)."""
    rows = []
    for r in results:
        family = family_of(r) if family_of is not None else None
        if r.engine == "cavi" and family is None:
            rows.append({**PsisDiagnostic(math.nan, None, math.nan, 0).row(),
                         "psis_note": "CAVI fit given without its family: q not rebuilt"})
        else:
            rows.append(psis_row(r, x, family=family, num_samples=num_samples, seed=seed))
    return pd.DataFrame(rows)


def _diagnose(model, guide, x, S, nest, seed, plate=DATA) -> PsisDiagnostic:
    w = importance_log_weights(model, guide, x, num_samples=S, max_plate_nesting=nest, seed=seed,
                               plate=plate)
    k_points = None if w.pointwise is None else pareto_khat(w.pointwise, axis=0)
    return PsisDiagnostic(pareto_khat(w.joint), k_points, importance_ess(w.joint), S, w.note)


def _psis_result(fit: FitResult, x, family, S, seed) -> PsisDiagnostic:
    if fit.engine == "svi":
        fam = fit.state.family
        with fit.fitted() as (model, guide):
            return _diagnose(model, guide, fam.check_data(x), S, fam.max_plate_nesting, seed,
                             getattr(fam, "data_plate", None) or DATA)
    if fit.engine != "cavi":
        raise NotVariational(f"fit: a {fit.engine} fit has no variational distribution q")
    if family is None:
        raise ValueError("family: psis_khat of a CAVI fit needs the family it was fitted on")
    x = family.check_data(x)
    guide = cavi_guide(fit, family, x)
    from elbolab.inference.runtime import isolated

    with isolated(None):
        return _diagnose(family.model, guide, x, S, family.max_plate_nesting, seed)


def cavi_guide(fit: FitResult, family, x):
    """A Pyro guide describing the q of a CAVI fit (constants, no params): the algorithm's own
    ``guide_for(state)`` when it has one (variational Bayes FA), the GMM's mean-field guide, or a
    local diagonal Gaussian from ``posterior['<site>_loc' / '<site>_scale']``; else
    NotVariational."""
    from elbolab.models.gmm.fit import CaviState as GmmCavi

    algo = family.cavi() if isinstance(family, ClosedFormCAVI) else None
    if callable(getattr(algo, "guide_for", None)):
        return algo.guide_for(fit.state)
    if isinstance(fit.state, GmmCavi):
        from elbolab.guides.gmm import mean_field_guide_from

        return mean_field_guide_from(fit.state, enumerate_c=False)
    site = family.latent_site if isinstance(family, LocalDensities) else "z"
    loc, scale = fit.posterior.get(f"{site}_loc"), fit.posterior.get(f"{site}_scale")
    if loc is None or scale is None or loc.shape[0] != x.shape[0]:
        raise NotVariational(f"fit: no guide is built from a {type(fit.state).__name__} "
                             f"(needs posterior '{site}_loc'/'{site}_scale' per data point)")
    loc, scale = loc.detach().to(x), scale.detach().to(x)

    def guide(x_, subsample_size=None):
        with pyro.plate(DATA, loc.shape[0], dim=-1):
            pyro.sample(site, dist.Normal(loc, scale).to_event(1))

    return guide


__all__ = [
    "KHAT_THRESHOLD", "ImportanceWeights", "NotVariational", "PsisDiagnostic", "cavi_guide",
    "evidence_weight_diagnostics",
    "importance_ess", "importance_log_weights", "pareto_khat", "psis_frame", "psis_khat",
    "psis_row",
    "tightest_evidence",
]
