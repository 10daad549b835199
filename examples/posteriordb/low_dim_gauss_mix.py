"""posteriordb ``low_dim_gauss_mix-low_dim_gauss_mix``: a two-component 1-D Gaussian mixture.

Stan program: posterior_database/models/stan/low_dim_gauss_mix.stan (posteriordb commit
28f8d3d6e975315f42aa274a8399f21e07a43b30). ``ordered[2] mu`` with ``mu ~ normal(0, 2)``: the
density of two iid normal(0, 2) draws restricted to mu[1] < mu[2]. That is the density of the
*sorted* pair of two iid draws (times 2), so the program draws ``mu_unordered`` iid and uses
``mu = sort(mu_unordered)`` (a deterministic site) in the likelihood, ``sigma[k]`` going with the
k-th smallest location as in Stan. The posterior of ``mu_unordered`` is the mirror image of
itself (two modes); ``mu`` is Stan's posterior whichever mode a chain or a guide is in. ``normal(0, 2)`` on the positive
``sigma`` is a half-normal. Stan's ``log_mix`` is the mixture marginalized over the component:
``MixtureSameFamily``, with ``theta`` the weight of the first component.
"""

import json
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch


def model(N, y):
    mu_unordered = pyro.sample("mu_unordered", dist.Normal(0.0, 2.0).expand([2]).to_event(1))
    mu = pyro.deterministic("mu", mu_unordered.sort(dim=-1).values)
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    theta = pyro.sample("theta", dist.Beta(5.0, 5.0))
    weights = torch.stack([theta, 1 - theta], dim=-1)
    with pyro.plate("data", N):
        mixture = dist.MixtureSameFamily(dist.Categorical(weights), dist.Normal(mu, sigma))
        pyro.sample("y", mixture, obs=y)


def data():
    raw = json.loads((Path(__file__).parent / "data" / "low_dim_gauss_mix.json").read_text())
    return {"N": raw["N"], "y": torch.tensor(raw["y"])}
