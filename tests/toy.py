"""A conjugate toy family with everything in closed form, for testing the engines themselves.

theta ~ N(0, s2), x_i | theta ~ N(theta, 1):  posterior N(m, v) with v = 1 / (1/s2 + n),
m = v * sum(x); log p(x) = log N(x; 0, I + s2 11^T).
"""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from elbolab import guides
from elbolab.guides.base import GuideSpec
from elbolab.models.base import ModelFamily
from elbolab.models.capabilities import Evidence
from elbolab.models.validate import as_data


class NormalMean(ModelFamily):
    name = "normal-mean"

    def __init__(self, prior_var=4.0):
        self.prior_var = prior_var

    def check_data(self, x):
        return as_data(x, "data", ndim=1)

    def model(self, x, subsample_size=None):
        theta = pyro.sample("theta", dist.Normal(x.new_zeros(()), math.sqrt(self.prior_var)))
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size, device=x.device) as i:
            pyro.sample("x", dist.Normal(theta, 1.0), obs=x[i])

    def posterior(self, x):
        v = 1.0 / (1.0 / self.prior_var + x.shape[0])
        return v * x.sum(), v

    def log_evidence(self, x):
        n = x.shape[0]
        cov = torch.eye(n, dtype=torch.float64) + self.prior_var
        value = dist.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov).log_prob(
            x.double().cpu()
        )
        return Evidence(float(value), 0.0, "exact", n)

    def pointwise_log_likelihood(self, samples, x):
        return dist.Normal(samples["theta"].unsqueeze(-1), 1.0).log_prob(x)

    def posterior_invariants(self, samples, x):
        return {"theta": samples["theta"]}

    def guides(self):
        def normal(family, x, **_):
            def guide(x, subsample_size=None):
                loc = pyro.param("loc", x.new_tensor(0.0))
                scale = pyro.param("scale", x.new_tensor(1.0), constraint=constraints.positive)
                pyro.sample("theta", dist.Normal(loc, scale))

            return guide

        def exact(family, x, **_):
            m, v = family.posterior(x)

            def guide(x, subsample_size=None):
                pyro.sample("theta", dist.Normal(m, math.sqrt(v)))

            return guide

        return {"normal": GuideSpec("normal", normal), "exact": GuideSpec("exact", exact)}

    default_guide = "normal"


guides.register(NormalMean, NormalMean().guides, "normal")


class NoisyLocal(ModelFamily):
    """A user-style model with learned globals and a per-point latent:
    z_i ~ N(0, 1), x_i | z_i ~ N(mu + z_i, sigma^2), with mu and sigma > 0 as pyro.params."""

    name = "noisy-local"

    def check_data(self, x):
        return as_data(x, "data", ndim=2)

    def model(self, x, subsample_size=None):
        sigma = pyro.param("sigma", x.new_ones(1), constraint=constraints.positive)
        mu = pyro.param("mu", x.new_zeros(1))
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1,
                        device=x.device) as i:
            z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(mu + z, sigma).to_event(1), obs=x[i])
