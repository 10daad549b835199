"""Bayesian factor analysis: priors on the loadings, the mean and the noise precisions.

W_ij ~ N(0, 1/alpha),  mu_i ~ N(0, mu_scale^2),  tau_i ~ Gamma(a0, b0) (rate b0),
z_n ~ N(0, I_k),  x_n | z_n ~ N(W z_n + mu, diag(1/tau)).

Engines: NUTS (``mcmc_model`` integrates z out exactly, x_n ~ N(mu, W W^T + diag(1/tau)); the
``model`` keeps z as a local site for SVI) and variational Bayes (CAVI hooks) with
q(Z) q(W~) q(tau), W~_i = [w_i; mu_i] (Bishop 1999, "Variational principal components", with a
per-dimension noise precision). W is identified only up to rotation: diagnostics use
C = W W^T + diag(1/tau) and the log-likelihood.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution
from torch.distributions import biject_to, constraints, transform_to
from torch.distributions.transforms import Transform

from models.base import ModelFamily
from models.fa import LOG_2PI, _mean_cov, _pca_init, gaussian_loglik, one_thread
from models.validate import as_data, integer, positive

# -- the identified loadings -----------------------------------------------------------------


def _tril_layout(d: int, k: int):
    """(row, col) of the d k - k (k - 1) / 2 entries on or below the diagonal of a d x k matrix
    (row by row, as torch.tril_indices) and the positions of the diagonal ones among them."""
    rows, cols = torch.tril_indices(d, k)
    return rows, cols, (rows == cols).nonzero().squeeze(-1)


class LowerTrapezoidal(constraints.Constraint):
    """d x k matrices (k <= d): zero above the diagonal, positive on it."""

    event_dim = 2

    def __init__(self, d: int, k: int):
        self.d, self.k = d, k
        super().__init__()

    def check(self, value):
        upper_zero = (torch.triu(value, 1) == 0).all(-1).all(-1)
        return upper_zero & (torch.diagonal(value, dim1=-2, dim2=-1) > 0).all(-1)


class FreeToLoadings(Transform):
    """R^m -> :class:`LowerTrapezoidal`, m = d k - k (k - 1) / 2: the entries fill the lower
    triangle row by row, the k diagonal ones through exp; log |dL/du| = sum of those k inputs."""

    domain = constraints.real_vector
    bijective = True

    def __init__(self, d: int, k: int, cache_size: int = 0):
        super().__init__(cache_size=cache_size)
        self.d, self.k = d, k
        self.rows, self.cols, self.diag = _tril_layout(d, k)
        self.codomain = LowerTrapezoidal(d, k)

    def __eq__(self, other):
        return isinstance(other, FreeToLoadings) and (self.d, self.k) == (other.d, other.k)

    def _call(self, u):
        diag = self.diag.to(u.device)
        vals = u.clone()
        vals[..., diag] = u[..., diag].exp()
        L = u.new_zeros(u.shape[:-1] + (self.d, self.k))
        L[..., self.rows.to(u.device), self.cols.to(u.device)] = vals
        return L

    def _inverse(self, L):
        diag = self.diag.to(L.device)
        u = L[..., self.rows.to(L.device), self.cols.to(L.device)]
        u[..., diag] = u[..., diag].log()
        return u

    def log_abs_det_jacobian(self, u, L):
        return u[..., self.diag.to(u.device)].sum(-1)

    def forward_shape(self, shape):
        return torch.Size(shape[:-1]) + (self.d, self.k)

    def inverse_shape(self, shape):
        return torch.Size(shape[:-2]) + (len(self.rows),)


@biject_to.register(LowerTrapezoidal)
@transform_to.register(LowerTrapezoidal)
def _free_to_loadings(constraint):
    return FreeToLoadings(constraint.d, constraint.k)


class IdentifiedLoadings(TorchDistribution):
    """The law of L, the identified representative of the rotation orbit {W Q : Q orthogonal},
    when W (d x k) has iid N(0, s^2) entries.

    L = W Q is the unique member of the orbit whose top k x k block is lower triangular with a
    positive diagonal (Geweke & Zhou 1996; Lopes & West 2004); it exists and is unique whenever
    that block is nonsingular (probability 1): L_1 = W_1 Q is the LQ factor of the top block W_1,
    L_2 = W_2 Q the other rows. Its law is exact (Bartlett decomposition of W_1 W_1^T ~
    Wishart_k(s^2 I, k), and W_2 Q ~ W_2 because W_2 is isotropic and independent of Q):
        L_ij ~ N(0, s^2) for i > j,   L_jj / s ~ Chi(k - j) (j = 0 .. k-1),   all independent,
    density  prod_{i>j} N(L_ij; 0, s^2) prod_j chi_{k-j}(L_jj / s) / s,
    chi_nu(r) = r^(nu-1) exp(-r^2/2) / (2^(nu/2-1) Gamma(nu/2)).
    Since L L^T = W W^T, L L^T has exactly the law of W W^T.
    """

    arg_constraints = {"scale": constraints.positive}
    has_rsample = False

    def __init__(self, d: int, k: int, scale: torch.Tensor, validate_args=None):
        if not 1 <= k <= d:
            raise ValueError(f"latent_dim: must lie in [1, {d}], got {k}")
        self.d, self.k, self.scale = d, k, scale
        rows, cols, _ = _tril_layout(d, k)
        off = rows != cols
        self._off = (rows[off].to(scale.device), cols[off].to(scale.device))
        self._nu = k - torch.arange(k, device=scale.device, dtype=scale.dtype)
        super().__init__(torch.Size(), torch.Size((d, k)), validate_args=validate_args)

    @property
    def support(self):
        return LowerTrapezoidal(self.d, self.k)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        s, nu = self.scale, self._nu
        off = value[..., self._off[0], self._off[1]] / s
        r = torch.diagonal(value, dim1=-2, dim2=-1) / s
        lp_off = (-0.5 * off * off - 0.5 * LOG_2PI).sum(-1)
        lp_diag = ((nu - 1) * torch.log(r) - 0.5 * r * r - (0.5 * nu - 1) * math.log(2.0)
                   - torch.lgamma(0.5 * nu)).sum(-1)
        m = off.shape[-1] + self.k
        return lp_off + lp_diag - m * torch.log(s)

    def sample(self, sample_shape=()):
        shape = torch.Size(sample_shape)
        with torch.no_grad():
            s = self.scale
            z = torch.randn(shape + (self.d, self.k), dtype=s.dtype, device=s.device)
            chi = dist.Gamma(0.5 * self._nu, 0.5).sample(shape).sqrt()  # chi^2_nu = Gamma(nu/2, 1/2)
            L = torch.tril(z)
            j = torch.arange(self.k, device=s.device)
            L[..., j, j] = chi
            return L * s


def identify_loadings(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, Q) with L = W Q the identified representative of W's orbit (see
    :class:`IdentifiedLoadings`): QR of the top block's transpose, W_1^T = Q R, so W_1 Q = R^T is
    lower triangular; column signs are then flipped to make its diagonal positive. Batched."""
    k = W.shape[-1]
    Q, R = torch.linalg.qr(W[..., :k, :].transpose(-1, -2))
    sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    Q = Q * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(-2)
    L = W @ Q
    return L.tril(), Q


