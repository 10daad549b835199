"""Generic imputation of missing entries by importance resampling on the observed part.

For a model with fixed parameters, a row x_n with missing entries (mask m_n, True = missing):

    z_s ~ r(z | x_n)  (the prior p(z), or a guide q(z | x_n~) on the row with gaps filled,
                       mixed with the prior: r = a p(z) + (1 - a) q(z | x_n~))
    log w_s = log p(x_obs | z_s) + log p(z_s) - log r(z_s)                        (1)
    E[x_mis | x_obs] ~= sum_s w~_s E[x_mis | z_s]          (w~ = self-normalized w)   (2)
    x_mis^(j) ~ p(x_mis | z_s(j)),  s(j) ~ Categorical(w~)  (multiple imputations)   (3)
    log p(x_obs) ~= log (1/S) sum_s exp(log w_s)          (a stochastic lower bound)

(2) is Rao-Blackwellized (it averages the conditional means rather than draws); its delta-method
SE is sqrt(sum_s w~_s^2 (E[x_mis | z_s] - (2))^2). ESS = 1 / sum_s w~_s^2.

What the family must supply: a Pyro ``model(x, subsample_size=None)`` whose latent site (``site``,
default "z") and observed site (``obs_site``, default "x") lie in the data plate, where the
observation factorizes over entries: ``Independent(elementwise distribution)`` or an elementwise
distribution (Normal, Bernoulli, ...). p(x | z) is read from the model's trace with z given, or
from ``family.observation_dist(z)`` when the family defines it (same contract: batch (..., n),
event = the row's shape, entrywise ``base_dist``). The model is called on the data with the
missing entries filled in (their values are never used: only observed entries enter (1)).

Also :func:`pseudo_gibbs_impute` (an amortized encoder alternating with p(x_mis | z)) and the
baselines :func:`column_mean_impute` and :func:`rmse`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pyro import poutine
from torch.distributions import Independent

from elbolab.inference.evaluation.evidence import seeded
from elbolab.inference.evaluation.pointwise import caller_scope, vectorized
from elbolab.models.validate import as_data, integer, probability


@dataclass
class Imputation:
    """Filled data (observed entries kept), SEs of the filled means, draws and diagnostics."""

    mean: torch.Tensor  # (n, ...) x with missing entries replaced by (2)
    mean_se: torch.Tensor  # (n, ...) SE of (2) on missing entries, 0 on observed ones
    draws: torch.Tensor | None  # (m, n, ...) multiple imputations (3), or None
    ess: torch.Tensor  # (n,) effective sample size of the weights
    log_evidence_obs: torch.Tensor  # (n,) log (1/S) sum_s w_s, an estimate of log p(x_obs,n)
    num_particles: int
    proposal: str


def missing_mask(x, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as a tensor, bool mask True = missing); default mask = isnan(x); NaN must be masked."""
    x = as_data(x, "x", ndim=(2, 3, 4), allow_nan=True)
    if mask is None:
        mask = torch.isnan(x)
    else:
        mask = torch.as_tensor(mask, device=x.device)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: must be boolean (True = missing), got {mask.dtype}")
        if mask.shape != x.shape:
            raise ValueError(f"mask: shape {tuple(mask.shape)} differs from x {tuple(x.shape)}")
        if (torch.isnan(x) & ~mask).any():
            raise ValueError("mask: x has NaN entries that the mask marks as observed")
    return x, mask


def column_mean_impute(x, mask=None) -> torch.Tensor:
    """Baseline: each missing entry becomes the mean of its column's observed entries."""
    x, mask = missing_mask(x, mask)
    obs = (~mask).to(x.dtype)
    counts = obs.sum(0)
    if (counts == 0).any():
        raise ValueError("x: some column has no observed entry; its mean is undefined")
    mean = torch.where(mask, torch.zeros((), **_like(x)), x).sum(0) / counts
    return torch.where(mask, mean.expand_as(x), x)


