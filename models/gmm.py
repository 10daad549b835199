"""Bayesian Gaussian mixture (Blei, Kucukelbir & McAuliffe 2017, sec. 3), any dimension d.

    mu_k ~ N(0, s2 I_d)          k = 1..K                                   (eq. 1)
    c_i  ~ Categorical(1/K)      i = 1..n                                   (eq. 2)
    x_i | c_i, mu ~ N(mu_{c_i}, I_d)                                        (eq. 3)

What is tractable and implemented here:

* exact log evidence, float64: (a) enumeration of the K^n assignments, each a product of
  conjugate Gaussian marginals (eq. 4 below); (b) the K*d-dimensional integral over mu with c
  summed out (eq. 5), by Gauss-Hermite quadrature or importance sampling;
* exact posterior moments of the sorted means for small n (from the enumeration);
* EM for the MAP of mu with c marginalized, and CAVI with the paper's updates (eqs. 6-8 below)
  and closed-form ELBO (eq. 9, in :meth:`BayesianGMM.cavi_objective`).

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

Numbering is local to this module.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex

from models.base import Evidence, ModelFamily
from models.validate import as_data, choice, integer, positive

LOG_2PI = math.log(2 * math.pi)

#: K^(n-1) assignments at most for ``method="auto"`` to pick enumeration (K = 3, n = 14: 1.6e6)
MAX_ASSIGNMENTS = 2_000_000
#: K*d at most for ``method="auto"`` to pick quadrature over importance sampling
MAX_QUADRATURE_DIM = 4
#: largest quadrature error indicator (nats) that ``method="auto"`` accepts
QUADRATURE_TOL = 0.01


# ----------------------------------------------------------------------------- helpers


def label_symmetry_term(K: int) -> float:
    """log K!: the posterior over mu has K! symmetric copies of each mode (label switching).

    A unimodal q that sits on one of K! well-separated modes covers at most 1/K! of the
    posterior mass, so its ELBO cannot beat log p(x) - log K! (up to the mass between modes).
    """
    return math.lgamma(integer(K, "K", minimum=1) + 1)


def sorted_means(mu: torch.Tensor) -> torch.Tensor:
    """Means ``(..., K, d)`` reordered by their first coordinate (a label-invariant summary)."""
    order = mu[..., 0].argsort(dim=-1)
    return torch.gather(mu, -2, order.unsqueeze(-1).expand(mu.shape))


def init_means(x: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
    """K distinct data points chosen at random (with replacement when n < K), on x's device."""
    n = x.shape[0]
    if n >= K:
        idx = torch.randperm(n, generator=generator)[:K]
    else:
        idx = torch.randint(n, (K,), generator=generator)
    return x[idx.to(x.device)].clone()


