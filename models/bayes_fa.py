"""Bayesian factor analysis: priors on the loadings, the mean and the noise precisions.

W_ij ~ N(0, 1/alpha),  mu_i ~ N(0, mu_scale^2),  tau_i ~ Gamma(a0, b0) (rate b0),
z_n ~ N(0, I_k),  x_n | z_n ~ N(W z_n + mu, diag(1/tau)).

Engines: NUTS (``mcmc_model``) and variational Bayes (CAVI hooks) with q(Z) q(W~) q(tau),
W~_i = [w_i; mu_i] (Bishop 1999, "Variational principal components", with a per-dimension noise
precision); ``model`` keeps z as a local site for SVI.

W is identified only up to rotation (W Q gives the same likelihood and prior), so NUTS samples
(by default) z integrated out, x_n ~ N(mu, W W^T + diag(1/tau)) exactly, and W replaced by its
identified representative L: top k x k block lower triangular with a positive diagonal
(Geweke & Zhou 1996; Lopes & West 2004), under the prior that W's law induces on L
(:class:`IdentifiedLoadings`), so W W^T = L L^T, mu and tau keep exactly the posterior of the
rotation-invariant model. NUTS moves in coordinates whitened by a Laplace approximation
(:meth:`BayesianFactorAnalysis.mcmc_coordinates`), which changes the path, not the target.
Diagnostics use C = W W^T + diag(1/tau), mu and the log-likelihood.

Caveat (Lopes & West 2004): the representative jumps where the top block is singular. If one
of the first k variables hardly loads on "its" factor, L_jj's posterior presses against 0 and
NUTS mixes worse there (the invariants' posterior is unaffected); put clearly loading variables
first.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution
from torch.distributions import biject_to, constraints, transform_to
from torch.distributions.transforms import ComposeTransform, Transform

from models.base import ModelFamily
from models.fa import LOG_2PI, _mean_cov, _pca_init, check_factor_data, gaussian_loglik, one_thread
from models.validate import integer, positive

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
        rows, _, _ = _tril_layout(d, k)
        nu = k - torch.arange(k, device=scale.device, dtype=scale.dtype)
        self._nu_minus_1 = nu - 1
        m = len(rows)
        self._const = (-(0.5 * nu - 1) * math.log(2.0) - torch.lgamma(0.5 * nu)).sum()
        log_s = torch.log(scale)
        self._const = self._const - 0.5 * (m - k) * LOG_2PI - (m + (nu - 1).sum()) * log_s
        super().__init__(torch.Size(), torch.Size((d, k)), validate_args=validate_args)

    @property
    def support(self):
        return LowerTrapezoidal(self.d, self.k)

    def log_prob(self, value):
        """-|L|_F^2 / (2 s^2) + sum_j (nu_j - 1) log L_jj + const (entries above the diagonal
        are zero on the support; const gathers the normalizers and the powers of s)."""
        if self._validate_args:
            self._validate_sample(value)
        sq = (value * value).sum((-1, -2)) / (-2 * self.scale * self.scale)
        log_diag = torch.log(torch.diagonal(value, dim1=-2, dim2=-1))
        return sq + (self._nu_minus_1 * log_diag).sum(-1) + self._const

    def sample(self, sample_shape=()):
        shape = torch.Size(sample_shape)
        with torch.no_grad():
            s = self.scale
            z = torch.randn(shape + (self.d, self.k), dtype=s.dtype, device=s.device)
            nu = self._nu_minus_1 + 1
            chi = dist.Gamma(0.5 * nu, 0.5).sample(shape).sqrt()  # chi^2_nu = Gamma(nu/2, 1/2)
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


# -- sampler coordinates ----------------------------------------------------------------------


class InCoordinates(constraints.Constraint):
    """The support ``base`` of a site, unchanged as a set, tagged with the coordinates NUTS should
    move in: eta with u = loc + scale_tril eta, u = biject_to(base).inv(value) the default ones."""

    def __init__(self, base, loc: torch.Tensor, scale_tril: torch.Tensor):
        self.base, self.loc, self.scale_tril = base, loc, scale_tril
        self.event_dim = base.event_dim
        super().__init__()

    def check(self, value):
        return self.base.check(value)


class AffineVector(Transform):
    """eta -> loc + A eta on the last dimension (A lower triangular); log|det| = sum log A_ii."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor, cache_size: int = 0):
        super().__init__(cache_size=cache_size)
        self.loc, self.scale_tril = loc, scale_tril
        self.logdet = torch.log(torch.diagonal(scale_tril, dim1=-2, dim2=-1)).sum(-1)

    def _call(self, eta):
        return self.loc + eta @ self.scale_tril.transpose(-1, -2)

    def _inverse(self, u):
        r = (u - self.loc).unsqueeze(-1)
        return torch.linalg.solve_triangular(self.scale_tril, r, upper=False).squeeze(-1)

    def log_abs_det_jacobian(self, eta, u):
        return self.logdet.expand(eta.shape[:-1])


