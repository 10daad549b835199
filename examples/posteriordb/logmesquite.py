"""posteriordb ``mesquite-logmesquite``: log weight of mesquite bushes on log dimensions.

Stan program: posterior_database/models/stan/logmesquite.stan (posteriordb commit
28f8d3d6e975315f42aa274a8399f21e07a43b30), from Gelman & Hill (2006), ch. 4. Neither ``beta`` nor
``real<lower=0> sigma`` has a sampling statement in Stan: flat priors on the real line and on the
positive half-line. Pyro cannot run a program whose site has no sampler (``ImproperUniform``), so
they are ``Normal(0, 1000)`` and ``HalfNormal(1000)``: against posterior sds of 0.04 to 0.33 they
move the posterior by under 1e-6 sd (effectively flat). Stan's
``transformed data`` block (the logs) is computed in the program.
"""

import json
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch


def model(N, weight, diam1, diam2, canopy_height, total_height, density, group):
    beta = pyro.sample("beta", dist.Normal(0.0, 1000.0).expand([7]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1000.0))
    mean = (
        beta[0]
        + beta[1] * diam1.log()
        + beta[2] * diam2.log()
        + beta[3] * canopy_height.log()
        + beta[4] * total_height.log()
        + beta[5] * density.log()
        + beta[6] * group
    )
    with pyro.plate("data", N):
        pyro.sample("log_weight", dist.Normal(mean, sigma), obs=weight.log())


def data():
    raw = json.loads((Path(__file__).parent / "data" / "mesquite.json").read_text())
    return {k: v if k == "N" else torch.tensor(v) for k, v in raw.items()}


def init_values(N, weight, diam1, diam2, canopy_height, total_height, density, group):
    """A data-based start for SVI (``init_to_value``): the least-squares fit on the same design
    and its residual sd (under the flat prior, the posterior mean; an autoguide's own start is
    the median of draws from the ``Normal(0, 1000)`` prior, see docs/posteriordb.md)."""
    logs = [v.log() for v in (diam1, diam2, canopy_height, total_height, density)]
    X = torch.stack([torch.ones(N, dtype=weight.dtype), *logs, group.to(weight.dtype)], dim=-1)
    y = weight.log()
    beta = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    return {"beta": beta, "sigma": (y - X @ beta).std()}
