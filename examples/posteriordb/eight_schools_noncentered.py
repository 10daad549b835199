"""posteriordb ``eight_schools-eight_schools_noncentered``: Rubin's eight schools, non-centered.

Stan program: posterior_database/models/stan/eight_schools_noncentered.stan (posteriordb commit
28f8d3d6e975315f42aa274a8399f21e07a43b30). Stan's ``cauchy(0, 5)`` on ``real<lower=0> tau`` is a
half-Cauchy; ``theta`` is a transformed parameter, here a deterministic site.
"""

import json
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch


def model(J, y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", J):
        theta_trans = pyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", theta_trans * tau + mu)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def data():
    raw = json.loads((Path(__file__).parent / "data" / "eight_schools.json").read_text())
    return {"J": raw["J"], "y": torch.tensor(raw["y"]), "sigma": torch.tensor(raw["sigma"])}
