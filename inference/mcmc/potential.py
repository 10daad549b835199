"""A batched NUTS potential read from any Pyro model's own trace (``kernel="batched"`` on a model
whose family declares no :class:`~elbolab.models.capabilities.BatchedPotential`).

The continuous latent sites are found by one trace and laid out flat in unconstrained space,
u -> z = T(u) with T = ``biject_to(support)``. For C chains the model runs once under an outer
plate of size C at dim -(max_plate_nesting + 1), conditioned on the C values of every site, and

    U(u) = -sum over sites of log p(z) summed over every dim but the chain's - log |dT/du|,

with its gradient by autograd (one backward pass for all chains, which are independent). A model
that cannot take the outer plate (a module or an index that a batch dim breaks) is an error
naming why, raised before any step: use ``kernel="pyro"`` for it.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from torch.distributions import biject_to

from elbolab.inference.tracing import site_is_plate
from elbolab.models.capabilities import FlatPotential, flat_point

CHAINS = "_nuts_chains"


def trace_potential(model, x, max_plate_nesting: int) -> FlatPotential:
    """The :class:`FlatPotential` of ``model(x)`` over its continuous latent sites."""
    nest = max_plate_nesting
    with torch.no_grad(), poutine.block():
        tr = poutine.trace(model).get_trace(x)
    sites = [(k, s) for k, s in tr.nodes.items()
             if s["type"] == "sample" and not s["is_observed"] and not site_is_plate(s)]
    discrete = [k for k, s in sites if s["fn"].has_enumerate_support]
    if discrete:
        raise ValueError(f"kernel: 'batched' on a model's trace takes continuous sites only; "
                         f"{discrete} are discrete (use kernel='pyro')")
    layout = []  # (name, transform, constrained shape, unconstrained shape, batch dims, offset)
    offset = 0
    for name, s in sites:
        t = biject_to(s["fn"].support)
        u = t.inv(s["value"])
        batch = len(s["fn"].batch_shape)
        layout.append((name, t, tuple(s["value"].shape), tuple(u.shape), batch, offset))
        offset += u.numel()
    like = sites[0][1]["value"]
    # every site's log-density shape without the chains, its plates' dims padded to ``nest``
    base = {}
    for k, site in tr.nodes.items():
        if site["type"] == "sample" and not site_is_plate(site):
            shape = tuple(_log_prob(site).shape)
            base[k] = (1,) * (nest - len(shape)) + shape

    def values(q):
        """Site name -> (constrained value shaped for the chain plate, log |det J| (C,))."""
        C, out, logdet = q.shape[0], {}, 0.0
        for name, t, shape, ushape, batch, start in layout:
            n = math.prod(ushape)
            u = q[:, start:start + n].reshape(C, *ushape)
            z = t(u)
            ladj = t.log_abs_det_jacobian(u, z)
            logdet = logdet + ladj.reshape(C, -1).sum(1)
            pad = (1,) * max(nest - batch, 0)
            out[name] = z.reshape(C, *pad, *shape)
        return out, logdet

    def log_density(q):
        C = q.shape[0]
        fixed, logdet = values(q)
        with pyro.plate(CHAINS, C, dim=-(nest + 1)):
            t = poutine.trace(poutine.condition(model, data=fixed)).get_trace(x)
        total = logdet
        for s in t.nodes.values():
            if s["type"] != "sample" or site_is_plate(s):
                continue
            lp = _log_prob(s)
            lp = lp.reshape((1,) * (nest + 1 - lp.dim()) + tuple(lp.shape))
            if lp.dim() > nest + 1 or lp.shape[0] not in (1, C) or (
                    tuple(lp.shape[1:]) != base.get(s["name"], tuple(lp.shape[1:]))):
                raise ValueError(  # the chains broadcast into another dim: they would mix
                    f"site {s['name']!r} has log-density shape {tuple(lp.shape)} under {C} "
                    f"chains, not {(C, *base.get(s['name'], ()))} (each latent gets the chains "
                    "left of its plates, as in Pyro's vectorized particles: e.g. `X @ w`, "
                    "`w.unsqueeze(-2)` or indexing from the left breaks that)")
            lp = lp.reshape(lp.shape[0], -1).sum(1).expand(C)  # (1, ...): the same for every chain
            total = total + lp
        return total

    def potential(q):
        # no argument checks while sampling: a scale that underflows to 0 on a wild leapfrog
        # gives an infinite potential (a divergence, as in Pyro's NUTS), not an exception
        with torch.enable_grad(), pyro.validation_enabled(False):
            q = q.detach().requires_grad_(True)
            lp = log_density(q)
            (g,) = torch.autograd.grad(lp.sum(), q)
        return -lp.detach(), -g

    def to_sites(q):
        lead = q.shape[:-1]
        flat = q.reshape(-1, q.shape[-1])
        vals, _ = values(flat)
        return {name: vals[name].reshape(*lead, *shape) for name, _, shape, *_ in layout}

    def init(chains: int, generator: torch.Generator):
        u = torch.rand(chains, offset, generator=generator, dtype=torch.float64)
        return (4 * u - 2).to(like)

    def from_sites(given: dict):
        return flat_point(given, {name: ushape for name, _, _, ushape, *_ in layout}, like)

    try:  # the chains must go through the model, each on its own: say why not before any step
        _check_chains_apart(log_density, init(3, torch.Generator().manual_seed(0)))
    except (ValueError, RuntimeError, IndexError) as e:
        raise ValueError(f"kernel: 'batched' needs the model to take the chains as a batch dim "
                         f"left of its plates, each chain on its own; "
                         f"{str(e).splitlines()[0][:300]}; use kernel='pyro'") from e
    return FlatPotential(offset, potential, to_sites, init, from_sites)


def _check_chains_apart(log_density, q: torch.Tensor) -> None:
    """log p of C chains computed together must be each chain's computed alone: a model that
    reduces over the chains' dim (a ``.sum()`` or ``.mean()`` of everything, ``cumsum(0)``,
    ``softmax(a, 0)``) keeps every shape right and mixes the chains."""
    with torch.no_grad():
        together = log_density(q)
        alone = torch.cat([log_density(q[c:c + 1]) for c in range(q.shape[0])])
    tol = (1e-3 if q.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-8)
    if not torch.allclose(together, alone, rtol=tol, atol=tol * float(alone.abs().max())):
        raise ValueError(
            f"the log density of {q.shape[0]} chains computed together, "
            f"{[round(float(v), 4) for v in together]}, is not each chain's alone, "
            f"{[round(float(v), 4) for v in alone]}: the model reduces over the chains' dim "
            "(e.g. a .sum() or .mean() of a whole tensor, cumsum(0), softmax(a, 0))")


def _log_prob(site) -> torch.Tensor:
    """A site's log-density with its scale and mask applied."""
    lp = site["fn"].log_prob(site["value"])
    if site["scale"] is not None:
        lp = lp * site["scale"]
    if site["mask"] is not None and site["mask"] is not True:
        lp = torch.where(torch.as_tensor(site["mask"]), lp, torch.zeros_like(lp))
    return lp


