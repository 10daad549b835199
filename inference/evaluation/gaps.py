"""The decomposition of the inference gap (Cremer, Li & Duvenaud 2018), for any model whose
latent site is a per-data-point z in the data plate, with the model's parameters fixed.

For data point n, an amortized guide q(z | x_n) and a variational family F:

    inference gap      log p(x_n) - L_n[q]        = approximation gap + amortization gap
    approximation gap  log p(x_n) - L_n[q*_F]     q*_F = argmax_{q in F} L_n[q] (per point)
    amortization gap   L_n[q*_F] - L_n[q]

q*_F is found by optimizing one member of F per data point (a local guide), warm-started from the
encoder's output, with the model's parameters fixed. Two ways to compute ELBOs and to optimize:

* ``"mc"`` / ``"svi"`` (generic): L_n from S draws, mean_s [log p(x_n, z_s) - log q(z_s | x_n)]
  (:mod:`elbolab.inference.evaluation.pointwise`), SE sd_s / sqrt(S); q*_F by SVI (:func:`elbolab.inference.svi.loop.run_svi`).
* ``"closed-form"`` (families with :class:`~elbolab.models.capabilities.ExactLocalPosterior` and
  :class:`~elbolab.models.capabilities.PointwiseEvidence`, e.g. FA/PPCA, and Gaussian guides):
  L_n[q] = log p(x_n) - KL(q_n || p(z | x_n)) exactly (SE 0), and q*_F by L-BFGS on
  sum_n KL(q_n || p(z | x_n)), a deterministic objective. ``"auto"`` picks this whenever it
  applies.

Standard errors: the per-point SEs are Monte Carlo SEs; estimates of different terms use
independent draws, so SE(a - b) = sqrt(se_a^2 + se_b^2) (the inference gap pairs log p and L[q]
directly). Totals add variances over points: SE = sqrt(sum_n se_n^2). The ``mean`` row is
total / n with the Monte Carlo SE sqrt(sum_n se_n^2) / n, i.e. the uncertainty given these data
points; its ``*_se_points`` columns hold sd_n(value_n) / sqrt(n), the SE of the mean as an
estimate of the expectation over the data distribution (between-point spread plus MC noise).
The optimization error of q*_F is not in the SEs: check ``converged`` in ``DataFrame.attrs``.

Diagnostics carried by every estimate: per point, the importance-sampling ESS and the PSIS k-hat
(:mod:`elbolab.inference.evaluation.diagnostics`) of the log weights of q and of q*_F (``num_particles`` draws;
drawn also on the closed-form path), and the ESS / k-hat of the evidence estimate when it kept
them. A row is flagged (``flagged``, reasons in ``flags``) when a gap is below zero by more than
3 standard errors (plus :data:`elbolab.inference.evaluation.gap_table.GAP_SLACK` nats per point for closed-form values, whose optimizer
error has no SE) or a k-hat exceeds 0.7; a flagged decomposition also raises a ``UserWarning``
naming the guide. ``local_family`` defaults to the family matching the amortized guide
(:func:`matching_local_family`). ``log_evidence`` takes the library's :class:`Evidence` objects,
exact or estimated; with several estimates at hand (AIS, IWAE: both stochastic lower bounds),
:func:`tightest_evidence` picks the larger and keeps a BDMC upper bound beside it. The closed-form
pieces are in :mod:`elbolab.inference.evaluation.gap_closed_form`, the table and its flags in
:mod:`elbolab.inference.evaluation.gap_table`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.distributions import kl_divergence

from elbolab import guides as guide_registry
from elbolab.guides import LatentGuide, LocalGuide
from elbolab.inference.evaluation.gap_closed_form import (
    closed_form_available,
    closed_form_elbo,
    detached_posterior,
    exact_posterior_mvn,
    gaussian_approximation_gap,
    mvn,
)
from elbolab.inference.evaluation.gap_table import (
    DIAGNOSTICS,
    GAP_SLACK,
    GAPS,
    QUANTITIES,
    frame,
    warn_if_flagged,
)
from elbolab.inference.evaluation.pointwise import caller_scope, log_weights
from elbolab.inference.evaluation.psis import (
    evidence_weight_diagnostics,
    importance_ess,
    pareto_khat,
    tightest_evidence,
)
from elbolab.inference.svi.loop import run_svi
from elbolab.inference.svi.settings import Settings as SviSettings
from elbolab.models.capabilities import Evidence, MissingCapability, PointwiseEvidence, require
from elbolab.models.validate import choice, integer, non_negative, positive


@dataclass
class QStarSettings:
    """How q*_F is optimized.

    svi: at most ``steps`` Adam steps of ``num_particles`` draws, learning rate ``lr`` decayed by
    the factor ``lr_decay`` over the run; stops when the mean loss per datum over ``window`` steps
    improves by less than ``tol`` nats. closed-form: L-BFGS for at most ``steps`` iterations,
    stops when the objective per datum changes by less than ``tol`` between rounds of 50.
    """

    steps: int = 3000
    lr: float = 0.05
    num_particles: int = 16
    lr_decay: float = 0.05
    tol: float = 1e-5
    window: int = 200

    def __post_init__(self):
        self.steps = integer(self.steps, "steps", minimum=1)
        positive(self.lr, "lr")
        self.num_particles = integer(self.num_particles, "num_particles", minimum=1)
        positive(self.lr_decay, "lr_decay")
        non_negative(self.tol, "tol")
        self.window = integer(self.window, "window", minimum=1)


@dataclass
class OptimizeRun:
    method: str
    trace: list[float] = field(default_factory=list)  # ELBO (total, nats) per step / iteration
    converged: bool = False
    steps: int = 0
    message: str = ""


@dataclass
class GapTerms:
    """Per-point values (n,) and Monte Carlo SEs (n,) of every term, plus the fitted q*_F."""

    values: dict[str, torch.Tensor]
    se: dict[str, torch.Tensor]
    q_star: object
    run: OptimizeRun
    estimator: str
    evidence_method: str
    settings: dict
    diagnostics: dict[str, np.ndarray] = field(default_factory=dict)  # DIAGNOSTICS -> (n,)

    def frame(self) -> pd.DataFrame:
        return frame(self)


# -- the evidence and the local family ---------------------------------------------------------
def resolve_log_evidence(family, x, log_evidence=None):
    """(values (n,), se (n,), method) from a tensor/array (n,), a (values, se) pair, an Evidence
    holding ``details['pointwise']`` (and optionally ``details['pointwise_se']``), or, by default,
    the family's exact ``log_evidence_pointwise``."""
    n = x.shape[0]
    method = "exact"
    se = None
    if log_evidence is None:
        require(family, PointwiseEvidence,
                "log_evidence: the gap decomposition without a given log_evidence (pass a "
                "per-data-point estimate instead, e.g. an IWAE with many samples or AIS Evidence)")
        values = family.log_evidence_pointwise(x)
    elif isinstance(log_evidence, Evidence):
        values = _pointwise_of(family, x, log_evidence)
        se = log_evidence.details.get("pointwise_se")
        method = log_evidence.method
    elif isinstance(log_evidence, tuple) and len(log_evidence) == 2:
        values, se = log_evidence
        method = "given"
    else:
        values, method = log_evidence, "given"
    values = torch.as_tensor(values, device=x.device, dtype=x.dtype).reshape(-1)
    if values.shape[0] != n:
        raise ValueError(f"log_evidence: expected {n} per-point values, got {values.shape[0]}")
    if not torch.isfinite(values).all():
        raise ValueError("log_evidence: contains non-finite values")
    if se is None:
        se = torch.zeros_like(values)
    else:
        se = torch.as_tensor(se, device=x.device, dtype=x.dtype).reshape(-1)
        if se.shape[0] not in (1, n):
            raise ValueError(f"log_evidence: expected 1 or {n} standard errors, got {se.shape[0]}")
        if (se < 0).any():
            raise ValueError("log_evidence: standard errors must be >= 0")
        se = se.expand(n)
    return values.detach(), se.detach(), method


