"""Per-data-point log densities read from Pyro traces (shared by IWAE, AIS and per-point ELBOs).

A site's log density is summed over its event dims and any plates nested inside the data plate
``"data"`` (which must use ``dim=-1``), giving one value per (particle, data point). Particles are
an outer ``pyro.plate`` at ``dim=-(max_plate_nesting + 1)``.

Global sites. :func:`pyro_log_joint` gives log p(x_n, z_n | theta) with theta fixed: the model's
sites outside the data plate must be parameters (``pyro.param``, module weights, constants) or
sample sites whose values are passed in ``fixed`` (they are conditioned on and their own log prior
is left out, as it belongs to no data point). Any other site outside the data plate is an error,
so a number is never silently mixed with log p(theta). This is what makes the estimates per data
point where Pyro's ``RenyiELBO(alpha=0)`` (one weight per joint sample) is not.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import site_is_subsample

from elbolab.models.validate import integer

LogJoint = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def to_numpy(v) -> np.ndarray:
    """A tensor (any device) or array-like as a numpy array."""
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def site_is_plate(site: dict) -> bool:
    """Whether a trace node is a plate's index site (not a latent variable)."""
    return site["type"] == "sample" and isinstance(site["fn"], _Subsample)


def is_random_site(site) -> bool:
    """A random variable: not a param, a plate's subsample site or a ``pyro.deterministic``."""
    return not (site["type"] != "sample" or site_is_subsample(site)
                or bool(site["infer"].get("_deterministic")))


def in_plate(site, name: str, who: str = "model") -> bool:
    """Whether ``site`` lies in the plate ``name`` (which must use dim=-1)."""
    for frame in site["cond_indep_stack"]:
        if frame.name == name:
            if frame.dim != -1:
                raise ValueError(f"{who}: plate {name!r} must use dim=-1, got dim={frame.dim}")
            return True
    return False


def site_log_prob(site, s: int, n: int, nesting: int, who: str) -> torch.Tensor:
    """log prob of a site in the data plate, summed over event and inner plate dims -> (s, n).

    Masked entries count 0; the site's scale is not applied (true densities)."""
    lp = site["fn"].log_prob(site["value"])
    if site["mask"] is not None and site["mask"] is not True:
        lp = torch.where(torch.as_tensor(site["mask"], device=lp.device), lp, lp.new_zeros(()))
    while lp.dim() < nesting + 1:
        lp = lp.unsqueeze(0)
    if lp.dim() > nesting + 1:
        raise ValueError(
            f"{who}: site {site['name']!r} has {lp.dim()} batch dims, more than "
            f"max_plate_nesting + 1 = {nesting + 1}; raise max_plate_nesting"
        )
    if nesting > 1:
        lp = lp.sum(dim=tuple(range(-nesting, -1)))
    return lp.expand(s, n)


def per_point_log_prob(trace, s: int, n: int, *, nesting: int, fixed, latent, what: str,
                       data_plate: str = "data"):
    """Sum of the log-probs of the sites in the data plate of ``trace`` -> (s, n), with the
    checks of the module docstring (``what``: ``"model"`` or ``"guide"``)."""
    total = None
    found = False
    for name, site in trace.nodes.items():
        if not is_random_site(site):
            continue
        if not in_plate(site, data_plate, what):
            if name in fixed:
                continue
            if what == "guide":
                raise ValueError(
                    f"guide: site {name!r} lies outside the plate {data_plate!r}; the per-point "
                    "IWAE needs a guide over the local latent only (fix global sites in the model)"
                )
            if site["is_observed"]:
                raise ValueError(
                    f"{what}: observed site {name!r} lies outside the plate {data_plate!r}; it "
                    "belongs to no data point"
                )
            raise ValueError(
                f"fixed: {what} site {name!r} is a global latent (outside the plate "
                f"{data_plate!r}); pass its value in fixed={{{name!r}: ...}}"
            )
        if name in fixed:
            raise ValueError(f"fixed: site {name!r} lies inside the plate {data_plate!r}")
        if what == "model" and not site["is_observed"] and name != latent:
            raise ValueError(
                f"latent: the model has a second unobserved per-point site {name!r}; only the "
                f"site {latent!r} is integrated out"
            )
        if not (isinstance(site["scale"], float | int) and site["scale"] == 1):
            raise ValueError(
                f"{what}: site {name!r} is scaled (subsampling or poutine.scale); "
                "per-point evidence needs the unscaled model (subsample_size=None)"
            )
        found = found or name == latent
        lp = site_log_prob(site, s, n, nesting, what)
        total = lp if total is None else total + lp
    if not found:
        raise ValueError(f"latent: no site {latent!r} in the plate {data_plate!r} of the {what}")
    return total


