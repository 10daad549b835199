"""Memory estimates of the engines' settings, checked before any work.

One trace of the guide and the model (replayed against it) gives the numbers one particle holds:
S = sum over the sample sites of their sizes. Sites the model marks for parallel enumeration
(and the guide does not sample) multiply every tensor that meets them by their support size E,
so a step with P particles holds about ``COPIES * P * E * S`` numbers (values, log densities,
gradients and intermediates: ``COPIES`` = 4). The engines refuse, naming the setting, what
exceeds :func:`elbolab.models.validate.memory_budget` (:func:`elbolab.models.validate.check_size`).
"""

from __future__ import annotations

import torch
from pyro import poutine

from elbolab.inference.tracing import site_is_plate
from elbolab.models.validate import check_size

#: numbers held per traced number (value, log density, gradient, intermediates)
COPIES = 4


def trace_size(model, guide, x: torch.Tensor) -> tuple[int, int, int]:
    """(numbers in one particle's sample sites, enumeration factor E, numbers in the guide's
    latent sites) of ``guide`` and ``model`` on ``x``; the random state is left as it was."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), poutine.block():
        gtr = poutine.trace(guide).get_trace(x) if guide is not None else None
        m = model if gtr is None else poutine.replay(model, trace=gtr)
        mtr = poutine.trace(m).get_trace(x)
    guided = set() if gtr is None else {k for k, s in gtr.nodes.items() if s["type"] == "sample"}
    size, factor, latent = 0, 1, 0
    for tr in (mtr, gtr):
        if tr is None:
            continue
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site_is_plate(site):
                continue
            value = site["value"]
            size += value.numel() if torch.is_tensor(value) else 1
            if tr is gtr and not site["is_observed"]:
                latent += value.numel() if torch.is_tensor(value) else 1
            if (tr is mtr and name not in guided and not site["is_observed"]
                    and site["infer"].get("enumerate") == "parallel"
                    and getattr(site["fn"], "has_enumerate_support", False)):
                factor *= int(site["fn"].enumerate_support(expand=False).shape[0])
    return size, factor, latent


def check_svi(model, guide, x: torch.Tensor, settings, enumerated: bool) -> None:
    """Refuse SVI settings whose step, evaluation or posterior draws cannot fit in memory."""
    size, factor, latent = trace_size(model, guide, x)
    factor = factor if enumerated else 1
    o, ev = settings.objective, settings.evaluation
    kw = {"itemsize": x.element_size(), "device": x.device}
    check_size(COPIES * o.num_particles * factor * size, "num_particles",
               f"an SVI step with {o.num_particles} particles of {size * factor:.3g} numbers", **kw)
    batch = min(ev.eval_batch, ev.eval_particles)
    check_size(COPIES * batch * factor * size, "eval_batch",
               f"the ELBO evaluation in batches of {batch} particles", **kw)
    check_size(2 * ev.num_posterior_samples * (latent + x.shape[0]), "num_posterior_samples",
               f"{ev.num_posterior_samples} posterior draws of {latent} latent numbers", **kw)


def check_mcmc(model, x: torch.Tensor, settings) -> None:
    """Refuse NUTS settings whose stored draws (chains x samples x latent numbers, plus the
    pointwise log likelihood) cannot fit in memory."""
    size, factor, _ = trace_size(model, None, x)
    draws = settings.num_chains * settings.num_samples
    check_size(2 * draws * (size + x.shape[0]), "num_samples",
               f"{settings.num_chains} chains x {settings.num_samples} draws of {size} numbers",
               itemsize=x.element_size(), device=x.device)
    check_size(COPIES * factor * size, "x", "one NUTS gradient evaluation",
               itemsize=x.element_size(), device=x.device)


__all__ = ["COPIES", "check_mcmc", "check_svi", "trace_size"]
