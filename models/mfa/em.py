"""Parameters, exact marginal densities and EM of the mixture of factor analysers
(Ghahramani & Hinton 1996, "The EM algorithm for mixtures of factor analyzers", CRG-TR-96-1).

    c_n ~ Cat(pi),  z_n ~ N(0, I_k),  x_n | c_n = j, z_n ~ N(W_j z_n + mu_j, Psi)

with one diagonal Psi = diag(psi) shared by all K components (as in the paper). Integrating z out,

    p(x_n) = sum_j pi_j N(x_n; mu_j, C_j),   C_j = W_j W_j^T + Psi                       (1)

evaluated per component with the determinant lemma and Woodbury through L_j = I + W_j^T Psi^-1 W_j
(:func:`elbolab.models.fa.linalg.gaussian_loglik`), O(n K d k). The posterior of (c_n, z_n) is exact:

    h_nj = p(c_n = j | x_n) = pi_j N(x_n; mu_j, C_j) / p(x_n)                             (2)
    z_n | x_n, c_n = j ~ N(m_nj, G_j),  G_j = L_j^-1,  m_nj = G_j W_j^T Psi^-1 (x_n - mu_j)  (3)

EM (the paper's eqs. 11-15, in the augmented form W~_j = [W_j mu_j], z~ = [z; 1]):

    A_j = sum_n h_nj x_n E[z~ | x_n, j]^T,   B_j = sum_n h_nj E[z~ z~^T | x_n, j]
    W~_j' = A_j B_j^-1,   psi' = diag(sum_n x_n x_n^T - sum_j W~_j' A_j^T) / n,   pi_j' = sum_n h_nj / n

with E[z~] = [m_nj; 1] and E[z~ z~^T] = [[G_j + m_nj m_nj^T, m_nj], [m_nj^T, 1]]. Each update
maximizes the expected complete log likelihood exactly (psi clamped at ``min_var``, still the
constrained maximizer, as Q is unimodal in each psi_i), so the exact log likelihood (1) summed
over the data never decreases. A component whose total responsibility falls below 1e-10 n keeps
its W_j, mu_j (a partial M-step: still no decrease).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from elbolab.models.fa.linalg import gaussian_loglik, mean_cov, pca_init, precision_factor
from elbolab.models.gmm.means import spread_means
from elbolab.models.validate import float_tensor_fields, integer

#: the noise model: one diagonal Psi shared by every component (Ghahramani & Hinton 1996)
NOISE = "shared-diagonal"


@dataclass
class MFAParams:
    """pi (K,) mixing weights, W (K, d, k) loadings, mu (K, d) means, psi (d,) shared noise."""

    pi: torch.Tensor
    W: torch.Tensor
    mu: torch.Tensor
    psi: torch.Tensor

    def __post_init__(self):
        float_tensor_fields(self, ("pi", "W", "mu", "psi"))
        if self.W.dim() != 3:
            raise ValueError(f"W: expected shape (K, d, k), got {tuple(self.W.shape)}")
        K, d, _ = self.W.shape
        for name, shape in (("pi", (K,)), ("mu", (K, d)), ("psi", (d,))):
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {got}")
        if not (self.psi > 0).all():
            raise ValueError("psi: noise variances must be > 0")
        if not ((self.pi >= 0).all() and abs(float(self.pi.sum()) - 1) < 1e-6):
            raise ValueError(f"pi: must be non-negative and sum to 1, got {self.pi.tolist()}")

    @property
    def K(self) -> int:
        return self.W.shape[0]

    @property
    def dim(self) -> int:
        return self.W.shape[1]

    @property
    def latent_dim(self) -> int:
        return self.W.shape[2]

    def to(self, ref=None, dtype=None) -> MFAParams:
        """Move to a reference tensor's device and dtype (or an explicit device and dtype)."""
        device = ref.device if isinstance(ref, torch.Tensor) else ref
        dtype = ref.dtype if isinstance(ref, torch.Tensor) else dtype
        return MFAParams(*(t.to(device=device, dtype=dtype) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.pi, self.W, self.mu, self.psi

    def as_dict(self) -> dict[str, torch.Tensor]:
        """By the names of the family's ``pyro.param`` sites."""
        return dict(zip(("pi", "W", "mu", "psi"), self.tensors()))

    def covariances(self) -> torch.Tensor:
        """C_j = W_j W_j^T + Psi (K, d, d)."""
        return self.W @ self.W.transpose(-1, -2) + torch.diag(self.psi)


def component_log_marginals(x: torch.Tensor, p: MFAParams) -> torch.Tensor:
    """log pi_j + log N(x_n; mu_j, W_j W_j^T + Psi), shape (n, K) (eq. 1 before the sum)."""
    return torch.log(p.pi) + gaussian_loglik(x, p.W, p.mu, p.psi).transpose(0, 1)


def log_marginal(x: torch.Tensor, p: MFAParams) -> torch.Tensor:
    """log p(x_n) (n,) by eq. (1)."""
    return torch.logsumexp(component_log_marginals(x, p), dim=-1)


@dataclass
class MFAState:
    """An EM iterate: the parameters, the exact total log likelihood at them (nats), and the
    E-step at them: responsibilities h (n, K) (eq. 2), posterior means m (K, n, k) and shared
    covariances G (K, k, k) of z per component (eq. 3)."""

    params: MFAParams
    loglik: float
    resp: torch.Tensor
    post_mean: torch.Tensor
    post_cov: torch.Tensor


def e_step(x: torch.Tensor, p: MFAParams) -> MFAState:
    """Eqs. (1)-(3) at ``p``, O(n K d k)."""
    lj = component_log_marginals(x, p)
    ll = torch.logsumexp(lj, dim=-1)
    resp = torch.exp(lj - ll.unsqueeze(-1))
    WtPi, chol = precision_factor(p.W, p.psi)  # (K, k, d), (K, k, k)
    b = (x.unsqueeze(0) - p.mu.unsqueeze(1)) @ WtPi.transpose(-1, -2)  # (K, n, k)
    mean = torch.cholesky_solve(b.transpose(-1, -2), chol).transpose(-1, -2)
    return MFAState(p, float(ll.sum()), resp, mean, torch.cholesky_inverse(chol))


def m_step(x: torch.Tensor, s: MFAState, min_var: float) -> MFAParams:
    """Ghahramani & Hinton's M-step (module docstring) from the E-step held in ``s``."""
    n = x.shape[0]
    h = s.resp.transpose(0, 1)  # (K, n)
    k = s.post_mean.shape[-1]
    Nj = h.sum(1)
    ez = torch.cat([s.post_mean, torch.ones_like(s.post_mean[..., :1])], dim=-1)  # (K, n, k+1)
    A = torch.einsum("jn,nd,jne->jde", h, x, ez)
    B = torch.einsum("jn,jne,jnf->jef", h, ez, ez)
    B[:, :k, :k] += Nj[:, None, None] * s.post_cov
    live = Nj > 1e-10 * n
    Bs = torch.where(live[:, None, None], B, torch.eye(k + 1, dtype=x.dtype, device=x.device))
    Wt = torch.linalg.solve(Bs, A.transpose(-1, -2)).transpose(-1, -2)  # (K, d, k+1)
    old = torch.cat([s.params.W, s.params.mu.unsqueeze(-1)], dim=-1)
    Wt = torch.where(live[:, None, None], Wt, old)
    # diag(sum_n x x^T - sum_j W~_j A_j^T), the dead components' A_j ~ 0
    psi = ((x * x).sum(0) - (Wt * A).sum(dim=(0, 2))) / n
    return MFAParams(Nj / n, Wt[..., :k].contiguous(), Wt[..., k].contiguous(),
                     psi.clamp_min(min_var))


def init_params(x: torch.Tensor, K: int, k: int, min_var: float,
                generator: torch.Generator) -> MFAParams:
    """A start for EM or SVI: means by k-means++ seeding (``elbolab.models.gmm.model.spread_means``), each
    component's W_j the PPCA closed form on the covariance of the points nearest its mean (the
    whole data when fewer than k + 2), psi = diag of the data covariance, pi uniform."""
    mu = spread_means(x, K, generator)
    nearest = ((x.unsqueeze(1) - mu.unsqueeze(0)) ** 2).sum(-1).argmin(1)
    _, S_all = mean_cov(x)
    Ws = []
    for j in range(K):
        pts = x[nearest == j]
        S = mean_cov(pts)[1] if pts.shape[0] >= k + 2 else S_all
        Ws.append(pca_init(S, k, "fa", min_var)[0])
    pi = torch.full((K,), 1.0 / K, dtype=x.dtype, device=x.device)
    return MFAParams(pi, torch.stack(Ws), mu, torch.diagonal(S_all).clamp_min(min_var).clone())


class MFAEM:
    """Maximum likelihood by Ghahramani & Hinton's EM (module docstring); objective: the exact
    total log likelihood (bound ``log-likelihood``), which never decreases. ``start``: start
    there (every restart), else :func:`init_params` with the engine's generator."""

    bound = "log-likelihood"
    guide = "exact-posterior"

    def __init__(self, K: int, latent_dim: int, *, min_var: float = 1e-6,
                 start: MFAParams | None = None):
        self.K = integer(K, "K", minimum=1)
        self.latent_dim = integer(latent_dim, "latent_dim", minimum=1)
        self.min_var = min_var
        self.start = start

    def init(self, x: torch.Tensor, generator: torch.Generator) -> MFAState:
        if self.start is not None:
            p = self.start.to(x)
        else:
            p = init_params(x, self.K, self.latent_dim, self.min_var, generator)
        return e_step(x, p)

    def step(self, x: torch.Tensor, state: MFAState) -> MFAState:
        return e_step(x, m_step(x, state, self.min_var))

    def objective(self, x: torch.Tensor, state: MFAState) -> float:
        """sum_n log p(x_n) at the state's parameters (eq. 1), nats, every constant kept."""
        return state.loglik

    def posterior(self, x: torch.Tensor, state: MFAState) -> dict[str, torch.Tensor]:
        """The parameters by their ``pyro.param`` names, and the responsibilities (n, K)."""
        return {**state.params.as_dict(), "responsibilities": state.resp}


__all__ = ["MFAEM", "MFAParams", "MFAState", "NOISE", "component_log_marginals", "e_step",
           "init_params", "log_marginal", "m_step"]