def spread_means(x: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
    """K data points by k-means++ seeding (Arthur & Vassilvitskii 2007): the first uniformly,
    each next one with probability proportional to its squared distance D(x_i)^2 to the nearest
    point already chosen. Shape ``(K, d)`` on x's device and dtype."""
    n = x.shape[0]
    idx = [int(torch.randint(n, (1,), generator=generator))]
    for _ in range(1, K):
        d2 = ((x.unsqueeze(1) - x[idx].unsqueeze(0)) ** 2).sum(-1).amin(1)
        weights = d2.detach().to("cpu", torch.float64)
        if not float(weights.sum()) > 0:  # fewer distinct points than K: any point
            weights = torch.ones(n, dtype=torch.float64)
        idx.append(int(torch.multinomial(weights, 1, generator=generator)))
    return x[torch.tensor(idx, device=x.device)].clone()


def pointwise_mixture_loglik(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """log sum_k (1/K) N(x_i; mu_k, I) for mu ``(..., K, d)``: shape ``(..., n)`` (eq. 5)."""
    K, d = mu.shape[-2:]
    sq = ((x.unsqueeze(-2) - mu.unsqueeze(-3)) ** 2).sum(-1)  # (..., n, K)
    return torch.logsumexp(-0.5 * sq, dim=-1) - math.log(K) - 0.5 * d * LOG_2PI


def log_prior(mu: torch.Tensor, prior_var: float) -> torch.Tensor:
    """log N(mu; 0, s2 I) summed over the K*d coordinates of mu ``(..., K, d)`` (eq. 1)."""
    K, d = mu.shape[-2:]
    return -0.5 * (mu**2).sum((-1, -2)) / prior_var - 0.5 * K * d * (
        LOG_2PI + math.log(prior_var)
    )


def log_joint(x: torch.Tensor, mu: torch.Tensor, prior_var: float) -> torch.Tensor:
    """log p(x, mu) with c summed out (eq. 5), every constant kept; mu ``(..., K, d)``."""
    return log_prior(mu, prior_var) + pointwise_mixture_loglik(x, mu).sum(-1)


def responsibilities(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """p(c_i = k | x_i, mu) with a uniform prior on c: softmax_k(-||x_i - mu_k||^2 / 2)."""
    sq = ((x.unsqueeze(-2) - mu.unsqueeze(-3)) ** 2).sum(-1)
    return _softmax(-0.5 * sq, dim=-1)


def _digit_stats(x: torch.Tensor, K: int):
    """Counts ``(K^m, K)`` and sums ``(K^m, K, d)`` of the m points of x for all K^m assignments
    (assignment j puts point i in cluster (j // K^i) % K)."""
    m = x.shape[0]
    idx = torch.arange(K**m, device=x.device)
    c = (idx[:, None] // K ** torch.arange(m, device=x.device)) % K
    onehot = torch.nn.functional.one_hot(c, K).to(x.dtype)  # (K^m, m, K)
    return onehot.sum(1), torch.einsum("jmk,md->jkd", onehot, x)


def _softmax(a: torch.Tensor, dim: int) -> torch.Tensor:
    """Stable softmax from elementwise ops (torch.softmax spawns a thread pool per call on CPU,
    which costs milliseconds per tiny call on a loaded machine)."""
    e = torch.exp(a - a.amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)


def _chunked(fn, mu: torch.Tensor, n: int, budget: int = 4_000_000) -> torch.Tensor:
    """Apply ``fn`` to rows of mu ``(S, K, d)`` in chunks of about ``budget / (n K d)`` rows."""
    K, d = mu.shape[-2:]
    size = max(1, budget // max(1, n * K * d))
    return torch.cat([fn(mu[i : i + size]) for i in range(0, mu.shape[0], size)])


# ----------------------------------------------------------------------------- the family


class BayesianGMM(ModelFamily):
    """The Bayesian GMM of Blei et al. (2017, sec. 3) with hyperparameters K, s2 (= prior_var), d.

    ``dim`` is optional: when given, data must have that many columns.
    """

    name = "gmm"
    discrete_sites = ("c",)
    max_plate_nesting = 1
    default_guide = "mean-field"
    em_bound = "log-joint-map"
    em_guide_name = "map"
    cavi_bound = "elbo"
    cavi_guide_name = "mean-field"

    def __init__(self, K: int = 3, prior_var: float = 10.0, dim: int | None = None):
        self.K = integer(K, "K", minimum=1)
        self.prior_var = positive(prior_var, "prior_var")
        self.dim = None if dim is None else integer(dim, "dim", minimum=1)

    def __repr__(self) -> str:
        return f"BayesianGMM(K={self.K}, prior_var={self.prior_var}, dim={self.dim})"

    def settings(self) -> dict:
        return {"K": self.K, "prior_var": self.prior_var, "dim": self.dim}

    def label_symmetry_term(self) -> float:
        """log K! (see :func:`label_symmetry_term`)."""
        return label_symmetry_term(self.K)

    # ------------------------------------------------------------------ data and model

    def check_data(self, x) -> torch.Tensor:
        """``x`` as an ``(n, d)`` floating tensor (1-D input read as d = 1); device/dtype kept."""
        x = as_data(x, "x", ndim=(1, 2))
        if x.dim() == 1:
            x = x.unsqueeze(-1)
        if self.dim is not None and x.shape[1] != self.dim:
            raise ValueError(f"x: expected {self.dim} columns (dim={self.dim}), got {x.shape[1]}")
        return x

    def _sample_means(self, x: torch.Tensor):
        """(x as (n, d), mu ~ N(0, s2 I_d) for each of the K components: eq. 1)."""
        if x.dim() == 1:
            x = x.unsqueeze(-1)
        scale = x.new_full((x.shape[1],), math.sqrt(self.prior_var))
        with pyro.plate("components", self.K, dim=-1):
            mu = pyro.sample("mu", dist.Normal(x.new_zeros(x.shape[1]), scale).to_event(1))
        return x, mu

    def model(self, x: torch.Tensor, subsample_size: int | None = None):
        """Pyro model of eqs. 1-3; c is marked for parallel enumeration (summed out exactly by
        ``TraceEnum_ELBO`` and NUTS when the guide does not sample it)."""
        x, mu = self._sample_means(x)
        n, d = x.shape
        with pyro.plate("data", n, subsample_size=subsample_size, dim=-1, device=x.device) as idx:
            c = pyro.sample(
                "c",
                dist.Categorical(logits=x.new_zeros(self.K)),
                infer={"enumerate": "parallel"},
            )
            # mu (..., K, d) -> (..., 1, K, d) so batch dims left of the data plate line up
            loc = Vindex(mu.unsqueeze(-3))[..., c, :]
            pyro.sample("obs", dist.Normal(loc, x.new_ones(())).to_event(1), obs=x[idx])

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
        return x.to(**kw), {"mu": mu.to(**kw), "c": c.to(device)}

    # ------------------------------------------------------------------ exact evidence

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
        standard error; ``details["ess"]`` the effective sample size),
        or ``"auto"``: enumeration when K^(n-1) <= ``max_assignments``, else quadrature when
        K*d <= 4 and its error indicator is <= 0.01 nats, else importance sampling.
        """
        x = self.check_data(x)
        method = choice(method, "method", ["auto", "enumeration", "quadrature", "importance"])
        n, d = x.shape
        max_assignments = integer(max_assignments, "max_assignments", minimum=1)
        auto = None
        if method == "auto":
            if self.K ** (n - 1) <= max_assignments:
                method = "enumeration"
            elif self.K * d <= MAX_QUADRATURE_DIM:
                auto = "quadrature"
            else:
                method = "importance"
        x64 = x.to(torch.float64)
        num_samples = integer(num_samples, "num_samples", minimum=2)
        seed = integer(seed, "seed", minimum=0)
        if method == "enumeration":
            return self._evidence_enumeration(x64, max_assignments)
        if method == "quadrature" or auto == "quadrature":
            ev = self._evidence_quadrature(x64, nodes, seed)
            if method == "quadrature" or ev.se <= QUADRATURE_TOL:
                return ev
            # auto: the quadrature's error indicator is too large -> importance sampling
            fallback = self._evidence_importance(x64, num_samples, seed)
            fallback.details["rejected_quadrature"] = {"value": ev.value, "error": ev.se}
            return fallback
        return self._evidence_importance(x64, num_samples, seed)

    def _assignment_log_weights(self, x: torch.Tensor, max_assignments: int):
        """log p(x | c) (eq. 4 summed over k) for every c with c_1 = 0, in chunks.

        Fixing c_1 = 0 is exact: the summand is symmetric under relabelling, so the sum over all
        K^n assignments is K times the sum over those with c_1 = 0. Assignment number
        ``j = sum_i c_{i+1} K^(i-1)`` (i = 1..n-1); the sufficient statistics (n_k, S_k) are
        sums of those of the low and high digits, precomputed for each half.
        Yields ``(first_index, log_weights)``.
        """
        n, d = x.shape
        K, s2 = self.K, self.prior_var
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
            denom = 1 + nk * s2
            lw = (-0.5 * d * torch.log(denom) + 0.5 * s2 * S2 / denom).sum(-1)
            yield start * lo_n.shape[0], lw.reshape(-1) + const

    def _evidence_enumeration(self, x: torch.Tensor, max_assignments: int) -> Evidence:
        n = x.shape[0]
        chunks = self._assignment_log_weights(x, max_assignments)
        parts = [torch.logsumexp(lw, 0) for _, lw in chunks]
        value = torch.logsumexp(torch.stack(parts), 0) + math.log(self.K) - n * math.log(self.K)
        return Evidence(float(value), 0.0, "enumeration", n, {"assignments": self.K**n})

    def _laplace(self, x: torch.Tensor, seed: int, restarts: int = 10, hessian: bool = True):
        """MAP of mu (eq. 5) by EM from ``restarts`` starts and the Laplace covariance there.

        Falls back to the diagonal precision 1/s2 + n_k when the Hessian is not negative definite.
        Returns ``(mode (K, d), covariance (K d, K d) or None)`` in float64.
        """
        K, d = self.K, x.shape[1]
        gen = torch.Generator().manual_seed(seed)
        best, best_val = None, -math.inf
        for _ in range(restarts):
            state = self.em_init(x, gen)
            val = self.em_objective(x, state)
            for _ in range(1000):
                state = self.em_step(x, state)
                new = self.em_objective(x, state)
                done = new - val <= 1e-12 * x.shape[0]
                val = new
                if done:
                    break
            if val > best_val:
                best, best_val = state["mu"], val
        if not hessian:
            return best, None
        hess = torch.autograd.functional.hessian(
            lambda v: log_joint(x, v.view(K, d), self.prior_var), best.reshape(-1)
        )
        prec = -(hess + hess.T) / 2
        try:
            cov = torch.cholesky_inverse(torch.linalg.cholesky(prec))
        except RuntimeError:  # not a strict local maximum: mean-field precision
            nk = responsibilities(x, best).sum(0)
            cov = torch.diag((1.0 / (1.0 / self.prior_var + nk)).repeat_interleave(d))
        return best, cov

    def _permutations(self, device) -> torch.Tensor:
        return torch.tensor(list(itertools.permutations(range(self.K))), device=device)

    def _evidence_quadrature(self, x: torch.Tensor, nodes: int | None, seed: int) -> Evidence:
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
        D = self.K * d
        if D > 5:
            raise ValueError(f"method: quadrature needs K*d <= 5, got K*d = {D}")
        m = integer(nodes or min(40, int(5e4 ** (1 / D))), "nodes", minimum=3)
        mode, cov = self._laplace(x, seed)
        perms = self._permutations(x.device)

        def rule(m_, c):
            L = torch.linalg.cholesky(c * cov)
            z, w = np.polynomial.hermite_e.hermegauss(m_)
            z = torch.as_tensor(z, dtype=x.dtype, device=x.device)
            lw = torch.as_tensor(np.log(w / math.sqrt(2 * math.pi)), dtype=x.dtype, device=x.device)
            grid = torch.cartesian_prod(*([z] * D)).reshape(-1, D)
            lwg = torch.cartesian_prod(*([lw] * D)).reshape(-1, D).sum(-1)
            mu = (mode.reshape(-1) + grid @ L.T).view(-1, self.K, d)
            log_f = _chunked(lambda b: log_joint(x, b, self.prior_var), mu, n)
            log_g = _chunked(lambda b: _log_sym_gauss(b, mode, L, perms), mu, len(perms))
            return float(torch.logsumexp(lwg + log_f - log_g, 0))

        value = rule(m, 1.5)
        coarse, wide = rule(max(3, round(0.75 * m)), 1.5), rule(m, 3.0)
        err = max(abs(value - coarse), abs(value - wide))
        details = {"nodes": m, "coarse_value": coarse, "wide_value": wide}
        return Evidence(value, err, "quadrature", n, details)

    def _gibbs_conditionals(self, x: torch.Tensor, seed: int, keep: int, chains: int = 8):
        """Posterior-fitted proposal components: about ``keep`` conditionals
        p(mu | c_j, x) = prod_k N(S_jk / lam_jk, I / lam_jk), lam_jk = 1/s2 + n_jk, at allocations
        c_j drawn by Gibbs sampling on (c, mu) (Fruhwirth-Schnatter 2004). ``chains`` chains run
        side by side: one from the MAP, the others from random data points (burn-in 50 sweeps,
        then every 2nd sweep kept). Returns ``(means (J, K, d), lam (J, K))``."""
        n, d = x.shape
        K, s2 = self.K, self.prior_var
        gen = torch.Generator().manual_seed(seed)
        mode, _ = self._laplace(x, seed, hessian=False)
        mu = torch.stack([mode] + [init_means(x, K, gen) for _ in range(chains - 1)])
        means, lams = [], []
        burn, thin, per_chain = 50, 2, -(-keep // chains)
        for t in range(burn + thin * per_chain):
            cdf = torch.cumsum(responsibilities(x, mu), -1)  # (C, n, K)
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

    def _evidence_importance(self, x: torch.Tensor, num_samples: int, seed: int) -> Evidence:
        """Importance sampling of eq. 5; the proposal covers all K! relabellings.

        g = eps p(mu) + (1-eps) (1/J) sum_j (1/K!) sum_pi prod_k N(mu_pi(k); S_jk/lam_jk, I/lam_jk)
        with J Gibbs allocations (see :meth:`_gibbs_conditionals`) and a defensive prior share
        eps = 0.05, so the weights f/g are bounded (by max likelihood / eps). For K > 4 the sum
        over relabellings is replaced by restriction to means sorted by first coordinate, with
        weights K! f/g 1{sorted} (exact: that region holds 1/K! of the mass of f).
        log p(x) = log mean(w); se = sd(w) / (sqrt(S) mean(w)) (delta method).
        """
        n, d = x.shape
        K, eps = self.K, 0.05
        symmetric = K <= 4
        ident = torch.arange(K, device=x.device)[None]
        perms = self._permutations(x.device) if symmetric else ident
        keep = max(8, 400 // len(perms))
        means, lams = self._gibbs_conditionals(x, seed, keep)
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
        mu = torch.where(from_prior[:, None, None], prior_draw * math.sqrt(self.prior_var), mu)

        def log_g(b):
            mix = _log_conditionals_mix(b, means, lams, perms)
            prior = log_prior(b, self.prior_var)
            return torch.logaddexp(math.log1p(-eps) + mix, math.log(eps) + prior)

        log_f = _chunked(lambda b: log_joint(x, b, self.prior_var), mu, n)
        log_w = log_f - _chunked(log_g, mu, len(perms) * J)
        if not symmetric:
            ok = (mu[:, 1:, 0] > mu[:, :-1, 0]).all(-1)
            log_w = torch.where(ok, log_w + math.lgamma(K + 1), -math.inf)
        top = log_w.max()
        w = torch.exp(log_w - top)
        mean = w.mean()
        value = float(torch.log(mean) + top)
        se = float(w.std() / (math.sqrt(num_samples) * mean))
        ess = float(w.sum() ** 2 / (w**2).sum())
        details = {"num_samples": num_samples, "ess": ess, "components": J * len(perms)}
        return Evidence(value, se, "importance", n, details)

    # ------------------------------------------------------------------ exact posterior

    def exact_posterior_sorted_moments(
        self,
        x,
        num_samples: int = 100_000,
        seed: int = 0,
        max_assignments: int = MAX_ASSIGNMENTS,
    ) -> dict:
        """Posterior mean and sd of the means sorted by first coordinate, for small n.

        The posterior is the exact mixture over assignments c (weights p(c | x) from eq. 4) of
        conjugate Gaussians mu_k | c, x ~ N(S_k / lam_k, I / lam_k), lam_k = 1/s2 + n_k.
        Sorting is not linear, so the moments are Monte Carlo averages over ``num_samples``
        exact draws from that mixture; ``mean_se`` (= sd / sqrt(S)) is their Monte Carlo error,
        ``sd_se`` (= sd / sqrt(2 S), the Gaussian approximation) that of the sd.
        Tensors shaped ``(K, d)`` on x's device and dtype.
        """
        x = self.check_data(x)
        S = integer(num_samples, "num_samples", minimum=2)
        gen = torch.Generator().manual_seed(integer(seed, "seed", minimum=0))
        x64 = x.to(torch.float64)
        n, d = x.shape
        K, s2 = self.K, self.prior_var
        lw = torch.cat([w for _, w in self._assignment_log_weights(x64, max_assignments)])
        cdf = torch.cumsum(_softmax(lw, 0), 0)
        u = torch.rand(S, generator=gen, dtype=torch.float64).to(x.device) * cdf[-1]
        idx = torch.searchsorted(cdf, u).clamp(max=len(cdf) - 1)
        powers = K ** torch.arange(n - 1, device=x.device, dtype=torch.int64)
        c = torch.cat([idx.new_zeros(S, 1), (idx[:, None] // powers) % K], dim=1)
        onehot = torch.nn.functional.one_hot(c, K).to(x64.dtype)
        lam = 1.0 / s2 + onehot.sum(1)  # (S, K)
        post_mean = torch.einsum("snk,nd->skd", onehot, x64) / lam[..., None]
        z = torch.randn(S, K, d, generator=gen, dtype=torch.float64).to(x.device)
        mu = sorted_means(post_mean + z / lam[..., None].sqrt())
        mean, sd = mu.mean(0), mu.std(0)
        return {
            "mean": mean.to(x.dtype),
            "sd": sd.to(x.dtype),
            "mean_se": (sd / math.sqrt(S)).to(x.dtype),
            "sd_se": (sd / math.sqrt(2 * S)).to(x.dtype),
            "num_samples": S,
        }

    def exact_posterior(self, x, **kwargs) -> dict:
        """Alias of :meth:`exact_posterior_sorted_moments` (the base-class hook name)."""
        return self.exact_posterior_sorted_moments(x, **kwargs)

    # ------------------------------------------------------------------ EM (MAP of mu)

    def em_init(self, x: torch.Tensor, generator: torch.Generator) -> dict:
        return {"mu": spread_means(x, self.K, generator)}

    def em_step(self, x: torch.Tensor, state: dict) -> dict:
        """E-step r_ik = p(c_i = k | x_i, mu); M-step mu_k = sum_i r_ik x_i / (n_k + 1/s2),
        n_k = sum_i r_ik (the maximizer of E_r[log p(x, c, mu)])."""
        r = responsibilities(x, state["mu"])
        return {"mu": (r.T @ x) / (r.sum(0) + 1.0 / self.prior_var)[:, None]}

    def em_objective(self, x: torch.Tensor, state: dict) -> float:
        """log p(x, mu) of eq. 5 (nats, all constants): never decreases under EM."""
        return float(log_joint(x, state["mu"], self.prior_var))

    def em_posterior(self, x: torch.Tensor, state: dict) -> dict:
        mu = state["mu"]
        r = responsibilities(x, mu)
        return {"mu": mu, "mu_sorted": sorted_means(mu), "responsibilities": r}

    # ------------------------------------------------------------------ CAVI

    def cavi_init(self, x: torch.Tensor, generator: torch.Generator) -> dict:
        """m_k at K data points by k-means++ seeding, s_k^2 = 1, phi from the phi-update."""
        m = spread_means(x, self.K, generator)
        s2 = x.new_ones(self.K)
        return {"m": m, "s2": s2, "phi": self._cavi_phi(x, m, s2)}

    def _cavi_phi(self, x, m, s2):
        """phi_ik ∝ exp(E[mu_k]^T x_i - E[mu_k^T mu_k] / 2)   (eq. 6)."""
        d = x.shape[1]
        return _softmax(x @ m.T - 0.5 * ((m**2).sum(-1) + d * s2), dim=-1)

    def cavi_step(self, x: torch.Tensor, state: dict) -> dict:
        """One sweep: every phi_i (eq. 6), then every q(mu_k) (eqs. 7-8):
        m_k = sum_i phi_ik x_i / (1/s2 + sum_i phi_ik),  s_k^2 = 1 / (1/s2 + sum_i phi_ik)."""
        phi = self._cavi_phi(x, state["m"], state["s2"])
        lam = 1.0 / self.prior_var + phi.sum(0)
        return {"m": (phi.T @ x) / lam[:, None], "s2": 1.0 / lam, "phi": phi}

    def cavi_objective(self, x: torch.Tensor, state: dict) -> float:
        """Closed-form ELBO (eq. 9; nats, summed over the data, every constant kept):

        E log p(mu)     = sum_k [-d/2 log(2 pi s2) - (||m_k||^2 + d s_k^2) / (2 s2)]
        E log p(c)      = -n log K
        E log p(x|c,mu) = sum_ik phi_ik [-d/2 log 2pi - (||x_i - m_k||^2 + d s_k^2) / 2]
        -E log q(mu)    = sum_k d/2 (1 + log(2 pi s_k^2))
        -E log q(c)     = -sum_ik phi_ik log phi_ik
        """
        m, s2, phi = state["m"], state["s2"], state["phi"]
        n, d = x.shape
        K, sp = self.K, self.prior_var
        msq = (m**2).sum(-1) + d * s2  # E ||mu_k||^2
        e_prior = (-0.5 * d * (LOG_2PI + math.log(sp)) - 0.5 * msq / sp).sum()
        e_c = -n * math.log(K)
        sq = (x**2).sum(-1, keepdim=True) - 2 * x @ m.T + msq  # E ||x_i - mu_k||^2
        e_lik = (phi * (-0.5 * d * LOG_2PI - 0.5 * sq)).sum()
        h_mu = (0.5 * d * (1 + LOG_2PI + torch.log(s2))).sum()
        h_c = -torch.special.xlogy(phi, phi).sum()
        return float(e_prior + e_c + e_lik + h_mu + h_c)

    def cavi_posterior(self, x: torch.Tensor, state: dict) -> dict:
        return {
            "m": state["m"],
            "s2": state["s2"],
            "phi": state["phi"],
            "mu_sorted": sorted_means(state["m"]),
        }

    # ------------------------------------------------------------------ SVI and MCMC

    def guides(self) -> dict:
        """Guide specs by name: mean-field, collapsed, auto-normal, auto-mvn (guides/gmm.py)."""
        from guides.gmm import guide_specs

        return guide_specs()

    def mcmc_model(self, x: torch.Tensor, subsample_size: int | None = None):
        """The model with c summed out in closed form (eq. 5, a MixtureSameFamily likelihood):
        the same density over mu as :meth:`model` with c enumerated, without the enumeration
        machinery in every gradient evaluation (NUTS is several times faster)."""
        x, mu = self._sample_means(x)
        n, d = x.shape
        mix = dist.Categorical(logits=x.new_zeros(self.K))
        comp = dist.Normal(mu.unsqueeze(-3), x.new_ones(())).to_event(1)  # batch (..., 1, K)
        with pyro.plate("data", n, subsample_size=subsample_size, dim=-1, device=x.device) as idx:
            pyro.sample("obs", dist.MixtureSameFamily(mix, comp), obs=x[idx])

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
        """log p(x_i | mu) = log sum_k (1/K) N(x_i; mu_k, I), shape ``(chain, draw, n)``."""
        x = self.check_data(x)
        mu = self._as_mu(samples, x)
        return torch.stack([pointwise_mixture_loglik(x, m) for m in mu])

    def mcmc_invariants(self, samples: dict, x) -> dict:
        """Label-invariant summaries for R-hat/ESS: means sorted by first coordinate
        ``(chain, draw, K, d)`` and the log likelihood sum_i log p(x_i | mu) ``(chain, draw)``."""
        x = self.check_data(x)
        mu = self._as_mu(samples, x)
        return {
            "mu_sorted": sorted_means(mu),
            "log_likelihood": self.pointwise_log_likelihood({"mu": mu}, x).sum(-1),
        }


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
