"""Normalizing-flow guides: an amortized flow encoder and a local (per-data-point) flow.

``flow`` (amortized; Rezende & Mohamed 2015, Kingma et al. 2016): a diagonal Gaussian from an MLP
encoder pushed through T invertible transforms of ``pyro.distributions.transforms``,

    z_0 ~ N(m(x_n), diag s(x_n)^2),   z = f_T o ... o f_1 (z_0),
    log q(z | x_n) = log N(z_0; m, s^2) - sum_t log |det df_t/dz_{t-1}|.

``flow`` in {"iaf" (affine autoregressive), "coupling" (affine coupling, halves swapped between
layers), "spline" (rational-quadratic spline coupling, Durkan et al. 2019)}; with
``conditional=True`` each transform's network also reads x_n (``conditional_*`` transforms).

``local-flow`` (the q*_Flow of Cremer, Li & Duvenaud 2018): per data point a diagonal Gaussian
followed by ``num_layers`` affine couplings whose small networks have their OWN weights per data
point (batched with einsum), so optimizing all points at once is optimizing each separately (Adam
is per coordinate; use no global gradient-norm clipping). The couplings start at the identity,
so after :meth:`LocalGuide.warm_start` q equals the warm-start Gaussian.
"""

from __future__ import annotations

import contextlib
import math

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn
from torch.distributions import constraints

from elbolab.guides.amortized import EncoderGuide, data_dim_of, encoder_body
from elbolab.guides.local import LocalGuide, data_of, latent_dim_of, no_extra
from elbolab.models.numerics import ACTIVATIONS
from elbolab.models.validate import choice, integer

FLOWS = ("iaf", "coupling", "spline")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class DtypeSafeInverse(torch.distributions.Transform):
    """Wraps a transform whose ``_inverse`` allocates in the default dtype (Pyro 1.9's
    ``AffineAutoregressive`` uses ``torch.zeros(...)`` without a dtype, which breaks float64):
    the inverse runs with the default dtype set to the input's. Caching stays in the inner
    transform (it sees the same tensors)."""

    bijective = True

    def __init__(self, inner: torch.distributions.Transform):
        super().__init__(cache_size=0)
        self.inner = inner
        self.domain, self.codomain = inner.domain, inner.codomain

    @property
    def sign(self):
        return self.inner.sign

    def _call(self, x):
        return self.inner(x)

    def _inverse(self, y):
        with _default_dtype(y.dtype):
            return self.inner.inv(y)

    def log_abs_det_jacobian(self, x, y):
        return self.inner.log_abs_det_jacobian(x, y)


