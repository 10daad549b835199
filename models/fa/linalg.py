"""Linear algebra of factor analysis / PPCA (tensors in, tensors out; batched where noted).

z_n ~ N(0, I_k),  x_n | z_n ~ N(W z_n + mu, Psi),  Psi = diag(psi)      (Bishop PRML 12.64-12.65)
PPCA is Psi = sigma^2 I (Tipping & Bishop 1999).

Everything goes through the k x k matrix L = I + W^T Psi^-1 W:
* log|C| = sum log psi + log|L|, C = W W^T + Psi         (matrix determinant lemma)
* C^-1 = Psi^-1 - Psi^-1 W L^-1 W^T Psi^-1              (Woodbury)
* z | x ~ N(L^-1 W^T Psi^-1 (x - mu), L^-1)             (PRML 12.68 with M = sigma^2 L)
so the evidence costs O(n d k) and one EM iteration on the sample covariance O(d^2 k).
"""

from __future__ import annotations

import torch

from elbolab.models.fa.params import FAParams
from elbolab.models.numerics import LOG_2PI, one_thread
from elbolab.models.validate import as_data, integer

#: the noise models: "fa" (diagonal Psi) and "ppca" (Psi = sigma^2 I)
KINDS = ("fa", "ppca")


def cholesky(A: torch.Tensor) -> torch.Tensor:
    """torch.linalg.cholesky, on one CPU thread for small matrices (see :func:`one_thread`)."""
    if A.shape[-1] > 64:
        return torch.linalg.cholesky(A)
    with one_thread(A):
        return torch.linalg.cholesky(A)


def precision_factor(W: torch.Tensor, psi: torch.Tensor):
    """W^T Psi^-1 (..., k, d) and the Cholesky factor of L = I + W^T Psi^-1 W (..., k, k)."""
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
    WtPi, chol = precision_factor(W, psi)
    r = x - mu.unsqueeze(-2)  # (..., n, d)
    b = r @ WtPi.transpose(-1, -2)  # (..., n, k)
    u = torch.linalg.solve_triangular(chol, b.transpose(-1, -2), upper=False)  # (..., k, n)
    quad = (r * r / psi.unsqueeze(-2)).sum(-1) - (u * u).sum(-2)
    logdet = torch.log(psi).sum(-1) + 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (d * LOG_2PI + logdet.unsqueeze(-1) + quad)


def loglik_from_cov(S: torch.Tensor, n: int, W, psi) -> torch.Tensor:
    """Total log-likelihood at mu = sample mean, from the biased sample covariance S:
    -n/2 (d log 2pi + log|C| + tr(C^-1 S)), with tr(C^-1 S) = tr(S Psi^-1) - tr(L^-1 B^T S B),
    B = Psi^-1 W (Woodbury). O(d^2 k)."""
    d = S.shape[0]
    WtPi, chol = precision_factor(W, psi)
    SB = S @ WtPi.T  # (d, k)
    inner = WtPi @ SB  # B^T S B (k, k)
    tr = (torch.diagonal(S) / psi).sum() - torch.trace(torch.cholesky_solve(inner, chol))
    logdet = torch.log(psi).sum() + 2 * torch.log(torch.diagonal(chol)).sum()
    return -0.5 * n * (d * LOG_2PI + logdet + tr)


def mean_cov(x: torch.Tensor):
    """The sample mean (d,) and the biased sample covariance (d, d) of the rows of x (each row
    divided by sqrt(n) before the product, so the sum cannot overflow where S itself does not)."""
    mean = x.mean(0)
    xc = (x - mean) / x.shape[0] ** 0.5
    return mean, xc.T @ xc


def variance_floor(S: torch.Tensor, min_var, kind: str = "fa") -> torch.Tensor:
    """The floor of the noise variances, relative to the data's scale (so EM is equivariant
    under rescaling of the data): FA psi_j >= min_var * S_jj (a constant column: min_var times
    the mean variance); PPCA sigma^2 >= min_var * mean_j S_jj. Shape (d,); a tensor ``min_var``
    (d,) is taken as the floor itself."""
    if torch.is_tensor(min_var):
        return min_var.to(S)
    diag = torch.diagonal(S)
    mean = diag.mean()
    if kind == "ppca":
        return (min_var * mean).expand(diag.shape[0]).clone()
    return min_var * torch.where(diag > 0, diag, mean)


def pca_init(S: torch.Tensor, k: int, kind: str, min_var: float):
    """PPCA closed form on S (Tipping & Bishop 1999, eq. 7-8): sigma^2 = mean of the d - k
    smallest eigenvalues, W = U_k (Lambda_k - sigma^2 I)^(1/2); FA takes psi = diag(S - W W^T)."""
    d = S.shape[0]
    floor = torch.as_tensor(min_var, dtype=S.dtype, device=S.device).expand(d)
    evals, evecs = torch.linalg.eigh(S)
    evals, evecs = evals.flip(0), evecs.flip(1)
    sigma2 = evals[k:].mean().clamp_min(floor.min())
    W = evecs[:, :k] * (evals[:k] - sigma2).clamp_min(0).sqrt()
    if kind == "ppca":
        psi = sigma2.clamp_min(floor.max()).expand(d).clone()
    else:
        psi = (torch.diagonal(S) - (W * W).sum(1)).clamp_min(floor)
    return W, psi