def _pointwise_of(family, x, ev: Evidence):
    """Per-point values of an Evidence: ``details['pointwise']``, or, for an exact total, the
    family's exact ``log_evidence_pointwise`` when it adds up to that total."""
    if "pointwise" in ev.details:
        return ev.details["pointwise"]
    if ev.exact and isinstance(family, PointwiseEvidence):
        values = family.log_evidence_pointwise(x)
        if abs(float(values.double().sum()) - ev.value) <= 1e-6 * max(1.0, abs(ev.value)):
            return values
        raise ValueError(f"log_evidence: the exact total {ev.value:.6f} is not the {family.name} "
                         f"family's log evidence of these data ({float(values.sum()):.6f})")
    raise ValueError("log_evidence: an Evidence needs details['pointwise'] (n,) values "
                     "for a per-data-point decomposition")


def matching_local_family(guide) -> str:
    """The local family q*_F is taken from by default: the one the guide's own q lies in.
    A diagonal-Gaussian guide (``mean-field``, ``linear-diag``, ``mlp``, ``semi-amortized``) ->
    ``mean-field``; a full-covariance Gaussian (``linear-full``, ``full-rank``, ``exact``) ->
    ``full-rank``; a flow (``flow``, ``local-flow``) -> ``local-flow``."""
    if not isinstance(guide, LatentGuide):
        raise ValueError(f"local_family: cannot tell the family of a {type(guide).__name__} "
                         "guide; pass local_family= (e.g. 'mean-field' or 'full-rank')")
    if guide.kind in ("flow", "local-flow"):
        return "local-flow"
    return "mean-field" if guide.diagonal else "full-rank"


