"""Bayesian factor analysis: priors on the loadings, the mean and the noise precisions.

W_ij ~ N(0, 1/alpha),  mu_i ~ N(0, mu_scale^2),  tau_i ~ Gamma(a0, b0) (rate b0),
z_n ~ N(0, I_k),  x_n | z_n ~ N(W z_n + mu, diag(1/tau)).

Engines: NUTS (``mcmc_model``) and variational Bayes (``cavi()``, :mod:`elbolab.models.fa.bayes_vb`) with
q(Z) q(W~) q(tau), W~_i = [w_i; mu_i]; ``model`` keeps z as a local site for SVI.

W is identified only up to rotation (W Q gives the same likelihood and prior), so NUTS samples
(by default) z integrated out, x_n ~ N(mu, W W^T + diag(1/tau)) exactly, and W replaced by its
identified representative L: top k x k block lower triangular with a positive diagonal
(Geweke & Zhou 1996; Lopes & West 2004), under the prior that W's law induces on L
(:class:`~elbolab.models.fa.bayes_dists.IdentifiedLoadings`), so W W^T = L L^T, mu and tau keep exactly
the posterior of the rotation-invariant model. NUTS moves in coordinates whitened by a Laplace
approximation (:meth:`BayesianFactorAnalysis.mcmc_coordinates`), which changes the path, not the
target. Diagnostics use C = W W^T + diag(1/tau), mu and the log-likelihood.

Caveat (Lopes & West 2004): the representative jumps where the top block is singular. If one
of the first k variables hardly loads on "its" factor, L_jj's posterior presses against 0 and
NUTS mixes worse there (the invariants' posterior is unaffected); put clearly loading variables
first.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch.distributions import biject_to

from elbolab.models.ascent import AscentSettings, ascend
from elbolab.models.base import ModelFamily
from elbolab.models.fa.bayes_dists import (
    FreeToLoadings,
    IdentifiedLoadings,
    Recoordinated,
    identify_loadings,
    into_lower_trapezoidal,
)
from elbolab.models.fa.bayes_vb import FactorVB, VBState
from elbolab.models.fa.linalg import check_factor_data, gaussian_loglik, mean_cov
from elbolab.models.numerics import LOG_2PI, one_thread
from elbolab.models.validate import integer, positive


@dataclass
class SuffStats:
    """n, xbar and a square root of the biased sample covariance S = root root^T (eigh; n < d
    and rank-deficient S allowed) of one data tensor; with whitening, the NUTS coordinates."""

    n: int
    xbar: torch.Tensor
    root: torch.Tensor
    coords: dict | None = None
    laplace: dict | None = None

    @classmethod
    def of(cls, x: torch.Tensor) -> SuffStats:
        xbar, S = mean_cov(x)
        evals, evecs = torch.linalg.eigh(S)
        return cls(x.shape[0], xbar, evecs * evals.clamp_min(0).sqrt())

    def loglik(self, W, mu, tau) -> torch.Tensor:
        """sum_n log N(x_n; mu, W W^T + diag(1/tau)), exactly, from the statistics:
        -n/2 (d log 2pi + log|C| + |U^-1 [root, xbar - mu]|_F^2), C = U U^T (Cholesky). O(d^3).
        -inf where C is numerically not positive definite (NUTS: a divergence; at the start: a
        rejected draw), rather than an exception."""
        d = self.xbar.shape[-1]
        C = W @ W.transpose(-1, -2) + torch.diag_embed(1.0 / tau)
        U, info = torch.linalg.cholesky_ex(C)
        A = torch.cat([self.root.expand(C.shape), (self.xbar - mu).unsqueeze(-1)], -1)
        Z = torch.linalg.solve_triangular(U, A, upper=False)
        logdet = 2 * torch.log(torch.diagonal(U, dim1=-2, dim2=-1)).sum(-1)
        ll = -0.5 * self.n * (d * LOG_2PI + logdet + (Z * Z).sum((-1, -2)))
        return torch.where(info == 0, ll, torch.full_like(ll, -math.inf))


@dataclass
class NewtonState:
    """A Newton iterate: u, f(u) (inf where f is not finite) and, once the iteration has
    stopped there, the symmetrized Hessian at u and why it stopped."""

    u: torch.Tensor
    value: float
    hessian: torch.Tensor | None = None
    note: str = ""


def newton(f, u: torch.Tensor, max_iter: int = 100, tol: float = 1e-10):
    """Minimize f by Newton's method on |H| (eigenvalues floored: a descent direction even
    where H is not positive definite) with backtracking (Armijo), run by
    :func:`elbolab.models.ascent.ascend` on -f. A step stays put (so the loop stops) once the Newton
    decrement -g^T p / 2 < tol or the line search fails. Returns (u, symmetrized Hessian at u,
    iterations)."""

    def value(v):
        with warnings.catch_warnings():  # a trial point may overflow; it is rejected below
            warnings.simplefilter("ignore", UserWarning)
            out = float(f(v))
        return out if math.isfinite(out) else math.inf  # e.g. C not positive definite

    def hessian(v):
        H = torch.autograd.functional.hessian(f, v)
        return 0.5 * (H + H.T)

    def step(s: NewtonState) -> NewtonState:
        g = torch.autograd.functional.jacobian(f, s.u)
        H = hessian(s.u)
        evals, evecs = torch.linalg.eigh(H)
        scale = evals.abs().clamp_min(1e-8 * evals.abs().max())
        p = -evecs @ ((evecs.T @ g) / scale)
        dec = -float(g @ p)
        if dec / 2 < tol:
            return NewtonState(s.u, s.value, H, "Newton decrement below tol")
        t = 1.0
        while t > 1e-10:
            f_new = value(s.u + t * p)
            if f_new <= s.value - 1e-4 * t * dec:
                return NewtonState(s.u + t * p, f_new)
            t /= 2
        return NewtonState(s.u, s.value, H, "line search failed")

    run = ascend(lambda _: NewtonState(u, value(u)), step, lambda s: -s.value, 1,
                 AscentSettings(max_iter=max_iter, tol=tol), label="newton")
    H = run.state.hessian if run.state.hessian is not None else hessian(run.state.u)
    return run.state.u, H, run.iterations


class BayesianFactorAnalysis(ModelFamily):
    """Factor analysis with conjugate priors (name ``bayes-fa``)."""

    name = "bayes-fa"
    max_plate_nesting = 1
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
        self._mcmc_cache = None  # (x, x._version, SuffStats) of the last data seen by NUTS

    def check_data(self, x) -> torch.Tensor:
        return check_factor_data(x, self.latent_dim, self.dim)

    def settings(self) -> dict:
        keys = ("latent_dim", "alpha", "a0", "b0", "mu_scale", "dim", "collapse_z", "identify",
                "whiten")
        return {k: getattr(self, k) for k in keys}

    def simulate(self, n: int, *, seed: int = 0, device=None, dtype=torch.float64):
        """``n`` rows drawn from ``model`` itself (float64 on the CPU under ``seed``, then moved),
        ``dim`` columns. Returns ``(x, {"W", "mu", "tau", "z"})``."""
        n = integer(n, "n", minimum=1)
        seed = integer(seed, "seed", minimum=0)
        if self.dim is None:
            raise ValueError("dim: simulate needs dim= on the family")
        shape = torch.zeros(n, self.dim, dtype=torch.float64)
        with poutine.seed(rng_seed=seed):
            tr = poutine.trace(poutine.uncondition(self.model)).get_trace(shape)
        out = {k: tr.nodes[k]["value"].to(device=device, dtype=dtype)
               for k in ("x", "W", "mu", "tau", "z")}
        return out.pop("x"), out

    # -- Pyro models ------------------------------------------------------------------------
    def _globals(self, d: int, like: torch.Tensor, identified: bool = False,
                 coords: dict | None = None):
        k = self.latent_dim
        zero = torch.zeros((), device=like.device, dtype=like.dtype)
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
        ``identified``: W is the identified representative (:class:`IdentifiedLoadings`).
        The globals may carry batch dimensions left of the plate (vectorized particles)."""
        n = x.shape[0]
        W, mu, tau = self._globals(x.shape[1], x, identified)
        zeros = torch.zeros(self.latent_dim, device=x.device, dtype=x.dtype)
        with pyro.plate("data", n, subsample_size=subsample_size, dim=-1, device=x.device) as idx:
            xb = x if subsample_size is None else x.index_select(0, idx)
            z = pyro.sample("z", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
            loc = (W @ z.unsqueeze(-1)).squeeze(-1) + mu
            pyro.sample("x", dist.Normal(loc, tau.rsqrt()).to_event(1), obs=xb)

    def collapsed_model(self, x: torch.Tensor, subsample_size: int | None = None, *,
                        identified=False):
        """The same model with z integrated out: x_n ~ N(mu, W W^T + diag(1/tau)) (exact)."""
        n = x.shape[0]
        W, mu, tau = self._globals(x.shape[1], x, identified)
        with pyro.plate("data", n, subsample_size=subsample_size, dim=-1, device=x.device) as idx:
            xb = x if subsample_size is None else x.index_select(0, idx)
            pyro.sample("x", dist.LowRankMultivariateNormal(mu, W, 1.0 / tau), obs=xb)

    def stats_model(self, stats: SuffStats, coords: dict | None = None):
        """The collapsed, identified model on the whole data through its sufficient statistics
        (:meth:`SuffStats.loglik`, exact): the NUTS target (in the ``coords`` given) and the
        density of the Laplace fit (without)."""
        W, mu, tau = self._globals(stats.xbar.shape[-1], stats.xbar, self.identify, coords)
        pyro.factor("x", stats.loglik(W, mu, tau))

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
        stats = self._stats(x)
        return self.stats_model(stats, stats.coords)

    def _whitened(self) -> bool:
        return self.whiten and self.identify and self.collapse_z

    def _stats(self, x: torch.Tensor) -> SuffStats:
        """:class:`SuffStats` of x and, when whitened, the NUTS coordinates; cached for the
        last data tensor seen (NUTS calls the model many times)."""
        c = self._mcmc_cache
        if c is not None and c[0] is x and c[1] == x._version:
            return c[2]
        stats = SuffStats.of(x)
        if self._whitened():
            coords, stats.laplace = self._laplace(x.detach().to(torch.float64))
            stats.coords = {k: (loc.to(x), A.to(x)) for k, (loc, A) in coords.items()}
        self._mcmc_cache = (x, x._version, stats)
        return stats

    def mcmc_coordinates(self, x: torch.Tensor) -> dict:
        """Site -> (loc, A): NUTS moves in eta, u = loc + A eta, u the default unconstrained
        coordinates (FreeToLoadings^-1(L), mu, log tau). loc is the posterior mode in u and
        A = chol(Sigma_bb), Sigma = H^-1 the Laplace covariance (H the Hessian of -log p(u | x)),
        b the site's block. HMC in eta is HMC in u with the dense mass matrix (A A^T)^-1 per
        site (Neal 2011, "MCMC using Hamiltonian dynamics", sec. 4.1), undoing the scales and
        correlations within W, mu and tau; Pyro's diagonal adaptation then runs on eta. Any A
        is exact; a poor one only slows mixing. Plus ``laplace``: Newton iterations, smallest
        Hessian eigenvalue, -log p(u, x) at the mode (all constants kept).

        Initial values given to NUTS for this model (``init_params``) are in eta."""
        x = self.check_data(x)
        if not self._whitened():
            raise ValueError("whiten: coordinates need whiten=True, identify=True, collapse_z=True")
        c = self._stats(x)
        return {**c.coords, "laplace": c.laplace}

    def _laplace(self, x: torch.Tensor):
        """Mode (Newton from the VB fit) and Hessian of -log p(u, x) in float64, the density
        read off :meth:`stats_model` (the NUTS target's own sites) plus the log-Jacobians of
        the bijections ``biject_to(support)`` of its sites: Pyro's potential energy in u."""
        stats = SuffStats.of(x)
        start = self.vb_start(x)
        start = {name: start[name] for name in ("W", "mu", "tau")}
        sites = self._trace(start, stats).nodes
        bij = {name: biject_to(sites[name]["fn"].support) for name in start}
        parts = [bij[name].inv(value) for name, value in start.items()]
        bounds = torch.tensor([0] + [p.shape[-1] for p in parts]).cumsum(0).tolist()

        def neg_log_post(u):
            values, log_jac = {}, 0.0
            for (name, t), lo, hi in zip(bij.items(), bounds[:-1], bounds[1:]):
                values[name] = t(u[lo:hi])
                log_jac = log_jac + t.log_abs_det_jacobian(u[lo:hi], values[name])
            return -(self._trace(values, stats).log_prob_sum() + log_jac)

        u0 = torch.cat(parts)
        if not math.isfinite(float(neg_log_post(u0))):
            raise ValueError("x: the Bayesian FA's Laplace start has a non-finite density")
        with torch.enable_grad(), one_thread(x):
            u, H, iters = newton(neg_log_post, u0)
        u = u.detach()
        evals, evecs = torch.linalg.eigh(H)
        floor = 1e-8 * evals.abs().max()
        Sigma = (evecs / evals.clamp_min(floor)) @ evecs.T  # H^-1 (floored if not PD)
        coords = {}
        for name, lo, hi in zip(bij, bounds[:-1], bounds[1:]):
            block = Sigma[lo:hi, lo:hi]
            coords[name] = (u[lo:hi], torch.linalg.cholesky(0.5 * (block + block.T)))
        info = {"newton_iterations": iters, "hessian_min_eig": float(evals.min()),
                "neg_log_post": float(neg_log_post(u))}
        return coords, info

    def _trace(self, values: dict, stats: SuffStats):
        """The trace of :meth:`stats_model` at ``values``, hidden from any handler outside
        (the fit may run while NUTS traces ``mcmc_model``)."""
        with poutine.block():
            return poutine.trace(poutine.condition(self.stats_model, values)).get_trace(stats)

    def vb_start(self, x: torch.Tensor) -> dict:
        """The VB fit after ``init_sweeps`` CAVI sweeps (seed 0; fewer only if the ELBO stops
        changing exactly), run by :func:`elbolab.models.ascent.ascend`: W = E_q[W] rotated to its
        identified representative, put exactly in its support (upper part 0, diagonal at least
        1e-3 prior sd: E_q[W] collapses to ~0 when the data's scale dwarfs the prior's, as for
        data x 100); as is without ``identify``. mu = E_q[mu], tau = E_q[tau], z = E_q[z]
        rotated like W."""
        k, vb = self.latent_dim, self.cavi()
        with one_thread(x):
            run = ascend(lambda g: vb.init(x, g), lambda s: vb.step(x, s),
                         lambda s: vb.objective(x, s), x.shape[0],
                         AscentSettings(max_iter=self.init_sweeps, tol=0.0),
                         torch.Generator().manual_seed(0), label="bayes-fa VB start")
            state = vb.update_z(x, run.state)
        W, z = state.w_loc[:, :k], state.z_loc
        if self.identify:
            W, Q = identify_loadings(W)
            W, z = into_lower_trapezoidal(W, 1e-3 * self.alpha**-0.5), z @ Q
        return {"W": W, "mu": state.w_loc[:, k], "tau": state.tau_shape / state.tau_rate, "z": z}

    def mcmc_init(self, x: torch.Tensor) -> dict | None:
        """Where NUTS starts. Whitened (the default): None, so that Pyro's default start is
        used, drawn per chain (seed + chain) uniformly in (-2, 2)^D in the whitened coordinates,
        i.e. within 2 Laplace sd of the mode along each: dispersed starts, as R-hat assumes
        (this also fits the coordinates, :meth:`mcmc_coordinates`). Otherwise the
        VB fit (:meth:`vb_start`) in unconstrained coordinates, the same for every chain."""
        x = self.check_data(x)
        if self._whitened():
            self._stats(x)
            return None
        vb = self.vb_start(x)
        W = FreeToLoadings(*vb["W"].shape).inv(vb["W"]) if self.identify else vb["W"]
        init = {"W": W, "mu": vb["mu"], "tau": torch.log(vb["tau"])}
        if not self.collapse_z:
            init["z"] = vb["z"]
        return init

    # -- posterior draws --------------------------------------------------------------------
    def pointwise_log_likelihood(self, samples: dict, x: torch.Tensor) -> torch.Tensor:
        """log p(x_n | W, mu, tau) with z integrated out, per draw: (chain, draw, n)."""
        x = self.check_data(x)
        W, mu, tau = (samples[k].to(x) for k in ("W", "mu", "tau"))
        return gaussian_loglik(x, W, mu, 1.0 / tau)

    def posterior_invariants(self, samples: dict, x: torch.Tensor) -> dict:
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

    # -- variational Bayes ------------------------------------------------------------------
    def cavi(self) -> FactorVB:
        """CAVI over q(Z) q(W~) q(tau) (:class:`elbolab.models.fa.bayes_vb.FactorVB`, bound "elbo")."""
        return FactorVB(self.latent_dim, alpha=self.alpha, a0=self.a0, b0=self.b0,
                        mu_scale=self.mu_scale)

    def vb_guide(self, state: VBState):
        """A Pyro guide for :meth:`model` drawing W, mu, tau and z from the VB factors of
        ``state``; its ELBO is the closed-form ``cavi().objective``."""
        return self.cavi().guide_for(state)
