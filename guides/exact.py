"""The exact-posterior guide: q(z_n | x_n) = p(z_n | x_n) from ``family.exact_posterior``.

For any family whose posterior over a per-data-point z is Gaussian in closed form (FA, PPCA,
a linear-Gaussian VAE): ``family.exact_posterior(x[, params]) -> (mean (n, k), cov)`` with ``cov``
of shape (k, k) (shared) or (n, k, k). With this guide log p(x_n, z) - log q(z | x_n) = log p(x_n)
for every z, so its ELBO is the log evidence with zero Monte Carlo variance.
The posterior is recomputed at each call, so it follows model parameters that are being learned.
"""

from __future__ import annotations

import torch

from elbolab.guides.local import LatentGuide, data_of, latent_dim_of, no_extra
from elbolab.models.capabilities import ExactLocalPosterior, require


class ExactPosteriorGuide(LatentGuide):
    """q = the family's exact posterior (no parameters of its own)."""

    kind = "exact"

    def __init__(self, family, latent_dim, *, params=None, site="z", plate="data", name=None):
        super().__init__(latent_dim, site=site, plate=plate, name=name)
        require(family, ExactLocalPosterior, "the exact-posterior guide")
        self.family = family
        self.params = params

    def moments(self, x, idx=None):
        rows = x if idx is None else x.index_select(0, idx)
        if self.params is None:
            mean, cov = self.family.exact_posterior(rows)
        else:
            mean, cov = self.family.exact_posterior(rows, self.params)
        if mean.dim() != 2 or mean.shape[-1] != self.latent_dim:
            raise ValueError(
                f"exact_posterior: mean must have shape (n, {self.latent_dim}), "
                f"got {tuple(mean.shape)}")
        tril = torch.linalg.cholesky(cov)
        return mean, tril.expand(mean.shape[0], self.latent_dim, self.latent_dim)


def build_exact(family, x, *, latent_dim=None, params=None, site="z", plate="data", name=None,
                **options):
    """``GuideSpec.build`` of the exact-posterior guide."""
    no_extra(options, "exact")
    data_of(family, x)
    return ExactPosteriorGuide(family, latent_dim_of(family, latent_dim), params=params, site=site,
                               plate=plate, name=name)
