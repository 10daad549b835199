"""Diagnostics that read the same for every engine: PSIS k-hat of a variational fit, importance
ESS, and the tightest evidence at hand (comparisons with a reference posterior and MCMC checks per
quantity are in :mod:`elbolab.inference.evaluation.reference`).

PSIS (Yao, Vehtari, Simpson & Gelman 2018, "Yes, but did it work?"). For draws z_s ~ q the log
importance weights are

    log w_s = log p(x, z_s) - log q(z_s)                                                  (1)

(discrete model sites the guide does not sample are summed out exactly, so p(x, z_s) is then the
collapsed joint; every constant kept). k-hat is the shape of the generalized Pareto distribution
fitted to the largest weights (Pareto-smoothed importance sampling, Vehtari et al. 2024; ArviZ's
``psislw``). Reading: k < 0.5 good, 0.5-0.7 usable, k > 0.7 q is not reliable as an importance
proposal for p(z | x) (importance-weighted estimates such as IWAE with q, and the variational
posterior's tails, cannot be trusted). When all weights are equal (q = p(z | x) exactly) the
generalized Pareto fit is undefined and k-hat is reported as -inf (importance sampling is exact).

*Overall* k-hat uses the joint weight (1) over all latents (globals and every data point's
locals). *Per point* k-hats use w_ns = log p(x_n, z_ns) - log q(z_ns | x_n); they are defined
when every latent and observed site lies in the plate ``"data"`` (no global latent), and then the
joint weight of draw s is sum_n w_ns. The importance-sampling effective sample size is
ESS = (sum_s w_s)^2 / sum_s w_s^2.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.ops.contract import contract_to_tensor

from elbolab.inference import arviz_io
from elbolab.inference.evaluation.evidence import seeded
from elbolab.inference.tracing import site_is_plate, to_numpy
from elbolab.models.capabilities import Evidence
from elbolab.models.validate import integer

#: k-hat above this: the approximation is not reliable for importance-weighted estimates
KHAT_THRESHOLD = 0.7
#: fewer draws than this give no k-hat (PSIS fits the largest min(0.2 S, 3 sqrt(S)) weights;
#: ArviZ needs at least 5 of them)
MIN_PSIS_SAMPLES = 25
PARTICLES = "_psis_particles"
DATA = "data"
CHUNK_ELEMENTS = 2**17  # (particle, data point) pairs per vectorized chunk


# -- k-hat and ESS of given log weights -----------------------------------------------------------
def pareto_khat(log_weights, axis: int = -1):
    """PSIS k-hat of log importance weights along ``axis`` (ArviZ ``psislw``, r_eff = 1):
    a float for a 1-D input, else an array over the other axes. Equal weights give -inf;
    fewer than :data:`MIN_PSIS_SAMPLES` draws give NaN (not estimated); weights so uneven that
    fewer than 5 tail weights are nonzero in float64 give +inf (ArviZ's value: one draw holds
    all the weight); a NaN weight is an error."""
    lw = np.moveaxis(np.asarray(to_numpy(log_weights), dtype=np.float64), axis, -1)
    if np.isnan(lw).any():
        raise ValueError("log_weights: contain NaN")
    if lw.shape[-1] < MIN_PSIS_SAMPLES:
        out = np.full(lw.shape[:-1], np.nan)
        return float(out) if out.ndim == 0 else out
    flat = lw.reshape(-1, lw.shape[-1])
    top = flat.max(-1, keepdims=True)
    if not np.isfinite(top).all():
        raise ValueError("log_weights: a row has no finite weight (or an infinite one)")
    equal = np.ptp(flat, axis=-1) <= 1e-10 * np.maximum(1.0, np.abs(top[:, 0]))
    k = np.full(flat.shape[0], -np.inf)
    if (~equal).any():  # shifted: psislw exponentiates
        k[~equal] = arviz_io.pareto_khat(flat[~equal] - top[~equal])
    k = k.reshape(lw.shape[:-1])
    return float(k) if k.ndim == 0 else k


def importance_ess(log_weights, axis: int = -1):
    """ESS = (sum w)^2 / sum w^2 along ``axis`` (1 <= ESS <= number of draws)."""
    lw = torch.as_tensor(to_numpy(log_weights), dtype=torch.float64).movedim(axis, -1)
    ess = torch.exp(2 * torch.logsumexp(lw, -1) - torch.logsumexp(2 * lw, -1))
    return float(ess) if ess.dim() == 0 else ess.numpy()


# -- log weights of a model/guide pair ------------------------------------------------------------
@dataclass
class ImportanceWeights:
    """Log weights (1): ``joint`` (S,) and, when there is no global latent, ``pointwise`` (S, n)."""

    joint: torch.Tensor
    pointwise: torch.Tensor | None
    note: str = ""


def importance_log_weights(model, guide, x, *, num_samples: int = 1000,
                           max_plate_nesting: int = 1, particle_batch: int | None = None,
                           seed: int = 0, plate: str = DATA) -> ImportanceWeights:
    """Log weights (1) of ``num_samples`` draws from ``guide(x)`` under ``model(x)``.

    Draws are vectorized by an outer plate at dim -(max_plate_nesting + 1), in chunks of
    ``particle_batch``. A pair that cannot take the particle plate (a latent site with batch
    dimensions outside any plate, such as eight schools' ``eta`` of shape (J,), a network that
    takes no extra batch dimension, fancy indexing) has its draws made one at a time instead, as
    the note says; k-hat needs only the S weights. Discrete model sites the guide does not sample
    are enumerated and summed out exactly (Pyro's tensor contraction, as ``TraceEnum_ELBO``
    does); a continuous model site the guide does not sample is an error naming it. Guide sites
    marked for enumeration are sampled. The draws are seeded by ``seed`` without touching the
    caller's random state. ``plate``: the plate over data points (a plain program's may have
    another name).
    """
    S = integer(num_samples, "num_samples", minimum=2)
    nest = integer(max_plate_nesting, "max_plate_nesting", minimum=1)
    n = x.shape[0]
    c = particle_batch or max(1, min(S, CHUNK_ELEMENTS // max(n, 1)))
    c = integer(c, "particle_batch", minimum=1)
    parts = []
    with seeded(seed, x.device), torch.no_grad():
        local, note, enum = _structure(model, guide, x, plate)
        try:
            left = S
            while left > 0:
                m = min(c, left)
                parts.append(_chunk(model, guide, x, m, nest, local, plate))
                left -= m
        except (ValueError, RuntimeError, IndexError) as exc:
            vector_error = exc
        else:
            vector_error = None
        if vector_error is not None:
            parts = _one_at_a_time(model, guide, x, S, nest, local, enum, vector_error, plate)
            why = f"particles drawn one at a time (vectorized: {reason(vector_error)})"
            note = f"{note}; {why}" if note else why
    w = torch.cat(parts, 0)
    if local:
        return ImportanceWeights(w.sum(-1), w, note)
    return ImportanceWeights(w, None, note)


def reason(exc: BaseException, limit: int = 400) -> str:
    """An exception's message as one line that keeps its cause: a first line ending with ':'
    (Pyro's "Error while packing tensors at site 'eta':") is followed by its next lines (at most
    three, up to the next heading such as "Trace Shapes:"), and a message that still ends with
    ':' or says nothing gets the chained exception's own :func:`reason`. At most ``limit``
    characters. (The CLI's one-line errors use it too.)"""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if text.endswith(":"):
        for ln in lines[1:4]:
            if ln.endswith(":"):
                break
            text = f"{text} {ln}"
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if (not text or text.endswith(":")) and cause is not None and cause is not exc:
        text = f"{text} {reason(cause, limit)}".strip()
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_at_a_time(model, guide, x, S, nest, local, enum, vector_error, plate=DATA):
    """Log weights (1) of S draws traced one by one: (S,) or, when ``local``, (S, n)."""
    n = x.shape[0]
    out = torch.empty((S, n) if local else (S,), dtype=x.dtype, device=x.device)
    for s in range(S):
        try:
            gtr = poutine.trace(guide).get_trace(x)
            m = poutine.replay(model, trace=gtr)
            if enum:
                m = poutine.enum(config_enumerate(m, default="parallel"),
                                 first_available_dim=-(nest + 1))
            mtr = poutine.trace(m).get_trace(x)
            if local or enum:
                target = (plate,) if local else ()
                out[s] = (_contract(mtr, target, (n,) if local else (), enum=True)
                          - _contract(gtr, target, (n,) if local else (), enum=False))
            else:
                out[s] = _log_prob_sum(mtr) - _log_prob_sum(gtr)
        except (ValueError, RuntimeError, IndexError) as exc:
            raise ValueError(
                "PSIS needs the latent sites inside the data plate or vectorizable particles: "
                f"vectorized, {reason(vector_error)}; one particle at a time, {reason(exc)}"
            ) from exc
    return [out]


def _log_prob_sum(trace) -> torch.Tensor:
    """Sum of every random site's log-prob, every batch dimension included (no plate needed)."""
    trace.compute_log_prob(site_filter=lambda name, site: _random(site))
    return torch.stack([site["log_prob"].sum() for site in trace.nodes.values()
                        if _random(site)]).sum()


def _structure(model, guide, x, plate=DATA):
    """(all sites in the data plate, note, model has discrete sites to sum out); errors for latent
    sites the guide leaves uncovered."""
    with torch.no_grad(), poutine.block():
        gtr = poutine.trace(guide).get_trace(x)
        mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(x)
    uncovered = [k for k, s in mtr.nodes.items() if _latent(s) and k not in gtr.nodes
                 and not s["fn"].has_enumerate_support]
    if uncovered:
        raise ValueError(f"guide: does not sample the model's continuous latent site(s) "
                         f"{uncovered}; importance weights need q over every continuous latent")
    enum = any(_latent(s) and k not in gtr.nodes for k, s in mtr.nodes.items())
    outside = sorted({k for tr in (gtr, mtr) for k, s in tr.nodes.items()
                      if _random(s) and not _in_data(s, plate)})
    if outside:
        return False, f"site(s) {outside} outside plate {plate!r}: overall k-hat only", enum
    return True, "", enum


def _random(site) -> bool:
    return (site["type"] == "sample" and not site_is_plate(site)
            and not site["infer"].get("_deterministic") and not site["infer"].get("is_auxiliary"))


def _latent(site) -> bool:
    return _random(site) and not site["is_observed"]


def _in_data(site, plate=DATA) -> bool:
    return any(f.name == plate for f in site["cond_indep_stack"])


def _chunk(model, guide, x, S, nest, local, plate=DATA):
    def vectorized(fn):
        def wrapped(*args, **kwargs):
            with pyro.plate(PARTICLES, S, dim=-(nest + 1)):
                return fn(*args, **kwargs)
        return wrapped

    gtr = poutine.trace(vectorized(guide)).get_trace(x)
    enum_model = poutine.enum(config_enumerate(poutine.replay(vectorized(model), trace=gtr),
                                               default="parallel"),
                              first_available_dim=-(nest + 2))
    mtr = poutine.trace(enum_model).get_trace(x)
    target, shape = ((PARTICLES, plate), (S, x.shape[0])) if local else ((PARTICLES,), (S,))
    return (_contract(mtr, target, shape, enum=True)
            - _contract(gtr, target, shape, enum=False))


def _contract(trace, target, shape, *, enum):
    """Sum of the trace's log-probs down to the plates ``target`` (enumerated dims summed out),
    as a tensor of ``shape`` (one size per target plate)."""
    trace.compute_log_prob(site_filter=lambda name, site: _random(site))
    trace.pack_tensors()
    p2s = trace.plate_to_symbol
    factors = OrderedDict()
    for site in trace.nodes.values():
        if _random(site):
            ordinal = frozenset(p2s[f.name] for f in site["cond_indep_stack"] if f.vectorized)
            factors.setdefault(ordinal, []).append(site["packed"]["log_prob"])
    sum_dims = (set(trace.symbol_to_dim) - set(p2s.values())) if enum else set()
    syms = [p2s.get(name) for name in target]
    out = contract_to_tensor(factors, sum_dims,
                             target_ordinal=frozenset(s for s in syms if s is not None))
    dims = getattr(out, "_pyro_dims", "")
    t = out.permute([dims.index(s) for s in syms if s is not None and s in dims])
    for i, s in enumerate(syms):  # a plate no factor depends on: broadcast
        if s is None or s not in dims:
            t = t.unsqueeze(i)
    return t.expand(shape)


# -- PSIS of a fit --------------------------------------------------------------------------------
# -- the evidence a gap is measured from ---------------------------------------------------------
def evidence_weight_diagnostics(evidence, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(ESS (n,), k-hat (n,)) of an estimated Evidence: ``details['ess']`` and the k-hat of
    ``details['log_weights']`` (draws, n) when the estimator kept them (AIS does); NaN where
    unknown, and for an exact evidence (no weights)."""
    nan = np.full(n, np.nan)
    if not isinstance(evidence, Evidence) or evidence.exact:
        return nan, nan
    ess = evidence.details.get("ess")
    ess = nan if ess is None else np.broadcast_to(to_numpy(ess).astype(np.float64), (n,)).copy()
    lw = evidence.details.get("log_weights")
    khat = nan
    if lw is not None and tuple(lw.shape)[-1] == n:
        khat = np.asarray(pareto_khat(lw, axis=0), dtype=np.float64).reshape(n)
    return ess, khat


def tightest_evidence(*evidences: Evidence) -> Evidence:
    """The largest of several lower bounds on log p(x) (e.g. AIS and IWAE, both stochastic lower
    bounds), with the BDMC upper bound (``method == "bdmc-upper"``) kept beside it.

    An exact evidence (``Evidence.exact``) wins outright. Otherwise the lower bound with the
    larger total is returned (a copy); its ``details`` gain ``candidates`` (method -> total),
    ``chosen_from`` and, when given, ``upper`` (the upper-bound Evidence) and ``upper_value``.
    Chosen by total, not per point: a per-point maximum of noisy estimates is biased upward.
    """
    if not evidences:
        raise ValueError("evidences: give at least one Evidence")
    for e in evidences:
        if not isinstance(e, Evidence):
            raise TypeError(f"evidences: expected elbolab.models.capabilities.Evidence, got "
                            f"{type(e).__name__}")
    lowers = [e for e in evidences if e.method != "bdmc-upper"]
    uppers = [e for e in evidences if e.method == "bdmc-upper"]
    if not lowers:
        raise ValueError("evidences: only upper bounds given; need a lower bound or exact value")
    if len({e.n for e in evidences}) > 1:
        raise ValueError(f"evidences: cover different numbers of points {[e.n for e in evidences]}")
    exact = [e for e in lowers if e.method in ("exact", "enumeration")]
    best = exact[0] if exact else max(lowers, key=lambda e: e.value)
    details = dict(best.details)
    details["candidates"] = {e.method: e.value for e in lowers}
    details["chosen_from"] = [e.method for e in lowers]
    if uppers:
        details["upper"] = min(uppers, key=lambda e: e.value)
        details["upper_value"] = details["upper"].value
    return Evidence(best.value, best.se, best.method, best.n, details)


__all__ = [
    "KHAT_THRESHOLD", "MIN_PSIS_SAMPLES", "ImportanceWeights", "evidence_weight_diagnostics",
    "importance_ess", "importance_log_weights", "pareto_khat", "reason", "tightest_evidence",
]
