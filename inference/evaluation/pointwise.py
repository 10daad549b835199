"""Per-data-point log importance weights and ELBOs, for any model with latents in the data plate.

For S draws z_n^(s) ~ q(z_n | x_n) the log weights are

    w_ns = log p(x_n, z_n^(s)) - log q(z_n^(s) | x_n)                                   (1)

(every site's log density summed over its event dims and any inner plates, the data plate kept,
plate scales ignored so the values are true densities). Their mean over s is an unbiased
estimate of the per-point ELBO L_n = E_q[w_n], with Monte Carlo SE sd_s(w_ns) / sqrt(S); their
log-mean-exp is the per-point IWAE bound log (1/S) sum_s exp(w_ns).

Draws are vectorized by an outer ``pyro.plate`` of S particles at dim -(max_plate_nesting + 1),
in chunks of ``particle_batch`` particles and ``data_batch`` data points (a data chunk is fixed by
conditioning the data plate's subsample site on its indices and calling model and guide with
``subsample_size``), so memory stays bounded. Every sample site must lie in the data plate: a
global latent has no per-point share and raises ``ValueError``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine

from elbolab.inference.runtime import seed_everything
from elbolab.inference.tracing import in_plate, is_random_site, site_log_prob
from elbolab.models.validate import integer

PARTICLES = "_pointwise_particles"


@dataclass
class PointwiseEstimate:
    """Per-data-point estimates (n,) with their Monte Carlo standard errors (n,)."""

    value: torch.Tensor
    se: torch.Tensor
    num_particles: int

    @property
    def total(self) -> float:
        return float(self.value.sum())

    @property
    def total_se(self) -> float:
        # draws are independent across data points, so variances add
        return float(self.se.pow(2).sum().sqrt())


def log_weights(model, guide, x, *, num_particles: int = 100, particle_batch: int | None = None,
                data_batch: int | None = None, plate: str = "data", max_plate_nesting: int = 1,
                model_kwargs: dict | None = None, grad: bool = False) -> torch.Tensor:
    """Log weights (1) of shape (num_particles, n), on x's device and dtype."""
    S = integer(num_particles, "num_particles", minimum=1)
    pb = S if particle_batch is None else min(integer(particle_batch, "particle_batch"), S)
    n = x.shape[0]
    db = n if data_batch is None else min(integer(data_batch, "data_batch"), n)
    nest = integer(max_plate_nesting, "max_plate_nesting", minimum=1)
    kwargs = dict(model_kwargs or {})
    chunks = []
    with torch.set_grad_enabled(grad):
        for start in range(0, n, db):
            idx = None
            if db < n:
                idx = torch.arange(start, min(start + db, n), device=x.device)
            parts, left = [], S
            while left > 0:
                s = min(pb, left)
                parts.append(_chunk(model, guide, x, s, idx, plate, nest, kwargs))
                left -= s
            chunks.append(torch.cat(parts, 0))
    return torch.cat(chunks, -1)


def pointwise_elbo(model, guide, x, *, num_particles: int = 1000, **options) -> PointwiseEstimate:
    """Per-point ELBO estimates mean_s w_ns with SE sd_s(w_ns) / sqrt(S) (S >= 2)."""
    integer(num_particles, "num_particles", minimum=2)
    w = log_weights(model, guide, x, num_particles=num_particles, **options)
    return PointwiseEstimate(w.mean(0), w.std(0, unbiased=True) / math.sqrt(w.shape[0]), w.shape[0])


@contextlib.contextmanager
def caller_scope(seed: int | None = None):
    """Seed, and work on a copy of the caller's param store (the model's and guides' fitted
    params are visible; any param created inside is dropped afterwards)."""
    store = pyro.get_param_store()
    with store.scope(store.get_state()):
        if seed is not None:
            seed_everything(seed)
        yield store


def vectorized(fn, S, nest):
    """``fn`` run inside an outer plate of ``S`` particles at dim -(nest + 1)."""

    def wrapped(*args, **kwargs):
        with pyro.plate(PARTICLES, S, dim=-(nest + 1)):
            return fn(*args, **kwargs)

    return wrapped


def _chunk(model, guide, x, S, idx, plate, nest, kwargs):
    kw = dict(kwargs)
    cond = {}
    if idx is not None:
        kw["subsample_size"] = idx.shape[0]
        cond = {plate: idx}
    g = poutine.condition(vectorized(guide, S, nest), data=cond)
    gtr = poutine.trace(g).get_trace(x, **kw)
    m = poutine.replay(poutine.condition(vectorized(model, S, nest), data=cond), trace=gtr)
    mtr = poutine.trace(m).get_trace(x, **kw)
    b = x.shape[0] if idx is None else idx.shape[0]
    log_p = _site_sum(mtr, S, b, plate, nest, observed=True, who="model")
    log_q = _site_sum(gtr, S, b, plate, nest, observed=False, who="guide")
    return log_p - log_q


def _site_sum(trace, S, b, plate, nest, *, observed: bool, who: str) -> torch.Tensor:
    total = None
    for name, site in trace.nodes.items():
        if not is_random_site(site):
            continue
        if site["is_observed"] and not observed:
            continue
        if site["infer"].get("is_auxiliary"):
            continue
        if not in_plate(site, plate, who):
            raise ValueError(
                f"{who}: site {name!r} is outside plate {plate!r}; a per-data-point ELBO needs "
                f"every latent and observed site inside it (global latents have no per-point share)"
            )
        lp = site_log_prob(site, S, b, nest, who)
        total = lp if total is None else total + lp
    if total is None:
        raise ValueError(f"{who}: no sample sites found")
    return total