# -- optimizing a guide with the model fixed ---------------------------------------------------
def optimize_guide(family, x, guide, *, method: str = "auto", settings: QStarSettings | None = None,
                   posterior=None) -> OptimizeRun:
    """Maximize the ELBO over ``guide``'s parameters with the model's parameters fixed, in the
    current param store. ``closed-form``: L-BFGS on sum_n KL(q_n || p(z | x_n)); ``svi``: Adam on
    the Monte Carlo ELBO (:func:`elbolab.inference.svi.loop.run_svi`, model params blocked)."""
    settings = settings or QStarSettings()
    method = choice(method, "method", ("auto", "closed-form", "svi"))
    if method == "auto":
        method = "closed-form" if closed_form_available(family, x, guide) else "svi"
    n = x.shape[0]
    if method == "svi":
        s = SviSettings(num_steps=settings.steps, lr=settings.lr,
                         num_particles=settings.num_particles, lr_decay=settings.lr_decay,
                         tol=settings.tol, window=settings.window, learn_model_params=False)
        run = run_svi(family.model, guide, (x,), s, max_plate_nesting=family.max_plate_nesting)
        return OptimizeRun("svi", run.trace, run.converged, run.steps, run.message)
    if not closed_form_available(family, x, guide):
        raise MissingCapability(
            f"method: closed-form needs the {family.name} family's ExactLocalPosterior and "
            "PointwiseEvidence capabilities, and a Gaussian elbolab.guides.LatentGuide")
    post = posterior if posterior is not None else detached_posterior(family, x)
    lp = family.log_evidence_pointwise(x).detach()
    guide.register()  # syncs the module with the param store; then its tensors are the leaves
    params = [p for p in guide.parameters() if p.requires_grad]
    if not params:
        return OptimizeRun("closed-form", [], True, 0, "guide has no parameters")
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=50, history_size=20,
                            tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")
    out = OptimizeRun("closed-form")

    def closure():
        opt.zero_grad()
        loc, tril = guide.moments(x)
        loss = kl_divergence(mvn(loc, tril), post).sum()
        loss.backward()
        return loss

    last = math.inf
    while out.steps < settings.steps:
        loss = float(opt.step(closure).detach())
        before, out.steps = out.steps, int(opt.state[params[0]].get("n_iter", out.steps))
        with torch.no_grad():
            loc, tril = guide.moments(x)
            kl = float(kl_divergence(mvn(loc, tril), post).sum())
        out.trace.append(float(lp.sum()) - kl)
        if not math.isfinite(loss):
            out.message = "objective became non-finite"
            return out
        if abs(last - kl) <= settings.tol * n or out.steps == before:
            out.converged = True
            break
        last = kl
    out.message = (f"converged after {out.steps} L-BFGS iterations" if out.converged
                   else f"reached steps={settings.steps} without converging")
    return out


