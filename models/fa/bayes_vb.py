"""Variational Bayes for the Bayesian factor analysis (:mod:`elbolab.models.fa.bayes`): CAVI over
q(Z) q(W~) q(tau), W~_i = [w_i; mu_i] (Bishop 1999, "Variational principal components", with a
per-dimension noise precision; PRML 10.9 for the updates).

:class:`FactorVB` is the family's :class:`elbolab.models.capabilities.CoordinateAscent` (``cavi()``) on a
:class:`VBState`; :meth:`FactorVB.guide_for` turns a state into a Pyro guide for the family's
``model`` (every latent site drawn from the VB factors), so the closed-form ELBO can be checked
against a Monte Carlo ELBO of the model itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

from elbolab.models.fa.linalg import mean_cov, pca_init
from elbolab.models.numerics import LOG_2PI, one_thread


@dataclass
class VBState:
    """q(W~_i) = N(w_loc_i, w_cov_i) per row W~_i = [w_i; mu_i] (the k loadings, then the mean);
    q(tau_i) = Gamma(tau_shape, tau_rate_i) (rate parameterization, shape shared by the rows);
    q(z_n) = N(z_loc_n, z_cov) (covariance shared by the points)."""

    w_loc: torch.Tensor  # (d, k + 1)
    w_cov: torch.Tensor  # (d, k + 1, k + 1)
    tau_shape: float
    tau_rate: torch.Tensor  # (d,)
    z_loc: torch.Tensor  # (n, k)
    z_cov: torch.Tensor  # (k, k)


class FactorVB:
    """CAVI for the Bayesian FA: each sweep sets q(Z), then q(W~), then q(tau) to its exact
    coordinate optimum; ``objective`` is the closed-form ELBO (nats, all constants)."""

    bound = "elbo"
    guide = "mean-field"

    def __init__(self, latent_dim: int, *, alpha: float, a0: float, b0: float, mu_scale: float):
        self.latent_dim, self.alpha, self.a0, self.b0 = latent_dim, alpha, a0, b0
        self.mu_scale = mu_scale

    def _prior_prec(self, x):
        """Prior precisions of W~_i = [w_i; mu_i]: alpha (k times), then 1 / mu_scale^2."""
        k = self.latent_dim
        D = torch.full((k + 1,), self.alpha, device=x.device, dtype=x.dtype)
        D[k] = self.mu_scale**-2
        return D

    # -- the CoordinateAscent interface ----------------------------------------------------
    def init(self, x: torch.Tensor, generator: torch.Generator) -> VBState:
        """q(W~_i) centred on the PPCA/PCA solution (+ seeded jitter), small covariances;
        E[tau_i] = 1 / psi_i; then q(Z) is set optimally given those."""
        n, d = x.shape
        k = self.latent_dim
        mean, S = mean_cov(x)
        W, psi = pca_init(S, k, "fa", 1e-3 * float(torch.diagonal(S).mean()))
        jitter = 1e-2 * torch.diagonal(S).mean().sqrt()
        W = W + jitter * torch.randn(d, k, generator=generator, dtype=torch.float64).to(x)
        eye = torch.eye(k + 1, device=x.device, dtype=x.dtype)
        a = self.a0 + 0.5 * n
        w_loc = torch.cat([W, mean[:, None]], 1)
        w_cov = 1e-2 * eye.expand(d, k + 1, k + 1).clone() / n
        return self._with_z(x, w_loc, w_cov, a, a * psi)

    def step(self, x: torch.Tensor, state: VBState) -> VBState:
        """One sweep q(Z) -> q(W~) -> q(tau), each the exact coordinate optimum (PRML 10.9):
        q(W~_i) = N(S_i E[tau_i] Z~^T x_i, S_i), S_i^-1 = D + E[tau_i] A, A = sum_n E[z~ z~^T];
        q(tau_i) = Gamma(a0 + n/2, b0 + R_i/2), R_i = sum_n E[(x_ni - w~_i^T z~_n)^2]."""
        with one_thread(x):  # small batched k x k algebra: one CPU thread is faster
            state = self.update_z(x, state)
            Zt, A = self._zstats(x, state)
            Et = state.tau_shape / state.tau_rate
            Lam = torch.diag(self._prior_prec(x)) + Et[:, None, None] * A
            WS = torch.linalg.inv(Lam)
            WS = 0.5 * (WS + WS.transpose(-1, -2))
            Wm = (WS @ (Et[:, None] * (x.T @ Zt)).unsqueeze(-1)).squeeze(-1)
            R = self._residual(x, Wm, WS, Zt, A)
            return VBState(Wm, WS, state.tau_shape, self.b0 + 0.5 * R, state.z_loc, state.z_cov)

    def objective(self, x: torch.Tensor, state: VBState) -> float:
        """The closed-form ELBO, see :meth:`elbo_terms`."""
        with one_thread(x):
            return float(self.elbo_terms(x, state)["elbo"])

    def posterior(self, x: torch.Tensor, state: VBState) -> dict[str, torch.Tensor]:
        k = self.latent_dim
        return {
            "W_loc": state.w_loc[:, :k],
            "mu_loc": state.w_loc[:, k],
            "Wmu_cov": state.w_cov,
            "tau_shape": torch.tensor(state.tau_shape, device=x.device, dtype=x.dtype),
            "tau_rate": state.tau_rate,
            "z_loc": state.z_loc,
            "z_cov": state.z_cov,
        }

    # -- the updates -------------------------------------------------------------------------
    def update_z(self, x: torch.Tensor, state: VBState) -> VBState:
        """``state`` with q(Z) set to its optimum given q(W~) q(tau)."""
        return self._with_z(x, state.w_loc, state.w_cov, state.tau_shape, state.tau_rate)

    def _with_z(self, x, Wm, WS, a, b) -> VBState:
        """q(z_n) = N(m_n, Sz): Sz^-1 = I + sum_i E[tau_i] E[w_i w_i^T],
        m_n = Sz sum_i E[tau_i] (x_ni E[w_i] - E[w_i mu_i])."""
        k = self.latent_dim
        Et = a / b
        Om = WS + Wm.unsqueeze(-1) * Wm.unsqueeze(-2)  # E[w~ w~^T] (d, k+1, k+1)
        eye = torch.eye(k, device=x.device, dtype=x.dtype)
        P = eye + (Et[:, None, None] * Om[:, :k, :k]).sum(0)
        Sz = torch.linalg.inv(P)
        Sz = 0.5 * (Sz + Sz.T)
        rhs = (x * Et) @ Wm[:, :k] - (Et[:, None] * Om[:, :k, k]).sum(0)
        return VBState(Wm, WS, a, b, rhs @ Sz, Sz)

    def _zstats(self, x, state: VBState):
        """E[z~_n] = [m_n; 1] (n, k+1) and A = sum_n E[z~_n z~_n^T]."""
        n, k = x.shape[0], self.latent_dim
        Zt = torch.cat([state.z_loc, torch.ones(n, 1, device=x.device, dtype=x.dtype)], 1)
        A = Zt.T @ Zt
        A[:k, :k] += n * state.z_cov
        return Zt, A

    @staticmethod
    def _residual(x, Wm, WS, Zt, A):
        """R_i = sum_n x_ni^2 - 2 E[w~_i]^T Z~^T x_i + tr(E[w~_i w~_i^T] A)."""
        Om = WS + Wm.unsqueeze(-1) * Wm.unsqueeze(-2)
        return (x * x).sum(0) - 2 * (Wm * (x.T @ Zt)).sum(1) + (Om * A).sum((-1, -2))

    def elbo_terms(self, x: torch.Tensor, state: VBState) -> dict[str, torch.Tensor]:
        """Closed-form ELBO (nats, all constants) and its terms:
        lik = sum_i [n/2 (E log tau_i - log 2pi) - E[tau_i] R_i / 2],
        kl_z = sum_n KL(q(z_n) || N(0, I)), kl_w = sum_i KL(q(w~_i) || N(0, D^-1)),
        kl_tau = sum_i KL(Gamma(a, b_i) || Gamma(a0, b0)) with
        KL(Gamma(a,b) || Gamma(a0,b0)) = (a-a0) psi(a) - lgamma(a) + lgamma(a0)
                                         + a0 (log b - log b0) + a (b0 - b) / b."""
        n, d = x.shape
        k = self.latent_dim
        a, b, m, Sz = state.tau_shape, state.tau_rate, state.z_loc, state.z_cov
        WS, Wm = state.w_cov, state.w_loc
        Zt, A = self._zstats(x, state)
        R = self._residual(x, Wm, WS, Zt, A)
        a_t = torch.tensor(a, device=x.device, dtype=x.dtype)
        Elog = torch.digamma(a_t) - torch.log(b)
        lik = (0.5 * n * (Elog - LOG_2PI) - 0.5 * (a / b) * R).sum()
        logdet_Sz = torch.linalg.slogdet(Sz)[1]
        kl_z = 0.5 * (n * (torch.trace(Sz) - k - logdet_Sz) + (m * m).sum())
        D = self._prior_prec(x)
        logdet_WS = torch.linalg.slogdet(WS)[1]
        kl_w = 0.5 * (
            (torch.diagonal(WS, dim1=-2, dim2=-1) * D).sum(-1)
            + (Wm * Wm * D).sum(-1)
            - (k + 1)
            - torch.log(D).sum()
            - logdet_WS
        ).sum()
        a0, b0 = self.a0, self.b0
        kl_t = (
            (a - a0) * torch.digamma(a_t)
            - torch.lgamma(a_t)
            + math.lgamma(a0)
            + a0 * (torch.log(b) - math.log(b0))
            + a * (b0 - b) / b
        ).sum()
        return {"elbo": lik - kl_z - kl_w - kl_t, "lik": lik, "kl_z": kl_z, "kl_w": kl_w,
                "kl_tau": kl_t}

    # -- the VB factors as a Pyro guide ----------------------------------------------------
    def guide_for(self, state: VBState):
        """A Pyro guide ``guide(x, subsample_size=None)`` for the family's ``model`` (sites W,
        mu, tau and z in the "data" plate) that draws every latent from q: W from the marginal
        q(w_i) = N(w_loc_i[:k], w_cov_i[:k, :k]) and mu_i from q(mu_i | w_i) (so (w_i, mu_i) ~
        q(W~_i) jointly), tau from q(tau), z_n from q(z_n). Its ELBO is the closed form's."""
        k = self.latent_dim
        m, S = state.w_loc, state.w_cov
        S_ww = S[:, :k, :k]
        beta = torch.linalg.solve(S_ww, S[:, :k, k:]).squeeze(-1)  # (d, k): S_ww^-1 S_w,mu
        mu_sd = (S[:, k, k] - (S[:, k, :k] * beta).sum(-1)).sqrt()
        shape = torch.full_like(state.tau_rate, state.tau_shape)
        z_tril = torch.linalg.cholesky(state.z_cov)

        def guide(x: torch.Tensor, subsample_size: int | None = None):
            W = pyro.sample("W", dist.MultivariateNormal(m[:, :k], S_ww).to_event(1))
            mu_loc = m[:, k] + ((W - m[:, :k]) * beta).sum(-1)  # batch dims of W kept
            pyro.sample("mu", dist.Normal(mu_loc, mu_sd).to_event(1))
            pyro.sample("tau", dist.Gamma(shape, state.tau_rate).to_event(1))
            with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1,
                            device=x.device) as idx:
                z_loc = state.z_loc.index_select(0, idx)
                pyro.sample("z", dist.MultivariateNormal(z_loc, scale_tril=z_tril))

        return guide
