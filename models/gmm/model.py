"""Bayesian Gaussian mixture (Blei, Kucukelbir & McAuliffe 2017, sec. 3), any dimension d.

    mu_k ~ N(0, s2 I_d)          k = 1..K                                   (eq. 1)
    c_i  ~ Categorical(1/K)      i = 1..n                                   (eq. 2)
    x_i | c_i, mu ~ N(mu_{c_i}, I_d)                                        (eq. 3)

What is tractable and implemented:

* exact log evidence, float64 (:mod:`elbolab.models.gmm.evidence`): (a) enumeration of the K^n
  assignments, each a product of conjugate Gaussian marginals (eq. 4 below); (b) the
  K*d-dimensional integral over mu with c summed out (eq. 5), by Gauss-Hermite quadrature or
  importance sampling;
* exact posterior moments of the sorted means for small n (from the enumeration);
* EM for the MAP of mu with c marginalized (:class:`GMMMap`), and CAVI with the paper's updates
  (eqs. 6-8 below) and closed-form ELBO (eq. 9, in :meth:`GMMCavi.objective`).

Conjugate marginal of the points assigned to one cluster (n_k points, sum S_k, sum of squares Q_k),
integrating mu_k ~ N(0, s2 I) out:

    log p(x_{c=k}) = -n_k d/2 log 2pi - d/2 log(1 + n_k s2) - Q_k/2
                     + s2 ||S_k||^2 / (2 (1 + n_k s2))                       (eq. 4)

Marginal of x with c summed out, as a function of mu:

    log p(x, mu) = log N(mu; 0, s2 I) + sum_i log sum_k (1/K) N(x_i; mu_k, I)  (eq. 5)

CAVI for q(mu_k) = N(m_k, s_k^2 I), q(c_i) = Cat(phi_i) (the paper's updates, isotropic in d):

    phi_ik ∝ exp(m_k^T x_i - (||m_k||^2 + d s_k^2) / 2)                        (eq. 6)
    m_k    = sum_i phi_ik x_i / (1/s2 + sum_i phi_ik)                           (eq. 7)
    s_k^2  = 1 / (1/s2 + sum_i phi_ik)                                          (eq. 8)

Numbering is local to this module and :mod:`elbolab.models.gmm.evidence`. Every density (eqs. 1-3 and 5)
comes from the distribution objects of :meth:`BayesianGMM.mean_prior`,
:meth:`BayesianGMM.assignment_prior`, :meth:`BayesianGMM.component` and
:meth:`BayesianGMM.likelihood`, which the Pyro models sample from.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex

from elbolab.models.base import ModelFamily
from elbolab.models.capabilities import Evidence, FlatPotential, Moments, flat_point
from elbolab.models.gmm import evidence as gmm_evidence
from elbolab.models.gmm.evidence import MAX_ASSIGNMENTS
from elbolab.models.gmm.fit import GMMCavi, GMMMap
from elbolab.models.gmm.means import sorted_means, spread_means
from elbolab.models.numerics import LOG_2PI, softmax
from elbolab.models.validate import as_data, integer, positive

#: the prior variances the family accepts: beyond, 1/s2 or s2 * (sums of squares) leave float64
PRIOR_VAR_RANGE = (1e-300, 1e300)
#: the coarsest spacing of representable data values (|x| * eps) accepted, in component sds
RESOLUTION = 0.1

# ----------------------------------------------------------------------------- helpers


def label_symmetry_term(K: int) -> float:
    """log K!: the posterior over mu has K! symmetric copies of each mode (label switching).

    A unimodal q that sits on one of K! well-separated modes covers at most 1/K! of the
    posterior mass, so its ELBO cannot beat log p(x) - log K! (up to the mass between modes).
    """
    return math.lgamma(integer(K, "K", minimum=1) + 1)


# ----------------------------------------------------------------------------- the family


class BayesianGMM(ModelFamily):
    """The Bayesian GMM of Blei et al. (2017, sec. 3) with hyperparameters K, s2 (= prior_var), d.

    ``dim`` is optional: when given, data must have that many columns.
    """

    name = "gmm"
    discrete_sites = ("c",)
    max_plate_nesting = 1

    def __init__(self, K: int = 3, prior_var: float = 10.0, dim: int | None = None):
        self.K = integer(K, "K", minimum=1)
        self.prior_var = positive(prior_var, "prior_var")
        lo, hi = PRIOR_VAR_RANGE
        if not lo <= self.prior_var <= hi:
            raise ValueError(f"prior_var: must lie in [{lo:g}, {hi:g}] (1/s2 and s2 times sums of "
                             f"squares must stay finite in float64), got {prior_var!r}")
        self.dim = None if dim is None else integer(dim, "dim", minimum=1)

    def __repr__(self) -> str:
        return f"BayesianGMM(K={self.K}, prior_var={self.prior_var}, dim={self.dim})"

    def settings(self) -> dict:
        return {"K": self.K, "prior_var": self.prior_var, "dim": self.dim}

    def label_symmetry_term(self) -> float:
        """log K! (see :func:`label_symmetry_term`)."""
        return label_symmetry_term(self.K)

    # ------------------------------------------------------------------ distributions

    def mean_prior(self, like: torch.Tensor):
        """p(mu_k) = N(0, s2 I_d) (eq. 1): batch (), event (d,), d = ``like.shape[-1]``."""
        d = like.shape[-1]
        scale = like.new_full((d,), math.sqrt(self.prior_var))
        return dist.Normal(like.new_zeros(d), scale).to_event(1)

    def assignment_prior(self, like: torch.Tensor):
        """p(c_i) = Categorical(1/K) (eq. 2), on ``like``'s device and dtype."""
        return dist.Categorical(logits=like.new_zeros(self.K))

    def component(self, loc: torch.Tensor):
        """p(x_i | c_i, mu) = N(loc, I_d) with loc = mu_{c_i} (eq. 3): event (d,)."""
        return dist.Normal(loc, loc.new_ones(())).to_event(1)

    def likelihood(self, mu: torch.Tensor):
        """p(x_i | mu) = sum_k (1/K) N(x_i; mu_k, I) (eqs. 2-3 with c summed out) for mu
        ``(..., K, d)``: batch ``(..., 1)`` (broadcasts against the data plate), event (d,)."""
        return dist.MixtureSameFamily(self.assignment_prior(mu), self.component(mu.unsqueeze(-3)))

    # The densities below skip Pyro's argument checks: x is checked data, and a non-finite mu
    # must give a non-finite value (stopped by elbolab.models.ascent.ascend), not an error; the checks
    # also cost more than the arithmetic in EM's objective.

    def log_prior(self, mu: torch.Tensor) -> torch.Tensor:
        """log p(mu) summed over the K components of mu ``(..., K, d)`` (eq. 1), shape (...)."""
        with pyro.validation_enabled(False):
            return self.mean_prior(mu).log_prob(mu).sum(-1)

    def log_likelihood(self, x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """log p(x_i | mu) = log sum_k (1/K) N(x_i; mu_k, I) for mu ``(..., K, d)``: ``(..., n)``."""
        with pyro.validation_enabled(False):
            return self.likelihood(mu).log_prob(x)

    def log_joint(self, x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """log p(x, mu) with c summed out (eq. 5), every constant kept; mu ``(..., K, d)``."""
        return self.log_prior(mu) + self.log_likelihood(x, mu).sum(-1)

    def responsibilities(self, x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """p(c_i = k | x_i, mu) with the uniform p(c) of eq. 2: softmax_k(-||x_i - mu_k||^2 / 2)
        (the constants of eq. 3 cancel), shape ``(..., n, K)``."""
        sq = ((x.unsqueeze(-2) - mu.unsqueeze(-3)) ** 2).sum(-1)
        return softmax(-0.5 * sq, dim=-1)

    # ------------------------------------------------------------------ data and model

    def check_data(self, x) -> torch.Tensor:
        """``x`` as an ``(n, d)`` floating tensor (1-D input read as d = 1); device/dtype kept.

        The components have unit variance, so the data must be resolved much finer than 1, and
        every log density sums terms of size ||x_i||^2: data are an error when the spacing of
        their values in their dtype (max |x| * eps) or the float64 rounding of those sums
        (eps_64 * sum_i ||x_i||^2, in nats) exceeds :data:`RESOLUTION` (e.g. float32 beyond ~8e5;
        100 float64 points beyond ~2e6): the rounding, not the model, would set every ELBO,
        evidence and gap. Squared norms that overflow are an error too."""
        x = as_data(x, "x", ndim=(1, 2))
        if x.dim() == 1:
            x = x.unsqueeze(-1)
        if self.dim is not None and x.shape[1] != self.dim:
            raise ValueError(f"x: expected {self.dim} columns (dim={self.dim}), got {x.shape[1]}")
        big = float(x.detach().abs().max())
        spacing = big * torch.finfo(x.dtype).eps
        if spacing > RESOLUTION:
            kind = str(x.dtype).removeprefix("torch.")
            raise ValueError(
                f"x: values up to {big:.3g} are resolved only to {spacing:.2g} in {kind}, too "
                "coarse for the GMM's unit-variance components; rescale the data"
                + ("" if x.dtype == torch.float64 else " or use float64"))
        sq = (x.detach() ** 2).sum(-1)
        total = float(sq.double().sum())
        if not (bool(torch.isfinite(sq).all()) and math.isfinite(total)):
            raise ValueError(
                f"x: values up to {big:.3g} overflow the squared distances in {str(x.dtype)[6:]} "
                "(the GMM's components have unit variance); rescale the data")
        if total * torch.finfo(torch.float64).eps > RESOLUTION:
            raise ValueError(
                f"x: values up to {big:.3g} make the log densities sums of size {total:.3g}, known "
                f"only to {total * torch.finfo(torch.float64).eps:.2g} nats in float64 (the "
                "components have unit variance); rescale the data")
        return x

    def _sample_means(self, x: torch.Tensor):
        """(x as (n, d), mu ~ N(0, s2 I_d) for each of the K components: eq. 1)."""
        if x.dim() == 1:
            x = x.unsqueeze(-1)
        with pyro.plate("components", self.K, dim=-1):
            mu = pyro.sample("mu", self.mean_prior(x))
        return x, mu

    def model(self, x: torch.Tensor, subsample_size: int | None = None):
        """Pyro model of eqs. 1-3; c is marked for parallel enumeration (summed out exactly by
        ``TraceEnum_ELBO`` and NUTS when the guide does not sample it)."""
        x, mu = self._sample_means(x)
        n = x.shape[0]
        with pyro.plate("data", n, subsample_size=subsample_size, dim=-1, device=x.device) as idx:
            c = pyro.sample("c", self.assignment_prior(x), infer={"enumerate": "parallel"})
            # mu (..., K, d) -> (..., 1, K, d) so batch dims left of the data plate line up
            loc = Vindex(mu.unsqueeze(-3))[..., c, :]
            pyro.sample("obs", self.component(loc), obs=x[idx])

    def simulate(self, n: int, *, seed: int = 0, device=None, dtype=torch.float64):
        """Draw ``n`` points from eqs. 1-3 (d = ``dim`` or 1). Returns ``(x, {"mu", "c"})``."""
        n = integer(n, "n", minimum=1)
        seed = integer(seed, "seed", minimum=0)
        d = self.dim or 1
        gen = torch.Generator().manual_seed(seed)
        mu = math.sqrt(self.prior_var) * torch.randn(self.K, d, generator=gen, dtype=torch.float64)
        c = torch.randint(self.K, (n,), generator=gen)
        x = mu[c] + torch.randn(n, d, generator=gen, dtype=torch.float64)
        kw = {"device": device, "dtype": dtype}
        try:
            self.check_data(x.to(dtype=dtype))
        except ValueError as exc:
            raise ValueError(f"prior_var: {self.prior_var:g} draws means of size "
                             f"{float(mu.abs().max()):.3g}, whose data cannot be used "
                             f"({str(exc).removeprefix('x: ')})") from exc
        return x.to(**kw), {"mu": mu.to(**kw), "c": c.to(device)}

    # ------------------------------------------------------------------ exact answers

    def log_evidence(
        self,
        x,
        method: str = "auto",
        *,
        seed: int = 0,
        num_samples: int = 20_000,
        nodes: int | None = None,
        max_assignments: int = MAX_ASSIGNMENTS,
    ) -> Evidence:
        """log p(x) in nats (float64, summed over the data), with its method and error.

        ``method``: ``"enumeration"`` (exact, eq. 4 summed over K^n assignments, se = 0),
        ``"quadrature"`` (Gauss-Hermite on eq. 5, K*d <= 5; se is an error indicator from
        coarser and wider grids, not a standard error), ``"importance"`` (importance sampling of
        eq. 5 with a proposal covering all K! label permutations; se is the delta-method
        standard error; ``details["ess"]`` the effective sample size), ``"sequential"``
        (sequential importance sampling over partitions, any K: :mod:`elbolab.models.gmm.sequential`),
        or ``"auto"``: enumeration when K^(n-1) <= ``max_assignments``, else sequential when
        K > n, else quadrature when K*d <= 4 and its error indicator is <= 0.01 nats, else
        importance sampling (sequential if that yields no finite estimate).
        See :func:`elbolab.models.gmm.evidence.log_evidence`.
        """
        return gmm_evidence.log_evidence(
            self, self.check_data(x), method, seed=seed, num_samples=num_samples, nodes=nodes,
            max_assignments=max_assignments,
        )

    def exact_invariant_moments(
        self, x, *, num_samples: int = 100_000, seed: int = 0,
        max_assignments: int = MAX_ASSIGNMENTS,
    ) -> dict[str, Moments]:
        """``{"mu_sorted": Moments}``: posterior mean and sd of the means sorted by first
        coordinate, for small n.

        The posterior is the exact mixture over assignments c (weights p(c | x) from eq. 4) of
        conjugate Gaussians mu_k | c, x ~ N(S_k / lam_k, I / lam_k), lam_k = 1/s2 + n_k.
        Sorting is not linear, so the moments are Monte Carlo averages over ``num_samples``
        exact draws from that mixture (:func:`elbolab.models.gmm.evidence.exact_posterior_draws`);
        ``mean_se`` (= sd / sqrt(S)) is their Monte Carlo error, ``sd_se`` (= sd / sqrt(2 S),
        the Gaussian approximation) that of the sd. Tensors shaped ``(K, d)`` on x's device
        and dtype.
        """
        x = self.check_data(x)
        S = integer(num_samples, "num_samples", minimum=2)
        gen = torch.Generator().manual_seed(integer(seed, "seed", minimum=0))
        draws = gmm_evidence.exact_posterior_draws(self, x.double(), S, gen, max_assignments)
        mu = sorted_means(draws)
        mean, sd = mu.mean(0), mu.std(0)
        se, sd_se = sd / math.sqrt(S), sd / math.sqrt(2 * S)
        moments = (v.to(x.dtype) for v in (mean, sd, se, sd_se))
        return {"mu_sorted": Moments(*moments, num_samples=S)}

    # ------------------------------------------------------------------ closed-form algorithms

    def em(self):
        """EM for the MAP of mu with c summed out (eq. 5): :class:`elbolab.models.gmm.fit.GMMMap`."""
        return GMMMap(self)

    def cavi(self):
        """CAVI on the mean-field ELBO (eqs. 6-9): :class:`elbolab.models.gmm.fit.GMMCavi`."""
        return GMMCavi(self)

    # ------------------------------------------------------------------ MCMC

    def mcmc_model(self, x: torch.Tensor, subsample_size: int | None = None):
        """The model with c summed out in closed form (eq. 5, :meth:`likelihood`, a
        MixtureSameFamily): the same density over mu as :meth:`model` with c enumerated, without
        the enumeration machinery in every gradient evaluation (NUTS is several times faster)."""
        x, mu = self._sample_means(x)
        n = x.shape[0]
        with pyro.plate("data", n, subsample_size=subsample_size, dim=-1, device=x.device) as idx:
            pyro.sample("obs", self.likelihood(mu), obs=x[idx])

    def batched_potential(self, x: torch.Tensor) -> FlatPotential:
        """U(mu) = -log N(mu; 0, s2 I) - log p(x | mu) (eq. 5), for C chains at once, with its
        gradient by hand: with a_ik = x_i . mu_k - ||mu_k||^2 / 2 and r = softmax_k(a),

            log p(x | mu) = sum_i logsumexp_k a_ik - ||x||^2/2 - n log K - n d/2 log 2pi,
            d/dmu_k = sum_i r_ik x_i - (sum_i r_ik) mu_k,   prior: -mu_k / s2.

        Flat coordinates: mu as (K d,); starting points uniform in (-2, 2), as Pyro's default."""
        x = self.check_data(x)
        n, d, K, s2 = x.shape[0], x.shape[1], self.K, self.prior_var
        const = (-0.5 * float((x.double() ** 2).sum()) - n * math.log(K) - 0.5 * n * d * LOG_2PI
                 - 0.5 * K * d * (math.log(s2) + LOG_2PI))

        xt = x.T.contiguous()

        def potential(q):
            mu = q.view(q.shape[0], K, d)
            sq = (mu * mu).sum(-1, keepdim=True)  # (C, K, 1)
            a = torch.matmul(mu, xt).sub_(sq, alpha=0.5)  # (C, K, n); in place: no new buffers
            top = a.amax(1, keepdim=True)
            e = a.sub_(top).exp_()
            z = e.sum(1, keepdim=True)
            r = e.div_(z)
            lse = z.log_().add_(top).sum((1, 2))
            U = sq.sum((1, 2)).mul_(0.5 / s2).sub_(lse).sub_(const)
            grad = mu * (r.sum(-1, keepdim=True) + 1.0 / s2) - torch.matmul(r, x)
            return U, grad.view(q.shape)

        def init(chains: int, generator: torch.Generator):
            u = torch.rand(chains, K * d, generator=generator, dtype=torch.float64)
            return (4 * u - 2).to(x)

        return FlatPotential(K * d, potential, lambda q: {"mu": q.reshape(*q.shape[:-1], K, d)},
                             init, lambda given: flat_point(given, {"mu": (K, d)}, x))

    def compiled_potential(self, x: torch.Tensor) -> tuple:
        """:meth:`batched_potential`'s U compiled (:func:`elbolab.models.gmm.compiled.gmm_potential`,
        Numba): ``(fn, x transposed, float64 (d, n), (K, s2, const))``."""
        from elbolab.models.gmm.compiled import gmm_potential

        x = self.check_data(x)
        n, d, K, s2 = x.shape[0], x.shape[1], self.K, float(self.prior_var)
        xd = x.detach().to("cpu", torch.float64).numpy().T.copy()
        const = (-0.5 * float((xd ** 2).sum()) - n * math.log(K) - 0.5 * n * d * LOG_2PI
                 - 0.5 * K * d * (math.log(s2) + LOG_2PI))
        return gmm_potential, xd, np.array([K, s2, const])

    def mcmc_init(self, x: torch.Tensor) -> None:
        """No special start: Pyro's default initialization."""
        return None

    def _as_mu(self, samples: dict, x: torch.Tensor) -> torch.Tensor:
        mu = samples["mu"]
        if not isinstance(mu, torch.Tensor):
            mu = torch.as_tensor(np.asarray(mu))
        mu = mu.to(device=x.device, dtype=x.dtype)
        if mu.dim() != 4 or mu.shape[-2] != self.K or mu.shape[-1] != x.shape[1]:
            raise ValueError(
                f"samples: 'mu' must be shaped (chain, draw, K={self.K}, d={x.shape[1]}), "
                f"got {tuple(mu.shape)}"
            )
        return mu

    def pointwise_log_likelihood(self, samples: dict, x) -> torch.Tensor:
        """log p(x_i | mu) = log sum_k (1/K) N(x_i; mu_k, I), shape ``(chain, draw, n)``, written
        as in :meth:`batched_potential` (``a_ik = x_i . mu_k - ||mu_k||^2/2``, one matrix product
        and a log-sum-exp per chain, in place): the same value as :meth:`log_likelihood` to
        rounding, at a quarter of its cost over thousands of draws."""
        x = self.check_data(x)
        mu = self._as_mu(samples, x)
        xt, K, d = x.T.contiguous(), mu.shape[-2], mu.shape[-1]
        const = -0.5 * (x * x).sum(-1) - math.log(K) - 0.5 * d * LOG_2PI  # (n,)
        out = []
        for m in mu:  # one chain at a time: (draw, K, n) at most in memory
            a = torch.matmul(m, xt).sub_((m * m).sum(-1, keepdim=True), alpha=0.5)
            top = a.amax(-2, keepdim=True)
            lse = a.sub_(top).exp_().sum(-2, keepdim=True).log_().add_(top)
            out.append(lse.squeeze(-2).add_(const))
        return torch.stack(out)

    def posterior_invariants(self, samples: dict, x) -> dict:
        """Label-invariant summaries for R-hat/ESS: means sorted by first coordinate
        ``(chain, draw, K, d)`` and the log likelihood sum_i log p(x_i | mu) ``(chain, draw)``."""
        x = self.check_data(x)
        mu = self._as_mu(samples, x)
        return {
            "mu_sorted": sorted_means(mu),
            "log_likelihood": self.pointwise_log_likelihood({"mu": mu}, x).sum(-1),
        }


__all__ = [
    "MAX_ASSIGNMENTS", "BayesianGMM", "label_symmetry_term", "softmax", "sorted_means",
    "spread_means",
]