def rmse(imputed, truth, mask) -> float:
    """Root mean squared error over the missing entries only."""
    imputed = torch.as_tensor(imputed)
    truth = torch.as_tensor(truth).to(imputed)
    mask = torch.as_tensor(mask).to(torch.bool)
    if truth.shape != imputed.shape:
        raise ValueError(f"truth: shape {tuple(truth.shape)} differs from imputed "
                         f"{tuple(imputed.shape)}")
    if mask.shape != imputed.shape:
        raise ValueError(f"mask: shape {tuple(mask.shape)} differs from imputed "
                         f"{tuple(imputed.shape)}")
    if not mask.any():
        raise ValueError("mask: no missing entries to score")
    diff = (imputed - truth)[mask.to(imputed.device)]
    return float(diff.pow(2).mean().sqrt())


def importance_impute(family, x, mask=None, *, proposal="prior", num_particles: int = 1000,
                      num_imputations: int = 0, particle_batch: int | None = None,
                      data_batch: int | None = None, defensive: float = 0.2, site: str = "z",
                      obs_site: str = "x", seed: int = 0) -> Imputation:
    """Impute the missing entries of ``x`` (NaN, or ``mask`` True) by (1)-(3).

    ``proposal``: ``"prior"`` or a fitted guide called as ``guide(x_filled, subsample_size=...)``
    on the rows with missing entries filled by their column means, mixed with the prior:
    r = defensive p(z) + (1 - defensive) q(z | x~) (``defensive`` in [0, 1), so the weights are
    bounded by p(x_obs | z) / defensive whatever q). ``particle_batch`` /
    ``data_batch`` bound memory (the weights of one row need all its particles, so particles are
    chunked only for the draws, not the normalization: the (S, n) log weights are kept).
    """
    x, mask = missing_mask(x, mask)
    S = integer(num_particles, "num_particles", minimum=2)
    M = integer(num_imputations, "num_imputations", minimum=0)
    pb = S if particle_batch is None else min(integer(particle_batch, "particle_batch"), S)
    n = x.shape[0]
    db = n if data_batch is None else min(integer(data_batch, "data_batch"), n)
    if isinstance(proposal, str) and proposal != "prior":
        raise ValueError(f"proposal: must be 'prior' or a guide, got {proposal!r}")
    if not isinstance(proposal, str) and not callable(proposal):
        raise TypeError(f"proposal: must be 'prior' or a guide (callable), got {proposal!r}")
    defensive = probability(defensive, "defensive")
    filled = _fill(x, mask)
    nest = getattr(family, "max_plate_nesting", 1)
    means, ses, esss, logzs, draws = [], [], [], [], []
    with caller_scope(seed), torch.no_grad():
        for start in range(0, n, db):
            idx = torch.arange(start, min(start + db, n), device=x.device)
            rows = None if db == n else idx
            xb, mb = x.index_select(0, idx), mask.index_select(0, idx)
            acc, logw, zs = _Moments(), [], []
            left = S
            while left > 0:
                s = min(pb, left)
                lw, obs_fn, z = _weights(family, filled, mask, rows, s, proposal, defensive,
                                         site, obs_site, nest)
                acc.add(lw, obs_fn.mean.expand(lw.shape + x.shape[1:]))
                logw.append(lw)
                zs.append(z)
                left -= s
            lw = torch.cat(logw, 0)  # (S, b)
            m, se = acc.result()
            means.append(torch.where(mb, m, xb))
            ses.append(torch.where(mb, se, torch.zeros((), **_like(x))))
            esss.append(1.0 / torch.softmax(lw, 0).pow(2).sum(0))
            logzs.append(torch.logsumexp(lw, 0) - math.log(S))
            if M:
                draws.append(_draws(family, filled, rows, lw, torch.cat(zs, 0), xb, mb, M,
                                    site, obs_site, nest))
    return Imputation(
        mean=torch.cat(means), mean_se=torch.cat(ses),
        draws=torch.cat(draws, 1) if M else None, ess=torch.cat(esss),
        log_evidence_obs=torch.cat(logzs), num_particles=S,
        proposal="prior" if isinstance(proposal, str) else getattr(proposal, "kind", "guide"),
    )


