"""Closed-form fitting of the Bayesian GMM (:mod:`elbolab.models.gmm.model`; equation numbers are that module's):
EM for the MAP of the means (c summed out, eq. 5) and CAVI on the mean-field ELBO (eqs. 6-9), as
the algorithm objects the family's ``em()`` / ``cavi()`` return, on dataclass states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from elbolab.models.gmm.means import sorted_means, spread_means
from elbolab.models.numerics import LOG_2PI, softmax
from elbolab.models.validate import check_size

if TYPE_CHECKING:
    from elbolab.models.gmm.model import BayesianGMM


def check_work_size(x: torch.Tensor, K: int, what: str) -> None:
    """EM and CAVI hold (n, K, d) squared differences per sweep: refuse, naming K, what cannot
    fit in memory (:func:`elbolab.models.validate.check_size`)."""
    n, d = x.shape
    check_size(3 * n * K * d, "K", f"{what} with K={K} on {n} points of dimension {d}",
               itemsize=x.element_size(), device=x.device)


# ----------------------------------------------------------------------------- EM (MAP of mu)


@dataclass
class MapState:
    """EM's state: the means ``mu`` (K, d)."""

    mu: torch.Tensor


class GMMMap:
    """EM for the MAP of mu with c summed out; objective log p(x, mu) of eq. 5 (no bound on
    log p(x)). Start: K data points by k-means++ seeding (:func:`spread_means`)."""

    bound = "log-joint-map"
    guide = "map"

    def __init__(self, family: BayesianGMM):
        self.family = family

    def init(self, x: torch.Tensor, generator: torch.Generator) -> MapState:
        check_work_size(x, self.family.K, "EM")
        return MapState(spread_means(x, self.family.K, generator))

    def step(self, x: torch.Tensor, state: MapState) -> MapState:
        """E-step r_ik = p(c_i = k | x_i, mu); M-step mu_k = sum_i r_ik x_i / (n_k + 1/s2),
        n_k = sum_i r_ik (the maximizer of E_r[log p(x, c, mu)])."""
        r = self.family.responsibilities(x, state.mu)
        return MapState((r.T @ x) / (r.sum(0) + 1.0 / self.family.prior_var)[:, None])

    def objective(self, x: torch.Tensor, state: MapState) -> float:
        """log p(x, mu) of eq. 5 (nats, all constants): never decreases under EM. Summed in
        float64 whatever the data's dtype (a float32 sum of terms of size 1e12 is off by 1e5)."""
        return float(self.family.log_joint(x.double(), state.mu.double()))

    def posterior(self, x: torch.Tensor, state: MapState) -> dict[str, torch.Tensor]:
        r = self.family.responsibilities(x, state.mu)
        return {"mu": state.mu, "mu_sorted": sorted_means(state.mu), "responsibilities": r}


# ----------------------------------------------------------------------------- CAVI


@dataclass
class CaviState:
    """q(mu_k) = N(m_k, s2_k I), q(c_i) = Cat(phi_i): ``m`` (K, d), ``s2`` (K,), ``phi`` (n, K).

    ``stats`` (set by :class:`GMMCavi`, not a constructor argument; dropped by
    ``dataclasses.replace``): the sufficient statistics the sweep computed, from which the ELBO
    costs O(Kd) (:class:`CaviStats`)."""

    m: torch.Tensor
    s2: torch.Tensor
    phi: torch.Tensor
    stats: CaviStats | None = field(default=None, init=False, repr=False, compare=False)


@dataclass
class CaviStats:
    """By-products of computing phi = softmax_k(a_ik), a_ik = m'_k^T x_i - (||m'_k||^2 + d s2'_k)/2
    (eq. 6 at the q(mu) = (m', s2') it was computed from): N_k = sum_i phi_ik, S_k = sum_i phi_ik
    x_i, log_norm = sum_i log sum_k exp a_ik, xsq = sum_i ||x_i||^2; and the tensors they
    describe (checked by identity before use)."""

    x: torch.Tensor
    m_from: torch.Tensor
    s2_from: torch.Tensor
    phi: torch.Tensor
    N: torch.Tensor
    S: torch.Tensor
    log_norm: torch.Tensor
    xsq: torch.Tensor


