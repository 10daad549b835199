"""One NUTS transition for C chains at once, over flat tensors (pure functions, no Pyro).

The sampler is the multinomial No-U-Turn sampler of Stan (Hoffman & Gelman 2014; Betancourt
2017, "A Conceptual Introduction to Hamiltonian Monte Carlo", sec. A.4): trajectories grow by
doubling in a random direction; states are drawn within a subtree in proportion to
w = exp(-H) (uniform progressive sampling) and a new subtree replaces the current proposal with
probability min(1, W_new / W_old) (biased progressive sampling); growth stops at a U-turn,

    rho . M^{-1} p(-) <= 0   or   rho . M^{-1} p(+) <= 0,   rho = sum of momenta,

checked on the whole trajectory, inside every subtree, and across each merge (Stan's extra
checks: the first subtree with the first state of the second, the second with the last state of
the first), or at a divergence (H - H0 > 1000). The criterion is symmetric, so subtrees are built
in the order of travel whatever the direction.

Batching: every chain takes its own direction, step size and diagonal inverse mass matrix M^{-1};
all chains run the same tree shape, and a chain whose trajectory has stopped keeps its state
(``where``), so C chains cost one computation per leapfrog. A point is packed into one
row ``[q | p | grad U | U]`` of width 3D + 1, so choosing between two points is one ``where``.

``potential(q)`` maps q of shape (C, D) to (U (C,), grad U (C, D)), U = -log density. The arrays
are NumPy's or torch's (:mod:`.arrays`): every function here takes its library from its input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from elbolab.inference.mcmc.arrays import Random, namespace

Array = Any  # a NumPy array or a torch tensor, the same library throughout one run

#: H - H0 beyond this is a divergence (Stan's value)
MAX_DELTA_H = 1000.0


@dataclass(slots=True)
class Tree:
    """A subtree, its ends in the order of travel (``start`` next to where it was grown from);
    ``p_*`` the momenta at its ends and ``s_*`` the same times M^{-1} (p#)."""

    start: Array  # packed point (C, 3D + 1)
    end: Array
    proposal: Array
    log_w: Array  # (C,) log sum of exp(H0 - H) over its states
    rho: Array  # (C, D) sum of its momenta
    p_start: Array
    p_end: Array
    s_start: Array
    s_end: Array
    valid: Array  # (C,) bool: no divergence, no U-turn inside
    diverging: Array  # (C,) bool
    accept: Array  # (C,) sum over its counted states of min(1, exp(H0 - H))
    counted: Array  # (C,) its states up to the first invalid half: those Stan would compute
    size: int  # leapfrog steps


def pack(q, p, grad, U) -> Array:
    return namespace(q).concatenate([q, p, grad, U[:, None]], axis=-1)


def parts(z: Array, D: int):
    """(q, p, grad U, U) of packed points."""
    return z[:, :D], z[:, D:2 * D], z[:, 2 * D:3 * D], z[:, 3 * D]


def kinetic(p, inv_mass) -> Array:
    return 0.5 * (inv_mass * p * p).sum(-1)


def leapfrog(z, eps, inv_mass, potential, D: int) -> Array:
    """One leapfrog step of signed size ``eps`` (C, 1) from packed points ``z``."""
    q, p, g, _ = parts(z, D)
    p = p - 0.5 * eps * g
    q = q + eps * inv_mass * p
    U, g = potential(q)
    p = p - 0.5 * eps * g
    return pack(q, p, g, U)


def turning(rho, p_a, p_b, inv_mass) -> Array:
    """The (symmetric) no-U-turn criterion fails between momenta ``p_a`` and ``p_b``."""
    return ((inv_mass * p_a * rho).sum(-1) <= 0) | ((inv_mass * p_b * rho).sum(-1) <= 0)


def merge_turns(rho, first: Tree, second: Tree) -> Array:
    """The criterion on the merged trajectory and across the merge (Stan's extra checks), in
    one computation: pairs (first.start, second.end) with rho, (first.start, second.start) with
    first.rho + second.p_start, (first.end, second.end) with second.rho + first.p_end."""
    xp, (C, D) = namespace(rho), rho.shape
    sharp = xp.concatenate([first.s_start, first.s_start, first.s_end,
                            second.s_end, second.s_start, second.s_end]).reshape(2, 3, C, D)
    r = xp.concatenate([rho, first.rho + second.p_start, second.rho + first.p_end])
    dots = (sharp * r.reshape(3, C, D)).sum(-1)  # (2, 3, C)
    return (dots <= 0).reshape(6, C).any(0)


@dataclass(slots=True)
class Step:
    """What every leapfrog of one trajectory shares: half the signed step, the signed step times
    M^{-1}, M^{-1}, the starting energy H0 and the potential."""

    half_eps: Array  # (C, 1)
    eps_im: Array  # (C, D)
    inv_mass: Array
    H0: Array
    potential: object
    D: int
    rng: Random
    xp: Any  # numpy or torch
    adapting: bool = True  # the acceptance statistic is only read during warm-up


def leaf(z, k: Step) -> Tree:
    D, xp = k.D, k.xp
    p = z[:, D:2 * D] - k.half_eps * z[:, 2 * D:3 * D]
    q = z[:, :D] + k.eps_im * p
    U, g = k.potential(q)
    p = p - k.half_eps * g
    s = k.inv_mass * p
    dH = U + 0.5 * (s * p).sum(-1) - k.H0
    dH = xp.where(dH == dH, dH, math.inf)  # nan: a divergence
    diverging = dH > MAX_DELTA_H
    z1 = xp.concatenate([q, p, g, U[:, None]], axis=-1)
    accept = xp.where(dH > 0, xp.exp(-dH), 1.0) if k.adapting else None  # min(1, e^-dH)
    counted = xp.ones_like(dH) if k.adapting else None
    return Tree(z1, z1, z1, -dH, p, p, p, s, s, ~diverging, diverging, accept, counted, 1)


def build(z, depth: int, k: Step) -> Tree:
    """A subtree of 2^depth leapfrog steps from ``z`` (not included) in the direction of the step."""
    if depth == 0:
        return leaf(z, k)
    t1 = build(z, depth - 1, k)
    t2 = build(t1.end, depth - 1, k)
    xp = k.xp
    log_w = xp.logaddexp(t1.log_w, t2.log_w)
    take2 = xp.log(k.rng.uniform(log_w.shape)) < t2.log_w - log_w
    rho = t1.rho + t2.rho
    valid = t1.valid & t2.valid & ~merge_turns(rho, t1, t2)
    return Tree(t1.start, t2.end, xp.where(take2[:, None], t2.proposal, t1.proposal), log_w, rho,
                t1.p_start, t2.p_end, t1.s_start, t2.s_end, valid,
                t1.diverging | (t1.valid & t2.diverging),
                None if t1.accept is None else t1.accept + t2.accept * t1.valid,
                None if t1.counted is None else t1.counted + t2.counted * t1.valid,
                t1.size + t2.size)


@dataclass
class Transition:
    z: Array  # the new packed points (C, 3D + 1)
    accept: Array  # (C,) mean acceptance statistic over the trajectory
    diverging: Array  # (C,) bool
    depth: Array  # (C,) tree depth reached
    leapfrogs: Array  # (C,) leapfrog steps taken


def transition(z, step_size, inv_mass, potential, max_depth: int, rng: Random,
               adapting: bool = True) -> Transition:
    """One NUTS transition of every chain from packed points ``z`` (module docstring);
    ``step_size`` (C,), ``inv_mass`` (C, D), all in the library of ``z``, as ``rng`` draws.
    ``adapting``: compute the acceptance statistic (warm-up reads it; sampling does not)."""
    xp = namespace(z)
    if xp is np:
        with np.errstate(all="ignore"):  # exp, log and inf - inf at divergences: handled
            return _transition(xp, z, step_size, inv_mass, potential, max_depth, rng, adapting)
    return _transition(xp, z, step_size, inv_mass, potential, max_depth, rng, adapting)


def _transition(xp, z, step_size, inv_mass, potential, max_depth, rng, adapting) -> Transition:
    C, D = z.shape[0], inv_mass.shape[-1]
    q, _, g, U = parts(z, D)
    p0 = rng.normal(q.shape) / xp.sqrt(inv_mass)
    H0 = U + 0.5 * (inv_mass * p0 * p0).sum(-1)
    z0 = pack(q, p0, g, U)
    left = right = proposal = z0  # the trajectory's ends in time, as packed points
    log_w, rho = xp.zeros_like(U), p0
    active = xp.zeros_like(U) == 0
    diverging = ~active
    accept = xp.zeros_like(U)
    counted = xp.zeros_like(U)
    depth = xp.zeros_like(U)
    step = step_size[:, None]
    for d in range(max_depth):
        fwd = rng.uniform((C, 1)) < 0.5
        eps = xp.where(fwd, step, -step)
        k = Step(0.5 * eps, eps * inv_mass, inv_mass, H0, potential, D, rng, xp, adapting)
        far, near = xp.where(fwd, left, right), xp.where(fwd, right, left)
        p_far, p_near = far[:, D:2 * D], near[:, D:2 * D]
        first = Tree(far, near, None, None, rho, p_far, p_near, inv_mass * p_far,
                     inv_mass * p_near, None, None, None, None, 0)  # the trajectory, in order
        t = build(near, d, k)
        grow = active & t.valid
        take = grow & (xp.log(rng.uniform((C,))) < t.log_w - log_w)
        proposal = xp.where(take[:, None], t.proposal, proposal)
        total = rho + t.rho
        turn = merge_turns(total, first, t)
        log_w = xp.where(grow, xp.logaddexp(log_w, t.log_w), log_w)
        g1 = grow[:, None]
        rho = xp.where(g1, total, rho)
        left = xp.where(g1 & ~fwd, t.end, left)
        right = xp.where(g1 & fwd, t.end, right)
        if adapting:
            accept = accept + t.accept * active
            counted = counted + t.counted * active
        diverging = diverging | (active & t.diverging)
        depth = depth + active
        active = grow & ~turn
        if not bool(active.any()):
            break
    steps = xp.exp2(depth) - 1  # the leapfrogs of a tree grown to this depth
    # Stan's acceptance statistic: the mean over the states it would have computed (a subtree
    # stops at its first invalid half; the batch completes it to keep the chains in step)
    return Transition(proposal, accept / xp.clip(counted, 1, None), diverging, depth, steps)


__all__ = ["MAX_DELTA_H", "Transition", "Tree", "build", "kinetic", "leapfrog", "pack", "parts",
           "transition", "turning"]