def init_from_cov(S, k, kind, min_var, generator: torch.Generator, jitter=1e-2):
    """:func:`pca_init` perturbed with a seeded N(0, (jitter * rms sd)^2) draw, so restarts differ."""
    W, psi = pca_init(S, k, kind, min_var)
    scale = jitter * torch.diagonal(S).mean().sqrt()
    W = W + scale * torch.randn(W.shape, generator=generator, dtype=torch.float64).to(W)
    return W, psi


def ppca_ml(x, k: int, *, min_var: float = 0.0) -> FAParams:
    """Closed-form maximum-likelihood PPCA (Tipping & Bishop 1999, eq. 7-8), up to rotation."""
    x = as_data(x, "x", min_rows=2)
    k = integer(k, "latent_dim", minimum=1, maximum=x.shape[1] - 1)
    mean, S = mean_cov(x)
    W, psi = pca_init(S, k, "ppca", min_var)
    return FAParams(W, mean, psi)


def em_update(S: torch.Tensor, W, psi, kind: str, min_var: float):
    """One EM iteration on S (Ghahramani & Hinton 1996; PRML 12.69-12.70 summed over n):
    G = L^-1, beta = G W^T Psi^-1,  E[z] = beta (x - mu),  sum E[zz^T]/n = G + beta S beta^T,
    W' = S beta^T (G + beta S beta^T)^-1,  Psi' = diag(S - W' beta S)  (PPCA: sigma^2' = tr/d).
    Also returns the total log-likelihood / n of the *input* (W, psi), at no extra cost."""
    d = S.shape[0]
    WtPi, chol = precision_factor(W, psi)
    G = torch.cholesky_inverse(chol)
    SB = S @ WtPi.T  # S Psi^-1 W (d, k)
    inner = WtPi @ SB  # W^T Psi^-1 S Psi^-1 W
    diagS = torch.diagonal(S)
    # objective of the input parameters (see loglik_from_cov)
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


def check_factor_data(x, latent_dim: int, dim: int | None, *, allow_nan: bool = False):
    """Data for a k-factor model: an (n, d) array with d == ``dim`` (when set) and k < d, whose
    second moments are representable in its dtype (:func:`check_second_moments`)."""
    x = as_data(x, "x", allow_nan=allow_nan)
    d = x.shape[1]
    if dim is not None and d != dim:
        raise ValueError(f"x: expected {dim} columns, got {d}")
    if latent_dim >= d:
        raise ValueError(f"latent_dim: must be < the data dimension {d}, got {latent_dim}")
    check_second_moments(x)
    return x


def check_second_moments(x: torch.Tensor, name: str = "x") -> None:
    """Every covariance computation needs the columns' sums of squares: an error naming ``name``
    when n max|x|^2 overflows with a factor 100 of headroom (for the products the algorithms
    form), or when a non-constant column's mean squared deviation underflows below the dtype's
    smallest normal number (float32 data of size 1e-20: every later quantity is NaN), or when
    no column varies (float32 data of size 1e-150 are all 0: said so)."""
    xd = x.detach()
    if xd.shape[0] < 1:
        return
    with one_thread(xd):  # fast path on one thread: finite, normal variances, headroom
        # headroom: n * max|x|^2 (any sum of squares) times 100 (the products algorithms form)
        lo, hi = torch.aminmax(xd, dim=0)  # one pass, no copies (NaN -> the slow path)
        top = torch.maximum(hi, -lo)
        room = bool(torch.isfinite(100.0 * xd.shape[0] * top * top).all())
        # with that headroom the squared deviations cannot overflow (2 passes, faster than var)
        ss = (xd - xd.mean(0)).square_().mean(0)
        if room and bool(torch.isfinite(ss).all()) and bool((ss >= torch.finfo(x.dtype).tiny).all()):
            return
    top = torch.nan_to_num(xd, nan=0.0).abs().amax(0)
    room = bool(torch.isfinite(100.0 * xd.shape[0] * top * top).all())
    finite = torch.nan_to_num(xd, nan=0.0)
    dev = (finite - finite.mean(0)) / xd.shape[0] ** 0.5
    ss = (dev * dev).sum(0)
    kind = str(x.dtype).removeprefix("torch.")
    if not (room and bool(torch.isfinite(ss).all())):
        raise ValueError(f"{name}: values up to {float(xd.abs().nan_to_num(0).max()):.3g} overflow "
                         f"the data's second moments in {kind}; rescale the data")
    spread = dev.abs().amax(0) > 0
    tiny = torch.finfo(x.dtype).tiny
    if not bool(spread.any()) and xd.shape[0] > 1:  # no column varies: nothing to model
        if not bool(finite.any()) and x.dtype != torch.float64:
            raise ValueError(f"{name}: every value is 0 in {kind}: data smaller than "
                             f"{torch.finfo(x.dtype).smallest_normal:.1g} underflow {kind} (to "
                             "0 when below its smallest subnormal); rescale the data or use "
                             "float64")
        raise ValueError(f"{name}: every column is constant (no variance to model)")
    if bool((spread & (ss < tiny)).any()):
        raise ValueError(f"{name}: the data's variances (as small as {float(ss[spread].min()):.3g}) "
                         f"underflow {kind}; rescale the data or use float64")


__all__ = [
    "KINDS", "LOG_2PI", "check_factor_data", "check_second_moments", "cholesky", "em_update",
    "gaussian_loglik", "init_from_cov", "loglik_from_cov", "mean_cov", "pca_init", "ppca_ml",
    "precision_factor", "svd_update", "variance_floor",
]