class FlowEncoderGuide(EncoderGuide):
    """q(z_n | x_n): MLP diagonal Gaussian followed by ``num_flows`` transforms (module docs)."""

    kind = "flow"
    diagonal = False

    def __init__(self, data_dim, latent_dim, *, hidden=(64,), activation="softplus", flow="iaf",
                 num_flows=2, flow_hidden=None, conditional=False, like, init_scale=1.0,
                 min_scale=1e-6, moment_samples=256, site="z", plate="data", name=None):
        super().__init__(data_dim, latent_dim, init_scale=init_scale, min_scale=min_scale,
                         site=site, plate=plate, name=name)
        if isinstance(hidden, int):
            hidden = (hidden,)
        self.hidden = tuple(integer(h, "hidden", minimum=1) for h in hidden)
        self.activation = choice(activation, "activation", list(ACTIVATIONS))
        self.flow = choice(flow, "flow", FLOWS)
        self.num_flows = integer(num_flows, "num_flows", minimum=0)
        self.conditional = bool(conditional)
        self.moment_samples = integer(moment_samples, "moment_samples", minimum=2)
        k, d = self.latent_dim, self.data_dim
        if self.num_flows and k < 2:
            raise ValueError(f"latent_dim: flows need latent_dim >= 2, got {k}")
        if flow_hidden is None:
            flow_hidden = (max(16, 4 * k),)
        if isinstance(flow_hidden, int):
            flow_hidden = (flow_hidden,)
        self.flow_hidden = [integer(h, "flow_hidden", minimum=1) for h in flow_hidden]
        self.config.update(hidden=list(self.hidden), activation=self.activation, flow=self.flow,
                           num_flows=self.num_flows, flow_hidden=list(self.flow_hidden),
                           conditional=self.conditional, moment_samples=self.moment_samples)
        # built in the default dtype, then moved (the initial weights do not depend on `like`)
        self.body = encoder_body(d, self.hidden, self.activation)
        width = self.hidden[-1] if self.hidden else d
        self.loc_net = nn.Linear(width, k)
        self.scale_net = nn.Linear(width, k)
        self._init_scale_head(self.scale_net)
        self.transforms = nn.ModuleList(self._make(i) for i in range(self.num_flows))
        # coupling layers transform the second half only: reverse the order between layers
        self.register_buffer("reverse", torch.arange(k - 1, -1, -1), persistent=False)
        self.to(device=like.device, dtype=like.dtype)

    def _make(self, i: int) -> nn.Module:
        k, d, hid = self.latent_dim, self.data_dim, self.flow_hidden
        if self.conditional:
            if self.flow == "iaf":
                return T.conditional_affine_autoregressive(k, d, hidden_dims=hid)
            if self.flow == "coupling":
                return T.conditional_affine_coupling(k, d, hidden_dims=hid)
            return T.conditional_spline_autoregressive(k, d, hidden_dims=hid)
        if self.flow == "iaf":
            return T.affine_autoregressive(k, hidden_dims=hid)
        if self.flow == "coupling":
            return T.affine_coupling(k, hidden_dims=hid)
        return T.spline_coupling(k, hidden_dims=hid)

    def base(self, x, idx=None):
        """(loc, scale) of the base Gaussian and the encoder input rows."""
        rows = self._inputs(x, idx)
        h = self.body(rows)
        return self.loc_net(h), self.positive_scale(self.scale_net(h)), rows

    def distribution(self, x, idx=None):
        loc, scale, rows = self.base(x, idx)
        chain = []
        for i, t in enumerate(self.transforms):
            t = t.condition(rows) if self.conditional else t
            chain.append(DtypeSafeInverse(t) if self.flow == "iaf" else t)
            if self.flow != "iaf" and i < len(self.transforms) - 1:
                chain.append(T.Permute(self.reverse))
        base = dist.Normal(loc, scale).to_event(1)
        return dist.TransformedDistribution(base, chain) if chain else base

    @torch.no_grad()
    def moments(self, x, idx=None):
        """Sample mean and Cholesky factor of the sample covariance (``moment_samples`` draws),
        e.g. to warm-start a local Gaussian guide; exact for ``num_flows=0``."""
        q = self.distribution(x, idx)
        if not self.transforms:
            return q.base_dist.loc, torch.diag_embed(q.base_dist.scale)
        z = q.sample((self.moment_samples,))  # (S, b, k)
        mean = z.mean(0)
        c = z - mean
        cov = torch.einsum("sbi,sbj->bij", c, c) / (z.shape[0] - 1)
        eye = torch.eye(self.latent_dim, device=z.device, dtype=z.dtype)
        return mean, torch.linalg.cholesky(cov + 1e-6 * eye)