@biject_to.register(InCoordinates)
@transform_to.register(InCoordinates)
def _in_coordinates(constraint):
    base = biject_to(constraint.base)
    return ComposeTransform([AffineVector(constraint.loc, constraint.scale_tril), base])


class Recoordinated(TorchDistribution):
    """``base`` itself (same ``log_prob`` and ``sample``, so the same prior and posterior) whose
    support carries :class:`InCoordinates`: only the parameterization NUTS integrates in
    changes, which is the same as giving HMC the fixed mass matrix (A A^T)^-1 in u."""

    arg_constraints = {}

    def __init__(self, base, loc: torch.Tensor, scale_tril: torch.Tensor):
        self.base = base
        self._support = InCoordinates(base.support, loc, scale_tril)
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self._support

    def log_prob(self, value):
        return self.base.log_prob(value)

    def sample(self, sample_shape=()):
        return self.base.sample(sample_shape)


def _suff_stats(x: torch.Tensor):
    """xbar and a square root of the biased sample covariance S = root root^T (eigh; n < d
    and rank-deficient S allowed)."""
    xbar, S = _mean_cov(x)
    evals, evecs = torch.linalg.eigh(S)
    return xbar, evecs * evals.clamp_min(0).sqrt()


def _stats_loglik(n: int, xbar, root, W, mu, tau) -> torch.Tensor:
    """sum_n log N(x_n; mu, W W^T + diag(1/tau)) from n, xbar and root (S = root root^T):
    -n/2 (d log 2pi + log|C| + |U^-1 [root, xbar - mu]|_F^2), C = U U^T (Cholesky). O(d^3).
    -inf where C is numerically not positive definite (NUTS: a divergence; at the start: a
    rejected draw), rather than an exception."""
    d = xbar.shape[-1]
    C = W @ W.transpose(-1, -2) + torch.diag_embed(1.0 / tau)
    U, info = torch.linalg.cholesky_ex(C)
    A = torch.cat([root.expand(C.shape), (xbar - mu).unsqueeze(-1)], -1)
    Z = torch.linalg.solve_triangular(U, A, upper=False)
    logdet = 2 * torch.log(torch.diagonal(U, dim1=-2, dim2=-1)).sum(-1)
    ll = -0.5 * n * (d * LOG_2PI + logdet + (Z * Z).sum((-1, -2)))
    return torch.where(info == 0, ll, torch.full_like(ll, -math.inf))


