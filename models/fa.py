"""Factor analysis and probabilistic PCA: the model where every variational quantity is exact.

z_n ~ N(0, I_k),  x_n | z_n ~ N(W z_n + mu, Psi),  Psi = diag(psi)      (Bishop PRML 12.64-12.65)
PPCA is Psi = sigma^2 I (Tipping & Bishop 1999).

Everything goes through the k x k matrix L = I + W^T Psi^-1 W:
* log|C| = sum log psi + log|L|, C = W W^T + Psi         (matrix determinant lemma)
* C^-1 = Psi^-1 - Psi^-1 W L^-1 W^T Psi^-1              (Woodbury)
* z | x ~ N(L^-1 W^T Psi^-1 (x - mu), L^-1)             (PRML 12.68 with M = sigma^2 L)
so the evidence costs O(n d k) and one EM iteration on the sample covariance O(d^2 k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from inference.runtime import one_thread
from models.base import Evidence, ModelFamily
from models.validate import as_data, choice, integer, non_negative, positive

LOG_2PI = math.log(2 * math.pi)
KINDS = ("fa", "ppca")


# --------------------------------------------------------------------------------------------
# parameters


@dataclass
class FAParams:
    """W (d, k) loadings, mu (d,) mean, psi (d,) diagonal noise variances."""

    W: torch.Tensor
    mu: torch.Tensor
    psi: torch.Tensor

    def __post_init__(self):
        for name in ("W", "mu", "psi"):
            v = getattr(self, name)
            if not isinstance(v, torch.Tensor):
                v = torch.as_tensor(v, dtype=torch.float64)
                setattr(self, name, v)
            if not v.is_floating_point():
                raise TypeError(f"{name}: must be a floating tensor, got {v.dtype}")
            if not torch.isfinite(v).all():
                raise ValueError(f"{name}: contains NaN or inf")
        if self.W.dim() != 2:
            raise ValueError(f"W: expected shape (d, k), got {tuple(self.W.shape)}")
        d = self.W.shape[0]
        for name in ("mu", "psi"):
            if tuple(getattr(self, name).shape) != (d,):
                shape = tuple(getattr(self, name).shape)
                raise ValueError(f"{name}: expected shape ({d},), got {shape}")
        if not (self.psi > 0).all():
            raise ValueError("psi: noise variances must be > 0")

    @property
    def dim(self) -> int:
        return self.W.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.W.shape[1]

    def to(self, ref=None, dtype=None) -> FAParams:
        """Move to the device/dtype of a reference tensor (or an explicit device and dtype)."""
        if isinstance(ref, torch.Tensor):
            device, dtype = ref.device, ref.dtype
        else:
            device = ref
        return FAParams(*(t.to(device=device, dtype=dtype) for t in (self.W, self.mu, self.psi)))

    def covariance(self) -> torch.Tensor:
        """C = W W^T + Psi (d, d)."""
        return self.W @ self.W.T + torch.diag(self.psi)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"W": self.W, "mu": self.mu, "psi": self.psi}

    @classmethod
    def from_dict(cls, d: dict) -> FAParams:
        missing = [k for k in ("W", "mu", "psi") if k not in d]
        if missing:
            raise ValueError(f"params: missing entries {missing}")
        return cls(d["W"], d["mu"], d["psi"])

    def save(self, path) -> Path:
        """A plain dict of tensors (loads with ``torch.load(weights_only=True)``)."""
        path = Path(path)
        torch.save({k: v.detach().cpu() for k, v in self.as_dict().items()}, path)
        return path

    @classmethod
    def load(cls, path, map_location=None) -> FAParams:
        return cls.from_dict(torch.load(path, map_location=map_location, weights_only=True))


# --------------------------------------------------------------------------------------------
# closed forms (batched over leading dims of W, mu, psi)


def cholesky(A: torch.Tensor) -> torch.Tensor:
    """torch.linalg.cholesky, on one CPU thread for small matrices (see :func:`one_thread`)."""
    if A.shape[-1] > 64:
        return torch.linalg.cholesky(A)
    with one_thread(A):
        return torch.linalg.cholesky(A)


def _chol_L(W: torch.Tensor, psi: torch.Tensor):
    """W^T Psi^-1 (..., k, d) and the Cholesky factor of L = I + W^T Psi^-1 W."""
    WtPi = (W / psi.unsqueeze(-1)).transpose(-1, -2)
    k = W.shape[-1]
    L = torch.eye(k, dtype=W.dtype, device=W.device) + WtPi @ W
    return WtPi, cholesky(L)


def gaussian_loglik(x: torch.Tensor, W: torch.Tensor, mu: torch.Tensor, psi: torch.Tensor):
    """log N(x_n; mu, W W^T + diag psi) for each row, O(n d k).

    x (n, d); W (..., d, k); mu, psi (..., d) -> (..., n). Determinant lemma and Woodbury:
    log|C| = sum log psi + 2 sum log diag chol(L), r^T C^-1 r = r^T Psi^-1 r - |chol(L)^-1 b|^2,
    b = W^T Psi^-1 r.
    """
    d = x.shape[-1]
    WtPi, chol = _chol_L(W, psi)
    r = x - mu.unsqueeze(-2)  # (..., n, d)
    b = r @ WtPi.transpose(-1, -2)  # (..., n, k)
    u = torch.linalg.solve_triangular(chol, b.transpose(-1, -2), upper=False)  # (..., k, n)
    quad = (r * r / psi.unsqueeze(-2)).sum(-1) - (u * u).sum(-2)
    logdet = torch.log(psi).sum(-1) + 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (d * LOG_2PI + logdet.unsqueeze(-1) + quad)


def _loglik_from_cov(S: torch.Tensor, n: int, W, psi) -> torch.Tensor:
    """Total log-likelihood at mu = sample mean, from the biased sample covariance S:
    -n/2 (d log 2pi + log|C| + tr(C^-1 S)), with tr(C^-1 S) = tr(S Psi^-1) - tr(L^-1 B^T S B),
    B = Psi^-1 W (Woodbury). O(d^2 k)."""
    d = S.shape[0]
    WtPi, chol = _chol_L(W, psi)
    SB = S @ WtPi.T  # (d, k)
    inner = WtPi @ SB  # B^T S B (k, k)
    tr = (torch.diagonal(S) / psi).sum() - torch.trace(torch.cholesky_solve(inner, chol))
    logdet = torch.log(psi).sum() + 2 * torch.log(torch.diagonal(chol)).sum()
    return -0.5 * n * (d * LOG_2PI + logdet + tr)


def _mean_cov(x: torch.Tensor):
    mean = x.mean(0)
    xc = x - mean
    return mean, (xc.T @ xc) / x.shape[0]


def _pca_init(S: torch.Tensor, k: int, kind: str, min_var: float):
    """PPCA closed form on S (Tipping & Bishop 1999, eq. 7-8): sigma^2 = mean of the d - k
    smallest eigenvalues, W = U_k (Lambda_k - sigma^2 I)^(1/2); FA takes psi = diag(S - W W^T)."""
    d = S.shape[0]
    evals, evecs = torch.linalg.eigh(S)
    evals, evecs = evals.flip(0), evecs.flip(1)
    sigma2 = evals[k:].mean().clamp_min(min_var)
    W = evecs[:, :k] * (evals[:k] - sigma2).clamp_min(0).sqrt()
    if kind == "ppca":
        psi = sigma2.expand(d).clone()
    else:
        psi = (torch.diagonal(S) - (W * W).sum(1)).clamp_min(min_var)
    return W, psi


def ppca_ml(x, k: int, *, min_var: float = 0.0) -> FAParams:
    """Closed-form maximum-likelihood PPCA (Tipping & Bishop 1999, eq. 7-8), up to rotation."""
    x = as_data(x, "x", min_rows=2)
    k = integer(k, "latent_dim", minimum=1, maximum=x.shape[1] - 1)
    mean, S = _mean_cov(x)
    W, psi = _pca_init(S, k, "ppca", min_var)
    return FAParams(W, mean, psi)


# --------------------------------------------------------------------------------------------
# EM on sufficient statistics


@dataclass
class EMState:
    """EM iterate: the parameters plus the sufficient statistics (mean, biased covariance S)."""

    params: FAParams
    S: torch.Tensor
    n: int


def em_update(S: torch.Tensor, W, psi, kind: str, min_var: float):
    """One EM iteration on S (Ghahramani & Hinton 1996; PRML 12.69-12.70 summed over n):
    G = L^-1, beta = G W^T Psi^-1,  E[z] = beta (x - mu),  sum E[zz^T]/n = G + beta S beta^T,
    W' = S beta^T (G + beta S beta^T)^-1,  Psi' = diag(S - W' beta S)  (PPCA: sigma^2' = tr/d).
    Also returns the total log-likelihood / n of the *input* (W, psi), at no extra cost."""
    d = S.shape[0]
    WtPi, chol = _chol_L(W, psi)
    G = torch.cholesky_inverse(chol)
    SB = S @ WtPi.T  # S Psi^-1 W (d, k)
    inner = WtPi @ SB  # W^T Psi^-1 S Psi^-1 W
    diagS = torch.diagonal(S)
    # objective of the input parameters (see _loglik_from_cov)
    tr = (diagS / psi).sum() - (G * inner).sum()
    logdet = torch.log(psi).sum() + 2 * torch.log(torch.diagonal(chol)).sum()
    ll_per_n = -0.5 * (d * LOG_2PI + logdet + tr)
    SbT = SB @ G  # S beta^T (d, k)
    A = G + G @ inner @ G  # G + beta S beta^T
    Wn = torch.linalg.solve(A, SbT.T).T
    resid = diagS - (Wn * SbT).sum(1)
    psin = resid.mean().expand(d).clone() if kind == "ppca" else resid
    return Wn, psin.clamp_min(min_var), ll_per_n


def svd_update(S: torch.Tensor, psi, k: int, min_var: float):
    """scikit-learn's FactorAnalysis iteration (Barber, BRML 21.2.33) on S instead of X:
    eigen-decompose Psi^-1/2 S Psi^-1/2, W = Psi^1/2 U_k (Lambda_k - 1)_+^1/2 (the optimal W for
    this psi), psi' = diag(S - W W^T). Returns W, psi', and log-lik / n at (W, psi)."""
    d = S.shape[0]
    sq = psi.sqrt()
    evals, evecs = torch.linalg.eigh(S / (sq[:, None] * sq[None, :]))
    lam, U = evals[-k:], evecs[:, -k:]
    W = sq[:, None] * U * (lam - 1).clamp_min(0).sqrt()
    # at the optimal W, log|C| = sum log psi + sum log max(lam, 1),
    # tr(C^-1 S) = tr(S~) - sum (lam - 1)_+ (eigenvalues in the W subspace are 1 in C~^-1 S~)
    lam1 = lam.clamp_min(1)
    tr = evals.sum() - (lam1 - 1).sum()
    ll = -0.5 * (d * LOG_2PI + torch.log(psi).sum() + torch.log(lam1).sum() + tr)
    psin = (torch.diagonal(S) - (W * W).sum(1)).clamp_min(min_var)
    return W, psin, ll


def fit_em(
    x,
    k: int,
    *,
    kind: str = "fa",
    method: str = "em",
    max_iter: int = 10000,
    tol: float = 1e-8,
    target: float | None = None,
    seed: int = 0,
    min_var: float = 1e-6,
    init: FAParams | None = None,
) -> tuple[FAParams, list[float]]:
    """Maximum-likelihood FA/PPCA by EM (``method="em"``) or by the eigen iteration
    (``method="svd"``, FA only), both on the d x d sample covariance (one O(n d^2) pass).

    Stops when the total log-likelihood rises by less than ``tol * n`` nats, or when it reaches
    ``target`` (total nats; for benchmarks). Returns the parameters and the trace of total
    log-likelihoods (exact, nats, every constant), which never decreases for EM.
    """
    x = as_data(x, "x", min_rows=2)
    n, d = x.shape
    k = integer(k, "latent_dim", minimum=1, maximum=d - 1)
    choice(kind, "kind", KINDS)
    choice(method, "method", ("em", "svd"))
    if method == "svd" and kind != "fa":
        raise ValueError("method: 'svd' is for kind='fa'; PPCA has the closed form ppca_ml")
    integer(max_iter, "max_iter", minimum=1)
    non_negative(tol, "tol")
    mean, S = _mean_cov(x)
    if init is None:
        W, psi = _init_from_cov(S, k, kind, min_var, seed)
    else:
        init = init.to(x)
        W, psi = init.W, init.psi
    with one_thread(x):
        W, psi, trace = _iterate(S, W, psi, n, k, kind, method, max_iter, tol, target, min_var)
    return FAParams(W, mean, psi), trace


def _iterate(S, W, psi, n, k, kind, method, max_iter, tol, target, min_var):
    trace: list[float] = []
    for _ in range(max_iter):
        # ll is the log-likelihood of the current iterate (W, psi); for "svd" W is first replaced
        # by the optimal W for psi, so the iterate is (Wn, psi)
        if method == "em":
            Wn, psin, ll = em_update(S, W, psi, kind, min_var)
        else:
            Wn, psin, ll = svd_update(S, psi, k, min_var)
            W = Wn
        ll = float(ll) * n
        if not math.isfinite(ll):
            break
        trace.append(ll)
        if len(trace) > 1 and trace[-1] - trace[-2] <= tol * n:
            break
        if target is not None and ll >= target:
            break
        W, psi = Wn, psin
    else:
        if method == "svd":
            W, _, ll = svd_update(S, psi, k, min_var)
        else:
            ll = _loglik_from_cov(S, n, W, psi) / n
        trace.append(float(ll) * n)
    return W, psi, trace


def _init_from_cov(S, k, kind, min_var, seed, generator=None, jitter=1e-2):
    """PCA-based start, perturbed with a seeded draw so restarts differ."""
    W, psi = _pca_init(S, k, kind, min_var)
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    scale = jitter * torch.diagonal(S).mean().sqrt()
    W = W + scale * torch.randn(W.shape, generator=g, dtype=torch.float64).to(W)
    return W, psi


# --------------------------------------------------------------------------------------------
# the family


def check_factor_data(x, latent_dim: int, dim: int | None, *, allow_nan: bool = False):
    """Data for a k-factor model: an (n, d) array with d == ``dim`` (when set) and k < d."""
    x = as_data(x, "x", allow_nan=allow_nan)
    d = x.shape[1]
    if dim is not None and d != dim:
        raise ValueError(f"x: expected {dim} columns, got {d}")
    if latent_dim >= d:
        raise ValueError(f"latent_dim: must be < the data dimension {d}, got {latent_dim}")
    return x


class FactorAnalysis(ModelFamily):
    """Factor analysis (``kind="fa"``) or probabilistic PCA (``kind="ppca"``).

    With ``params`` the parameters are fixed constants of the Pyro model (for guide-only SVI,
    CAVI, gap decompositions); without, the model registers ``pyro.param`` sites ``W``, ``mu`` and
    ``psi`` (PPCA: one ``sigma2``), initialized from the data (``init="pca"``, the PPCA closed
    form, or ``init="random"``).
    """

    max_plate_nesting = 1
    em_bound = "log-likelihood"
    em_guide_name = "exact-posterior"
    cavi_bound = "elbo"
    cavi_guide_name = "mean-field"

    def __init__(
        self,
        latent_dim: int,
        *,
        kind: str = "fa",
        params: FAParams | None = None,
        dim: int | None = None,
        min_var: float = 1e-6,
        init: str = "pca",
    ):
        self.latent_dim = integer(latent_dim, "latent_dim", minimum=1)
        self.kind = choice(kind, "kind", KINDS)
        self.name = kind
        self.min_var = positive(min_var, "min_var")
        self.init = choice(init, "init", ("pca", "random"))
        if params is not None and not isinstance(params, FAParams):
            raise TypeError(f"params: expected FAParams or None, got {type(params).__name__}")
        if params is not None:
            if params.latent_dim != self.latent_dim:
                raise ValueError(
                    f"params: W has {params.latent_dim} columns, latent_dim is {self.latent_dim}"
                )
            if dim is not None and int(dim) != params.dim:
                raise ValueError(f"dim: {dim} does not match params (d = {params.dim})")
            dim = params.dim
        if dim is not None:
            dim = integer(dim, "dim", minimum=2)
            if self.latent_dim >= dim:
                raise ValueError(f"latent_dim: must be < dim ({dim}), got {self.latent_dim}")
        self.dim = dim
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
        }

    def current_params(self) -> FAParams | None:
        """The fixed params, else the learned ``pyro.param`` values in the active param store
        (so an exact-posterior guide follows parameters being learned by SVI), else None."""
        if self.params is not None:
            return self.params
        store = pyro.get_param_store()
        noise = "sigma2" if self.kind == "ppca" else "psi"
        if not all(k in store for k in ("W", "mu", noise)):
            return None
        W, mu = pyro.param("W"), pyro.param("mu")
        psi = pyro.param(noise)
        return FAParams(W, mu, psi.expand(W.shape[0]) if self.kind == "ppca" else psi)

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

    # -- Pyro model -------------------------------------------------------------------------
    def _model_params(self, x: torch.Tensor):
        if self.params is not None:
            p = self.params.to(x)
            return p.W, p.mu, p.psi
        n, d = x.shape
        k, kind, min_var = self.latent_dim, self.kind, self.min_var
        cache: dict = {}

        def start():
            if not cache:
                mean, S = _mean_cov(x.detach())
                if self.init == "pca":
                    W, psi = _pca_init(S, k, kind, min_var)
                else:
                    scale = 0.1 * torch.diagonal(S).mean().sqrt()
                    W = scale * torch.randn(d, k, device=x.device, dtype=x.dtype)
                    psi = torch.diagonal(S).clamp_min(min_var)
                    if kind == "ppca":
                        psi = psi.mean().expand(d)
                cache.update(W=W, mu=mean, psi=psi)
            return cache

        W = pyro.param("W", lambda: start()["W"].clone())
        mu = pyro.param("mu", lambda: start()["mu"].clone())
        pos = constraints.greater_than(min_var)
        if kind == "ppca":
            sigma2 = pyro.param("sigma2", lambda: start()["psi"][0].clone(), constraint=pos)
            psi = sigma2.expand(d)
        else:
            psi = pyro.param("psi", lambda: start()["psi"].clone(), constraint=pos)
        return W, mu, psi

    def model(self, x: torch.Tensor, subsample_size: int | None = None):
        """z_n ~ N(0, I_k) (site ``z``), x_n ~ N(W z_n + mu, diag psi) (site ``x``)."""
        n, d = x.shape
        W, mu, psi = self._model_params(x)
        zeros = torch.zeros(self.latent_dim, device=x.device, dtype=x.dtype)
        with pyro.plate("data", n, subsample_size=subsample_size, dim=-1, device=x.device) as idx:
            xb = x if subsample_size is None else x.index_select(0, idx)
            z = pyro.sample("z", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
            loc = z @ W.transpose(-1, -2) + mu
            pyro.sample("x", dist.Normal(loc, psi.sqrt()).to_event(1), obs=xb)

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

    def exact_posterior(self, x, params: FAParams | None = None):
        """z_n | x_n ~ N(L^-1 W^T Psi^-1 (x_n - mu), L^-1): returns mean (n, k), cov (k, k)."""
        x = self.check_data(x)
        p = self._params(x, params)
        WtPi, chol = _chol_L(p.W, p.psi)
        cov = torch.cholesky_inverse(chol)
        mean = torch.cholesky_solve(WtPi @ (x - p.mu).T, chol).T
        return mean, cov

    def log_joint(self, x, z: torch.Tensor, params: FAParams | None = None) -> torch.Tensor:
        """log p(x_n, z_n) = log N(z_n; 0, I) + log N(x_n; W z_n + mu, Psi).

        z (..., n, k) -> (..., n), broadcast over leading sample dims."""
        x = self.check_data(x)
        p = self._params(x, params)
        if z.shape[-2:] != (x.shape[0], self.latent_dim):
            want = f"(..., {x.shape[0]}, {self.latent_dim})"
            raise ValueError(f"z: expected shape {want}, got {tuple(z.shape)}")
        d, k = x.shape[1], self.latent_dim
        r = x - z @ p.W.T - p.mu
        lx = -0.5 * (d * LOG_2PI + torch.log(p.psi).sum() + (r * r / p.psi).sum(-1))
        lz = -0.5 * (k * LOG_2PI + (z * z).sum(-1))
        return lx + lz

    # -- EM hooks (inference.em.fit) --------------------------------------------------------
    def em_init(self, x: torch.Tensor, generator: torch.Generator) -> EMState:
        mean, S = _mean_cov(x)
        if self.params is not None:
            p = self.params.to(x)
            W, psi = p.W, p.psi
        else:
            W, psi = _init_from_cov(S, self.latent_dim, self.kind, self.min_var, 0, generator)
        return EMState(FAParams(W, mean, psi), S, x.shape[0])

    def em_step(self, x: torch.Tensor, state: EMState) -> EMState:
        p = state.params
        W, psi, _ = em_update(state.S, p.W, p.psi, self.kind, self.min_var)
        return EMState(FAParams(W, p.mu, psi), state.S, state.n)

    def em_objective(self, x: torch.Tensor, state: EMState) -> float:
        """Exact total log-likelihood sum_n log N(x_n; mu, C) (bound ``log-likelihood``)."""
        p = state.params
        return float(_loglik_from_cov(state.S, state.n, p.W, p.psi))

    def em_posterior(self, x: torch.Tensor, state: EMState) -> dict:
        """W, mu, psi (PPCA also ``sigma2``, named like the Pyro param)."""
        out = state.params.as_dict()
        if self.kind == "ppca":
            out["sigma2"] = out["psi"][0]
        return out

    # -- SVI guides -------------------------------------------------------------------------
    default_guide = "mean-field"

    def guides(self) -> dict:
        """The per-data-point latent guides of :mod:`guides` (``exact`` included)."""
        import guides

        return guides.latent_guides(exact=True)

    # -- CAVI hooks with fixed params (inference.cavi.fit) -------------------------------------
    def _cavi_consts(self, x):
        p = self._params(x, None)
        WtPi, chol = _chol_L(p.W, p.psi)
        L = chol @ chol.T
        r = x - p.mu
        b = r @ WtPi.T  # (n, k)
        const = -0.5 * (x.shape[1] * LOG_2PI + torch.log(p.psi).sum() + (r * r / p.psi).sum(1))
        return L, b, const

    def cavi_init(self, x: torch.Tensor, generator: torch.Generator) -> dict:
        """q(z_n) = prod_j N(m_nj, v_j): m from N(0, 1) draws, v = 1."""
        if self.params is None:
            raise ValueError("params: CAVI over q(z) needs a family with fixed params")
        L, b, const = self._cavi_consts(x)
        m = torch.randn(x.shape[0], self.latent_dim, generator=generator, dtype=torch.float64).to(x)
        v = torch.ones(self.latent_dim, device=x.device, dtype=x.dtype)
        return {"m": m, "v": v, "L": L, "b": b, "c": const}

    def cavi_step(self, x: torch.Tensor, state: dict) -> dict:
        """Sweep j = 1..k: v_j = 1 / L_jj, m_nj = (b_nj - sum_{i != j} L_ji m_ni) / L_jj
        (the optimal factor given the others, PRML 10.9 for a Gaussian target)."""
        L, b = state["L"], state["b"]
        m = state["m"].clone()
        diag = torch.diagonal(L)
        for j in range(self.latent_dim):
            m[:, j] = (b[:, j] - m @ L[:, j] + diag[j] * m[:, j]) / diag[j]
        return {**state, "m": m, "v": 1.0 / diag}

    def cavi_objective(self, x: torch.Tensor, state: dict) -> float:
        """Closed-form ELBO, summed over n (every constant kept):
        sum_n [ -1/2 (d log 2pi + sum log psi + r^T Psi^-1 r) + m^T b - 1/2 m^T L m
                - 1/2 sum_j L_jj v_j + k/2 + 1/2 sum_j log v_j ],  r = x_n - mu, b = W^T Psi^-1 r.
        (E log N(z; 0, I) and the entropy share their 2pi terms, which cancel.)"""
        return float(self.cavi_elbo_pointwise(state).sum())

    @staticmethod
    def cavi_elbo_pointwise(state: dict) -> torch.Tensor:
        L, b, c, m, v = state["L"], state["b"], state["c"], state["m"], state["v"]
        k = m.shape[1]
        quad = (m * b).sum(1) - 0.5 * ((m @ L) * m).sum(1)
        tail = -0.5 * (torch.diagonal(L) * v).sum() + 0.5 * k + 0.5 * torch.log(v).sum()
        return c + quad + tail

    def cavi_posterior(self, x: torch.Tensor, state: dict) -> dict:
        return {"z_loc": state["m"], "z_scale": state["v"].sqrt().expand_as(state["m"])}


# --------------------------------------------------------------------------------------------
# missing data: exact conditional Gaussians and EM on the observed entries


def _check_missing(x_nan, params: FAParams | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x = as_data(x_nan, "x", allow_nan=True)
    obs = ~torch.isnan(x)
    if params is not None and params.dim != x.shape[1]:
        raise ValueError(f"x: expected {params.dim} columns, got {x.shape[1]}")
    return x, obs


def _posterior_observed(x0: torch.Tensor, obs: torch.Tensor, W, mu, psi):
    """Per row, z | x_obs ~ N(m_n, G_p(n)) with L_p = I + W_o^T Psi_o^-1 W_o per missingness
    pattern p. Returns m (n, k), G per row (n, k, k), chol per pattern, inverse index, b."""
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
    """EM for FA/PPCA with entries missing at random (NaN), hidden variables (z_n, x_mis,n).

    With z~ = [z; 1] and W~ = [W, mu] (so x = W~ z~ + eps), the E-step takes z | x_obs from
    :func:`_posterior_observed` and, for a missing entry i, E[x_ni z~] = W~_i E[z~ z~^T],
    E[x_ni^2] = W~_i E[z~ z~^T] W~_i^T + psi_i; the M-step is W~_i = B_i A^-1,
    psi_i = (sum_n E[x_ni^2] - W~_i B_i^T) / n with A = sum_n E[z~ z~^T], B_i = sum_n E[x_ni z~]
    (Ghahramani & Jordan 1994). The observed-data log-likelihood (trace, total nats) never
    decreases. Stops when it rises by less than ``tol * n``.
    """
    x, obs = _check_missing(x_nan)
    n, d = x.shape
    k = integer(k, "latent_dim", minimum=1, maximum=d - 1)
    choice(kind, "kind", KINDS)
    integer(max_iter, "max_iter", minimum=1)
    non_negative(tol, "tol")
    counts = obs.sum(0)
    if (counts == 0).any():
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"x: column(s) {empty} have no observed values")
    o = obs.to(x.dtype)
    x0 = torch.where(obs, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if init is None:
        mean = x0.sum(0) / counts
        filled = torch.where(obs, x, mean)
        _, S = _mean_cov(filled)
        W, psi = _init_from_cov(S, k, kind, min_var, seed)
        p = FAParams(W, mean, psi)
    else:
        p = init.to(x)
    sum_x2_obs = (x0 * x0).sum(0)
    trace = [float(observed_loglik(x, p).sum())]
    for _ in range(max_iter):
        m, G, *_ = _posterior_observed(x0, obs, p.W, p.mu, p.psi)
        zt = torch.cat([m, torch.ones(n, 1, dtype=x.dtype, device=x.device)], 1)  # E[z~] (n, k+1)
        Ezz = zt.unsqueeze(-1) * zt.unsqueeze(-2)
        Ezz[:, :k, :k] += G
        A = Ezz.sum(0)
        C = torch.einsum("nd,nab->dab", 1 - o, Ezz)  # sum over rows missing i of E[z~ z~^T]
        Wt = torch.cat([p.W, p.mu[:, None]], 1)  # (d, k+1)
        B = x0.T @ zt + torch.einsum("da,dab->db", Wt, C)
        Wn = torch.linalg.solve(A, B.T).T
        sxx = sum_x2_obs + torch.einsum("da,dab,db->d", Wt, C, Wt) + (n - counts) * p.psi
        resid = (sxx - (Wn * B).sum(1)) / n
        psin = resid.mean().expand(d).clone() if kind == "ppca" else resid
        p = FAParams(Wn[:, :k].contiguous(), Wn[:, k].contiguous(), psin.clamp_min(min_var))
        ll = float(observed_loglik(x, p).sum())
        trace.append(ll)
        if not math.isfinite(ll) or abs(ll - trace[-2]) <= tol * n:
            break
    return p, trace


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
    if not isinstance(params, FAParams):
        raise TypeError(f"params: expected FAParams, got {type(params).__name__}")
    x, obs = _check_missing(x_nan, params)
    p = params.to(x)
    x0 = torch.where(obs, x, torch.zeros((), dtype=x.dtype, device=x.device))
    m, G, chol, inv, *_ = _posterior_observed(x0, obs, p.W, p.mu, p.psi)
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
    if not isinstance(params, FAParams):
        raise TypeError(f"params: expected FAParams, got {type(params).__name__}")
    num_draws = integer(num_draws, "num_draws", minimum=1)
    x, obs = _check_missing(x_nan, params)
    p = params.to(x)
    x0 = torch.where(obs, x, torch.zeros((), dtype=x.dtype, device=x.device))
    m, G, *_ = _posterior_observed(x0, obs, p.W, p.mu, p.psi)
    n, d = x.shape
    g = torch.Generator().manual_seed(integer(seed, "seed", minimum=0))
    e1 = torch.randn(num_draws, n, p.latent_dim, generator=g, dtype=torch.float64).to(x)
    e2 = torch.randn(num_draws, n, d, generator=g, dtype=torch.float64).to(x)
    z = m + (cholesky(G) @ e1.unsqueeze(-1)).squeeze(-1)
    draws = z @ p.W.T + p.mu + e2 * p.psi.sqrt()
    return torch.where(obs, x, draws)
