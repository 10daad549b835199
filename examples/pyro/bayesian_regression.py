"""The Bayesian regression tutorial, part 1 (Pyro's tutorial/source/bayesian_regression.ipynb,
pyro-ppl/pyro at ff6ae1c9572591791aae8842bcd702fcf0b46fd6), written as the tutorial does: a
``PyroModule`` whose ``PyroModule[nn.Linear]`` has its ``weight`` and ``bias`` replaced by
``PyroSample`` priors. Those are latent sites named ``linear.weight`` (shape ``(1, 3)``) and
``linear.bias`` (shape ``(1,)``), next to ``sigma``.

Data: the tutorial's terrain ruggedness data (Nunn & Puga 2012), read from the copy in
rmcelreath/rethinking ``data/rugged.csv`` (commit ac1b3b2cda83f3e14096e2d997a6e30ad109eeee; the
tutorial downloads the same table from a CDN): the 170 nations with a GDP figure, the columns
``cont_africa``, ``rugged`` and ``rgdppc_2000`` kept in ``data/rugged.json``. As in the tutorial,
the response is log GDP per capita and the features are ``cont_africa``, ``rugged`` and their
product.

The tutorial's guide is ``AutoDiagonalNormal(model)`` (``guide="auto-normal"`` in elbolab).

    from elbolab import inference
    from examples.pyro import bayesian_regression as br
    fit = inference.fit("svi", br.model, br.data(), guide="auto-normal", num_steps=1500, lr=0.03)
"""

import json
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn


class BayesianRegression(PyroModule):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear = PyroModule[nn.Linear](in_features, out_features)
        self.linear.weight = PyroSample(
            dist.Normal(0.0, 1.0).expand([out_features, in_features]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([out_features]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)
        return mean


model = BayesianRegression(3, 1)


def data():
    """The keyword arguments ``x`` (170 x 3: cont_africa, rugged, their product) and ``y`` (log
    GDP per capita in 2000)."""
    raw = json.loads((Path(__file__).parent / "data" / "rugged.json").read_text())
    cont_africa = torch.tensor(raw["cont_africa"], dtype=torch.float)
    rugged = torch.tensor(raw["rugged"], dtype=torch.float)
    x = torch.stack([cont_africa, rugged, cont_africa * rugged], dim=-1)
    y = torch.tensor(raw["rgdppc_2000"], dtype=torch.float).log()
    return {"x": x, "y": y}