# -- the decomposition --------------------------------------------------------------------------
def gap_terms(family, x, amortized_guide, local_family=None, *, log_evidence=None,
              optimizer: str = "auto", estimator: str = "auto",
              settings: QStarSettings | None = None, num_particles: int = 1000,
              particle_batch: int | None = None, data_batch: int | None = None, seed: int = 0,
              guide_options: dict | None = None) -> GapTerms:
    """Everything :func:`decompose_gaps` reports, as tensors, plus the fitted q*_F guide."""
    x = family.check_data(x)
    optimizer = choice(optimizer, "optimizer", ("auto", "closed-form", "svi"))
    estimator = choice(estimator, "estimator", ("auto", "closed-form", "mc"))
    integer(num_particles, "num_particles", minimum=2)
    settings = settings or QStarSettings()
    if not callable(amortized_guide):
        raise TypeError("amortized_guide: must be a fitted guide (callable), e.g. from elbolab.guides.make")
    if local_family is None:
        local_family = matching_local_family(amortized_guide)
    lspec = _local_spec(family, local_family)
    options = {"site": "z", "name": f"qstar_{lspec.name}"}
    if isinstance(amortized_guide, LatentGuide):
        options.update(latent_dim=amortized_guide.latent_dim, site=amortized_guide.site)
    options.update(guide_options or {})
    with caller_scope(seed):  # sees the caller's params; q*'s are dropped afterwards
        q_star = lspec.build(family, x, **options)
        if getattr(amortized_guide, "scalar_site", False) and isinstance(q_star, LatentGuide):
            q_star.scalar_site = True  # the site has event shape (): q* samples it so too
        if isinstance(q_star, LocalGuide) and isinstance(amortized_guide, LatentGuide):
            with torch.no_grad():
                q_star.warm_start(amortized_guide, x)
        closed = closed_form_available(family, x, q_star, amortized_guide)
        if estimator == "auto":
            estimator = "closed-form" if closed and log_evidence is None else "mc"
        if estimator == "closed-form" and not closed:
            raise MissingCapability(
                f"estimator: closed-form needs the {family.name} family's ExactLocalPosterior and "
                "PointwiseEvidence capabilities, and Gaussian elbolab.guides.LatentGuide guides")
        lp, lp_se, ev_method = resolve_log_evidence(family, x, log_evidence)
        run = optimize_guide(family, x, q_star, method=optimizer, settings=settings)
        with torch.no_grad():
            kw = dict(num_particles=num_particles, particle_batch=particle_batch,
                      data_batch=data_batch, max_plate_nesting=family.max_plate_nesting)
            w_star = log_weights(family.model, q_star, x, **kw)
            w_q = log_weights(family.model, amortized_guide, x, **kw)
            if estimator == "closed-form":
                post = exact_posterior_mvn(family, x)
                exact_lp = family.log_evidence_pointwise(x)
                l_star = closed_form_elbo(family, x, q_star, posterior=post, log_evidence=exact_lp)
                l_q = closed_form_elbo(family, x, amortized_guide, posterior=post,
                                       log_evidence=exact_lp)
                l_star_se, l_q_se = torch.zeros_like(l_star), torch.zeros_like(l_q)
            else:
                root = math.sqrt(num_particles)
                l_star, l_star_se = w_star.mean(0), w_star.std(0) / root
                l_q, l_q_se = w_q.mean(0), w_q.std(0) / root
    ev_ess, ev_khat = evidence_weight_diagnostics(log_evidence, x.shape[0])
    diag = {"ess_amortized": importance_ess(w_q, axis=0),
            "khat_amortized": pareto_khat(w_q, axis=0),
            "ess_q_star": importance_ess(w_star, axis=0), "khat_q_star": pareto_khat(w_star, axis=0),
            "log_evidence_ess": ev_ess, "log_evidence_khat": ev_khat}
    values = {
        "log_evidence": lp, "elbo_q_star": l_star, "elbo_amortized": l_q,
        "approximation_gap": lp - l_star, "amortization_gap": l_star - l_q,
        "inference_gap": lp - l_q,
    }
    se = {
        "log_evidence": lp_se, "elbo_q_star": l_star_se, "elbo_amortized": l_q_se,
        "approximation_gap": _hypot(lp_se, l_star_se),
        "amortization_gap": _hypot(l_star_se, l_q_se),
        "inference_gap": _hypot(lp_se, l_q_se),
    }
    info = {
        "amortized_guide": (amortized_guide.kind if isinstance(amortized_guide, LatentGuide)
                            else type(amortized_guide).__name__),
        "local_family": lspec.name, "optimizer": run.method, "estimator": estimator,
        "num_particles": num_particles if estimator == "mc" else 0,
        "diagnostic_particles": num_particles,
        "q_star_converged": run.converged, "q_star_steps": run.steps,
        "q_star_message": run.message, "seed": seed,
    }
    terms = GapTerms({k: v.detach() for k, v in values.items()},
                     {k: v.detach() for k, v in se.items()}, q_star, run, estimator, ev_method,
                     info, diag)
    warn_if_flagged(terms)
    return terms


