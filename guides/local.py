"""Local (not amortized) Gaussian guides: one q(z_n) per data point, and the shared base class.

Every guide here is for a model whose latent site is a per-data-point ``z`` of shape (n, k)
(``.to_event(1)``; or shape (n,), event shape (), with ``scalar_site``) inside
``pyro.plate("data", n, dim=-1)``. A guide is a ``torch.nn.Module`` registered with ``pyro.module`` on each call, so its ``state_dict`` is the whole fitted state and
it is called like the model: ``guide(x, subsample_size=None)``. With ``subsample_size`` it opens
the same plate, so Pyro replays the guide's subsample indices into the model.

* ``mean-field``:  q(z_n) = prod_j N(z_nj; m_nj, s_nj^2)   params loc (n, k), log_scale (n, k)
* ``full-rank``:   q(z_n) = N(z_n; m_n, L_n L_n^T)          params loc (n, k), raw (n, k, k);
  L_n = tril(raw, -1) + diag(exp(diag(raw))), i.e. ``transform_to(constraints.lower_cholesky)``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions.transforms import ReshapeTransform

from elbolab.models.validate import as_data, integer, positive


class LatentGuide(nn.Module):
    """Base class: a Gaussian q(z_n | x_n) per data point, sampled inside the data plate.

    Subclasses implement :meth:`moments` -> (loc (b, k), scale_tril (b, k, k)) for the rows
    ``idx`` of ``x`` and may override :meth:`distribution` (diagonal guides sample cheaper).
    """

    kind = "latent"
    diagonal = False
    amortized = False
    #: True for a site with event shape () (a scalar z_n per point, no ``.to_event(1)``): q is
    #: built with latent_dim 1 and sampled with event shape () (see :meth:`site_distribution`)
    scalar_site = False

    def __init__(self, latent_dim: int, *, site: str = "z", plate: str = "data", name=None):
        super().__init__()
        self.latent_dim = integer(latent_dim, "latent_dim", minimum=1)
        if not isinstance(site, str) or not site:
            raise ValueError(f"site: must be a non-empty string, got {site!r}")
        self.site = site
        self.plate = plate
        self.pyro_name = name or f"guide_{self.kind}"

    # -- what q is --------------------------------------------------------------------------
    def moments(self, x: torch.Tensor, idx: torch.Tensor | None = None):
        raise NotImplementedError

    def distribution(self, x: torch.Tensor, idx: torch.Tensor | None = None):
        """q(z_n | x_n) for the rows ``idx`` (all rows when None): batch (b,), event (k,)."""
        loc, tril = self.moments(x, idx)
        if self.diagonal:
            return dist.Normal(loc, tril.diagonal(dim1=-2, dim2=-1)).to_event(1)
        return dist.MultivariateNormal(loc, scale_tril=tril)

    def site_distribution(self, x: torch.Tensor, idx: torch.Tensor | None = None):
        """q(z_n | x_n) as sampled at the model's site: :meth:`distribution`, with its event shape
        (1,) reshaped to () for a scalar site (``scalar_site``)."""
        q = self.distribution(x, idx)
        if not self.scalar_site:
            return q
        if self.latent_dim != 1:
            raise ValueError(f"{self.site}: a scalar site needs latent_dim=1, got {self.latent_dim}")
        return dist.TransformedDistribution(q, [ReshapeTransform((1,), ())])

    def register(self) -> None:
        """Put this module's parameters into the active Pyro param store."""
        if any(True for _ in self.parameters()):
            pyro.module(self.pyro_name, self)

    # -- the Pyro guide ---------------------------------------------------------------------
    def forward(self, x, subsample_size=None, **kwargs):
        n = x.shape[0]
        self.register()
        plate = pyro.plate(self.plate, n, subsample_size=subsample_size, dim=-1, device=x.device)
        with plate as idx:
            return pyro.sample(self.site, self.site_distribution(x, idx))

    def extra_repr(self) -> str:
        return f"site={self.site!r}, latent_dim={self.latent_dim}, name={self.pyro_name!r}"


class LocalGuide(LatentGuide):
    """Shared parts of the per-data-point guides: fixed n, indexing, warm start."""

    def __init__(self, n: int, latent_dim: int, *, like: torch.Tensor, init_scale: float = 1.0,
                 site: str = "z", plate: str = "data", name=None):
        super().__init__(latent_dim, site=site, plate=plate, name=name)
        self.n = integer(n, "n", minimum=1)
        self.init_scale = positive(init_scale, "init_scale")
        self._like = {"device": like.device, "dtype": like.dtype}

    def _rows(self, x, idx):
        if x is not None and x.shape[0] != self.n:
            raise ValueError(
                f"data: this local guide holds {self.n} data points, got {x.shape[0]} "
                "(local guides are not amortized: build one for these data)"
            )
        return slice(None) if idx is None else idx

    @torch.no_grad()
    def warm_start(self, source, x: torch.Tensor) -> LocalGuide:
        """Set q(z_n) from another guide's q(z_n | x_n) (e.g. an amortized encoder), in place."""
        self._rows(x, None)
        loc, tril = source.moments(x)
        self.set_moments(loc.detach(), tril.detach())
        return self

    def set_moments(self, loc: torch.Tensor, scale_tril: torch.Tensor) -> None:
        raise NotImplementedError


