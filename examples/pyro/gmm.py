"""The Gaussian mixture model tutorial (Pyro's tutorial/source/gmm.ipynb, pyro-ppl/pyro at
ff6ae1c9572591791aae8842bcd702fcf0b46fd6): two components, a shared scale, and the discrete
``assignment`` of each point enumerated (``@config_enumerate``), on the tutorial's five points.

``model`` is the tutorial's. ``guide`` is the tutorial's ``full_guide``: MAP (delta) values for the
global ``weights``, ``locs`` and ``scale`` (the tutorial gets them from ``AutoDelta`` on the blocked
model; here they are written out as ``pyro.param``s, initialized as its ``init_loc_fn`` does, except
that the locations start at the best of its random initializations directly, see below) and an
enumerated categorical ``assignment`` per point with its own ``assignment_probs``. Both need
``TraceEnum_ELBO``. The tutorial's collapsed NUTS runs ``model`` as it is (``assignment``
marginalized).

    from elbolab import inference
    from examples.pyro import gmm
    fit = inference.fit("mcmc", gmm.model, gmm.data(), num_samples=250, warmup=50)
    svi = inference.fit("svi", gmm.model, gmm.data(), guide=gmm.guide, num_steps=200, lr=0.2)
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import config_enumerate
from torch.distributions import constraints

K = 2  # Fixed number of components.


@config_enumerate
def model(data):
    # Global variables.
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))

    with pyro.plate("data", len(data)):
        # Local variables.
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


@config_enumerate
def guide(data):
    # Global variables: MAP estimates (the tutorial's AutoDelta), initialized as its init_loc_fn.
    weights = pyro.param("weights_map", lambda: torch.ones(K) / K,
                         constraint=constraints.simplex)
    scale = pyro.param("scale_map", lambda: (data.var() / 2).sqrt(),
                       constraint=constraints.positive)
    # the tutorial draws two data points at random and keeps the best of 100 draws by the initial
    # loss; the best draw is two points far apart, taken here directly (deterministic)
    locs = pyro.param("locs_map", lambda: torch.stack([data.min(), data.max()]))
    pyro.sample("weights", dist.Delta(weights).to_event(1))
    pyro.sample("scale", dist.Delta(scale))
    with pyro.plate("components", K):
        pyro.sample("locs", dist.Delta(locs))

    # Local variables.
    with pyro.plate("data", len(data)):
        assignment_probs = pyro.param(
            "assignment_probs",
            lambda: torch.ones(len(data), K) / K,
            constraint=constraints.simplex,
        )
        pyro.sample("assignment", dist.Categorical(assignment_probs))


def data():
    """The keyword argument ``data``: the tutorial's five points."""
    return {"data": torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])}
