"""Constraints, transforms and distributions of the Bayesian FA (:mod:`elbolab.models.fa.bayes`).

* :class:`LowerTrapezoidal`: d x k matrices, zero above the diagonal, positive on it; its bijection
  from R^m is :class:`FreeToLoadings` (registered with ``biject_to`` / ``transform_to``).
* :class:`IdentifiedLoadings`: the exact law of the identified representative L = W Q of the
  rotation orbit of W with iid Gaussian entries; :func:`identify_loadings` computes L from W.
* :class:`Recoordinated`: a distribution unchanged but for the coordinates NUTS moves in
  (:class:`InCoordinates`, :class:`AffineVector`).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution
from torch.distributions import biject_to, constraints, transform_to
from torch.distributions.transforms import ComposeTransform, Transform

from elbolab.models.numerics import LOG_2PI

# -- the identified loadings -----------------------------------------------------------------


def tril_layout(d: int, k: int):
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
        self.rows, self.cols, self.diag = tril_layout(d, k)
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
        rows, _, _ = tril_layout(d, k)
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


def into_lower_trapezoidal(L: torch.Tensor, floor: float) -> torch.Tensor:
    """L with its entries above the diagonal set to exactly 0 and its diagonal raised to at least
    ``floor`` > 0: a point of :class:`LowerTrapezoidal` (whose check needs exact zeros and a
    positive diagonal, and whose bijection takes the log of the diagonal). Entries already in the
    support are returned unchanged, bit for bit."""
    L = torch.tril(L)
    k = L.shape[-1]
    j = torch.arange(k, device=L.device)
    L[..., j, j] = L[..., j, j].clamp_min(floor)
    return L


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
