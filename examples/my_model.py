"""A model of your own, ready for ``elbolab run fit`` (copy this file and change the model).

    elbolab run fit --model examples.my_model:NoisyMean --model-args '{"dim": 2}' --quick

The model has a global latent theta (shared by all points) and a local latent z_n per point:

    theta ~ N(0, s2 I_d),   z_n ~ N(0, I_d),   x_n | theta, z_n ~ N(theta + z_n, v I_d)

It is conjugate, so the exact evidence is known: each column x_{.j} of the data is Gaussian,
x_{.j} ~ N(0, a I_n + s2 1 1^T) with a = 1 + v, whose log density follows from the matrix
determinant lemma and Sherman-Morrison:

    log N(x; 0, a I + s2 11^T) = -n/2 log 2pi - (n - 1)/2 log a - 1/2 log(a + n s2)
                                 - 1/2 (|x|^2 - s2 (sum x)^2 / (a + n s2)) / a

What the study does with it follows from what the class implements (models/capabilities.py):
``model`` and ``check_data`` make it a Pyro family (SVI with any guide of
``elbolab.guides.for_family``, NUTS); ``simulate`` lets the study run without ``--data``; ``log_evidence``
gives every row its gap log p(x) - ELBO. With a global latent there is no per-point IWAE (the study
says so in the ``notes`` column).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

from elbolab.models.base import ModelFamily
from elbolab.models.capabilities import Evidence
from elbolab.models.validate import as_data, integer, positive


class NoisyMean(ModelFamily):
    name = "noisy-mean"

    def __init__(self, dim: int = 1, prior_var: float = 4.0, noise_var: float = 0.5):
        self.dim = integer(dim, "dim", minimum=1)
        self.prior_var = positive(prior_var, "prior_var")
        self.noise_var = positive(noise_var, "noise_var")

    def settings(self) -> dict:
        return {"dim": self.dim, "prior_var": self.prior_var, "noise_var": self.noise_var}

    def check_data(self, x) -> torch.Tensor:
        x = as_data(x, "x", ndim=2)  # names the field; keeps the caller's device and dtype
        if x.shape[1] != self.dim:
            raise ValueError(f"x: expected {self.dim} columns (dim={self.dim}), got {x.shape[1]}")
        return x

    def model(self, x, subsample_size=None):
        d = x.shape[1]
        theta = pyro.sample("theta", dist.Normal(x.new_zeros(d), math.sqrt(self.prior_var))
                            .to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1) as i:
            z = pyro.sample("z", dist.Normal(x.new_zeros(d), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(theta + z, math.sqrt(self.noise_var)).to_event(1),
                        obs=x[i])

    def simulate(self, n, *, seed=0, device=None, dtype=torch.float64):
        g = torch.Generator().manual_seed(integer(seed, "seed", minimum=0))
        n = integer(n, "n", minimum=1)
        theta = math.sqrt(self.prior_var) * torch.randn(self.dim, generator=g, dtype=torch.float64)
        z = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        eps = math.sqrt(self.noise_var) * torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        x = (theta + z + eps).to(device=device, dtype=dtype)
        return x, {"theta": theta.to(device=device, dtype=dtype)}

    def log_evidence(self, x) -> Evidence:
        """Exact log p(x) in nats (module docstring), summed over the columns."""
        x = self.check_data(x).double()
        n, a, s2 = x.shape[0], 1.0 + self.noise_var, self.prior_var
        b = a + n * s2
        quad = ((x * x).sum(0) - s2 * x.sum(0) ** 2 / b) / a
        per_col = (-0.5 * n * math.log(2 * math.pi) - 0.5 * (n - 1) * math.log(a)
                   - 0.5 * math.log(b) - 0.5 * quad)
        return Evidence(float(per_col.sum()), 0.0, "exact", n)