def decompose_gaps(family, x, amortized_guide, local_family=None,
                   **options) -> pd.DataFrame:
    """One call: the per-point, total and mean approximation / amortization / inference gaps.

    Returns a DataFrame with a row per data point (``scope == "point"``, ``index`` = row of x),
    then a ``total`` row (sums) and a ``mean`` row (per datum); for every quantity in
    :data:`QUANTITIES` a value column and ``<quantity>_se``; ``<quantity>_se_points`` on the mean
    row (see the module docstring); the :data:`DIAGNOSTICS` columns (per point; on the total and
    mean rows the largest k-hat and smallest ESS over the points) and ``flagged`` / ``flags``.
    ``DataFrame.attrs`` holds how it was computed. ``local_family``: default
    :func:`matching_local_family`.
    Options are those of :func:`gap_terms`: ``log_evidence`` (per-point tensor, (values, se) or an
    Evidence with ``details['pointwise']``; default ``family.log_evidence_pointwise``),
    ``optimizer``, ``estimator``, ``settings`` (:class:`QStarSettings`), ``num_particles``,
    ``particle_batch``, ``data_batch``, ``seed``, ``guide_options`` (for the local family).

    The model's parameters are whatever ``family.model`` reads: constants held by the family
    (e.g. ``FactorAnalysis(k, params=...)``), weights of its modules (a VAE decoder), or
    ``pyro.param``s in the caller's param store; they are never changed. The amortized guide is
    not changed either; q*_F lives in a copy of the store that is dropped afterwards.
    float32 data: ELBOs near -10 nats carry ~1e-6 nats of rounding not in the SEs.
    """
    return gap_terms(family, x, amortized_guide, local_family, **options).frame()


def summary_row(df: pd.DataFrame, scope: str = "mean") -> dict:
    """The ``total`` or ``mean`` row of a :func:`decompose_gaps` frame, as a dict."""
    choice(scope, "scope", ("total", "mean"))
    return df[df["scope"] == scope].iloc[0].to_dict()


def _local_spec(family, local_family):
    """A GuideSpec, a name from ``elbolab.guides.LATENT_GUIDES``, or a name from
    ``elbolab.guides.for_family(family)``."""
    if isinstance(local_family, str) and local_family not in guide_registry.LATENT_GUIDES:
        specs = guide_registry.for_family(family)
        if local_family in specs:
            return specs[local_family]
    return guide_registry.spec(local_family)


def _hypot(a, b):
    return (a.pow(2) + b.pow(2)).sqrt()


__all__ = [
    "DIAGNOSTICS", "GAPS", "GAP_SLACK", "QUANTITIES", "GapTerms", "OptimizeRun", "QStarSettings",
    "closed_form_available", "closed_form_elbo", "decompose_gaps", "exact_posterior_mvn",
    "gap_terms", "gaussian_approximation_gap", "matching_local_family", "optimize_guide",
    "resolve_log_evidence", "summary_row", "tightest_evidence",
]
