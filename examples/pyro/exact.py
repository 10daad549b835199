"""Exact posteriors of the example models, the references ``tests/test_pyro_examples.py`` uses.

Each model is Gaussian given one positive scalar, so its posterior is a one-dimensional mixture of
Gaussians: the conditional moments are closed-form and the scalar is integrated on a fine grid
(in log space: 20,001 points, whose discretization error is far below any Monte Carlo error the
tests allow). Everything is in float64 numpy. Each function returns
``{"mean": {site: array}, "sd": {site: array}, "log_evidence": float}``, site shapes as the
program's sites.

- :func:`eight_schools`: given tau, ``mu`` and ``eta`` are Gaussian (conjugate normal hierarchy).
- :func:`bayesian_regression`: given sigma, the coefficients are Gaussian (linear regression).
- :func:`gmm`: given the scale and the 2^5 assignments, the locations are Gaussian and the weights
  Dirichlet; the assignments are summed over. Label switching makes ``locs`` symmetric, so the
  reference is for the sorted locations (``locs_sorted``: the smaller, then the larger), whose
  moments are Clark's (1961) moments of the max/min of two independent normals.
- :func:`vae_latent`: the posterior of one image's 2-D code under a given decoder, on a 2-D grid.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from scipy.special import betaln, logsumexp
from scipy.stats import norm


def _np(x) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, np.float64)


def _mixture(logw: np.ndarray, du: float, moments: dict[str, tuple]) -> dict:
    """Moments of a grid mixture: ``moments[site] = (E[x | u], E[x^2 | u])`` per grid point."""
    w = np.exp(logw - logw.max())
    w /= w.sum()
    mean, sd = {}, {}
    for site, (m1, m2) in moments.items():
        e1 = np.tensordot(w, m1, axes=(0, 0))
        e2 = np.tensordot(w, m2, axes=(0, 0))
        mean[site], sd[site] = e1, np.sqrt(np.maximum(e2 - e1**2, 0.0))
    return {"mean": mean, "sd": sd, "log_evidence": float(logsumexp(logw) + math.log(du))}


def _log_normal_rank_one(y, var, s2):
    """log N(y; 0, diag(var) + s2 11^T) for each row of ``var`` (Sherman-Morrison), with the
    posterior precision and mean of the shared offset (prior N(0, s2))."""
    prec = 1 / s2 + (1 / var).sum(-1)
    ybar = (y / var).sum(-1)
    logdet = np.log(var).sum(-1) + np.log1p(s2 * (1 / var).sum(-1))
    quad = (y**2 / var).sum(-1) - ybar**2 / prec
    n = var.shape[-1]
    return -0.5 * (n * math.log(2 * math.pi) + logdet + quad), prec, ybar / prec


def eight_schools(J, sigma, y, *, mu_scale=10.0, tau_scale=25.0, grid=(-12.0, 10.0, 20001)):
    """Pyro's eight schools (examples/pyro/eight_schools.py): mu ~ N(0, 10), tau ~ HalfCauchy(25),
    eta ~ N(0, 1), y ~ N(mu + tau eta, sigma)."""
    sigma, y = _np(sigma), _np(y)
    u = np.linspace(*grid)
    tau = np.exp(u)[:, None]
    var = sigma**2 + tau**2  # (G, J): y_j | mu, tau
    loglik, prec, mu_mean = _log_normal_rank_one(y, var, mu_scale**2)
    logprior = math.log(2 / (math.pi * tau_scale)) - np.log1p((tau[:, 0] / tau_scale) ** 2)
    logw = loglik + logprior + u  # + u: the Jacobian of tau = exp(u)
    eta_mean = tau / var * (y - mu_mean[:, None])
    eta_var = sigma**2 / var + (tau / var) ** 2 / prec[:, None]
    out = _mixture(logw, u[1] - u[0], {
        "mu": (mu_mean[:, None], (mu_mean**2 + 1 / prec)[:, None]),
        "tau": (tau, tau**2),
        "eta": (eta_mean, eta_mean**2 + eta_var),
    })
    return out


def bayesian_regression(x, y, *, weight_scale=1.0, bias_scale=10.0, sigma_max=10.0,
                        grid=(-8.0, None, 20001)):
    """The regression tutorial's model: weight ~ N(0, 1) (1 x 3), bias ~ N(0, 10),
    sigma ~ Uniform(0, 10), y ~ N(x weight^T + bias, sigma)."""
    x, y = _np(x), _np(y)
    n, d = x.shape
    z = np.concatenate([np.ones((n, 1)), x], axis=1)  # column 0: the bias
    prior_prec = np.diag([bias_scale**-2] + [weight_scale**-2] * d)
    u = np.linspace(grid[0], math.log(sigma_max), grid[2])[:-1]  # sigma in (0, sigma_max)
    zz, zy, yy = z.T @ z, z.T @ y, y @ y
    logw, m1, m2 = [], [], []
    _, logdet0 = np.linalg.slogdet(prior_prec)
    for s in np.exp(u):
        a = prior_prec + zz / s**2
        cov = np.linalg.inv(a)
        mean = cov @ (zy / s**2)
        _, logdet_a = np.linalg.slogdet(a)
        loglik = (-0.5 * n * math.log(2 * math.pi) - n * math.log(s) + 0.5 * logdet0
                  - 0.5 * logdet_a - 0.5 * (yy / s**2 - mean @ a @ mean))
        logw.append(loglik - math.log(sigma_max) + math.log(s))  # Uniform prior, Jacobian s
        m1.append(mean)
        m2.append(mean**2 + np.diag(cov))
    logw, m1, m2 = np.array(logw), np.array(m1), np.array(m2)
    sig = np.exp(u)
    out = _mixture(logw, u[1] - u[0], {
        "sigma": (sig, sig**2),
        "linear.bias": (m1[:, :1], m2[:, :1]),
        "linear.weight": (m1[:, None, 1:], m2[:, None, 1:]),
    })
    return out


def gmm(data, *, K=2, alpha=0.5, loc_scale=10.0, scale_logsd=2.0, grid=(-10.0, 8.0, 20001),
        _cdf_at=None):
    """The GMM tutorial's model: weights ~ Dirichlet(0.5, 0.5), scale ~ LogNormal(0, 2),
    locs ~ N(0, 10) (2), assignment ~ Categorical(weights), obs ~ N(locs[assignment], scale)."""
    assert K == 2
    y = _np(data)
    n = len(y)
    u = np.linspace(*grid)
    s = np.exp(u)
    logprior_u = norm.logpdf(u, 0.0, scale_logsd)  # log scale ~ N(0, 2): the density of u itself
    logw_all, moments = [], {"scale": [], "locs_sorted": []}
    for z in itertools.product(range(K), repeat=n):
        z = np.array(z)
        counts = np.bincount(z, minlength=K)
        log_pz = betaln(alpha + counts[0], alpha + counts[1]) - betaln(alpha, alpha)
        logw = np.full_like(u, log_pz) + logprior_u
        locs = []
        for k in range(K):
            yk = y[z == k]
            if len(yk):
                var = np.broadcast_to(s[:, None] ** 2, (len(s), len(yk)))
                ll, prec, mean = _log_normal_rank_one(yk, var, loc_scale**2)
                logw = logw + ll
            else:
                prec, mean = np.full_like(s, loc_scale**-2), np.zeros_like(s)
            locs.append((mean, 1 / prec))
        (m0, v0), (m1, v1) = locs
        a = np.sqrt(v0 + v1)
        alpha_ = (m0 - m1) / a
        e_max = m0 * norm.cdf(alpha_) + m1 * norm.cdf(-alpha_) + a * norm.pdf(alpha_)
        e_max2 = ((m0**2 + v0) * norm.cdf(alpha_) + (m1**2 + v1) * norm.cdf(-alpha_)
                  + (m0 + m1) * a * norm.pdf(alpha_))
        e_min, e_min2 = m0 + m1 - e_max, m0**2 + v0 + m1**2 + v1 - e_max2
        logw_all.append(logw)
        moments["scale"].append((s, s**2))
        moments["locs_sorted"].append((np.stack([e_min, e_max], -1),
                                       np.stack([e_min2, e_max2], -1)))
    # the grid over (assignment, log scale) flattened into one mixture
    logw = np.concatenate(logw_all)
    flat = {k: (np.concatenate([m[0] for m in v]), np.concatenate([m[1] for m in v]))
            for k, v in moments.items()}
    out = _mixture(logw, u[1] - u[0], flat)
    if _cdf_at is not None:
        w = np.exp(logw - logw.max())
        below = np.tile(s <= _cdf_at, len(logw_all))
        out["cdf"] = float(w[below].sum() / w.sum())
    return out


def gmm_scale_cdf(q, data, **kwargs):
    """The exact posterior CDF of the GMM's ``scale`` at ``q`` (the grid over log scale is the
    scale's own marginal, summed over the assignments)."""
    out = gmm(data, _cdf_at=q, **kwargs)
    return out["cdf"]


def vae_latent(decoder, x, *, half_width=5.0, points=241):
    """Posterior mean and sd of the 2-D code of each image in ``x`` (n, pixels) under ``decoder``
    (z ~ N(0, I), x | z ~ Bernoulli(decoder(z))), on a ``points`` x ``points`` grid over
    [-half_width, half_width]^2. Returns ``{"mean": (n, 2), "sd": (n, 2)}``."""
    g = torch.linspace(-half_width, half_width, points, dtype=torch.float64)
    zz = torch.cartesian_prod(g, g)  # (G, 2)
    with torch.no_grad():
        p = decoder(zz.to(torch.get_default_dtype())).double().clamp(1e-12, 1 - 1e-12)  # (G, P)
        xb = torch.as_tensor(x, dtype=torch.float64)
        loglik = xb @ p.log().T + (1 - xb) @ (1 - p).log().T  # (n, G)
        logw = loglik - 0.5 * (zz**2).sum(-1)
        w = torch.softmax(logw, dim=-1)
        mean = w @ zz
        sd = (w @ zz**2 - mean**2).clamp_min(0).sqrt()
    return {"mean": mean.numpy(), "sd": sd.numpy()}
