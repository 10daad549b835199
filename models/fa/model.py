"""Factor analysis and probabilistic PCA: the model where every variational quantity is exact.

z_n ~ N(0, I_k),  x_n | z_n ~ N(W z_n + mu, Psi),  Psi = diag(psi)      (Bishop PRML 12.64-12.65)
PPCA is Psi = sigma^2 I (Tipping & Bishop 1999).

:class:`FactorAnalysis` is a :class:`elbolab.models.base.LocalLatentFamily`: its Pyro model, log joint and
log likelihood are built from ``local_prior`` and ``observation_dist``. The closed forms are in
:mod:`elbolab.models.fa.linalg` (evidence, posterior, EM updates), the fitting algorithms in
:mod:`elbolab.models.fa.fit` (EM, CAVI, :func:`fit_em`) and the missing-data ones in
:mod:`elbolab.models.fa.missing`.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from elbolab.models.base import LocalLatentFamily
from elbolab.models.capabilities import Evidence, GaussianPosterior
from elbolab.models.fa.fit import (
    METHODS,
    EMState,
    FactorCAVI,
    FactorEM,
    cavi_elbo_pointwise,
    fit_em,
)
from elbolab.models.fa.linalg import (
    KINDS,
    check_factor_data,
    gaussian_loglik,
    mean_cov,
    pca_init,
    ppca_ml,
    precision_factor,
)
from elbolab.models.fa.missing import em_missing, impute, multiple_impute, observed_loglik
from elbolab.models.fa.params import FAParams
from elbolab.models.validate import choice, factor_dim, integer, positive


class FactorAnalysis(LocalLatentFamily):
    """Factor analysis (``kind="fa"``) or probabilistic PCA (``kind="ppca"``).

    With ``params`` the parameters are fixed constants of the Pyro model (for guide-only SVI,
    CAVI, gap decompositions); without, the model registers ``pyro.param`` sites ``W``, ``mu`` and
    ``psi`` (PPCA: one ``sigma2``), initialized from the data (``init="pca"``, the PPCA closed
    form, or ``init="random"``), and every density reads the values in the param store.

    ``min_var``: EM keeps each noise variance >= ``min_var`` times its column's sample variance
    (:func:`elbolab.models.fa.linalg.variance_floor`; relative, so a fit to data times c is the fit to
    the data, rescaled); the learned ``pyro.param`` psi of SVI is kept > ``min_var`` itself.

    ``em_method`` (the ``em`` engine): ``"em"`` (Ghahramani & Hinton's EM), ``"svd"`` (the eigen
    iteration, FA only) or ``"auto"`` (svd for FA, em for PPCA). Both reach the same likelihood; the
    loadings differ by a rotation: svd's makes the posterior covariance diagonal.
    """

    max_plate_nesting = 1

    def __init__(
        self,
        latent_dim: int,
        *,
        kind: str = "fa",
        params: FAParams | None = None,
        dim: int | None = None,
        min_var: float = 1e-6,
        init: str = "pca",
        em_method: str = "auto",
    ):
        self.latent_dim = integer(latent_dim, "latent_dim", minimum=1)
        self.kind = choice(kind, "kind", KINDS)
        self.em_method = choice(em_method, "em_method", METHODS)
        self.name = kind
        self.min_var = positive(min_var, "min_var")
        self.init = choice(init, "init", ("pca", "random"))
        if params is not None and not isinstance(params, FAParams):
            raise TypeError(f"params: expected FAParams or None, got {type(params).__name__}")
        if params is not None and params.latent_dim != self.latent_dim:
            raise ValueError(
                f"params: W has {params.latent_dim} columns, latent_dim is {self.latent_dim}")
        self.dim = factor_dim(dim, self.latent_dim, None if params is None else params.dim)
        self.params = params

    # -- boundary ---------------------------------------------------------------------------
    def check_data(self, x, *, allow_nan: bool = False) -> torch.Tensor:
        return check_factor_data(x, self.latent_dim, self.dim, allow_nan=allow_nan)

    def settings(self) -> dict:
        return {
            "latent_dim": self.latent_dim,
            "kind": self.kind,
            "dim": self.dim,
            "min_var": self.min_var,
            "em_method": self.em_method,
        }

    # -- where the parameters come from -------------------------------------------------------
    def _noise_site(self) -> str:
        return "sigma2" if self.kind == "ppca" else "psi"

    def _learned(self) -> bool:
        store = pyro.get_param_store()
        return all(k in store for k in ("W", "mu", self._noise_site()))

    def _store_params(self):
        """W, mu, psi from the active param store (PPCA: sigma2 broadcast to d)."""
        W, mu = pyro.param("W"), pyro.param("mu")
        noise = pyro.param(self._noise_site())
        return W, mu, (noise.expand(W.shape[0]) if self.kind == "ppca" else noise)

    def current_params(self) -> FAParams | None:
        """The fixed params, else the learned ``pyro.param`` values in the active param store
        (so an exact-posterior guide follows parameters being learned by SVI), else None."""
        if self.params is not None:
            return self.params
        if not self._learned():
            return None
        return FAParams(*self._store_params())

    def _params(self, x: torch.Tensor, params: FAParams | None) -> FAParams:
        p = params if params is not None else self.current_params()
        if p is None:
            raise ValueError("params: none given and the family holds none (fit first: fit_em)")
        if p.dim != x.shape[-1] or p.latent_dim != self.latent_dim:
            raise ValueError(
                f"params: shape (d={p.dim}, k={p.latent_dim}) does not match data d={x.shape[-1]}, "
                f"latent_dim={self.latent_dim}"
            )
        return p.to(x)

    def _model_params(self, ref: torch.Tensor):
        """(W, mu, psi) the Pyro model uses, on ``ref``'s device and dtype: the fixed params,
        else the param store's (learnable; gradients flow)."""
        if self.params is not None:
            p = self.params
            return tuple(t.to(device=ref.device, dtype=ref.dtype) for t in (p.W, p.mu, p.psi))
        try:  # pyro.param goes through the handlers: fixed values (substitute) are seen too
            return self._store_params()
        except KeyError:
            raise ValueError(
                "params: none given and the family holds none (fit first: fit_em)") from None

    def _register_params(self, x: torch.Tensor) -> None:
        """The ``pyro.param`` sites W, mu, psi (PPCA: sigma2), started from all of ``x``."""
        d = x.shape[1]
        k, kind, min_var = self.latent_dim, self.kind, self.min_var
        cache: dict = {}

        def start():
            if not cache:
                mean, S = mean_cov(x.detach())
                if self.init == "pca":
                    W, psi = pca_init(S, k, kind, min_var)
                else:
                    scale = 0.1 * torch.diagonal(S).mean().sqrt()
                    W = scale * torch.randn(d, k, device=x.device, dtype=x.dtype)
                    psi = torch.diagonal(S).clamp_min(min_var)
                    if kind == "ppca":
                        psi = psi.mean().expand(d)
                cache.update(W=W, mu=mean, psi=psi)
            return cache

        pyro.param("W", lambda: start()["W"].clone())
        pyro.param("mu", lambda: start()["mu"].clone())
        pos = constraints.greater_than(min_var)
        if kind == "ppca":
            pyro.param("sigma2", lambda: start()["psi"][0].clone(), constraint=pos)
        else:
            pyro.param("psi", lambda: start()["psi"].clone(), constraint=pos)

    # -- the model: one source for every density ----------------------------------------------
    def local_prior(self, x: torch.Tensor):
        """p(z_n) = N(0, I_k) for the rows of ``x``: batch (n,), event (k,)."""
        zeros = torch.zeros(x.shape[0], self.latent_dim, device=x.device, dtype=x.dtype)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def observation_dist(self, z: torch.Tensor):
        """p(x_n | z_n) = N(W z_n + mu, diag psi): batch ``z.shape[:-1]``, event (d,)."""
        W, mu, psi = self._model_params(z)
        return dist.Normal(z @ W.transpose(-1, -2) + mu, psi.sqrt()).to_event(1)

    def model(self, x: torch.Tensor, subsample_size: int | None = None):
        """z_n ~ N(0, I_k) (site ``z``), x_n ~ N(W z_n + mu, diag psi) (site ``x``)."""
        if self.params is None:
            self._register_params(x)
        super().model(x, subsample_size)

    def log_joint(self, x, z: torch.Tensor) -> torch.Tensor:
        """log p(x_n, z_n) = log N(z_n; 0, I) + log N(x_n; W z_n + mu, Psi).

        z (..., n, k) -> (..., n), broadcast over leading sample dims."""
        x = self.check_data(x)
        if z.shape[-2:] != (x.shape[0], self.latent_dim):
            want = f"(..., {x.shape[0]}, {self.latent_dim})"
            raise ValueError(f"z: expected shape {want}, got {tuple(z.shape)}")
        return super().log_joint(x, z)

    # -- simulation -------------------------------------------------------------------------
    def simulate(self, n: int, *, seed: int = 0, device=None, dtype=torch.float64):
        """Synthetic data and the truth. Uses ``params`` when the family has them; else draws
        W_ij ~ N(0, 1), mu_i ~ N(0, 1), psi_i ~ U(0.1, 1) (PPCA: one sigma^2 ~ U(0.1, 1))."""
        n = integer(n, "n", minimum=1)
        if self.params is not None:
            truth = self.params.to(device, dtype)
        else:
            if self.dim is None:
                raise ValueError("dim: simulate needs dim= (or params=) on the family")
            g = torch.Generator().manual_seed(integer(seed, "seed", minimum=0))
            d, k = self.dim, self.latent_dim
            W = torch.randn(d, k, generator=g, dtype=torch.float64)
            mu = torch.randn(d, generator=g, dtype=torch.float64)
            m = 1 if self.kind == "ppca" else d
            psi = (0.1 + 0.9 * torch.rand(m, generator=g, dtype=torch.float64)).expand(d).clone()
            truth = FAParams(W, mu, psi).to(device, dtype)
        return self.sample(n, truth, seed=seed), truth

    def sample(self, n: int, params: FAParams | None = None, *, seed: int = 0) -> torch.Tensor:
        """n new rows from the model with ``params`` (default: the family's), on their device."""
        n = integer(n, "n", minimum=1)
        p = params if params is not None else self.params
        if p is None:
            raise ValueError("params: sample needs fitted parameters")
        g = torch.Generator().manual_seed(integer(seed, "seed", minimum=0) + 1)
        z = torch.randn(n, p.latent_dim, generator=g, dtype=torch.float64).to(p.W)
        eps = torch.randn(n, p.dim, generator=g, dtype=torch.float64).to(p.W)
        return z @ p.W.T + p.mu + eps * p.psi.sqrt()

    # -- exact quantities -------------------------------------------------------------------
    def log_evidence_pointwise(self, x, params: FAParams | None = None) -> torch.Tensor:
        """log N(x_n; mu, W W^T + Psi) per row (n,), O(n d k)."""
        x = self.check_data(x)
        p = self._params(x, params)
        return gaussian_loglik(x, p.W, p.mu, p.psi)

    def log_evidence(self, x, params: FAParams | None = None) -> Evidence:
        """Exact log p(x) = sum_n log N(x_n; mu, W W^T + Psi) in nats."""
        lp = self.log_evidence_pointwise(x, params)
        return Evidence(float(lp.sum()), 0.0, "exact", lp.shape[0], {"pointwise": lp})

    def exact_posterior(self, x, params: FAParams | None = None) -> GaussianPosterior:
        """z_n | x_n ~ N(L^-1 W^T Psi^-1 (x_n - mu), L^-1): mean (n, k), cov (k, k) shared."""
        x = self.check_data(x)
        p = self._params(x, params)
        WtPi, chol = precision_factor(p.W, p.psi)
        cov = torch.cholesky_inverse(chol)
        mean = torch.cholesky_solve(WtPi @ (x - p.mu).T, chol).T
        return GaussianPosterior(mean, cov)

    def impute_exact(self, x_nan) -> torch.Tensor:
        """E[x_mis | x_obs] under the family's parameters (observed entries kept); see
        :func:`elbolab.models.fa.missing.impute` for the conditional covariances."""
        x = self.check_data(x_nan, allow_nan=True)
        return impute(x, self._params(x, None))[0]

    # -- closed-form algorithms (engines ``em`` and ``cavi``) ---------------------------------
    def em(self) -> FactorEM:
        """Maximum likelihood by EM on the sufficient statistics (bound ``log-likelihood``),
        starting from the family's params when it has them."""
        return FactorEM(self.latent_dim, kind=self.kind, method=self.em_method,
                        min_var=self.min_var, start=self.params)

    def cavi(self) -> FactorCAVI:
        """Mean-field CAVI over q(z) with the family's fixed params (bound ``elbo``)."""
        return FactorCAVI(self.latent_dim, self.params)


__all__ = [
    "EMState", "FAParams", "FactorAnalysis", "FactorCAVI", "FactorEM", "cavi_elbo_pointwise",
    "em_missing", "fit_em", "impute", "multiple_impute", "observed_loglik", "ppca_ml",
]