def pseudo_gibbs_impute(family, encoder, x, mask=None, *, steps: int = 50, burn_in: int = 10,
                        fill=None, seed: int = 0) -> torch.Tensor:
    """Pseudo-Gibbs imputation (Rezende, Mohamed & Wierstra 2014, sec. 5.3): start from ``fill``
    (a (D,) or (n, D) tensor; default: the observed column means, 0.5 where a column has none),
    then repeat z ~ q(z | x~), x~_mis ~ p(x_mis | z) (observed entries kept); the result averages
    E[x_mis | z] over the ``steps - burn_in`` last sweeps. ``family``: a local-latent family
    (``observation_dist(z)``, the model's p(x | z)); ``encoder``: an amortized guide with
    ``distribution(x)`` (e.g. ``elbolab.guides.make("mlp", ...)`` after training). Returns x with the
    missing entries (NaN, or ``mask`` True) filled.
    """
    x, mask = missing_mask(x, mask)
    steps = integer(steps, "steps", minimum=1)
    burn_in = integer(burn_in, "burn_in", minimum=0, maximum=steps - 1)
    if fill is None:
        obs = (~mask).to(x.dtype)
        zero = torch.zeros((), device=x.device, dtype=x.dtype)
        total = torch.where(mask, zero, x).sum(0)
        fill = torch.where(obs.sum(0) > 0, total / obs.sum(0).clamp_min(1), zero + 0.5)
    fill = torch.as_tensor(fill, device=x.device, dtype=x.dtype).expand_as(x)
    filled = torch.where(mask, fill, x)
    acc = torch.zeros_like(filled)
    with seeded(seed, x.device), torch.no_grad():
        for t in range(steps):
            z = encoder.distribution(filled).sample()
            p_x = family.observation_dist(z)
            draw = p_x.sample()
            if t >= burn_in:
                acc += p_x.mean
            filled = torch.where(mask, draw, x)
    return torch.where(mask, acc / (steps - burn_in), x)


class _Moments:
    """Streaming self-normalized sums over particle chunks (log-sum-exp rescaled):
    m = sum_s w~_s h_s and se^2 = sum_s w~_s^2 (h_s - m)^2
    = [sum e^(2l) h^2 - 2 m sum e^(2l) h + m^2 sum e^(2l)] / (sum e^l)^2."""

    def __init__(self):
        self.c = None

    def add(self, lw, h):
        c_new = lw.max(0).values if self.c is None else torch.maximum(self.c, lw.max(0).values)
        e = (lw - c_new).exp()
        ev = (slice(None), slice(None)) + (None,) * (h.dim() - 2)
        e, e2 = e[ev], e.pow(2)[ev]
        parts = (e.sum(0), (e * h).sum(0), e2.sum(0), (e2 * h).sum(0), (e2 * h * h).sum(0))
        if self.c is None:
            self.sums = list(parts)
        else:
            r = (self.c - c_new)[(slice(None),) + (None,) * (h.dim() - 2)]
            scale = (r.exp(), r.exp(), (2 * r).exp(), (2 * r).exp(), (2 * r).exp())
            self.sums = [s * f + p for s, f, p in zip(self.sums, scale, parts)]
        self.c = c_new

    def result(self):
        z, zh, z2, z2h, z2hh = self.sums
        m = zh / z
        var = (z2hh - 2 * m * z2h + m * m * z2) / (z * z)
        return m, var.clamp_min(0).sqrt()


def _like(x):
    return {"device": x.device, "dtype": x.dtype}


def _fill(x, mask):
    obs = (~mask).to(x.dtype)
    counts = obs.sum(0).clamp_min(1)
    mean = torch.where(mask, torch.zeros((), **_like(x)), x).sum(0) / counts
    return torch.where(mask, mean.expand_as(x), x)