class BayesianFactorAnalysis(ModelFamily):
    """Factor analysis with conjugate priors (name ``bayes-fa``)."""

    name = "bayes-fa"
    max_plate_nesting = 1
    cavi_bound = "elbo"
    cavi_guide_name = "vb-mean-field"
    #: CAVI sweeps behind :meth:`mcmc_init`
    init_sweeps = 200

    def __init__(
        self,
        latent_dim: int,
        *,
        alpha: float = 1.0,
        a0: float = 1.0,
        b0: float = 1.0,
        mu_scale: float = 10.0,
        dim: int | None = None,
        collapse_z: bool = True,
        identify: bool = True,
    ):
        self.latent_dim = integer(latent_dim, "latent_dim", minimum=1)
        self.alpha = positive(alpha, "alpha")
        self.a0 = positive(a0, "a0")
        self.b0 = positive(b0, "b0")
        self.mu_scale = positive(mu_scale, "mu_scale")
        if dim is not None:
            dim = integer(dim, "dim", minimum=2)
            if self.latent_dim >= dim:
                raise ValueError(f"latent_dim: must be < dim ({dim}), got {self.latent_dim}")
        self.dim = dim
        self.collapse_z = bool(collapse_z)
        self.identify = bool(identify)

    def check_data(self, x) -> torch.Tensor:
        x = as_data(x, "x")
        d = x.shape[1]
        if self.dim is not None and d != self.dim:
            raise ValueError(f"x: expected {self.dim} columns, got {d}")
        if self.latent_dim >= d:
            raise ValueError(f"latent_dim: must be < the data dimension {d}, got {self.latent_dim}")
        return x

    def settings(self) -> dict:
        keys = ("latent_dim", "alpha", "a0", "b0", "mu_scale", "dim", "collapse_z", "identify")
        return {k: getattr(self, k) for k in keys}

    # -- Pyro models ------------------------------------------------------------------------
    def _globals(self, x: torch.Tensor, identified: bool = False):
        d, k = x.shape[1], self.latent_dim
        zero = torch.zeros((), device=x.device, dtype=x.dtype)
        if identified:
            W = pyro.sample("W", IdentifiedLoadings(d, k, zero + self.alpha**-0.5))
        else:
            W = pyro.sample("W", dist.Normal(zero, self.alpha**-0.5).expand([d, k]).to_event(2))
        mu = pyro.sample("mu", dist.Normal(zero, self.mu_scale).expand([d]).to_event(1))
        tau = pyro.sample("tau", dist.Gamma(zero + self.a0, zero + self.b0).expand([d]).to_event(1))
        return W, mu, tau

    def model(self, x: torch.Tensor, subsample_size: int | None = None, *, identified=False):
        """Priors on W, mu, tau; local z_n (site ``z``) in the data plate; obs site ``x``.
        ``identified``: W is the identified representative (:class:`IdentifiedLoadings`)."""
        n = x.shape[0]
        W, mu, tau = self._globals(x, identified)
        zeros = torch.zeros(self.latent_dim, device=x.device, dtype=x.dtype)
        with pyro.plate("data", n, subsample_size=subsample_size, dim=-1, device=x.device) as idx:
            xb = x if subsample_size is None else x.index_select(0, idx)
            z = pyro.sample("z", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
            loc = z @ W.transpose(-1, -2) + mu.unsqueeze(-2)
            pyro.sample("x", dist.Normal(loc, tau.rsqrt().unsqueeze(-2)).to_event(1), obs=xb)

    def collapsed_model(self, x: torch.Tensor, subsample_size: int | None = None, *,
                        identified=False):
        """The same model with z integrated out: x_n ~ N(mu, W W^T + diag(1/tau)) (exact)."""
        n = x.shape[0]
        W, mu, tau = self._globals(x, identified)
        with pyro.plate("data", n, subsample_size=subsample_size, dim=-1, device=x.device) as idx:
            xb = x if subsample_size is None else x.index_select(0, idx)
            pyro.sample("x", dist.LowRankMultivariateNormal(mu, W, 1.0 / tau), obs=xb)

    def mcmc_model(self, x: torch.Tensor, subsample_size: int | None = None):
        """NUTS target: the collapsed model unless ``collapse_z=False``; W identified (site
        ``W`` holds L, see :class:`IdentifiedLoadings`) unless ``identify=False``. The
        likelihood depends on W only through W W^T = L L^T and L L^T has the prior law of
        W W^T, so every function of (W W^T, mu, tau) has exactly the unidentified posterior."""
        fn = self.collapsed_model if self.collapse_z else self.model
        return fn(x, subsample_size, identified=self.identify)

    def mcmc_init(self, x: torch.Tensor) -> dict:
        """Unconstrained NUTS start (the same for every chain) at the variational Bayes fit:
        ``init_sweeps`` CAVI sweeps from :meth:`cavi_init` (seed 0), then W = E_q[W] rotated to
        its identified representative, mu = E_q[mu], tau = E_q[tau] (unconstrained: log tau),
        z = E_q[z] rotated likewise (uncollapsed model only)."""
        x = self.check_data(x)
        k = self.latent_dim
        with one_thread(x):
            state = self.cavi_init(x, torch.Generator().manual_seed(0))
            for _ in range(self.init_sweeps):
                state = self._sweep(x, state)
            state = self._update_z(x, state)
        W, z = state["Wm"][:, :k], state["m"]
        if self.identify:
            L, Q = identify_loadings(W)
            W, z = FreeToLoadings(*L.shape).inv(L), z @ Q
        init = {"W": W, "mu": state["Wm"][:, k], "tau": torch.log(state["a"] / state["b"])}
        if not self.collapse_z:
            init["z"] = z
        return init

    # -- MCMC helpers -----------------------------------------------------------------------
    def pointwise_log_likelihood(self, samples: dict, x: torch.Tensor) -> torch.Tensor:
        """log p(x_n | W, mu, tau) with z integrated out, per draw: (chain, draw, n)."""
        x = self.check_data(x)
        W, mu, tau = (samples[k].to(x) for k in ("W", "mu", "tau"))
        return gaussian_loglik(x, W, mu, 1.0 / tau)

    def mcmc_invariants(self, samples: dict, x: torch.Tensor) -> dict:
        """Rotation-invariant summaries: the upper triangle of C = W W^T + diag(1/tau)
        (``cov``), ``mu``, and the total log-likelihood (``log_lik``)."""
        W, mu, tau = (samples[k].to(x) for k in ("W", "mu", "tau"))
        C = W @ W.transpose(-1, -2) + torch.diag_embed(1.0 / tau)
        iu = torch.triu_indices(C.shape[-1], C.shape[-1], device=C.device)
        return {
            "cov": C[..., iu[0], iu[1]],
            "mu": mu,
            "log_lik": self.pointwise_log_likelihood(samples, x).sum(-1),
        }

    # -- variational Bayes (inference.cavi.fit) ---------------------------------------------
    def _prior_prec(self, x):
        k = self.latent_dim
        D = torch.full((k + 1,), self.alpha, device=x.device, dtype=x.dtype)
        D[k] = self.mu_scale**-2
        return D

    def cavi_init(self, x: torch.Tensor, generator: torch.Generator) -> dict:
        """q(W~_i) centred on the PPCA/PCA solution (+ seeded jitter), small covariances;
        E[tau_i] = 1 / psi_i; then q(Z) is set optimally given those."""
        n, d = x.shape
        k = self.latent_dim
        mean, S = _mean_cov(x)
        W, psi = _pca_init(S, k, "fa", 1e-3 * float(torch.diagonal(S).mean()))
        jitter = 1e-2 * torch.diagonal(S).mean().sqrt()
        W = W + jitter * torch.randn(d, k, generator=generator, dtype=torch.float64).to(x)
        eye = torch.eye(k + 1, device=x.device, dtype=x.dtype)
        state = {
            "Wm": torch.cat([W, mean[:, None]], 1),
            "WS": 1e-2 * eye.expand(d, k + 1, k + 1).clone() / n,
            "a": self.a0 + 0.5 * n,
        }
        state["b"] = state["a"] * psi
        return self._update_z(x, state)

    def _update_z(self, x, state):
        """q(z_n) = N(m_n, Sz): Sz^-1 = I + sum_i E[tau_i] E[w_i w_i^T],
        m_n = Sz sum_i E[tau_i] (x_ni E[w_i] - E[w_i mu_i])."""
        k = self.latent_dim
        Wm, WS, a, b = state["Wm"], state["WS"], state["a"], state["b"]
        Et = a / b
        Om = WS + Wm.unsqueeze(-1) * Wm.unsqueeze(-2)  # E[w~ w~^T] (d, k+1, k+1)
        eye = torch.eye(k, device=x.device, dtype=x.dtype)
        P = eye + (Et[:, None, None] * Om[:, :k, :k]).sum(0)
        Sz = torch.linalg.inv(P)
        Sz = 0.5 * (Sz + Sz.T)
        rhs = (x * Et) @ Wm[:, :k] - (Et[:, None] * Om[:, :k, k]).sum(0)
        return {**state, "m": rhs @ Sz, "Sz": Sz}

    def _zstats(self, x, state):
        n, k = x.shape[0], self.latent_dim
        m, Sz = state["m"], state["Sz"]
        Zt = torch.cat([m, torch.ones(n, 1, device=x.device, dtype=x.dtype)], 1)  # E[z~] (n, k+1)
        A = Zt.T @ Zt
        A[:k, :k] += n * Sz  # sum_n E[z~ z~^T]
        return Zt, A

    def cavi_step(self, x: torch.Tensor, state: dict) -> dict:
        """One sweep q(Z) -> q(W~) -> q(tau), each the exact coordinate optimum (PRML 10.9):
        q(W~_i) = N(S_i E[tau_i] Z~^T x_i, S_i), S_i^-1 = D + E[tau_i] A, A = sum_n E[z~ z~^T];
        q(tau_i) = Gamma(a0 + n/2, b0 + R_i/2), R_i = sum_n E[(x_ni - w~_i^T z~_n)^2]."""
        with one_thread(x):  # small batched k x k algebra: one CPU thread is faster
            return self._sweep(x, state)

    def _sweep(self, x, state):
        state = self._update_z(x, state)
        Zt, A = self._zstats(x, state)
        Et = state["a"] / state["b"]
        Lam = torch.diag(self._prior_prec(x)) + Et[:, None, None] * A
        WS = torch.linalg.inv(Lam)
        WS = 0.5 * (WS + WS.transpose(-1, -2))
        Wm = (WS @ (Et[:, None] * (x.T @ Zt)).unsqueeze(-1)).squeeze(-1)
        state = {**state, "Wm": Wm, "WS": WS}
        R = self._residual(x, state, Zt, A)
        return {**state, "b": self.b0 + 0.5 * R}

    @staticmethod
    def _residual(x, state, Zt, A):
        """R_i = sum_n x_ni^2 - 2 E[w~_i]^T Z~^T x_i + tr(E[w~_i w~_i^T] A)."""
        Wm, WS = state["Wm"], state["WS"]
        Om = WS + Wm.unsqueeze(-1) * Wm.unsqueeze(-2)
        return (x * x).sum(0) - 2 * (Wm * (x.T @ Zt)).sum(1) + (Om * A).sum((-1, -2))

    def cavi_objective(self, x: torch.Tensor, state: dict) -> float:
        """Closed-form ELBO (nats, all constants):
        sum_i [n/2 (E log tau_i - log 2pi) - E[tau_i] R_i / 2]
        - sum_n KL(q(z_n) || N(0, I)) - sum_i KL(q(w~_i) || N(0, D^-1))
        - sum_i KL(Gamma(a, b_i) || Gamma(a0, b0)),
        KL(Gamma(a,b) || Gamma(a0,b0)) = (a-a0) psi(a) - lgamma(a) + lgamma(a0)
                                          + a0 (log b - log b0) + a (b0 - b) / b."""
        with one_thread(x):
            return float(self.elbo_terms(x, state)["elbo"])

    def elbo_terms(self, x: torch.Tensor, state: dict) -> dict:
        n, d = x.shape
        k = self.latent_dim
        a, b, m, Sz, WS, Wm = (state[key] for key in ("a", "b", "m", "Sz", "WS", "Wm"))
        Zt, A = self._zstats(x, state)
        R = self._residual(x, state, Zt, A)
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

    def cavi_posterior(self, x: torch.Tensor, state: dict) -> dict:
        k = self.latent_dim
        return {
            "W_loc": state["Wm"][:, :k],
            "mu_loc": state["Wm"][:, k],
            "Wmu_cov": state["WS"],
            "tau_shape": torch.tensor(state["a"], device=x.device, dtype=x.dtype),
            "tau_rate": state["b"],
            "z_loc": state["m"],
            "z_cov": state["Sz"],
        }
