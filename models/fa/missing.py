"""Factor analysis with entries missing at random (NaN): exact conditional Gaussians
p(z | x_obs) and p(x_mis | x_obs), the observed-data log-likelihood, EM on the observed entries
(run by :func:`elbolab.models.ascent.ascend`), exact imputation and multiple imputation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from elbolab.models.ascent import AscentSettings, ascend
from elbolab.models.fa.linalg import KINDS, cholesky, init_from_cov, mean_cov
from elbolab.models.fa.params import FAParams
from elbolab.models.numerics import LOG_2PI
from elbolab.models.validate import as_data, choice, integer


def _check_missing(x_nan, params: FAParams | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x = as_data(x_nan, "x", allow_nan=True)
    obs = ~torch.isnan(x)
    if params is not None and params.dim != x.shape[1]:
        raise ValueError(f"x: expected {params.dim} columns, got {x.shape[1]}")
    return x, obs


def _check_params(params) -> None:
    if not isinstance(params, FAParams):
        raise TypeError(f"params: expected FAParams, got {type(params).__name__}")


def _zero_missing(x: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    return torch.where(obs, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _posterior_observed(x0: torch.Tensor, obs: torch.Tensor, W, mu, psi):
    """Per row, z | x_obs ~ N(m_n, G_p(n)) with L_p = I + W_o^T Psi_o^-1 W_o per missingness
    pattern p. Returns m (n, k), G per row (n, k, k), chol per pattern, inverse index, b, r."""
    pats, inv = torch.unique(obs, dim=0, return_inverse=True)
    k = W.shape[1]
    op = pats.to(W.dtype) / psi  # (P, d) observed precision
    Lp = torch.eye(k, dtype=W.dtype, device=W.device) + torch.einsum("pd,dj,dl->pjl", op, W, W)
    chol = cholesky(Lp)
    Gp = torch.cholesky_inverse(chol)
    r = torch.where(obs, x0 - mu, torch.zeros((), dtype=x0.dtype, device=x0.device))
    b = (r / psi) @ W  # (n, k): W_o^T Psi_o^-1 r_o
    m = (Gp[inv] @ b.unsqueeze(-1)).squeeze(-1)
    return m, Gp[inv], chol, inv, b, r


def observed_loglik(x_nan, params: FAParams) -> torch.Tensor:
    """log N(x_obs,n; mu_o, W_o W_o^T + Psi_o) per row (rows with nothing observed give 0)."""
    x, obs = _check_missing(x_nan, params)
    p = params.to(x)
    m, G, chol, inv, b, r = _posterior_observed(x, obs, p.W, p.mu, p.psi)
    o = obs.to(x.dtype)
    logdet_L = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    logdet = (o * torch.log(p.psi)).sum(1) + logdet_L[inv]
    quad = (r * r / p.psi).sum(1) - (b * m).sum(1)
    return -0.5 * (o.sum(1) * LOG_2PI + logdet + quad)


# -- EM on the observed entries ----------------------------------------------------------------


@dataclass
class MissingEMState:
    """An iterate of :class:`MissingDataEM`: the parameters and the observed-data statistics
    (x with NaN -> 0, the mask, the observed count and sum of squares of each column)."""

    params: FAParams
    x0: torch.Tensor
    obs: torch.Tensor
    counts: torch.Tensor
    sum_x2_obs: torch.Tensor


class MissingDataEM:
    """EM for FA/PPCA with hidden variables (z_n, x_mis,n) (Ghahramani & Jordan 1994).

    With z~ = [z; 1] and W~ = [W, mu] (so x = W~ z~ + eps), the E-step takes z | x_obs per
    missingness pattern and, for a missing entry i, E[x_ni z~] = W~_i E[z~ z~^T],
    E[x_ni^2] = W~_i E[z~ z~^T] W~_i^T + psi_i; the M-step is W~_i = B_i A^-1,
    psi_i = (sum_n E[x_ni^2] - W~_i B_i^T) / n with A = sum_n E[z~ z~^T], B_i = sum_n E[x_ni z~].
    Objective: the observed-data log-likelihood (total nats), which never decreases. ``x`` is the
    data with NaN for the missing entries; ``start`` (FAParams) replaces the PCA start on the
    column-mean-filled data.
    """

    bound = "log-likelihood"
    guide = "exact-posterior"

    def __init__(self, latent_dim: int, *, kind: str = "fa", min_var: float = 1e-6,
                 start: FAParams | None = None):
        self.latent_dim = latent_dim
        self.kind = choice(kind, "kind", KINDS)
        self.min_var = min_var
        self.start = start

    def init(self, x: torch.Tensor, generator: torch.Generator) -> MissingEMState:
        obs = ~torch.isnan(x)
        counts = obs.sum(0)
        x0 = _zero_missing(x, obs)
        if self.start is None:
            mean = x0.sum(0) / counts
            _, S = mean_cov(torch.where(obs, x, mean))
            W, psi = init_from_cov(S, self.latent_dim, self.kind, self.min_var, generator)
            p = FAParams(W, mean, psi)
        else:
            p = self.start.to(x)
        return MissingEMState(p, x0, obs, counts, (x0 * x0).sum(0))

    def step(self, x: torch.Tensor, state: MissingEMState) -> MissingEMState:
        p, x0, obs, k = state.params, state.x0, state.obs, self.latent_dim
        n, d = x0.shape
        o = obs.to(x0.dtype)
        m, G, *_ = _posterior_observed(x0, obs, p.W, p.mu, p.psi)
        zt = torch.cat([m, torch.ones(n, 1, dtype=x0.dtype, device=x0.device)], 1)  # E[z~]
        Ezz = zt.unsqueeze(-1) * zt.unsqueeze(-2)
        Ezz[:, :k, :k] += G
        A = Ezz.sum(0)
        C = torch.einsum("nd,nab->dab", 1 - o, Ezz)  # sum over rows missing i of E[z~ z~^T]
        Wt = torch.cat([p.W, p.mu[:, None]], 1)  # (d, k+1)
        B = x0.T @ zt + torch.einsum("da,dab->db", Wt, C)
        Wn = torch.linalg.solve(A, B.T).T
        sxx = state.sum_x2_obs + torch.einsum("da,dab,db->d", Wt, C, Wt) + (n - state.counts) * p.psi
        resid = (sxx - (Wn * B).sum(1)) / n
        psin = resid.mean().expand(d).clone() if self.kind == "ppca" else resid
        pn = FAParams(Wn[:, :k].contiguous(), Wn[:, k].contiguous(), psin.clamp_min(self.min_var))
        return MissingEMState(pn, x0, obs, state.counts, state.sum_x2_obs)

    def objective(self, x: torch.Tensor, state: MissingEMState) -> float:
        return float(observed_loglik(x, state.params).sum())

    def posterior(self, x: torch.Tensor, state: MissingEMState) -> dict[str, torch.Tensor]:
        return state.params.as_dict()


def em_missing(
    x_nan,
    k: int,
    *,
    kind: str = "fa",
    max_iter: int = 1000,
    tol: float = 1e-8,
    seed: int = 0,
    min_var: float = 1e-6,
    init: FAParams | None = None,
) -> tuple[FAParams, list[float]]:
    """EM for FA/PPCA with entries missing at random (NaN) (:class:`MissingDataEM`).

    Returns the parameters and the trace of observed-data log-likelihoods (total nats), which
    never decreases. Stops when it changes by at most ``tol * n``.
    """
    x, obs = _check_missing(x_nan)
    n, d = x.shape
    k = integer(k, "latent_dim", minimum=1, maximum=d - 1)
    algo = MissingDataEM(k, kind=kind, min_var=min_var, start=init)
    settings = AscentSettings(max_iter=max_iter, tol=tol)
    counts = obs.sum(0)
    if (counts == 0).any():
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"x: column(s) {empty} have no observed values")
    run = ascend(lambda g: algo.init(x, g), lambda s: algo.step(x, s),
                 lambda s: algo.objective(x, s), n, settings,
                 torch.Generator().manual_seed(seed), label="em_missing")
    return run.state.params, run.trace


# -- imputation --------------------------------------------------------------------------------


@dataclass
class PatternCov:
    """Conditional covariance Cov(x_mis | x_obs) shared by the rows with one missingness pattern."""

    rows: torch.Tensor  # (r,) row indices
    missing: torch.Tensor  # (m,) column indices
    cov: torch.Tensor  # (m, m)


def impute(x_nan, params: FAParams) -> tuple[torch.Tensor, list[PatternCov]]:
    """Exact conditional Gaussian p(x_mis | x_obs) under the model:
    E[x_mis | x_obs] = W_m E[z | x_obs] + mu_m,  Cov = W_m L_o^-1 W_m^T + Psi_m
    (equal to C_mo C_oo^-1 (x_o - mu_o) + mu_m and C_mm - C_mo C_oo^-1 C_om).
    Returns x with the missing entries replaced by their conditional means, and one covariance per
    missingness pattern (patterns with nothing missing are left out)."""
    _check_params(params)
    x, obs = _check_missing(x_nan, params)
    p = params.to(x)
    m, G, chol, inv, *_ = _posterior_observed(_zero_missing(x, obs), obs, p.W, p.mu, p.psi)
    filled = torch.where(obs, x, m @ p.W.T + p.mu)
    covs = []
    Gp = torch.cholesky_inverse(chol)
    pats = torch.unique(obs, dim=0)
    for j in range(pats.shape[0]):
        mis = torch.nonzero(~pats[j]).flatten()
        if mis.numel() == 0:
            continue
        Wm = p.W[mis]
        cov = Wm @ Gp[j] @ Wm.T + torch.diag(p.psi[mis])
        covs.append(PatternCov(torch.nonzero(inv == j).flatten(), mis, cov))
    return filled, covs


def multiple_impute(x_nan, params: FAParams, num_draws: int, *, seed: int = 0) -> torch.Tensor:
    """``num_draws`` exact draws from p(x_mis | x_obs), observed entries kept: (num_draws, n, d).
    x_mis = W_m z + mu_m + eps_m with z ~ N(m_n, L_o^-1), eps ~ N(0, Psi_m)."""
    _check_params(params)
    num_draws = integer(num_draws, "num_draws", minimum=1)
    x, obs = _check_missing(x_nan, params)
    p = params.to(x)
    m, G, *_ = _posterior_observed(_zero_missing(x, obs), obs, p.W, p.mu, p.psi)
    n, d = x.shape
    g = torch.Generator().manual_seed(integer(seed, "seed", minimum=0))
    e1 = torch.randn(num_draws, n, p.latent_dim, generator=g, dtype=torch.float64).to(x)
    e2 = torch.randn(num_draws, n, d, generator=g, dtype=torch.float64).to(x)
    z = m + (cholesky(G) @ e1.unsqueeze(-1)).squeeze(-1)
    draws = z @ p.W.T + p.mu + e2 * p.psi.sqrt()
    return torch.where(obs, x, draws)


__all__ = [
    "MissingDataEM", "MissingEMState", "PatternCov", "em_missing", "impute", "multiple_impute",
    "observed_loglik",
]