def pyro_log_joint(
    model,
    *,
    latent: str = "z",
    fixed: dict | None = None,
    model_kwargs: dict | None = None,
    max_plate_nesting: int = 1,
    event_dim: int = 1,
) -> LogJoint:
    """``log_joint(x, z) -> (..., n)``: log p(x_n, z_n | theta) per data point, from a Pyro model.

    ``z`` has shape ``(..., n, *event)``; the leading dims are flattened into a
    ``pyro.plate("particles", S, dim=-(max_plate_nesting + 1))`` around the model, the site
    ``latent`` is conditioned on ``z`` (and the sites in ``fixed`` on their values), and the
    log-probs of all sites in the plate ``"data"`` are summed over their event dims (module
    docstring: treatment of global sites). ``event_dim``: event dims of the latent (1 for a
    vector z_n). Differentiable in ``z``.
    """
    fixed = dict(fixed or {})
    kwargs = dict(model_kwargs or {})
    nesting = integer(max_plate_nesting, "max_plate_nesting", minimum=1)
    event_dim = integer(event_dim, "event_dim", minimum=0)

    def log_joint(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        lead, event = _split_latent(z, n, event_dim)
        s = math.prod(lead)
        zf = z.reshape((s, n) + event)
        data = {latent: zf, **fixed}
        with pyro.plate("particles", s, dim=-(nesting + 1), device=x.device):
            trace = poutine.trace(poutine.condition(model, data=data)).get_trace(x, **kwargs)
        lp = per_point_log_prob(trace, s, n, nesting=nesting, fixed=fixed, latent=latent,
                                what="model")
        return lp.reshape(lead + (n,))

    return log_joint


def _split_latent(z: torch.Tensor, n: int, event_dim: int):
    """(leading dims, event shape) of z shaped (..., n, *event) with ``event_dim`` event dims."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z: expected a tensor, got {type(z).__name__}")
    d = z.dim() - 1 - event_dim
    if d < 0 or z.shape[d] != n:
        raise ValueError(
            f"z: expected shape (..., {n}, <{event_dim} event dims>) to match {n} data points, "
            f"got {tuple(z.shape)}"
        )
    return tuple(z.shape[:d]), tuple(z.shape[d + 1:])


def proposal_from(
    program,
    x: torch.Tensor,
    *,
    latent: str = "z",
    fixed: dict | None = None,
    kwargs: dict | None = None,
) -> torch.distributions.Distribution:
    """The distribution of site ``latent`` in one trace of ``program(x, **kwargs)``.

    With the model this is the prior p(z_n) (batch shape ``(n,)``); with an amortized guide it is
    q(z_n | x_n). ``program`` may have no other unobserved sample site (the distribution must not
    depend on other random draws); use :func:`elbolab.inference.evaluation.evidence.iwae` with the guide for guides
    with auxiliary sites.
    """
    fixed = dict(fixed or {})
    with torch.no_grad():
        trace = poutine.trace(poutine.condition(program, data=fixed)).get_trace(x, **(kwargs or {}))
    if latent not in trace.nodes:
        raise ValueError(f"latent: the program has no site {latent!r}")
    for name, site in trace.nodes.items():
        if is_random_site(site) and not site["is_observed"] and name != latent:
            raise ValueError(
                f"latent: site {latent!r} may depend on the other random site {name!r}; "
                "proposal_from needs it to be the only unobserved site"
            )
    fn = trace.nodes[latent]["fn"]
    if tuple(fn.batch_shape) != (x.shape[0],):
        raise ValueError(
            f"latent: site {latent!r} has batch shape {tuple(fn.batch_shape)}, expected "
            f"({x.shape[0]},) (one draw per data point in the plate 'data')"
        )
    return fn
