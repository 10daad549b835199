"""The evidence, diagnostics and gap decomposition of the ``fit`` study, for any family.

Every number is computed at the parameters of the fit it belongs to: an SVI fit's own (its fitted
pair, ``FitResult.fitted()``, with the fitted copy of the family), an EM fit's estimate (its
``posterior`` entries named like the model's ``pyro.param`` sites, put in a fresh param store), or
the family's fixed constants. What applies to which family:

* exact log evidence: :class:`~elbolab.models.capabilities.ExactEvidence`;
* AIS (Neal 2001; :func:`elbolab.inference.evaluation.ais.ais`, from the prior p(z)): :class:`LocalDensities`;
* IWAE with the fitted guide as proposal (Burda et al. 2016; :func:`elbolab.inference.evaluation.evidence.iwae`): SVI
  fits of a family with :class:`LocalDensities` (on :class:`LocalView`, its per-point model with
  any discrete sites summed out), or of a model whose only latent is one per-point site;
* PSIS k-hat of q (:func:`elbolab.inference.evaluation.diagnostics.psis_row`): SVI fits, and CAVI fits whose state
  describes a q;
* the gap decomposition (Cremer, Li & Duvenaud 2018; :func:`elbolab.inference.evaluation.gaps.decompose_gaps`):
  SVI fits with an amortized per-point guide (``elbolab.guides.LatentGuide``) of a family with
  :class:`LocalDensities`, against the exact per-point evidence, else AIS, else IWAE.

Where something does not apply, or an optional estimate or diagnostic cannot be computed for
the model (e.g. PSIS or IWAE on a latent site with batch dimensions outside any plate), the
row's value is NaN and ``notes`` (``psis_note`` for PSIS) says why, with the whole cause: the
study goes on.
"""

from __future__ import annotations

import contextlib
import math

import torch
from pyro import poutine

from elbolab.guides import LatentGuide
from elbolab.guides.auto import latent_sites
from elbolab.inference.evaluation import gaps as gap_lib
from elbolab.inference.evaluation.ais import AisSettings, ais
from elbolab.inference.evaluation.diagnostics import psis_row, tightest_evidence
from elbolab.inference.evaluation.evidence import iwae
from elbolab.inference.evaluation.psis import reason
from elbolab.inference.runtime import isolated
from elbolab.models.base import LocalLatentFamily
from elbolab.models.capabilities import Evidence, ExactEvidence, LocalDensities, PointwiseEvidence


class NotApplicable(ValueError):
    """A quantity that does not apply to this family or fit (the reason is the message)."""


class LocalView(LocalLatentFamily):
    """A :class:`LocalDensities` family as a per-point model of its own: z_n ~ ``local_prior``,
    x_n ~ ``observation_dist(z_n)``. These are the family's densities with any discrete per-point
    site summed out (e.g. the mixture of factor analysers' component c), so per-point estimators
    that trace one latent site (IWAE, the gap decomposition) see p(x_n, z_n) = sum_c p(x_n, z_n, c).
    Parameters are read wherever the family reads them (its constants or the active param store).
    """

    max_plate_nesting = 1
    discrete_sites = ()

    def __init__(self, family):
        self.family = family
        self.name = family.name
        self.latent_dim = family.latent_dim
        self.latent_site = family.latent_site
        self.obs_site = "x"

    def check_data(self, x) -> torch.Tensor:
        return self.family.check_data(x)

    def local_prior(self, x: torch.Tensor):
        return self.family.local_prior(x)

    def observation_dist(self, z: torch.Tensor):
        return self.family.observation_dist(z)

    def settings(self) -> dict:
        return self.family.settings()


def local_plate(family) -> str:
    """The plate over data points: a program's data plate (its sites are local), else "data"."""
    return getattr(family, "data_plate", None) or "data"


def model_param_names(family, x) -> list[str]:
    """The ``pyro.param`` sites the model creates (learnable unless fixed)."""
    with isolated(0), torch.no_grad():
        tr = poutine.trace(family.model).get_trace(x)
    return [k for k, s in tr.nodes.items() if s["type"] == "param"]


def params_from(result, names: list[str]) -> dict[str, torch.Tensor]:
    """A fit's values of the model parameters ``names``: an SVI fit's learned ones, an EM/CAVI
    fit's posterior entries of those names; an error naming what is missing."""
    if not names:
        return {}
    values = result.model_params() if result.engine == "svi" else dict(result.posterior)
    missing = [k for k in names if k not in values]
    if missing:
        raise NotApplicable(f"the {result.engine} fit gives no value of the model parameter(s) "
                            f"{missing}")
    return {k: values[k].detach() for k in names}


@contextlib.contextmanager
def at_params(family, result, params: dict | None):
    """Yield the family whose densities read ``result``'s parameters: an SVI fit's fitted copy
    inside its fitted pair's param store, else ``family`` with ``params`` put in a fresh store."""
    if result is not None and result.engine == "svi":
        with result.fitted():
            yield result.state.family
        return
    with isolated(None) as store:
        for k, v in (params or {}).items():
            store[k] = v.clone()
        yield family


