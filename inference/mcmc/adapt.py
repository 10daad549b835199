"""Warm-up and sampling for batched NUTS (:mod:`elbolab.inference.mcmc.batched`), per chain.

Warm-up follows Stan's windowed adaptation (Stan Reference Manual, "HMC algorithm parameters"):
a fast interval that adapts the step size only (15% of warm-up, at most 75 iterations), slow
windows of doubling length (from 25) that also estimate the diagonal inverse mass matrix from the
draws of the window, regularized toward 1e-3 as Stan does,

    M^{-1} = n/(n + 5) var + 1e-3 * 5/(n + 5),

and a final fast interval (10%, at most 50). The step size follows dual averaging (Hoffman &
Gelman 2014, sec. 3.2) toward the target acceptance statistic delta,

    H_t = (1 - 1/(t + t0)) H_{t-1} + (delta - alpha_t) / (t + t0),
    log eps_t = mu - sqrt(t)/gamma H_t,   log eps_bar_t = t^-kappa log eps_t + (1 - t^-kappa) log eps_bar_{t-1},

gamma = 0.05, t0 = 10, kappa = 0.75, mu = log(10 eps_0), restarted after every mass-matrix
update; sampling uses eps_bar. Everything is a (C,) or (C, D) array, NumPy's or torch's
(:mod:`.arrays`): each chain adapts its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from elbolab.inference.mcmc.arrays import Random, namespace
from elbolab.inference.mcmc.batched import Array, kinetic, leapfrog, pack, transition

GAMMA, T0, KAPPA = 0.05, 10.0, 0.75


@dataclass
class Draws:
    q: Array  # (C, S, D) positions after warm-up
    diverging: Array  # (C, S) bool
    accept: Array  # (C, S)
    depth: Array  # (C, S)
    step_size: Array  # (C,)
    inv_mass: Array  # (C, D)
    leapfrogs: int  # all chains, warm-up included


def windows(warmup: int) -> tuple[int, int, list[int]]:
    """(initial fast interval, final fast interval, ends of the slow windows) for ``warmup``."""
    if warmup < 20:
        return warmup, 0, []
    init, term = min(75, int(0.15 * warmup)), min(50, int(0.1 * warmup))
    ends, start, size = [], init, 25
    while start < warmup - term:
        end = start + size
        if end + 2 * size > warmup - term:  # the next window would not fit: stretch this one
            end = warmup - term
        ends.append(end)
        start, size = end, 2 * size
    return init, term, ends


class DualAveraging:
    def __init__(self, step_size: Array, target: float):
        self.target = target
        self.restart(step_size)

    def restart(self, step_size):
        self.xp = xp = namespace(step_size)
        self.mu = xp.log(10 * step_size)
        self.h = xp.zeros_like(step_size)
        self.log_bar = xp.zeros_like(step_size)
        self.t = 0

    def update(self, accept: Array) -> Array:
        self.t += 1
        eta = 1.0 / (self.t + T0)
        self.h = (1 - eta) * self.h + eta * (self.target - accept)
        log_eps = self.mu - math.sqrt(self.t) / GAMMA * self.h
        x = self.t ** -KAPPA
        self.log_bar = x * log_eps + (1 - x) * self.log_bar
        return self.xp.exp(log_eps)

    def final(self) -> Array:
        return self.xp.exp(self.log_bar)


def reasonable_step_size(z, inv_mass, potential, rng: Random, D: int) -> Array:
    """Hoffman & Gelman's heuristic (Algorithm 4), per chain: double or halve eps from 1 until the
    one-step acceptance exp(H0 - H) crosses 1/2."""
    xp = namespace(z)
    q, _, g, U = (z[:, :D], None, z[:, 2 * D:3 * D], z[:, 3 * D])
    eps = xp.ones_like(U)
    p = rng.normal(q.shape) / xp.sqrt(inv_mass)
    z0 = pack(q, p, g, U)
    H0 = U + kinetic(p, inv_mass)

    def log_accept(e):
        z1 = leapfrog(z0, e[:, None], inv_mass, potential, D)
        dH = z1[:, 3 * D] + kinetic(z1[:, D:2 * D], inv_mass) - H0
        return xp.nan_to_num(-dH, nan=-math.inf)

    up = log_accept(eps) > math.log(0.5)
    active = xp.ones_like(eps) > 0
    for _ in range(60):
        nxt = xp.where(up, 2 * eps, eps / 2)
        crossed = (log_accept(nxt) > math.log(0.5)) != up
        eps = xp.where(active, nxt, eps)
        active = active & ~crossed
        if not bool(active.any()):
            break
    return xp.clip(eps, 1e-8, 1e3)


def run(potential, q0: Array, *, warmup: int, num_samples: int, target_accept: float,
        max_depth: int, rng: Random, on_step=None, step=transition) -> Draws:
    """Warm up from ``q0`` (C, D), then draw ``num_samples`` per chain; ``potential`` and
    ``rng`` in the library of ``q0``. ``step``: one NUTS transition of all chains, with the
    signature of :func:`elbolab.inference.mcmc.batched.transition` (the compiled one:
    :class:`elbolab.inference.mcmc.compiled.Compiled`)."""
    xp = namespace(q0)
    args = (xp, potential, q0, warmup, num_samples, target_accept, max_depth, rng, on_step, step)
    if xp is not np:
        return _run(*args)
    with np.errstate(all="ignore"):  # a divergence's inf and nan are handled where they arise
        return _run(*args)


def _run(xp, potential, q0, warmup, num_samples, target_accept, max_depth, rng, on_step,
         transition) -> Draws:
    C, D = q0.shape
    U, g = potential(q0)
    z = pack(q0, xp.zeros_like(q0), g, U)
    inv_mass = xp.ones_like(q0)
    step = reasonable_step_size(z, inv_mass, potential, rng, D)
    da = DualAveraging(step, target_accept)
    _, _, ends = windows(warmup)
    starts = [windows(warmup)[0]] + ends[:-1]
    n, mean, m2 = 0, xp.zeros_like(q0), xp.zeros_like(q0)
    leapfrogs = 0
    for it in range(warmup):
        tr = transition(z, step, inv_mass, potential, max_depth, rng)
        z, leapfrogs = tr.z, leapfrogs + int(tr.leapfrogs.sum())
        step = da.update(tr.accept)
        if any(s <= it < e for s, e in zip(starts, ends)):  # Welford over the slow window
            n += 1
            delta = z[:, :D] - mean
            mean = mean + delta / n
            m2 = m2 + delta * (z[:, :D] - mean)
        if it + 1 in ends:
            var = m2 / max(n - 1, 1)
            inv_mass = (n / (n + 5.0)) * var + 1e-3 * (5.0 / (n + 5.0))
            n, mean, m2 = 0, xp.zeros_like(q0), xp.zeros_like(q0)
            step = reasonable_step_size(z, inv_mass, potential, rng, D)
            da.restart(step)
        if on_step is not None:
            on_step()
    if warmup:
        step = da.final()
    qs, div, acc, depth = [], [], [], []
    for _ in range(num_samples):
        tr = transition(z, step, inv_mass, potential, max_depth, rng, adapting=False)
        z, leapfrogs = tr.z, leapfrogs + int(tr.leapfrogs.sum())
        qs.append(z[:, :D])
        div.append(tr.diverging)
        acc.append(tr.accept)
        depth.append(tr.depth)
        if on_step is not None:
            on_step()
    stack = lambda xs: xp.stack(xs, axis=1)  # noqa: E731
    return Draws(stack(qs), stack(div), stack(acc), stack(depth), step, inv_mass, leapfrogs)


__all__ = ["Draws", "DualAveraging", "reasonable_step_size", "run", "windows"]
