"""Eight schools, as in Pyro's ``examples/eight_schools`` (pyro-ppl/pyro at
ff6ae1c9572591791aae8842bcd702fcf0b46fd6: mcmc.py, svi.py, data.py).

The model is mcmc.py's: a non-centered hierarchy with ``mu ~ N(0, 10)``, ``tau ~ HalfCauchy(25)``
and one ``eta`` per school, unplated (batch shape ``(J,)``), as Pyro wrote it. mcmc.py conditions
``obs`` with ``poutine.condition``; here ``y`` is passed as ``obs=``, the same thing.

The guide is svi.py's mean-field guide (a normal per ``eta``, a normal on ``mu``, a log-normal on
``tau``, scales initialized narrow), with one change: svi.py samples ``mu`` and ``tau`` inside
``pyro.plate("data", J)``, which broadcasts them to one ``mu`` and one ``tau`` per school, i.e. a
different model from mcmc.py's; here they are global, matching the model.

    from elbolab import inference
    from examples.pyro import eight_schools as es
    fit = inference.fit("mcmc", es.model, es.data(), num_samples=1000, warmup=500)
    svi = inference.fit("svi", es.model, es.data(), guide=es.guide, num_steps=2000)
"""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints, transforms


def model(J, sigma, y=None):
    eta = pyro.sample("eta", dist.Normal(torch.zeros(J), torch.ones(J)))
    mu = pyro.sample("mu", dist.Normal(torch.zeros(1), 10 * torch.ones(1)))
    tau = pyro.sample("tau", dist.HalfCauchy(scale=25 * torch.ones(1)))

    theta = mu + tau * eta

    return pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def guide(J, sigma, y=None):
    # note that we initialize our scales to be pretty narrow
    loc_eta = pyro.param("loc_eta", lambda: torch.randn(J))
    scale_eta = pyro.param("scale_eta", lambda: 0.1 * torch.rand(J),
                           constraint=constraints.positive)
    loc_mu = pyro.param("loc_mu", lambda: torch.randn(1))
    scale_mu = pyro.param("scale_mu", lambda: 0.1 * torch.rand(1),
                          constraint=constraints.positive)
    loc_logtau = pyro.param("loc_logtau", lambda: torch.randn(1))
    scale_logtau = pyro.param("scale_logtau", lambda: 0.1 * torch.rand(1),
                              constraint=constraints.positive)

    pyro.sample("eta", dist.Normal(loc_eta, scale_eta))
    pyro.sample("mu", dist.Normal(loc_mu, scale_mu))
    pyro.sample("tau", dist.TransformedDistribution(
        dist.Normal(loc_logtau, scale_logtau), transforms=transforms.ExpTransform()))


def data():
    """The keyword arguments: Pyro's examples/eight_schools/data.py."""
    return {
        "J": 8,
        "sigma": torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]),
        "y": torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]),
    }