def check_against_model(model, x: torch.Tensor, flat: FlatPotential, q: torch.Tensor) -> None:
    """A family's declared potential against its model's own trace, before any step: for the
    first starting point q and q + 1/2, U(q + 1/2) - U(q) must equal the same difference of

        -log p(z, x) - log |det dz/dq|,   z = ``flat.to_sites(q)`` (the model conditioned on z),

    with the Jacobian of ``to_sites`` by autograd, to 1e-6 relative (float64; a difference, so
    the constants, which move no draw, need not match). A term that depends on q missing from
    the potential (a prior, a log-Jacobian) would otherwise give another posterior, silently.
    Skipped where it cannot apply: ``to_sites`` not one-to-one in size (a simplex), or a latent
    site the points do not fix (summed out or sampled by the model itself)."""
    x = x.detach().to(torch.float64)
    q = q.detach().to("cpu", torch.float64)[:1]  # one pair: two traces (a few ms at n = 1000)

    def z_of(u):
        return torch.cat([v.reshape(-1) for v in flat.to_sites(u).values()])

    def minus_log_joint(u):  # -log p(z, x) - log |det dz/du| for one point u (D,)
        sites = {k: v.detach().to(x) for k, v in flat.to_sites(u).items()}
        with torch.no_grad(), poutine.block():
            tr = poutine.trace(poutine.condition(model, data=sites)).get_trace(x)
        free = [k for k, s in tr.nodes.items() if s["type"] == "sample" and not
                s["is_observed"] and not site_is_plate(s)]
        unknown = sorted(set(sites) - set(tr.nodes))
        if unknown:
            raise ValueError(f"batched_potential: to_sites gives {unknown}, which the model has "
                             f"no site of that name for (its latent sites: {free})")
        if free:
            return None
        J = torch.autograd.functional.jacobian(z_of, u.to(x))
        return -float(tr.log_prob_sum()) - float(torch.linalg.slogdet(J).logabsdet)

    if z_of(q[0]).numel() != q.shape[-1]:
        return
    U0, _ = flat.potential(q.to(x))
    U1, _ = flat.potential((q + 0.5).to(x))
    for c in range(q.shape[0]):
        m0, m1 = minus_log_joint(q[c]), minus_log_joint(q[c] + 0.5)
        if m0 is None or m1 is None:
            return
        mine, theirs = float(U1[c] - U0[c]), m1 - m0
        if not abs(mine - theirs) <= 1e-6 * (1 + abs(float(U0[c])) + abs(m0)):
            raise ValueError(
                "batched_potential: from q to q + 1/2 (q = "
                f"{[round(float(v), 4) for v in q[c][:6]]}...) U changes by {mine!r}, but the "
                f"model's own -log p(z, x) - log|dz/dq| by {theirs!r}: a term that depends on q "
                "is missing or wrong (a prior, a log-Jacobian of to_sites)")


__all__ = ["CHAINS", "trace_potential"]
