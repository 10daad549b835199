"""posteriordb ``garch-garch11``: a GARCH(1, 1) volatility model.

Stan program: posterior_database/models/stan/garch11.stan (posteriordb commit
28f8d3d6e975315f42aa274a8399f21e07a43b30). No parameter has a sampling statement in Stan: each has
a flat density on its constrained space.

- ``mu`` (real) and ``alpha0`` (positive): Pyro cannot run a program whose site has no sampler
  (``ImproperUniform``), so they are ``Normal(0, 1000)`` and ``HalfNormal(1000)``, flat to within
  1e-6 of the log density over the posterior (mu 5.05 +- 0.12, alpha0 1.5 +- 0.6).
- ``alpha1`` in (0, 1) and ``beta1`` in (0, 1 - alpha1): flat on that triangle. A support that
  depends on another parameter is not something Pyro's NUTS can transform (it fixes each site's
  transform once), so the triangle is written the way a Pyro user would: the uniform density on it
  has the marginal ``alpha1 ~ Beta(1, 2)`` and, given alpha1, ``beta1 = (1 - alpha1) * u`` with
  ``u ~ Uniform(0, 1)``. Same density, up to a constant; ``beta1`` is a deterministic site.
"""

import json
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch


def model(T, y, sigma1):
    mu = pyro.sample("mu", dist.Normal(0.0, 1000.0))
    alpha0 = pyro.sample("alpha0", dist.HalfNormal(1000.0))
    alpha1 = pyro.sample("alpha1", dist.Beta(1.0, 2.0))
    beta1_share = pyro.sample("beta1_share", dist.Uniform(0.0, 1.0))
    beta1 = pyro.deterministic("beta1", (1 - alpha1) * beta1_share)
    sigma = [torch.as_tensor(sigma1, dtype=y.dtype).expand_as(mu)]
    for t in range(1, T):
        sigma.append((alpha0 + alpha1 * (y[t - 1] - mu) ** 2 + beta1 * sigma[t - 1] ** 2).sqrt())
    with pyro.plate("time", T):
        pyro.sample("y", dist.Normal(mu, torch.stack(sigma, dim=-1)), obs=y)


def data():
    raw = json.loads((Path(__file__).parent / "data" / "garch.json").read_text())
    return {"T": raw["T"], "y": torch.tensor(raw["y"]), "sigma1": raw["sigma1"]}
