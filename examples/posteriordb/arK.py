"""posteriordb ``arK-arK``: an autoregressive model of order K.

Stan program: posterior_database/models/stan/arK.stan (posteriordb commit
28f8d3d6e975315f42aa274a8399f21e07a43b30). ``cauchy(0, 2.5)`` on ``real<lower=0> sigma`` is a
half-Cauchy. As in Stan, the first K values only condition the later ones (no likelihood term);
given the parameters, the terms for t = K+1..T are independent, so they sit in a plate.
"""

import json
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch


def model(K, T, y):
    alpha = pyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 10.0).expand([K]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
    # lags[i, k] = y[t - k - 1] for t = K + i: the k-th lag of each modelled point
    lags = torch.stack([y[K - k - 1 : T - k - 1] for k in range(K)], dim=-1)
    mu = alpha + lags @ beta
    with pyro.plate("time", T - K):
        pyro.sample("y", dist.Normal(mu, sigma), obs=y[K:])


def data():
    raw = json.loads((Path(__file__).parent / "data" / "arK.json").read_text())
    return {"K": raw["K"], "T": raw["T"], "y": torch.tensor(raw["y"])}