class GMMCavi:
    """CAVI with the updates of eqs. 6-8 and the closed-form ELBO (eq. 9). Start: m_k at K data
    points by k-means++ seeding, s_k^2 = 1, phi from the phi-update.

    A sweep costs O(nKd) (one pass over phi laid out (K, n)); its ELBO then costs O(Kd) from the
    sweep's sufficient statistics (:meth:`objective`); :meth:`closed_form_elbo` is the O(nKd)
    reference that evaluates eq. 9 term by term at any state."""

    bound = "elbo"
    guide = "mean-field"

    def __init__(self, family: BayesianGMM):
        self.family = family

    def init(self, x: torch.Tensor, generator: torch.Generator) -> CaviState:
        check_work_size(x, self.family.K, "CAVI")
        m = spread_means(x, self.family.K, generator)
        s2 = x.new_ones(self.family.K)
        return self._sweep(x, m, s2, None, update=False)

    @staticmethod
    def phi(x: torch.Tensor, m: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        """phi_ik ∝ exp(E[mu_k]^T x_i - E[mu_k^T mu_k] / 2)   (eq. 6), computed as
        exp(-(||x_i - m_k||^2 + d s_k^2) / 2) (the same up to the factor exp(-||x_i||^2 / 2)),
        without the cancellation of the expanded form on data far from 0 (float32 x 1e6)."""
        d = x.shape[1]
        sq = ((x.unsqueeze(-2) - m.unsqueeze(-3)) ** 2).sum(-1)
        return softmax(-0.5 * (sq + d * s2), dim=-1)

    def step(self, x: torch.Tensor, state: CaviState) -> CaviState:
        """One sweep: every phi_i (eq. 6), then every q(mu_k) (eqs. 7-8):
        m_k = sum_i phi_ik x_i / (1/s2 + sum_i phi_ik),  s_k^2 = 1 / (1/s2 + sum_i phi_ik)."""
        return self._sweep(x, state.m, state.s2, state.stats, update=True)

    def _sweep(self, x, m, s2, previous: CaviStats | None, *, update: bool) -> CaviState:
        """phi from (m, s2) (eq. 6) laid out (K, n), its statistics, and (``update``) the new
        q(mu) (eqs. 7-8). Five passes over K x n numbers: logits, max, exp, sum, normalize."""
        d = x.shape[1]
        a = torch.addmm((-0.5 * ((m**2).sum(-1) + d * s2)).unsqueeze(-1), m, x.T)  # (K, n)
        amax = a.amax(0)
        e = a.sub_(amax).exp_()
        z = e.sum(0)
        phi_kn = e.mul_(z.reciprocal())
        N, S = phi_kn.sum(1), phi_kn @ x
        reuse = previous is not None and previous.x is x
        xsq = previous.xsq if reuse else (x * x).sum()
        stats = CaviStats(x, m, s2, phi_kn.T, N, S, (amax + z.log()).sum(), xsq)
        if update:
            lam = 1.0 / self.family.prior_var + N
            m, s2 = S / lam[:, None], 1.0 / lam
        state = CaviState(m, s2, stats.phi)
        state.stats = stats
        return state

    def objective(self, x: torch.Tensor, state: CaviState) -> float:
        """The closed-form ELBO of eq. 9 (:meth:`closed_form_elbo`) from the sweep's statistics,
        O(Kd): with N_k, S_k, xsq as in :class:`CaviStats`, msq_k = ||m_k||^2 + d s_k^2,

        E log p(x|c,mu) = -n d/2 log 2pi - xsq/2 + sum_k (S_k^T m_k - N_k msq_k / 2)
        -E log q(c)     = log_norm - sum_k (S_k^T m'_k - N_k msq'_k / 2)
        (log phi_ik = a_ik - log sum_k exp a_ik, a at the q(mu) = (m', s2') phi came from).
        Falls back to :meth:`closed_form_elbo` for a state without matching statistics."""
        st = state.stats
        if st is None or st.x is not x or st.phi is not state.phi or x.dtype != torch.float64:
            # below float64 the statistics' x^2 - 2 x m + m^2 cancels catastrophically (float32
            # data x 1e6: errors of 1e7 nats): the term-by-term form, in float64
            return self.closed_form_elbo(x, state)
        m, s2 = state.m, state.s2
        n, d = x.shape
        msq = (m**2).sum(-1) + d * s2
        msq_from = (st.m_from**2).sum(-1) + d * st.s2_from
        e_lik = -0.5 * n * d * LOG_2PI - 0.5 * st.xsq + (st.S * m).sum() - 0.5 * (st.N * msq).sum()
        h_c = st.log_norm - (st.S * st.m_from).sum() + 0.5 * (st.N * msq_from).sum()
        return float(e_lik + h_c + self._global_terms(n, d, m, s2, msq))

    def _global_terms(self, n, d, m, s2, msq) -> torch.Tensor:
        """E log p(mu) + E log p(c) - E log q(mu) (eq. 9; see :meth:`closed_form_elbo`)."""
        K, sp = self.family.K, self.family.prior_var
        e_prior = (-0.5 * d * (LOG_2PI + math.log(sp)) - 0.5 * msq / sp).sum()
        h_mu = (0.5 * d * (1 + LOG_2PI + torch.log(s2))).sum()
        return e_prior - n * math.log(K) + h_mu

    def closed_form_elbo(self, x: torch.Tensor, state: CaviState) -> float:
        """Closed-form ELBO (eq. 9; nats, summed over the data, every constant kept), term by term
        at any (m, s2, phi), O(nKd):

        E log p(mu)     = sum_k [-d/2 log(2 pi s2) - (||m_k||^2 + d s_k^2) / (2 s2)]
        E log p(c)      = -n log K
        E log p(x|c,mu) = sum_ik phi_ik [-d/2 log 2pi - (||x_i - m_k||^2 + d s_k^2) / 2]
        -E log q(mu)    = sum_k d/2 (1 + log(2 pi s_k^2))
        -E log q(c)     = -sum_ik phi_ik log phi_ik

        Computed in float64 whatever the data's dtype, with ||x_i - m_k||^2 formed directly (the
        expanded x^2 - 2 x m + m^2 cancels catastrophically on data far from 0).
        """
        x = x.double()
        m, s2, phi = state.m.double(), state.s2.double(), state.phi.double()
        n, d = x.shape
        msq = (m**2).sum(-1) + d * s2  # E ||mu_k||^2
        sq = ((x.unsqueeze(-2) - m.unsqueeze(-3)) ** 2).sum(-1) + d * s2  # E ||x_i - mu_k||^2
        e_lik = (phi * (-0.5 * d * LOG_2PI - 0.5 * sq)).sum()
        h_c = -torch.special.xlogy(phi, phi).sum()
        return float(e_lik + h_c + self._global_terms(n, d, m, s2, msq))

    def posterior(self, x: torch.Tensor, state: CaviState) -> dict[str, torch.Tensor]:
        return {"m": state.m, "s2": state.s2, "phi": state.phi.contiguous(),
                "mu_sorted": sorted_means(state.m)}
