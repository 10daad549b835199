"""posteriordb ``kidiq-kidscore_momiq``: a child's test score regressed on the mother's IQ.

Stan program: posterior_database/models/stan/kidscore_momiq.stan (posteriordb commit
28f8d3d6e975315f42aa274a8399f21e07a43b30), from Gelman & Hill (2006), ch. 3. ``vector[2] beta``
has no sampling statement in Stan, i.e. a flat prior on the real line; Pyro cannot run a program
whose site has no sampler (``ImproperUniform``), so here it is ``Normal(0, 1000)``: its curvature
(1e-6) against the likelihood's (1 / posterior variance: 1/36 for beta[1], 300 for beta[2]) moves
the posterior mean by under 1e-4 posterior sd. ``cauchy(0, 2.5)`` on ``real<lower=0> sigma`` is a
half-Cauchy.
"""

import json
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch


def model(N, kid_score, mom_iq):
    beta = pyro.sample("beta", dist.Normal(0.0, 1000.0).expand([2]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
    with pyro.plate("data", N):
        pyro.sample("kid_score", dist.Normal(beta[0] + beta[1] * mom_iq, sigma), obs=kid_score)


def data():
    raw = json.loads((Path(__file__).parent / "data" / "kidiq.json").read_text())
    return {
        "N": raw["N"],
        "kid_score": torch.tensor(raw["kid_score"]),
        "mom_iq": torch.tensor(raw["mom_iq"]),
    }


def init_values(N, kid_score, mom_iq):
    """A data-based start for SVI (``init_to_value``): the least-squares fit and its residual sd.

    Under the flat prior that is the posterior mean; an autoguide's own start is the median of
    draws from the ``Normal(0, 1000)`` prior, hundreds of units from beta[1] = 26, and Adam moves
    a location by about ``lr`` per step (see docs/posteriordb.md)."""
    y = kid_score.to(torch.get_default_dtype())
    X = torch.stack([torch.ones_like(y), mom_iq.to(y.dtype)], dim=-1)
    beta = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    return {"beta": beta, "sigma": (y - X @ beta).std()}
