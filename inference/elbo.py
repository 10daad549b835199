"""One ELBO evaluator for every engine, so all rows of a table are computed the same way.

For a model and a fitted guide, the ELBO E_q[log p(x, z) - log q(z)] is estimated from
``num_particles`` independent draws, in vectorized batches of ``batch_size``; the batch means are
i.i.d., so their spread gives the standard error. With ``collapsed=True`` the discrete sites marked
for enumeration are summed out exactly (``TraceEnum_ELBO``): a different, tighter bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from elbolab.models.validate import integer


@dataclass
class ElboEstimate:
    value: float  # total over the data, nats
    se: float
    num_particles: int
    bound: str

    def per_datum(self, n: int) -> float:
        return self.value / n


def estimate_elbo(
    model,
    guide,
    *args,
    num_particles: int = 1000,
    batch_size: int = 100,
    collapsed: bool = False,
    enumerate: bool | None = None,
    max_plate_nesting: int = 1,
    vectorize: bool = True,
    **kwargs,
) -> ElboEstimate:
    """Monte Carlo ELBO (total over the data) with its standard error.

    The guide's parameters are read from the active param store and not changed.
    ``enumerate`` (default: ``collapsed``) uses ``TraceEnum_ELBO``, which also sums exactly over
    discrete guide sites marked for enumeration; the bound is then still the plain ELBO.
    """
    integer(num_particles, "num_particles", minimum=2)
    batch_size = min(integer(batch_size, "batch_size", minimum=1), num_particles)
    n_batches = max(2, math.ceil(num_particles / batch_size))
    batch_size = max(1, num_particles // n_batches)
    cls = TraceEnum_ELBO if (collapsed if enumerate is None else enumerate) else Trace_ELBO
    elbo = cls(
        num_particles=batch_size,
        vectorize_particles=vectorize and batch_size > 1,
        max_plate_nesting=max_plate_nesting,
    )
    means = []
    with torch.no_grad():
        for _ in range(n_batches):
            means.append(-elbo.loss(model, guide, *args, **kwargs))
    t = torch.tensor(means, dtype=torch.float64)
    se = float(t.std(unbiased=True) / math.sqrt(len(means)))
    return ElboEstimate(
        float(t.mean()), se, batch_size * n_batches, "elbo-collapsed" if collapsed else "elbo"
    )