def exact_evidence(fam, x) -> Evidence | None:
    return fam.log_evidence(x) if isinstance(fam, ExactEvidence) else None


def ais_evidence(fam, x, args) -> Evidence:
    if not isinstance(fam, LocalDensities):
        raise NotApplicable("AIS needs the LocalDensities capability")
    if args.ais_steps == 0:
        raise NotApplicable("--ais-steps 0")
    s = AisSettings(num_steps=args.ais_steps, num_chains=args.ais_chains)
    with torch.no_grad():
        return ais(fam.log_joint, fam.local_prior(x), x, s, seed=args.seed)


def iwae_evidence(fam, guide, x, args) -> Evidence:
    """IWAE of the fitted pair (read in the active param store)."""
    if args.iwae_particles == 0:
        raise NotApplicable("--iwae-particles 0")
    if isinstance(fam, LocalDensities):
        model, site = LocalView(fam).model, fam.latent_site
    else:
        glob, loc, enum = latent_sites(fam.model, x, local_plate(fam))
        if glob or enum or len(loc) != 1:
            raise NotApplicable(
                "IWAE per data point needs one per-point latent and no global or discrete latent "
                f"(the model has global {sorted(glob)}, local {sorted(loc)}, enumerated "
                f"{sorted(enum)}); or give the family LocalDensities")
        model, site = fam.model, next(iter(loc))
    return iwae(model, guide, x, num_samples=args.iwae_particles, latent=site,
                max_plate_nesting=1, seed=args.seed)


def _columns(ev: Evidence | None, prefix: str) -> dict:
    if ev is None:
        return {prefix: math.nan, f"{prefix}_se": math.nan}
    return {prefix: ev.value, f"{prefix}_se": ev.se}


def evaluate(family, x, result, params, args, *, variational: bool) -> tuple[Evidence | None, dict]:
    """(the best log evidence at the fit's parameters, extra summary columns incl. ``notes``)."""
    notes, cols = [], {}
    best = None
    with at_params(family, result, params) as fam:
        exact = None
        try:
            exact = exact_evidence(fam, x)
        except ValueError as exc:
            notes.append(f"exact evidence: {exc}")
        estimates = {}
        for name, fn in (("ais", lambda: ais_evidence(fam, x, args)),
                         ("iwae", lambda: iwae_evidence(fam, result.state.guide, x, args))):
            if name == "iwae" and not variational:
                continue
            try:
                estimates[name] = fn()
            except NotApplicable as exc:
                notes.append(f"{name}: {exc}")
            except (ValueError, RuntimeError, IndexError) as exc:  # an optional estimate: a note
                notes.append(f"{name}: not computed: {reason(exc)}")
        cols.update(_columns(estimates.get("ais"), "ais"))
        cols.update(_columns(estimates.get("iwae"), "iwae"))
        if exact is not None:
            best = exact
        elif estimates:
            best = tightest_evidence(*estimates.values())
    if result is not None and result.engine in ("svi", "cavi") and args.psis_samples > 0:
        cols.update(psis_row(result, x, family=family, num_samples=args.psis_samples,
                             seed=args.seed))
    cols["notes"] = "; ".join(notes)
    return best, cols


def gap_row(family, x, result, evidence: Evidence | None, args) -> dict:
    """The Cremer et al. decomposition (mean per data point) of an amortized SVI fit."""
    guide = result.state.guide
    if not isinstance(guide, LatentGuide):
        raise NotApplicable(f"guide {result.guide!r} is not a per-point guide (elbolab.guides.LatentGuide)")
    with result.fitted():
        fam = result.state.family
        if not isinstance(fam, LocalDensities):
            raise NotApplicable("the gap decomposition needs the LocalDensities capability")
        if evidence is None:
            raise NotApplicable("no log evidence per data point")
        log_ev = evidence
        if "pointwise" not in evidence.details:
            if not isinstance(fam, PointwiseEvidence):
                raise NotApplicable("the evidence has no per-point values")
            log_ev = fam.log_evidence_pointwise(x)
        view = LocalView(fam)
        qs = gap_lib.QStarSettings(steps=args.qstar_steps)
        df = gap_lib.decompose_gaps(view, x, guide, log_evidence=log_ev, optimizer="svi",
                                    estimator="mc", settings=qs,
                                    num_particles=args.gap_particles, seed=args.seed)
    row = {"guide": result.guide, "local_family": df.attrs.get("local_family"),
           "n": x.shape[0], "unit": "nats per data point",
           "log_evidence_method": evidence.method,
           "q_star_converged": df.attrs.get("q_star_converged")}
    mean = gap_lib.summary_row(df, "mean")
    for q in gap_lib.QUANTITIES:
        row[q], row[f"{q}_se"] = mean[q], mean[f"{q}_se"]
    for k in ("flagged", "flags"):
        if k in mean:
            row[k] = mean[k]
    return row


__all__ = ["LocalView", "NotApplicable", "at_params", "evaluate", "gap_row", "local_plate",
           "model_param_names", "params_from"]