class PointwiseCoupling(torch.distributions.Transform):
    """Affine coupling with separate network weights per data point.

    y_a = z_a,  y_b = z_b * exp(s) + t,  (s, t) = g_n(z_a),
    g_n(u) = W2_n tanh(W1_n u + b1_n) + b2_n;
    s is soft-clamped to (-clamp, clamp). log |det| = sum s. Weights: W1 (b, |a|, H),
    b1 (b, H), W2 (b, H, 2|b|), b2 (b, 2|b|) for the b points of the batch; z (..., b, k).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, W1, b1, W2, b2, cond_idx, out_idx, clamp=5.0, cache_size=1):
        super().__init__(cache_size=cache_size)
        self.W1, self.b1, self.W2, self.b2 = W1, b1, W2, b2
        self.cond_idx, self.out_idx, self.clamp = cond_idx, out_idx, clamp
        self.inv_perm = torch.argsort(torch.cat([cond_idx, out_idx]))

    def _st(self, za):
        h = torch.tanh(torch.einsum("...bi,bih->...bh", za, self.W1) + self.b1)
        o = torch.einsum("...bh,bho->...bo", h, self.W2) + self.b2
        s, t = o.chunk(2, dim=-1)
        return self.clamp * torch.tanh(s / self.clamp), t

    def _join(self, a, b):
        return torch.cat([a, b], dim=-1).index_select(-1, self.inv_perm)

    def _call(self, z):
        za, zb = z.index_select(-1, self.cond_idx), z.index_select(-1, self.out_idx)
        s, t = self._st(za)
        return self._join(za, zb * torch.exp(s) + t)

    def _inverse(self, y):
        ya, yb = y.index_select(-1, self.cond_idx), y.index_select(-1, self.out_idx)
        s, t = self._st(ya)
        return self._join(ya, (yb - t) * torch.exp(-s))

    def log_abs_det_jacobian(self, z, y):
        s, _ = self._st(z.index_select(-1, self.cond_idx))
        return s.sum(-1)


class LocalFlowGuide(LocalGuide):
    """Per-data-point diagonal Gaussian + ``num_layers`` per-point affine couplings."""

    kind = "local-flow"
    diagonal = False

    def __init__(self, n, latent_dim, *, like, num_layers=4, hidden=16, init_scale=1.0,
                 moment_samples=256, seed=0, site="z", plate="data", name=None):
        super().__init__(n, latent_dim, like=like, init_scale=init_scale, site=site, plate=plate,
                         name=name)
        k = self.latent_dim
        if k < 2:
            raise ValueError(f"latent_dim: the local flow needs latent_dim >= 2, got {k}")
        self.num_layers = integer(num_layers, "num_layers", minimum=0)
        self.width = integer(hidden, "hidden", minimum=1)
        self.moment_samples = integer(moment_samples, "moment_samples", minimum=2)
        kw = self._like
        self.loc = nn.Parameter(torch.zeros(self.n, k, **kw))
        self.log_scale = nn.Parameter(torch.full((self.n, k), math.log(self.init_scale), **kw))
        half = k // 2
        first = torch.arange(half, device=like.device)
        second = torch.arange(half, k, device=like.device)
        gen = torch.Generator().manual_seed(integer(seed, "seed", minimum=0))
        self.W1, self.b1 = nn.ParameterList(), nn.ParameterList()
        self.W2, self.b2 = nn.ParameterList(), nn.ParameterList()
        self._splits = []
        for i in range(self.num_layers):
            cond, out = (first, second) if i % 2 == 0 else (second, first)
            a, b = len(cond), len(out)
            w1 = torch.randn(self.n, a, self.width, generator=gen, dtype=torch.float64)
            w1 = w1 / math.sqrt(a)
            self.W1.append(nn.Parameter(w1.to(**kw)))
            self.b1.append(nn.Parameter(torch.zeros(self.n, self.width, **kw)))
            # zero output layer: every coupling starts as the identity
            self.W2.append(nn.Parameter(torch.zeros(self.n, self.width, 2 * b, **kw)))
            self.b2.append(nn.Parameter(torch.zeros(self.n, 2 * b, **kw)))
            self._splits.append((cond, out))

    def distribution(self, x, idx=None):
        rows = self._rows(x, idx)
        base = dist.Normal(self.loc[rows], self.log_scale[rows].exp()).to_event(1)
        chain = [PointwiseCoupling(self.W1[i][rows], self.b1[i][rows], self.W2[i][rows],
                                   self.b2[i][rows], *self._splits[i])
                 for i in range(self.num_layers)]
        return dist.TransformedDistribution(base, chain) if chain else base

    @torch.no_grad()
    def moments(self, x, idx=None):
        """Sample mean and covariance Cholesky factor (``moment_samples`` draws)."""
        z = self.distribution(x, idx).sample((self.moment_samples,))
        mean = z.mean(0)
        c = z - mean
        cov = torch.einsum("sbi,sbj->bij", c, c) / (z.shape[0] - 1)
        eye = torch.eye(self.latent_dim, device=z.device, dtype=z.dtype)
        return mean, torch.linalg.cholesky(cov + 1e-6 * eye)

    @torch.no_grad()
    def set_moments(self, loc, scale_tril):
        # base Gaussian gets the marginal standard deviations (row norms of L); couplings reset
        self.loc.copy_(loc)
        self.log_scale.copy_(scale_tril.pow(2).sum(-1).sqrt().log())
        for p in (*self.W2, *self.b2):
            p.zero_()


def build_flow(family, x, *, latent_dim=None, hidden=(64,), activation="softplus", flow="iaf",
               num_flows=2, flow_hidden=None, conditional=False, site="z", plate="data",
               name=None, init_scale=1.0, min_scale=1e-6, **options):
    """``GuideSpec.build`` of the amortized flow encoder."""
    no_extra(options, "flow")
    x = data_of(family, x)
    return FlowEncoderGuide(data_dim_of(x), latent_dim_of(family, latent_dim), hidden=hidden,
                            activation=activation, flow=flow, num_flows=num_flows,
                            flow_hidden=flow_hidden, conditional=conditional, like=x,
                            init_scale=init_scale, min_scale=min_scale, site=site, plate=plate,
                            name=name)


def build_local_flow(family, x, *, latent_dim=None, num_layers=4, hidden=16, init_scale=1.0,
                     seed=0, site="z", plate="data", name=None, **options):
    """``GuideSpec.build`` of the per-data-point flow (q*_Flow)."""
    no_extra(options, "local-flow")
    x = data_of(family, x)
    return LocalFlowGuide(x.shape[0], latent_dim_of(family, latent_dim), like=x,
                          num_layers=num_layers, hidden=hidden, init_scale=init_scale, seed=seed,
                          site=site, plate=plate, name=name)


__all__ = ["FLOWS", "FlowEncoderGuide", "LocalFlowGuide", "PointwiseCoupling", "build_flow",
           "build_local_flow"]