def _newton(f, u: torch.Tensor, max_iter: int = 100, tol: float = 1e-10):
    """Minimize f by Newton's method on |H| (eigenvalues floored: a descent direction even
    where H is not positive definite) with backtracking (Armijo); stops when the Newton
    decrement -g^T p / 2 < tol. Returns (u, symmetrized Hessian at u, iterations)."""

    def value(v):
        out = float(f(v))
        return out if math.isfinite(out) else math.inf  # e.g. C not positive definite

    fu, it = value(u), 0
    for it in range(1, max_iter + 1):
        g = torch.autograd.functional.jacobian(f, u)
        H = torch.autograd.functional.hessian(f, u)
        H = 0.5 * (H + H.T)
        evals, evecs = torch.linalg.eigh(H)
        scale = evals.abs().clamp_min(1e-8 * evals.abs().max())
        p = -evecs @ ((evecs.T @ g) / scale)
        dec = -float(g @ p)
        if dec / 2 < tol:
            return u, H, it
        t = 1.0
        while t > 1e-10:
            f_new = value(u + t * p)
            if f_new <= fu - 1e-4 * t * dec:
                break
            t /= 2
        else:
            break
        u, fu = u + t * p, f_new
    H = torch.autograd.functional.hessian(f, u)
    return u, 0.5 * (H + H.T), it


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
        whiten: bool = True,
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
        self.whiten = bool(whiten)
        self._mcmc_cache = None

    def check_data(self, x) -> torch.Tensor:
        return check_factor_data(x, self.latent_dim, self.dim)

    def settings(self) -> dict:
        keys = ("latent_dim", "alpha", "a0", "b0", "mu_scale", "dim", "collapse_z", "identify",
                "whiten")
        return {k: getattr(self, k) for k in keys}

    # -- Pyro models ------------------------------------------------------------------------
    def _globals(self, x: torch.Tensor, identified: bool = False, coords: dict | None = None):
        d, k = x.shape[1], self.latent_dim
        zero = torch.zeros((), device=x.device, dtype=x.dtype)
        priors = {
            "W": IdentifiedLoadings(d, k, zero + self.alpha**-0.5) if identified
            else dist.Normal(zero, self.alpha**-0.5).expand([d, k]).to_event(2),
            "mu": dist.Normal(zero, self.mu_scale).expand([d]).to_event(1),
            "tau": dist.Gamma(zero + self.a0, zero + self.b0).expand([d]).to_event(1),
        }
        if coords is not None:
            priors = {name: Recoordinated(p, *coords[name]) for name, p in priors.items()}
        return tuple(pyro.sample(name, p) for name, p in priors.items())

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
        """NUTS target: the collapsed model (unless ``collapse_z=False``) with W identified
        (unless ``identify=False``): site ``W`` holds L, see :class:`IdentifiedLoadings`. The
        likelihood depends on W only through W W^T = L L^T and L L^T has the prior law of W W^T,
        so (W W^T, mu, tau) has exactly the posterior of the unidentified model.

        Collapsed, the likelihood is summed through sufficient statistics (exact):
        sum_n log N(x_n; mu, C) = -n/2 (d log 2pi + log|C| + tr(C^-1 S) + r^T C^-1 r),
        S the biased sample covariance, r = xbar - mu. With ``whiten`` (and ``identify``) NUTS
        moves in coordinates fitted by :meth:`mcmc_coordinates`; the density is unchanged."""
        if not self.collapse_z:
            return self.model(x, subsample_size, identified=self.identify)
        if subsample_size is not None:
            return self.collapsed_model(x, subsample_size, identified=self.identify)
        cache = self._stats(x)
        W, mu, tau = self._globals(x, self.identify, cache["coords"])
        pyro.factor("x", _stats_loglik(cache["n"], cache["xbar"], cache["root"], W, mu, tau))

    def _whitened(self) -> bool:
        return self.whiten and self.identify and self.collapse_z

    def _stats(self, x: torch.Tensor) -> dict:
        """n, xbar, a square root of S (S = root root^T) and, when whitened, the NUTS
        coordinates; cached for the last data tensor seen (NUTS calls the model many times)."""
        c = self._mcmc_cache
        if c is not None and c["x"] is x and c["version"] == x._version:
            return c
        xbar, root = _suff_stats(x)
        c = {"x": x, "version": x._version, "n": x.shape[0], "xbar": xbar, "root": root,
             "coords": None}
        if self._whitened():
            x64 = x.detach().to(torch.float64)
            c["coords"], c["laplace"] = self._laplace(x64)
            c["coords"] = {k: (loc.to(x), A.to(x)) for k, (loc, A) in c["coords"].items()}
        self._mcmc_cache = c
        return c

    def mcmc_coordinates(self, x: torch.Tensor) -> dict:
        """Site -> (loc, A): NUTS moves in eta, u = loc + A eta, u the default unconstrained
        coordinates (FreeToLoadings^-1(L), mu, log tau). loc is the posterior mode in u and
        A = chol(Sigma_bb), Sigma = H^-1 the Laplace covariance (H the Hessian of -log p(u | x)),
        b the site's block. HMC in eta is HMC in u with the dense mass matrix (A A^T)^-1 per
        site (Neal 2011, "MCMC using Hamiltonian dynamics", sec. 4.1), undoing the scales and
        correlations within W, mu and tau; Pyro's diagonal adaptation then runs on eta. Any A
        is exact; a poor one only slows mixing. Plus ``laplace``: Newton iterations, smallest
        Hessian eigenvalue, -log p(u | x) at the mode (up to a constant).

        Initial values given to NUTS for this model (``init_params``) are in eta."""
        x = self.check_data(x)
        if not self._whitened():
            raise ValueError("whiten: coordinates need whiten=True, identify=True, collapse_z=True")
        c = self._stats(x)
        return {**c["coords"], "laplace": c["laplace"]}

    def _laplace(self, x: torch.Tensor):
        """Mode (Newton from the VB fit) and Hessian of -log p(u | x) in float64."""
        n, d = x.shape
        k = self.latent_dim
        T = FreeToLoadings(d, k)
        m = len(T.rows)
        xbar, root = _suff_stats(x)
        one = torch.ones((), dtype=x.dtype, device=x.device)
        prior_L = IdentifiedLoadings(d, k, one * self.alpha**-0.5)
        prior_tau = dist.Gamma(one * self.a0, one * self.b0)

        def neg_log_post(u):  # up to a constant; Jacobians of L(u) and tau = exp(u) included
            uW, mu, ut = u[:m], u[m : m + d], u[m + d :]
            L, tau = T(uW), ut.exp()
            lp = _stats_loglik(n, xbar, root, L, mu, tau) + prior_L.log_prob(L)
            lp = lp + T.log_abs_det_jacobian(uW, L) - 0.5 * ((mu / self.mu_scale) ** 2).sum()
            return -(lp + prior_tau.log_prob(tau).sum() + ut.sum())

        vb = self._vb_start(x)
        u0 = torch.cat([T.inv(vb["W"]), vb["mu"], vb["tau"].log()])
        with torch.enable_grad(), one_thread(x):
            u, H, iters = _newton(neg_log_post, u0)
        u = u.detach()
        evals, evecs = torch.linalg.eigh(H)
        floor = 1e-8 * evals.abs().max()
        Sigma = (evecs / evals.clamp_min(floor)) @ evecs.T  # H^-1 (floored if not PD)
        coords, i = {}, 0
        for name, size in (("W", m), ("mu", d), ("tau", d)):
            block = Sigma[i : i + size, i : i + size]
            coords[name] = (u[i : i + size], torch.linalg.cholesky(0.5 * (block + block.T)))
            i += size
        info = {"newton_iterations": iters, "hessian_min_eig": float(evals.min()),
                "neg_log_post": float(neg_log_post(u))}
        return coords, info

    def _vb_start(self, x: torch.Tensor) -> dict:
        """The VB fit after ``init_sweeps`` CAVI sweeps (seed 0): W = E_q[W] rotated to its
        identified representative (as is without ``identify``), mu = E_q[mu], tau = E_q[tau],
        z = E_q[z] rotated likewise."""
        k = self.latent_dim
        with one_thread(x):
            state = self.cavi_init(x, torch.Generator().manual_seed(0))
            for _ in range(self.init_sweeps):
                state = self._sweep(x, state)
            state = self._update_z(x, state)
        W, z = state["Wm"][:, :k], state["m"]
        if self.identify:
            W, Q = identify_loadings(W)
            z = z @ Q
        return {"W": W, "mu": state["Wm"][:, k], "tau": state["a"] / state["b"], "z": z}

    def mcmc_init(self, x: torch.Tensor) -> dict | None:
        """Where NUTS starts. Whitened (the default): None, so that Pyro's default start is
        used, drawn per chain (seed + chain) uniformly in (-2, 2)^D in the whitened coordinates,
        i.e. within 2 Laplace sd of the mode along each: dispersed starts, as R-hat assumes
        (this also fits the coordinates, :meth:`mcmc_coordinates`). Otherwise the
        VB fit (:meth:`_vb_start`) in unconstrained coordinates, the same for every chain."""
        x = self.check_data(x)
        if self._whitened():
            self._stats(x)
            return None
        vb = self._vb_start(x)
        W = FreeToLoadings(*vb["W"].shape).inv(vb["W"]) if self.identify else vb["W"]
        init = {"W": W, "mu": vb["mu"], "tau": torch.log(vb["tau"])}
        if not self.collapse_z:
            init["z"] = vb["z"]
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
