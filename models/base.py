"""Base classes of the model families (the contract itself is in :mod:`elbolab.models.capabilities`).

:class:`ModelFamily` holds a family's name and hyperparameters. :class:`LocalLatentFamily` is for
models with one per-point latent z_n and fixed global parameters,

    z_n ~ p(z) = local_prior(x),   x_n | z_n ~ observation_dist(z_n),

whose Pyro ``model``, ``log_joint`` and ``log_likelihood`` are all built from those two
distribution objects, so every density the family exposes is the model's own.
"""

from __future__ import annotations

import pyro
import torch

from elbolab.models.capabilities import capabilities_of


class ModelFamily:
    """Base class of the model families; subclasses set ``name`` and implement ``model``."""

    name: str = "family"
    #: discrete latent sites marked for enumeration (summed out by collapsed bounds and NUTS)
    discrete_sites: tuple[str, ...] = ()
    #: how deeply the model nests plates (needed by TraceEnum_ELBO)
    max_plate_nesting: int = 1

    def check_data(self, x) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def model(self, x: torch.Tensor, subsample_size: int | None = None):  # pragma: no cover
        raise NotImplementedError

    def settings(self) -> dict:
        """Hyperparameters as plain values (for run.json and result rows)."""
        return {}

    def capabilities(self) -> list[str]:
        return capabilities_of(self)


class LocalLatentFamily(ModelFamily):
    """A model with a per-point latent ``latent_site`` and fixed globals (see module docstring).

    Subclasses set ``latent_dim`` and implement ``local_prior(x)`` (batch (n,), event (k,); any
    batch shape broadcasting against z) and ``observation_dist(z)`` (batch (..., n), event = one
    row of x).
    """

    latent_site: str = "z"
    obs_site: str = "x"
    latent_dim: int

    def local_prior(self, x: torch.Tensor):  # pragma: no cover - overridden
        raise NotImplementedError

    def observation_dist(self, z: torch.Tensor):  # pragma: no cover - overridden
        raise NotImplementedError

    def model(self, x: torch.Tensor, subsample_size: int | None = None):
        x = self.check_data(x) if not torch.is_tensor(x) else x
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1,
                        device=x.device) as idx:
            xb = x.index_select(0, idx) if subsample_size is not None else x
            z = pyro.sample(self.latent_site, self.local_prior(xb))
            pyro.sample(self.obs_site, self.observation_dist(z), obs=xb)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x_n | z_n), shape (..., n)."""
        return self.observation_dist(z).log_prob(x)

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(z_n) + log p(x_n | z_n), shape (..., n)."""
        return self.local_prior(x).log_prob(z) + self.log_likelihood(x, z)


__all__ = ["LocalLatentFamily", "ModelFamily"]
