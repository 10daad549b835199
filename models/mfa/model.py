"""Mixture of factor analysers (Ghahramani & Hinton 1996): a discrete component and continuous
factors per data point.

    c_n ~ Cat(pi)                                   (site ``c``, enumerated)
    z_n ~ N(0, I_k)                                 (site ``z``)
    x_n | c_n = j, z_n ~ N(W_j z_n + mu_j, Psi)     (site ``x``), Psi = diag(psi) shared by all j

Which capabilities (:mod:`elbolab.models.capabilities`) and why:

* ``PyroFamily``: the model above; ``c`` carries ``infer={"enumerate": "parallel"}``, so
  ``TraceEnum_ELBO`` and NUTS sum it out exactly (``discrete_sites = ("c",)``).
* ``LocalDensities`` over z with c summed out: ``local_prior(x)`` = N(0, I_k) and
  ``observation_dist(z)`` = p(x_n | z_n) = sum_j pi_j N(x_n; W_j z_n + mu_j, Psi), a
  ``MixtureSameFamily`` of the very ``assignment_prior`` and ``component`` objects the model samples
  c and x from; ``log_joint(x, z)`` = log p(z_n) + log p(x_n | z_n) (IWAE, AIS, per-point guides).
* ``ExactEvidence`` / ``PointwiseEvidence``: log p(x_n) = log sum_j pi_j N(x_n; mu_j, W_j W_j^T + Psi)
  (:mod:`elbolab.models.mfa.em`, eq. 1): the parameters are point estimates, so the points are independent.
* ``ClosedFormEM``: Ghahramani & Hinton's EM (:class:`elbolab.models.mfa.em.MFAEM`), objective the exact
  log likelihood, which never decreases.
* ``Simulator``.

No exact local posterior as a Gaussian (p(z_n | x_n) is a K-component Gaussian mixture) and no
CAVI. Parameters: fixed when ``params`` (:class:`MFAParams`) is given; otherwise the model registers
learnable ``pyro.param`` sites ``pi`` (simplex), ``W``, ``mu``, ``psi`` (> ``min_var``), started by
:func:`elbolab.models.mfa.em.init_params` from the data with a seed drawn from torch's generator (seeded by
the engine), and every density reads the values in the active param store (so SVI learns them
and a fitted pair's evidence is computed at its own parameters).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from elbolab.models.base import ModelFamily
from elbolab.models.capabilities import Evidence
from elbolab.models.mfa.em import (
    MFAEM,
    NOISE,
    MFAParams,
    MFAState,
    component_log_marginals,
    init_params,
    log_marginal,
)
from elbolab.models.validate import as_data, factor_dim, integer, positive

PARAM_NAMES = ("pi", "W", "mu", "psi")


class MixtureOfFactorAnalysers(ModelFamily):
    """K factor analysers with ``latent_dim`` factors each and one shared diagonal noise.

    ``K`` components, ``latent_dim`` = k factors (k < d), ``params`` fixed parameters (else
    learnable ``pyro.param`` sites), ``dim`` the data dimension (needed by ``simulate`` without
    params), ``min_var`` the floor of the noise variances.
    """

    name = "mfa"
    discrete_sites = ("c",)
    max_plate_nesting = 1
    latent_site = "z"
    obs_site = "x"

    def __init__(self, K: int = 2, latent_dim: int = 1, *, params: MFAParams | None = None,
                 dim: int | None = None, min_var: float = 1e-6):
        self.K = integer(K, "K", minimum=1)
        self.latent_dim = integer(latent_dim, "latent_dim", minimum=1)
        self.min_var = positive(min_var, "min_var")
        if params is not None and not isinstance(params, MFAParams):
            raise TypeError(f"params: expected MFAParams or None, got {type(params).__name__}")
        if params is not None:
            if (params.K, params.latent_dim) != (self.K, self.latent_dim):
                raise ValueError(
                    f"params: K={params.K}, latent_dim={params.latent_dim} do not match the "
                    f"family's K={self.K}, latent_dim={self.latent_dim}")
        self.dim = factor_dim(dim, self.latent_dim, None if params is None else params.dim)
        self.params = params

    def __repr__(self) -> str:
        return (f"MixtureOfFactorAnalysers(K={self.K}, latent_dim={self.latent_dim}, "
                f"dim={self.dim}, fixed_params={self.params is not None})")

    def settings(self) -> dict:
        return {"K": self.K, "latent_dim": self.latent_dim, "dim": self.dim,
                "min_var": self.min_var, "noise": NOISE}

    def check_data(self, x) -> torch.Tensor:
        """``x`` as an (n, d) floating tensor with d > latent_dim (and d == ``dim`` when set)."""
        x = as_data(x, "x", ndim=2)
        d = x.shape[1]
        if self.dim is not None and d != self.dim:
            raise ValueError(f"x: expected {self.dim} columns (dim={self.dim}), got {d}")
        if self.latent_dim >= d:
            raise ValueError(f"latent_dim: must be < the data dimension {d}, got {self.latent_dim}")
        return x

    # -- where the parameters come from -------------------------------------------------------
    def _learned(self) -> bool:
        store = pyro.get_param_store()
        return all(k in store for k in PARAM_NAMES)

    def current_params(self) -> MFAParams | None:
        """The fixed params, else the ``pyro.param`` values in the active store, else None."""
        if self.params is not None:
            return self.params
        if not self._learned():
            return None
        return MFAParams(*(pyro.param(k).detach() for k in PARAM_NAMES))

    def _params(self, ref: torch.Tensor, params: MFAParams | None = None) -> MFAParams:
        p = params if params is not None else self.current_params()
        if p is None:
            raise ValueError("params: none given and the family holds none (fit first, e.g. "
                             "elbolab.inference.fit('em', family, x), or pass params=)")
        if p.dim != ref.shape[-1] or (p.K, p.latent_dim) != (self.K, self.latent_dim):
            raise ValueError(f"params: (K={p.K}, d={p.dim}, k={p.latent_dim}) do not match the "
                             f"data d={ref.shape[-1]}, K={self.K}, latent_dim={self.latent_dim}")
        return p.to(ref)

    def _model_params(self, ref: torch.Tensor):
        """(pi, W, mu, psi) the densities use, on ``ref``'s device and dtype: the fixed params, else
        the ``pyro.param`` values (learnable; gradients flow)."""
        if self.params is not None:
            return self.params.to(ref).tensors()
        try:  # the store's values, or those a handler substitutes (NUTS with fixed params)
            return tuple(pyro.param(k) for k in PARAM_NAMES)
        except KeyError:
            raise ValueError("params: none given and the family holds none (fit first, e.g. "
                             "elbolab.inference.fit('em', family, x), or pass params=)") from None

    def _register_params(self, x: torch.Tensor) -> None:
        """The ``pyro.param`` sites pi, W, mu, psi, started by :func:`init_params` on all of x."""
        cache: dict = {}

        def start(name):
            if not cache:
                seed = int(torch.randint(2**31 - 1, ()))
                g = torch.Generator().manual_seed(seed)
                p = init_params(x.detach(), self.K, self.latent_dim, self.min_var, g)
                cache.update(p.as_dict())
            return cache[name].clone()

        pyro.param("pi", lambda: start("pi"), constraint=constraints.simplex)
        pyro.param("W", lambda: start("W"))
        pyro.param("mu", lambda: start("mu"))
        pyro.param("psi", lambda: start("psi"), constraint=constraints.greater_than(self.min_var))

    # -- the distributions every density is built from -----------------------------------------
    def local_prior(self, x: torch.Tensor):
        """p(z_n) = N(0, I_k) for the rows of ``x``: batch (n,), event (k,)."""
        zeros = torch.zeros(x.shape[0], self.latent_dim, device=x.device, dtype=x.dtype)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def assignment_prior(self, ref: torch.Tensor):
        """p(c_n) = Cat(pi): batch (), on ``ref``'s device and dtype."""
        pi = self._model_params(ref)[0]
        return dist.Categorical(probs=pi)

    def component(self, loc: torch.Tensor, ref: torch.Tensor):
        """p(x_n | c_n, z_n) = N(loc, Psi) with loc = W_c z_n + mu_c: event (d,)."""
        psi = self._model_params(ref)[3]
        return dist.Normal(loc, psi.sqrt()).to_event(1)

    def component_loc(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """W_c z + mu_c: for every component, (..., n, K, d), when ``c`` is None; else for the
        components ``c`` (broadcast against z's batch shape), (..., d)."""
        _, W, mu, _ = self._model_params(z)
        if c is None:
            return torch.einsum("...nk,jdk->...njd", z, W) + mu
        return (W[c] @ z.unsqueeze(-1)).squeeze(-1) + mu[c]

    def observation_dist(self, z: torch.Tensor):
        """p(x_n | z_n) = sum_j pi_j N(x_n; W_j z_n + mu_j, Psi) (c summed out): batch
        ``z.shape[:-1]``, event (d,)."""
        return dist.MixtureSameFamily(self.assignment_prior(z),
                                      self.component(self.component_loc(z), z))

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x_n | z_n) with c summed out, (..., n)."""
        return self.observation_dist(z).log_prob(x)

    def log_joint(self, x, z: torch.Tensor) -> torch.Tensor:
        """log p(z_n) + log p(x_n | z_n), c summed out; z (..., n, k) -> (..., n)."""
        x = self.check_data(x)
        if z.shape[-2:] != (x.shape[0], self.latent_dim):
            want = f"(..., {x.shape[0]}, {self.latent_dim})"
            raise ValueError(f"z: expected shape {want}, got {tuple(z.shape)}")
        return self.local_prior(x).log_prob(z) + self.log_likelihood(x, z)

    # -- the Pyro model -----------------------------------------------------------------------
    def model(self, x: torch.Tensor, subsample_size: int | None = None):
        """z_n ~ N(0, I) (``z``), c_n ~ Cat(pi) (``c``, enumerated), x_n ~ N(W_c z_n + mu_c, Psi)."""
        x = self.check_data(x) if not torch.is_tensor(x) else x
        if self.params is None:
            self._register_params(x)
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1,
                        device=x.device) as idx:
            xb = x.index_select(0, idx) if subsample_size is not None else x
            z = pyro.sample(self.latent_site, self.local_prior(xb))
            c = pyro.sample("c", self.assignment_prior(xb), infer={"enumerate": "parallel"})
            pyro.sample(self.obs_site, self.component(self.component_loc(z, c), xb), obs=xb)

    # -- simulation ---------------------------------------------------------------------------
    def simulate(self, n: int, *, seed: int = 0, device=None, dtype=torch.float64):
        """``n`` points and the true :class:`MFAParams`. Uses ``params`` when the family has
        them; else draws pi ~ Dirichlet(5, ..., 5), mu_j ~ N(0, 3^2 I), W ~ N(0, 1) entries,
        psi_i ~ U(0.1, 0.5) (needs ``dim``)."""
        n = integer(n, "n", minimum=1)
        seed = integer(seed, "seed", minimum=0)
        g = torch.Generator().manual_seed(seed)
        if self.params is not None:
            truth = self.params.to(device, dtype)
        else:
            if self.dim is None:
                raise ValueError("dim: simulate needs dim= (or params=) on the family")
            K, d, k = self.K, self.dim, self.latent_dim
            gam = torch._standard_gamma(torch.full((K,), 5.0, dtype=torch.float64), generator=g)
            truth = MFAParams(gam / gam.sum(), torch.randn(K, d, k, generator=g, dtype=torch.float64),
                              3.0 * torch.randn(K, d, generator=g, dtype=torch.float64),
                              0.1 + 0.4 * torch.rand(d, generator=g, dtype=torch.float64))
            truth = truth.to(device, dtype)
        return self.sample(n, truth, seed=seed), truth

    def sample(self, n: int, params: MFAParams | None = None, *, seed: int = 0) -> torch.Tensor:
        """``n`` rows drawn from the model with ``params`` (default: the family's)."""
        n = integer(n, "n", minimum=1)
        p = params if params is not None else self.params
        if p is None:
            raise ValueError("params: sample needs parameters")
        g = torch.Generator().manual_seed(integer(seed, "seed", minimum=0) + 1)
        pc = p.to("cpu", torch.float64)
        c = torch.multinomial(pc.pi, n, replacement=True, generator=g)
        z = torch.randn(n, p.latent_dim, generator=g, dtype=torch.float64)
        eps = torch.randn(n, p.dim, generator=g, dtype=torch.float64)
        x = (pc.W[c] @ z.unsqueeze(-1)).squeeze(-1) + pc.mu[c] + eps * pc.psi.sqrt()
        return x.to(device=p.W.device, dtype=p.W.dtype)

    # -- exact quantities ---------------------------------------------------------------------
    def log_evidence_pointwise(self, x, params: MFAParams | None = None) -> torch.Tensor:
        """log p(x_n) = log sum_j pi_j N(x_n; mu_j, W_j W_j^T + Psi) per row (n,), O(n K d k)."""
        x = self.check_data(x)
        return log_marginal(x, self._params(x, params))

    def log_evidence(self, x, params: MFAParams | None = None) -> Evidence:
        """Exact log p(x) = sum_n log p(x_n) in nats at the family's (or the given) parameters."""
        lp = self.log_evidence_pointwise(x, params)
        return Evidence(float(lp.sum()), 0.0, "exact", lp.shape[0], {"pointwise": lp})

    def responsibilities(self, x, params: MFAParams | None = None) -> torch.Tensor:
        """p(c_n = j | x_n) (n, K)."""
        x = self.check_data(x)
        lj = component_log_marginals(x, self._params(x, params))
        return torch.softmax(lj, dim=-1)

    # -- closed-form algorithm (engine ``em``) --------------------------------------------------
    def em(self) -> MFAEM:
        """Maximum likelihood by EM (bound ``log-likelihood``), from the family's params when it
        has them."""
        return MFAEM(self.K, self.latent_dim, min_var=self.min_var, start=self.params)


__all__ = ["MFAEM", "MFAParams", "MFAState", "MixtureOfFactorAnalysers", "PARAM_NAMES"]