class MeanFieldGuide(LocalGuide):
    """q(z_n) = prod_j N(m_nj, s_nj^2), one diagonal Gaussian per data point."""

    kind = "mean-field"
    diagonal = True

    def __init__(self, n, latent_dim, *, like, init_scale=1.0, site="z", plate="data", name=None):
        super().__init__(n, latent_dim, like=like, init_scale=init_scale, site=site, plate=plate,
                         name=name)
        self.loc = nn.Parameter(torch.zeros(self.n, self.latent_dim, **self._like))
        self.log_scale = nn.Parameter(
            torch.full((self.n, self.latent_dim), math.log(self.init_scale), **self._like))

    def moments(self, x, idx=None):
        rows = self._rows(x, idx)
        scale = self.log_scale[rows].exp()
        return self.loc[rows], torch.diag_embed(scale)

    def distribution(self, x, idx=None):
        rows = self._rows(x, idx)
        return dist.Normal(self.loc[rows], self.log_scale[rows].exp()).to_event(1)

    @torch.no_grad()
    def set_moments(self, loc, scale_tril):
        # the marginal standard deviations of N(loc, L L^T) are the row norms of L
        self.loc.copy_(loc)
        self.log_scale.copy_(scale_tril.pow(2).sum(-1).sqrt().log())


class FullRankGuide(LocalGuide):
    """q(z_n) = N(m_n, L_n L_n^T), one full-covariance Gaussian per data point."""

    kind = "full-rank"

    def __init__(self, n, latent_dim, *, like, init_scale=1.0, site="z", plate="data", name=None):
        super().__init__(n, latent_dim, like=like, init_scale=init_scale, site=site, plate=plate,
                         name=name)
        k = self.latent_dim
        self.loc = nn.Parameter(torch.zeros(self.n, k, **self._like))
        raw = torch.zeros(self.n, k, k, **self._like)
        raw.diagonal(dim1=-2, dim2=-1).fill_(math.log(self.init_scale))
        self.raw_tril = nn.Parameter(raw)

    def moments(self, x, idx=None):
        rows = self._rows(x, idx)
        return self.loc[rows], lower_cholesky(self.raw_tril[rows])

    @torch.no_grad()
    def set_moments(self, loc, scale_tril):
        self.loc.copy_(loc)
        self.raw_tril.copy_(lower_cholesky_inverse(scale_tril))


def lower_cholesky(raw: torch.Tensor) -> torch.Tensor:
    """tril(raw, -1) + diag(exp(diag raw)): ``transform_to(constraints.lower_cholesky)``."""
    return raw.tril(-1) + torch.diag_embed(raw.diagonal(dim1=-2, dim2=-1).exp())


def lower_cholesky_inverse(tril: torch.Tensor) -> torch.Tensor:
    return tril.tril(-1) + torch.diag_embed(tril.diagonal(dim1=-2, dim2=-1).log())


def no_extra(options: dict, guide: str) -> None:
    if options:
        raise TypeError(f"guide_options: unknown option(s) {sorted(options)} for guide {guide!r}")


def latent_dim_of(family, latent_dim):
    if latent_dim is None:
        latent_dim = getattr(family, "latent_dim", None)  # LocalDensities, or a user family's attribute
    if latent_dim is None:
        raise ValueError("latent_dim: the family has no latent_dim attribute; pass latent_dim=")
    return integer(latent_dim, "latent_dim", minimum=1)


def data_of(family, x):
    if family is not None and callable(getattr(family, "check_data", None)):
        return family.check_data(x)
    return as_data(x, "data")


def _local_builder(cls, label: str):
    def build(family, x, *, latent_dim=None, site="z", plate="data", name=None, init_scale=1.0,
              **options):
        no_extra(options, label)
        x = data_of(family, x)
        return cls(x.shape[0], latent_dim_of(family, latent_dim), like=x, init_scale=init_scale,
                   site=site, plate=plate, name=name)

    build.__name__ = f"build_{label.replace('-', '_')}"
    build.__doc__ = f"``GuideSpec.build`` of the local {label} guide."
    return build


build_mean_field = _local_builder(MeanFieldGuide, "mean-field")
build_full_rank = _local_builder(FullRankGuide, "full-rank")