def _entrywise(fn, event_ndim: int):
    """The elementwise distribution behind p(x | z) (batch ..., event dims as batch dims)."""
    base, r = fn, 0
    while isinstance(base, Independent):
        r += base.reinterpreted_batch_ndims
        base = base.base_dist
    if base.event_shape != () or r != event_ndim:
        raise TypeError(
            "observation: p(x | z) must factorize over the entries of a row "
            f"(Independent of an elementwise distribution), got {type(fn).__name__}"
        )
    return base


def _weights(family, filled, mask, rows, S, proposal, defensive, site, obs_site, nest):
    """Log weights (1) of shape (S, b) and the elementwise p(x | z_s)."""
    kw, cond = {}, {}
    if rows is not None:
        kw["subsample_size"] = rows.shape[0]
        cond = {"data": rows}
    model = vectorized(family.model, S, nest)
    mtr = poutine.trace(poutine.condition(model, data=cond)).get_trace(filled, **kw)
    for name in (site, obs_site):
        if name not in mtr.nodes:
            raise ValueError(f"{'site' if name == site else 'obs_site'}: the model has no site "
                             f"{name!r}")
    log_w_z = None
    if not isinstance(proposal, str):
        # defensive mixture r = a p(z) + (1 - a) q(z | x~): weights stay below p(x_obs | z) / a
        g = poutine.condition(vectorized(proposal, S, nest), data=cond)
        gtr = poutine.trace(g).get_trace(filled, **kw)
        prior, q = mtr.nodes[site]["fn"], gtr.nodes[site]["fn"]
        z_p, z_q = mtr.nodes[site]["value"], gtr.nodes[site]["value"]
        coin = torch.rand(z_q.shape[:-1], device=z_q.device) < defensive
        z = torch.where(coin.unsqueeze(-1), z_p, z_q)
        log_p = prior.log_prob(z)
        log_r = torch.logaddexp(log_p + math.log(defensive) if defensive > 0 else log_p - math.inf,
                                q.log_prob(z) + math.log1p(-defensive))
        log_w_z = log_p - log_r
        data = dict(cond, **{site: z})
        mtr = poutine.trace(poutine.condition(model, data=data)).get_trace(filled, **kw)
    z = mtr.nodes[site]["value"]
    if callable(getattr(family, "observation_dist", None)):
        fn = family.observation_dist(z)
    else:
        fn = mtr.nodes[obs_site]["fn"]
    xb = filled if rows is None else filled.index_select(0, rows)
    mb = mask if rows is None else mask.index_select(0, rows)
    base = _entrywise(fn, xb.dim() - 1)
    # masked entries get a draw from p(x | z) so every value lies in the support; they are
    # zeroed out of the sum right after
    lp = base.log_prob(torch.where(mb, base.sample(), xb))  # (S, b, ...)
    lp = torch.where(mb, torch.zeros((), **_like(lp)), lp)
    logw = lp.reshape(lp.shape[0], lp.shape[1], -1).sum(-1)
    if log_w_z is not None:
        logw = logw + log_w_z
    return logw, base, z


def _draws(family, filled, rows, lw, z, xb, mb, M, site, obs_site, nest):
    """(3): M imputations per row: resample z by the weights, then x ~ p(x | z) once."""
    b = lw.shape[1]
    pick = torch.multinomial(torch.softmax(lw, 0).T, M, replacement=True).T  # (M, b)
    z_sel = z[pick, torch.arange(b, device=z.device)]  # (M, b, k)
    if callable(getattr(family, "observation_dist", None)):
        fn = family.observation_dist(z_sel)
    else:
        kw, data = {}, {site: z_sel}
        if rows is not None:
            kw["subsample_size"] = rows.shape[0]
            data["data"] = rows
        model = poutine.condition(vectorized(family.model, M, nest), data=data)
        fn = poutine.trace(model).get_trace(filled, **kw).nodes[obs_site]["fn"]
    return torch.where(mb, fn.sample(), xb)


__all__ = ["Imputation", "column_mean_impute", "importance_impute", "missing_mask",
           "pseudo_gibbs_impute", "rmse"]
