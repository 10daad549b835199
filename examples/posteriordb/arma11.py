"""posteriordb ``arma-arma11``: an ARMA(1, 1) time series.

Stan program: posterior_database/models/stan/arma11.stan (posteriordb commit
28f8d3d6e975315f42aa274a8399f21e07a43b30). ``cauchy(0, 2.5)`` on ``real<lower=0> sigma`` is a
half-Cauchy. The one-step errors follow Stan's recursion (err[0] = 0); given the parameters they
are deterministic functions of y, and Stan scores them as ``err ~ normal(0, sigma)``: here the
observed site ``err`` in a plate over time (the map from y to err has unit Jacobian).
"""

import json
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch


def model(T, y):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    phi = pyro.sample("phi", dist.Normal(0.0, 2.0))
    theta = pyro.sample("theta", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
    err = [y[0] - (mu + phi * mu)]
    for t in range(1, T):
        err.append(y[t] - (mu + phi * y[t - 1] + theta * err[t - 1]))
    with pyro.plate("time", T):
        pyro.sample("err", dist.Normal(0.0, sigma), obs=torch.stack(err, dim=-1))


def data():
    raw = json.loads((Path(__file__).parent / "data" / "arma.json").read_text())
    return {"T": raw["T"], "y": torch.tensor(raw["y"])}
