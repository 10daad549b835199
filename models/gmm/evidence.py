"""Exact answers for the Bayesian GMM (:mod:`elbolab.models.gmm.model`; equation numbers are that module's).

* :func:`log_evidence`: log p(x) by enumerating the assignments (eq. 4), Gauss-Hermite quadrature
  of eq. 5 against a label-symmetrized Laplace approximation, importance sampling of eq. 5
  with a proposal built from Gibbs conditionals and covering every relabelling, or sequential
  importance sampling over partitions (:mod:`elbolab.models.gmm.sequential`; any K, also K > n);
* :func:`exact_posterior_draws`: exact draws of mu from p(mu | x) for small n (the mixture over
  assignments of conjugate Gaussians), from which the family computes invariant moments.

Every function takes the family (a :class:`elbolab.models.gmm.model.BayesianGMM`) and uses its hyperparameters
``K``, ``prior_var``, its densities ``log_joint`` / ``log_prior`` (eq. 5, eq. 1) and its EM
(``family.em()``, run by :func:`elbolab.models.ascent.ascend`); x is ``(n, d)`` float64.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from elbolab.models.ascent import AscentSettings, ascend
from elbolab.models.capabilities import Evidence
from elbolab.models.gmm.sequential import sequential
from elbolab.models.numerics import LOG_2PI, importance_summary
from elbolab.models.validate import check_size, choice, integer

if TYPE_CHECKING:
    from elbolab.models.gmm.model import BayesianGMM

#: K^(n-1) assignments at most for ``method="auto"`` to pick enumeration (K = 3, n = 14: 1.6e6)
MAX_ASSIGNMENTS = 2_000_000
#: K*d at most for ``method="auto"`` to pick quadrature over importance sampling
MAX_QUADRATURE_DIM = 4
#: largest quadrature error indicator (nats) that ``method="auto"`` accepts
QUADRATURE_TOL = 0.01


def log_evidence(
    family: BayesianGMM,
    x: torch.Tensor,
    method: str = "auto",
    *,
    seed: int = 0,
    num_samples: int = 20_000,
    nodes: int | None = None,
    max_assignments: int = MAX_ASSIGNMENTS,
) -> Evidence:
    """log p(x) (nats, float64); see :meth:`elbolab.models.gmm.model.BayesianGMM.log_evidence` for the methods.
    ``x`` is checked data ``(n, d)`` (any floating dtype, computed in float64)."""
    method = choice(method, "method",
                    ["auto", "enumeration", "quadrature", "importance", "sequential"])
    n, d = x.shape
    max_assignments = integer(max_assignments, "max_assignments", minimum=1)
    auto = None
    if method == "auto":
        if family.K ** (n - 1) <= max_assignments:
            method = "enumeration"
        elif family.K > n:  # empty components: the proposal in mu-space cannot cover them
            method = "sequential"
        elif family.K * d <= MAX_QUADRATURE_DIM:
            auto = "quadrature"
        else:
            method = "importance"
    x64 = x.to(torch.float64)
    num_samples = integer(num_samples, "num_samples", minimum=2)
    seed = integer(seed, "seed", minimum=0)
    if method == "enumeration":
        return enumeration(family, x64, max_assignments)
    if method == "sequential":
        return sequential(family, x64, num_samples, seed)
    if method == "quadrature" or auto == "quadrature":
        ev = quadrature(family, x64, nodes, seed)
        if method == "quadrature" or ev.se <= QUADRATURE_TOL:
            return ev
        # auto: the quadrature's error indicator is too large -> importance sampling
        fallback = importance(family, x64, num_samples, seed)
        fallback.details["rejected_quadrature"] = {"value": ev.value, "error": ev.se}
        return fallback
    ev = importance(family, x64, num_samples, seed)
    if method == "auto" and not math.isfinite(ev.value):  # no proposal draw landed: no estimate
        fallback = sequential(family, x64, num_samples, seed)
        fallback.details["rejected_importance"] = {"value": ev.value, "ess": ev.details["ess"]}
        return fallback
    return ev


# ----------------------------------------------------------------------------- enumeration


def assignment_log_weights(family: BayesianGMM, x: torch.Tensor, max_assignments: int):
    """log p(x | c) (eq. 4 summed over k) for every c with c_1 = 0, in chunks.

    Fixing c_1 = 0 is exact: the summand is symmetric under relabelling, so the sum over all
    K^n assignments is K times the sum over those with c_1 = 0. Assignment number
    ``j = sum_i c_{i+1} K^(i-1)`` (i = 1..n-1); the sufficient statistics (n_k, S_k) are
    sums of those of the low and high digits, precomputed for each half.
    Yields ``(first_index, log_weights)``.
    """
    n, d = x.shape
    K, s2 = family.K, family.prior_var
    total = K ** (n - 1)
    if total > max_assignments:
        raise ValueError(
            f"max_assignments: enumeration needs K^(n-1) = {K}^{n - 1} = {total} assignments, "
            f"more than max_assignments={max_assignments}"
        )
    const = -0.5 * n * d * LOG_2PI - 0.5 * float((x**2).sum())
    a = n // 2  # low digits: points 1..a; high digits: points a+1..n-1
    lo_n, lo_S = _digit_stats(x[1 : a + 1], K)
    lo_n[:, 0] += 1  # point 0 sits in cluster 0
    lo_S[:, 0] += x[0]
    hi_n, hi_S = _digit_stats(x[a + 1 :], K)
    chunk = max(1, 2**21 // (lo_n.shape[0] * K * d))
    for start in range(0, hi_n.shape[0], chunk):
        nk = hi_n[start : start + chunk, None] + lo_n  # (chunk, K^a, K)
        S2 = ((hi_S[start : start + chunk, None] + lo_S) ** 2).sum(-1)  # ||S_k||^2
        # s2 S2 / (1 + n_k s2) written as S2 / (1/s2 + n_k): no overflow for huge s2
        lw = (-0.5 * d * torch.log1p(nk * s2) + 0.5 * S2 / (1.0 / s2 + nk)).sum(-1)
        yield start * lo_n.shape[0], lw.reshape(-1) + const


def enumeration(family: BayesianGMM, x: torch.Tensor, max_assignments: int) -> Evidence:
    """Exact log p(x): log (1/K^n) sum_c p(x | c), eq. 4 over all K^n assignments."""
    n, K = x.shape[0], family.K
    parts = [torch.logsumexp(lw, 0) for _, lw in assignment_log_weights(family, x, max_assignments)]
    value = torch.logsumexp(torch.stack(parts), 0) + math.log(K) - n * math.log(K)
    return Evidence(float(value), 0.0, "enumeration", n, {"assignments": K**n})


def exact_posterior_draws(
    family: BayesianGMM, x: torch.Tensor, num_samples: int, generator: torch.Generator,
    max_assignments: int = MAX_ASSIGNMENTS,
) -> torch.Tensor:
    """``num_samples`` exact draws of mu ``(S, K, d)`` (float64) from p(mu | x): an assignment c
    with probability p(c | x) (eq. 4; c_1 = 0 fixes the labels, harmless for label-invariant
    summaries), then mu_k | c, x ~ N(S_k / lam_k, I / lam_k), lam_k = 1/s2 + n_k."""
    S = num_samples
    n, d = x.shape
    K, s2 = family.K, family.prior_var
    lw = torch.cat([w for _, w in assignment_log_weights(family, x, max_assignments)])
    w = torch.exp(lw - lw.amax())  # p(c | x) up to a constant
    cdf = torch.cumsum(w / w.sum(), 0)
    u = torch.rand(S, generator=generator, dtype=torch.float64).to(x.device) * cdf[-1]
    idx = torch.searchsorted(cdf, u).clamp(max=len(cdf) - 1)
    powers = K ** torch.arange(n - 1, device=x.device, dtype=torch.int64)
    c = torch.cat([idx.new_zeros(S, 1), (idx[:, None] // powers) % K], dim=1)
    onehot = torch.nn.functional.one_hot(c, K).to(x.dtype)
    lam = 1.0 / s2 + onehot.sum(1)  # (S, K)
    post_mean = torch.einsum("snk,nd->skd", onehot, x) / lam[..., None]
    z = torch.randn(S, K, d, generator=generator, dtype=torch.float64).to(x.device)
    return post_mean + z / lam[..., None].sqrt()


def _digit_stats(x: torch.Tensor, K: int):
    """Counts ``(K^m, K)`` and sums ``(K^m, K, d)`` of the m points of x for all K^m assignments
    (assignment j puts point i in cluster (j // K^i) % K)."""
    m = x.shape[0]
    idx = torch.arange(K**m, device=x.device)
    c = (idx[:, None] // K ** torch.arange(m, device=x.device)) % K
    onehot = torch.nn.functional.one_hot(c, K).to(x.dtype)  # (K^m, m, K)
    return onehot.sum(1), torch.einsum("jmk,md->jkd", onehot, x)


# ----------------------------------------------------------------------------- quadrature


def laplace(family: BayesianGMM, x: torch.Tensor, seed: int, restarts: int = 10,
            hessian: bool = True):
    """MAP of mu (eq. 5) by the family's EM from ``restarts`` starts (run by
    :func:`elbolab.models.ascent.ascend`, 1000 sweeps at most, tol 1e-12 nats per point) and the Laplace
    covariance there.

    Falls back to the diagonal precision 1/s2 + n_k when the Hessian is not negative definite.
    Returns ``(mode (K, d), covariance (K d, K d) or None)`` in float64.
    """
    K, d = family.K, x.shape[1]
    algo = family.em()
    run = ascend(
        lambda g: algo.init(x, g),
        lambda s: algo.step(x, s),
        lambda s: algo.objective(x, s),
        x.shape[0],
        AscentSettings(max_iter=1000, tol=1e-12, n_init=restarts),
        torch.Generator().manual_seed(seed),
        label="laplace",
    )
    best = run.state.mu
    if not hessian:
        return best, None
    hess = torch.autograd.functional.hessian(
        lambda v: family.log_joint(x, v.view(K, d)), best.reshape(-1)
    )
    prec = -(hess + hess.T) / 2
    try:
        cov = torch.cholesky_inverse(torch.linalg.cholesky(prec))
    except RuntimeError:  # not a strict local maximum: mean-field precision
        nk = family.responsibilities(x, best).sum(0)
        cov = torch.diag((1.0 / (1.0 / family.prior_var + nk)).repeat_interleave(d))
    return best, cov


def quadrature(family: BayesianGMM, x: torch.Tensor, nodes: int | None, seed: int) -> Evidence:
    """Gauss-Hermite on eq. 5 against the label-symmetrized Laplace approximation.

    With g(mu) = (1/K!) sum_pi N(mu_pi; m, c Sigma) (pi permutes the K components, m the MAP,
    Sigma the Laplace covariance) and f the integrand of eq. 5, the symmetry of f and g gives
    int f = int N(mu; m, c Sigma) f/g dmu exactly; a tensor Gauss-Hermite grid for
    N(m, c Sigma) integrates the smooth ratio f/g. Value: c = 1.5 with ``nodes`` per
    dimension. ``se`` is an error indicator, not a standard error: the largest change when
    the grid is coarsened (0.75 nodes) or widened (c = 3). It is large when the posterior
    is far from Gaussian (overlapping clusters, small n).
    """
    n, d = x.shape
    K = family.K
    D = K * d
    if D > 5:
        raise ValueError(f"method: quadrature needs K*d <= 5, got K*d = {D}")
    m = integer(nodes or min(40, int(5e4 ** (1 / D))), "nodes", minimum=3)
    mode, cov = laplace(family, x, seed)
    perms = _permutations(K, x.device)

    def rule(m_, c):
        L = torch.linalg.cholesky(c * cov)
        z, w = np.polynomial.hermite_e.hermegauss(m_)
        z = torch.as_tensor(z, dtype=x.dtype, device=x.device)
        lw = torch.as_tensor(np.log(w / math.sqrt(2 * math.pi)), dtype=x.dtype, device=x.device)
        grid = torch.cartesian_prod(*([z] * D)).reshape(-1, D)
        lwg = torch.cartesian_prod(*([lw] * D)).reshape(-1, D).sum(-1)
        mu = (mode.reshape(-1) + grid @ L.T).view(-1, K, d)
        log_f = _chunked(lambda b: family.log_joint(x, b), mu, n)
        log_g = _chunked(lambda b: _log_sym_gauss(b, mode, L, perms), mu, len(perms))
        return float(torch.logsumexp(lwg + log_f - log_g, 0))

    value = rule(m, 1.5)
    coarse, wide = rule(max(3, round(0.75 * m)), 1.5), rule(m, 3.0)
    err = max(abs(value - coarse), abs(value - wide))
    details = {"nodes": m, "coarse_value": coarse, "wide_value": wide}
    return Evidence(value, err, "quadrature", n, details)


# ----------------------------------------------------------------------------- importance sampling


def gibbs_conditionals(family: BayesianGMM, x: torch.Tensor, seed: int, keep: int,
                       chains: int = 8):
    """Posterior-fitted proposal components: about ``keep`` conditionals
    p(mu | c_j, x) = prod_k N(S_jk / lam_jk, I / lam_jk), lam_jk = 1/s2 + n_jk, at allocations
    c_j drawn by Gibbs sampling on (c, mu) (Fruhwirth-Schnatter 2004). ``chains`` chains run
    side by side: one from the MAP, the others from random data points (burn-in 50 sweeps,
    then every 2nd sweep kept). Returns ``(means (J, K, d), lam (J, K))``."""
    n, d = x.shape
    K, s2 = family.K, family.prior_var
    gen = torch.Generator().manual_seed(seed)
    mode, _ = laplace(family, x, seed, hessian=False)
    mu = torch.stack([mode] + [_data_points(x, K, gen) for _ in range(chains - 1)])
    means, lams = [], []
    burn, thin, per_chain = 50, 2, -(-keep // chains)
    for t in range(burn + thin * per_chain):
        cdf = torch.cumsum(family.responsibilities(x, mu), -1)  # (C, n, K)
        u = torch.rand(chains, n, 1, generator=gen, dtype=torch.float64).to(x)
        c = (cdf < u).sum(-1).clamp(max=K - 1)
        onehot = torch.nn.functional.one_hot(c, K).to(x.dtype)  # (C, n, K)
        lam = 1.0 / s2 + onehot.sum(1)  # (C, K)
        mean = (onehot.transpose(1, 2) @ x) / lam[..., None]
        z = torch.randn(chains, K, d, generator=gen, dtype=torch.float64).to(x)
        mu = mean + z / lam[..., None].sqrt()
        if t >= burn and (t - burn) % thin == 0:
            means.append(mean)
            lams.append(lam)
    return torch.cat(means), torch.cat(lams)


def importance(family: BayesianGMM, x: torch.Tensor, num_samples: int, seed: int) -> Evidence:
    """Importance sampling of eq. 5; the proposal covers all K! relabellings.

    g = eps p(mu) + (1-eps) (1/J) sum_j (1/K!) sum_pi prod_k N(mu_pi(k); S_jk/lam_jk, I/lam_jk)
    with J Gibbs allocations (see :func:`gibbs_conditionals`) and a defensive prior share
    eps = 0.05, so the weights f/g are bounded (by max likelihood / eps). For K > 4 the sum
    over relabellings is replaced by restriction to means sorted by first coordinate, with
    weights K! f/g 1{sorted} (exact: that region holds 1/K! of the mass of f).
    log p(x) = log mean(w); se = sd(w) / (sqrt(S) mean(w)) (delta method).
    """
    n, d = x.shape
    K, eps = family.K, 0.05
    check_size(6 * num_samples * K * d, "num_samples", f"importance sampling with K={K}",
               device=x.device)
    symmetric = K <= 4
    ident = torch.arange(K, device=x.device)[None]
    perms = _permutations(K, x.device) if symmetric else ident
    keep = max(8, 400 // len(perms))
    means, lams = gibbs_conditionals(family, x, seed, keep)
    if not symmetric:  # relabel each component by its first coordinate
        order = means[..., 0].argsort(-1)
        means = torch.gather(means, 1, order[..., None].expand(means.shape))
        lams = torch.gather(lams, 1, order)
    gen = torch.Generator().manual_seed(seed + 1)
    J = means.shape[0]
    j = torch.randint(J, (num_samples,), generator=gen).to(x.device)
    z = torch.randn(num_samples, K, d, generator=gen, dtype=torch.float64).to(x)
    mu = means[j] + z / lams[j].sqrt()[..., None]
    pick = torch.randint(len(perms), (num_samples,), generator=gen).to(x.device)
    mu = torch.gather(mu, 1, perms[pick][..., None].expand(mu.shape))
    from_prior = torch.rand(num_samples, generator=gen, dtype=torch.float64).to(x.device) < eps
    prior_draw = torch.randn(num_samples, K, d, generator=gen, dtype=torch.float64).to(x)
    mu = torch.where(from_prior[:, None, None], prior_draw * math.sqrt(family.prior_var), mu)

    def log_g(b):
        mix = _log_conditionals_mix(b, means, lams, perms)
        return torch.logaddexp(math.log1p(-eps) + mix, math.log(eps) + family.log_prior(b))

    log_f = _chunked(lambda b: family.log_joint(x, b), mu, n)
    log_w = log_f - _chunked(log_g, mu, len(perms) * J)
    if not symmetric:
        ok = (mu[:, 1:, 0] > mu[:, :-1, 0]).all(-1)
        log_w = torch.where(ok, log_w + math.lgamma(K + 1), -math.inf)
    value, se, ess = importance_summary(log_w)
    details = {"num_samples": num_samples, "ess": ess, "components": J * len(perms)}
    return Evidence(value, se, "importance", n, details)


# ----------------------------------------------------------------------------- helpers


def _data_points(x: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
    """K distinct data points chosen at random (with replacement when n < K), on x's device."""
    n = x.shape[0]
    if n >= K:
        idx = torch.randperm(n, generator=generator)[:K]
    else:
        idx = torch.randint(n, (K,), generator=generator)
    return x[idx.to(x.device)].clone()


def _permutations(K: int, device) -> torch.Tensor:
    return torch.tensor(list(itertools.permutations(range(K))), device=device)


def _chunked(fn, mu: torch.Tensor, n: int, budget: int = 4_000_000) -> torch.Tensor:
    """Apply ``fn`` to rows of mu ``(S, K, d)`` in chunks of about ``budget / (n K d)`` rows."""
    K, d = mu.shape[-2:]
    size = max(1, budget // max(1, n * K * d))
    return torch.cat([fn(mu[i : i + size]) for i in range(0, mu.shape[0], size)])


def _log_sym_gauss(mu, mode, L, perms):
    """log (1/P) sum_pi N(vec(mu[pi]); vec(mode), L L^T) for mu ``(B, K, d)``."""
    maha = _maha(mu, mode, L, perms)
    D = L.shape[0]
    logdet = torch.log(torch.diagonal(L)).sum()
    log_n = -0.5 * maha - 0.5 * D * LOG_2PI - logdet
    return torch.logsumexp(log_n, -1) - math.log(len(perms))


def _log_conditionals_mix(mu, means, lams, perms):
    """log (1/(J P)) sum_j sum_pi prod_k N(mu_pi(k); means_jk, I / lams_jk) for mu (B, K, d)."""
    B, K, d = mu.shape
    mp = mu[:, perms]  # (B, P, K, d)
    # sum_k lam_jk ||mu_pi(k) - m_jk||^2 expanded into matrix products, shape (B, P, J)
    quad = (mp**2).sum(-1) @ lams.T
    cross = mp.reshape(B, len(perms), K * d) @ (lams[..., None] * means).reshape(-1, K * d).T
    const = (lams * (means**2).sum(-1)).sum(-1) - d * (torch.log(lams) - LOG_2PI).sum(-1)
    log_n = -0.5 * (quad - 2 * cross + const)
    return torch.logsumexp(log_n.flatten(1), -1) - math.log(log_n[0].numel())


def _maha(mu, mode, L, perms):
    """Squared Mahalanobis distances ``(B, P)`` of each relabelling mu[pi] to ``mode``."""
    B = mu.shape[0]
    diff = mu[:, perms].reshape(B, len(perms), -1) - mode.reshape(-1)
    y = torch.linalg.solve_triangular(L, diff.reshape(-1, L.shape[0]).T, upper=False)
    return (y**2).sum(0).reshape(B, len(perms))


__all__ = [
    "MAX_ASSIGNMENTS", "MAX_QUADRATURE_DIM", "QUADRATURE_TOL", "assignment_log_weights",
    "enumeration", "exact_posterior_draws", "gibbs_conditionals", "importance", "laplace",
    "log_evidence", "quadrature",
]
