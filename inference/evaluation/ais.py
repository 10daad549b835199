"""Annealed importance sampling per data point (Neal 2001) with HMC transitions, and BDMC.

Path. For a proposal q(z_n) (the prior, or an encoder's q(z_n | x_n)) and inverse temperatures
0 = b_0 < b_1 < ... < b_T = 1, the intermediate unnormalized targets are the geometric path

    f_t(z) = q(z)^(1 - b_t) p(x_n, z)^(b_t),    f_0 = q (normalized), f_T = p(x_n, z).

With the prior as q this is p(z) p(x_n | z)^(b_t). Forward AIS draws z_0 ~ q and, for t = 1..T,
adds  log f_t(z_{t-1}) - log f_{t-1}(z_{t-1}) = (b_t - b_{t-1}) (log p(x_n, z) - log q(z))  to the
log weight, then moves z_{t-1} -> z_t with an HMC kernel leaving f_t invariant (t < T). Then
E[w] = p(x_n) (Neal 2001, eq. 11), so log mean_c w_c over C independent chains is a stochastic
lower bound on log p(x_n) (Jensen), with the delta-method se of :mod:`elbolab.inference.evaluation.evidence`.

BDMC (Grosse, Ghahramani & Adams 2015). Run the chain backwards from an exact posterior draw
z_T ~ p(z | x_n) (available on simulated data: simulate z, then x), adding
log f_{t-1}(z_t) - log f_t(z_t) and moving with the kernels in reverse order; then E[w_rev] =
1 / p(x_n), so -log mean_c w_rev,c is a stochastic upper bound. The two bracket log p(x_n).

Settings (:class:`AisSettings`, validated when built). HMC: U_t(z) = -log f_t(z); momentum
p ~ N(0, M) with diagonal M^-1 = s^2, s the proposal's standard deviation (``mass="proposal"``)
or 1; L leapfrog steps of size eps_t[n] (one per data point and temperature); Metropolis accept
on the Hamiltonian. Step sizes: ``adapt="pilot"`` (default) runs a pilot AIS with
``pilot_chains`` chains that moves eps multiplicatively toward ``target_accept`` after each
temperature (eps <- eps exp(0.5 (accept - target))), then the
estimates use those step sizes frozen, so their kernels do not depend on their own draws and the
bounds above hold exactly. ``adapt="online"`` adapts inside the run itself (cheaper, slightly
biased), ``adapt="none"`` keeps ``step_size``.

Divergent trajectories. A step size that is too large for a stiff target (e.g. a Poisson model,
whose rates exp(W z + b) overflow a few leapfrog steps away from the posterior) sends the leapfrog
path to positions where log p(x, z) or its gradient is not finite. The target is evaluated with
distribution validation off, so such a position gives a non-finite energy and the move is rejected
(z stays where it was, as for any rejection; the kernel still leaves f_t invariant), and the
adaptation shrinks the step. ``details["divergent_fraction"]`` is the share of HMC moves rejected
that way. A point whose mean acceptance stays below ``MIN_ACCEPTANCE`` (its chains barely moved,
so the bound may be loose) or whose log weights are all -inf (log p(x, z) not finite at the
proposal's draws) is named in ``details["warning"]`` and a ``RuntimeWarning``.

Schedules: ``linear`` b_t = t / T; ``sigmoid`` (Grosse, Maddison & Salakhutdinov 2013)
b_t proportional to sigma(delta (2 t / T - 1)), rescaled to [0, 1], delta = 4; or any increasing
sequence from 0 to 1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import pyro
import torch

from elbolab.inference.evaluation.evidence import (
    check_proposal,
    chunks,
    evidence_from_logsumexp,
    seeded,
)
from elbolab.inference.tracing import LogJoint
from elbolab.models.capabilities import Evidence
from elbolab.models.validate import as_data, choice, integer, positive, probability

SCHEDULES = ("linear", "sigmoid")
#: mean HMC acceptance per point below which an AIS estimate is flagged (chains barely moved)
MIN_ACCEPTANCE = 0.05
ADAPT = ("pilot", "online", "none")
MASS = ("proposal", "identity")


def annealing_schedule(num_steps: int, kind: str = "sigmoid", *, delta: float = 4.0) -> list[float]:
    """Inverse temperatures b_0 = 0 < ... < b_T = 1 (``num_steps`` = T), as Python floats."""
    t_max = integer(num_steps, "num_steps", minimum=1)
    choice(kind, "schedule", SCHEDULES)
    if kind == "linear":
        return [t / t_max for t in range(t_max + 1)]
    delta = positive(delta, "delta")
    raw = [1 / (1 + math.exp(-delta * (2 * t / t_max - 1))) for t in range(t_max + 1)]
    lo, hi = raw[0], raw[-1]
    betas = [(r - lo) / (hi - lo) for r in raw]
    betas[0], betas[-1] = 0.0, 1.0
    return betas


def _custom_betas(schedule) -> tuple[float, ...]:
    if not isinstance(schedule, Sequence | torch.Tensor):
        raise TypeError(f"schedule: must be one of {list(SCHEDULES)} or a sequence, got {schedule}")
    betas = tuple(float(b) for b in schedule)
    if len(betas) < 2 or betas[0] != 0.0 or betas[-1] != 1.0:
        raise ValueError("schedule: a sequence must start at 0, end at 1 and have >= 2 entries")
    if any(b1 <= b0 for b0, b1 in zip(betas, betas[1:])):
        raise ValueError("schedule: inverse temperatures must increase strictly")
    return betas


@dataclass(frozen=True)
class AisSettings:
    """How :func:`ais` and :func:`bdmc` anneal (module docstring), checked when built.

    ``num_steps`` temperatures T on the ``schedule`` (``"linear"``, ``"sigmoid"`` or an increasing
    sequence from 0 to 1, which then sets T itself); ``num_chains`` independent chains per data
    point; HMC with ``leapfrog_steps`` steps of size ``step_size`` (the start when adapting),
    ``adapt`` in ``pilot`` / ``online`` / ``none`` toward ``target_accept`` (the pilot run uses
    ``pilot_chains`` chains), inverse mass ``mass`` (``proposal`` variances or ``identity``);
    ``batch_size`` data points at a time (default all; needs a callable proposal).
    """

    num_steps: int = 200
    num_chains: int = 16
    schedule: str | tuple[float, ...] = "sigmoid"
    leapfrog_steps: int = 5
    step_size: float = 0.5
    adapt: str = "pilot"
    target_accept: float = 0.65
    pilot_chains: int = 4
    mass: str = "proposal"
    batch_size: int | None = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("num_steps", integer(self.num_steps, "num_steps", minimum=1))
        put("num_chains", integer(self.num_chains, "num_chains", minimum=1))
        put("leapfrog_steps", integer(self.leapfrog_steps, "leapfrog_steps", minimum=1))
        put("step_size", positive(self.step_size, "step_size"))
        choice(self.adapt, "adapt", ADAPT)
        put("target_accept", probability(self.target_accept, "target_accept", open_left=True))
        put("pilot_chains", integer(self.pilot_chains, "pilot_chains", minimum=1))
        choice(self.mass, "mass", MASS)
        if isinstance(self.schedule, str):
            choice(self.schedule, "schedule", SCHEDULES)
        else:
            put("schedule", _custom_betas(self.schedule))
        if self.batch_size is not None:
            put("batch_size", integer(self.batch_size, "batch_size"))

    @property
    def betas(self) -> list[float]:
        """The inverse temperatures b_0 = 0 < ... < b_T = 1."""
        if isinstance(self.schedule, str):
            return annealing_schedule(self.num_steps, self.schedule)
        return list(self.schedule)

    @property
    def schedule_name(self) -> str:
        return self.schedule if isinstance(self.schedule, str) else "custom"


class AnnealingTarget:
    """log p(x, z), log q(z) and their gradients in z, for chains shaped (C, n, *event)."""

    def __init__(self, log_joint, q, x, event_dim):
        self.log_joint, self.q, self.x, self.event_dim = log_joint, q, x, event_dim

    def __call__(self, z):
        # validation off: a divergent leapfrog position (non-finite z or parameters) must give a
        # non-finite energy that the Metropolis test rejects, not a constraint error
        with torch.enable_grad(), pyro.validation_enabled(False):
            z = z.detach().requires_grad_(True)
            lp = self.log_joint(self.x, z)
            if tuple(lp.shape) != tuple(z.shape[:2]):
                raise ValueError(
                    f"log_joint: must return shape {tuple(z.shape[:2])} (chains, n), "
                    f"got {tuple(lp.shape)}"
                )
            lq = self.q.log_prob(z)
            (gp,) = torch.autograd.grad(lp.sum(), z)
            (gq,) = torch.autograd.grad(lq.sum(), z)
        return z.detach(), lp.detach(), lq.detach(), gp, gq


def _esum(t, event_dim):
    return t.flatten(-event_dim).sum(-1) if event_dim else t


def hmc_step(state, beta, eps, minv, leapfrog, target):
    """One HMC transition leaving f_beta invariant; returns (state, accept probability (C, n))."""
    z, lp, lq, gp, gq = state
    ed = target.event_dim
    e = eps.reshape((1, -1) + (1,) * ed)

    def energy(lp_, lq_):
        return -(lq_ + beta * (lp_ - lq_))

    def grad(gp_, gq_):
        return -(gq_ + beta * (gp_ - gq_))

    p = torch.randn_like(z) / minv.sqrt()
    h0 = energy(lp, lq) + 0.5 * _esum(minv * p * p, ed)
    p = p - 0.5 * e * grad(gp, gq)
    zn = z
    for step in range(leapfrog):
        zn = zn + e * minv * p
        zn, lpn, lqn, gpn, gqn = target(zn)
        p = p - (e if step < leapfrog - 1 else 0.5 * e) * grad(gpn, gqn)
    h1 = energy(lpn, lqn) + 0.5 * _esum(minv * p * p, ed)
    log_acc = torch.nan_to_num(h0 - h1, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    accept = torch.log(torch.rand_like(log_acc)) < log_acc
    acc_prob = torch.exp(torch.clamp(log_acc, max=0.0))
    keep = accept.reshape(accept.shape + (1,) * ed)
    new = (
        torch.where(keep, zn, z),
        torch.where(accept, lpn, lp),
        torch.where(accept, lqn, lq),
        torch.where(keep, gpn, gp),
        torch.where(keep, gqn, gq),
    )
    return new, acc_prob


def _anneal(target, z0, betas, eps, minv, leapfrog, *, reverse=False, adapt=None):
    """Run one AIS sweep. ``eps``: (T + 1, n) frozen step sizes, or (n,) start when adapting.

    Returns (log weights (C, n), mean acceptance per point, step sizes used (T + 1, n), share of
    moves per point rejected with a non-finite energy (divergent)).
    """
    state = target(z0)
    t_max = len(betas) - 1
    log_w = torch.zeros_like(state[1])
    acc_total = torch.zeros_like(log_w[0])
    div_total = torch.zeros_like(log_w[0])
    used = torch.zeros((t_max + 1,) + tuple(log_w[0].shape), dtype=z0.dtype, device=z0.device)
    cur = eps.clone() if adapt is not None else None
    moves = 0
    order = range(t_max, 0, -1) if reverse else range(1, t_max + 1)
    for t in order:
        lp, lq = state[1], state[2]
        delta = (betas[t - 1] - betas[t]) if reverse else (betas[t] - betas[t - 1])
        log_w = log_w + delta * (lp - lq)
        t_move = t - 1 if reverse else t
        if not 1 <= t_move <= t_max - 1:
            continue
        step = cur if adapt is not None else eps[t_move]
        state, acc = hmc_step(state, betas[t_move], step, minv, leapfrog, target)
        a = acc.mean(0)
        acc_total = acc_total + a
        div_total = div_total + (acc == 0).to(acc.dtype).mean(0)  # exp(-inf): non-finite energy
        moves += 1
        if adapt is not None:
            rate, goal = adapt
            cur = torch.clamp(cur * torch.exp(rate * (a - goal)), 1e-8, 1e3)
        used[t_move] = step if adapt is None else cur
    mean_acc = acc_total / max(moves, 1)
    return torch.nan_to_num(log_w, nan=-math.inf), mean_acc, used, div_total / max(moves, 1)


def _mass(q, mass, like_z):
    ones = torch.ones_like(like_z)
    if mass == "identity":
        return ones
    try:
        s = q.stddev.expand_as(like_z)
    except (NotImplementedError, AttributeError, RuntimeError):
        return ones
    if not torch.isfinite(s).all() or (s <= 0).any():
        return ones
    return (s * s).to(like_z)


def _one_batch(log_joint, q, xb, s: AisSettings, betas, z_post=None):
    """Forward (and, with z_post, reverse) AIS on one block of data points."""
    m = xb.shape[0]
    check_proposal(q, m)
    ed = len(q.event_shape)
    target = AnnealingTarget(log_joint, q, xb, ed)
    c = s.num_chains
    z0 = q.sample((c,))
    minv = _mass(q, s.mass, z0)
    lf = s.leapfrog_steps
    eps0 = torch.full((m,), s.step_size, dtype=xb.dtype, device=xb.device)
    adapt = (0.5, s.target_accept)
    if s.adapt == "pilot":
        zp = q.sample((s.pilot_chains,))
        _, _, eps_t, _ = _anneal(target, zp, betas, eps0, minv[:1].expand_as(zp), lf,
                                 adapt=adapt)
    elif s.adapt == "none":
        eps_t = eps0.expand(len(betas), m)
    if s.adapt == "online":
        log_w, acc, eps_t, div = _anneal(target, z0, betas, eps0, minv, lf, adapt=adapt)
    else:
        log_w, acc, _, div = _anneal(target, z0, betas, eps_t, minv, lf)
    out = {"log_w": log_w, "acc": acc, "eps": eps_t, "div": div}
    if z_post is not None:
        out["log_w_rev"], out["acc_rev"], _, out["div_rev"] = _anneal(
            target, z_post, betas, eps_t, minv, lf, reverse=True)
    return out


def _estimate(log_w, num_chains, method, details, dtype, upper=False) -> Evidence:
    lse1 = torch.logsumexp(log_w, 0).to(dtype)
    lse2 = torch.logsumexp(2 * log_w, 0).to(dtype)
    return evidence_from_logsumexp(lse1, lse2, num_chains, method, details, negate=upper)


def _run(log_joint, proposal, x, settings, seed, z_posterior=None):
    if settings is None:
        settings = AisSettings()
    if not isinstance(settings, AisSettings):
        raise TypeError(f"settings: must be an AisSettings, got {type(settings).__name__}")
    s = settings
    x = as_data(x, "x", ndim=(1, 2, 3, 4))
    if not callable(log_joint):
        raise TypeError("log_joint: must be callable log_joint(x, z) -> (chains, n)")
    n = x.shape[0]
    batch = n if s.batch_size is None else min(s.batch_size, n)
    betas = s.betas
    fixed_q = isinstance(proposal, torch.distributions.Distribution)
    if not fixed_q and not callable(proposal):
        raise TypeError("proposal: must be a torch Distribution or a callable x -> Distribution")
    if fixed_q and batch < n:
        raise ValueError(
            "batch_size: a Distribution proposal covers all n points at once; pass a callable "
            "proposal(x_rows) to batch over data points"
        )
    outs = []
    with seeded(seed, x.device), torch.no_grad():
        for i, m in chunks(n, batch):
            xb = x[i:i + m]
            q = proposal if fixed_q else proposal(xb)
            zb = None
            if z_posterior is not None:
                zb = _slice_posterior(z_posterior, q, i, m, n, s.num_chains, x)
            outs.append(_one_batch(log_joint, q, xb, s, betas, zb))
    cat = {k: torch.cat([o[k] for o in outs], dim=-1) for k in outs[0]}
    details = {
        "num_steps": len(betas) - 1,
        "num_chains": s.num_chains,
        "schedule": s.schedule_name,
        "leapfrog_steps": s.leapfrog_steps,
        "adapt": s.adapt,
        "mass": s.mass,
        "acceptance": cat["acc"],
        "mean_acceptance": float(cat["acc"].mean()),
        "step_sizes": cat["eps"],
        "log_weights": cat["log_w"],
        "divergent_fraction": float(cat["div"].mean()),
    }
    _flag(details, cat["acc"], cat["log_w"], "ais")
    lower = _estimate(cat["log_w"], s.num_chains, "ais", details, x.dtype)
    if z_posterior is None:
        return lower
    rdetails = {**details, "acceptance": cat["acc_rev"], "log_weights": cat["log_w_rev"],
                "mean_acceptance": float(cat["acc_rev"].mean()),
                "divergent_fraction": float(cat["div_rev"].mean())}
    rdetails.pop("warning", None)
    _flag(rdetails, cat["acc_rev"], cat["log_w_rev"], "bdmc (reverse)")
    upper = _estimate(cat["log_w_rev"], s.num_chains, "bdmc-upper", rdetails, x.dtype, True)
    return lower, upper


def _flag(details: dict, acc: torch.Tensor, log_w: torch.Tensor, what: str) -> None:
    """Name the points whose chains barely moved or whose weights are all zero (module docs):
    ``details["warning"]`` and a RuntimeWarning; nothing when every point is fine."""
    notes = []
    dead = (~torch.isfinite(log_w).any(0)).nonzero().flatten().tolist()
    if dead:
        notes.append(f"log p(x, z) was not finite at every draw of the proposal for point(s) "
                     f"{dead[:10]}{' ...' if len(dead) > 10 else ''} (estimate -inf)")
    stuck = (acc < MIN_ACCEPTANCE).nonzero().flatten().tolist()
    if stuck:
        notes.append(
            f"mean HMC acceptance below {MIN_ACCEPTANCE} at point(s) {stuck[:10]}"
            f"{' ...' if len(stuck) > 10 else ''} (lowest {float(acc.min()):.3f}; divergent "
            f"share {details['divergent_fraction']:.2f}): the chains barely moved and the bound "
            "may be loose; use adapt='pilot', more leapfrog steps or a closer proposal")
    if notes:
        details["warning"] = f"{what}: " + "; ".join(notes)
        warnings.warn(details["warning"], RuntimeWarning, stacklevel=4)


def _slice_posterior(z_posterior, q, i, m, n, chains, x):
    if not isinstance(z_posterior, torch.Tensor):
        raise TypeError("z_posterior: must be a tensor (n, *event) or (chains, n, *event)")
    ev = tuple(q.event_shape)
    shape = tuple(z_posterior.shape)
    if shape == (n,) + ev:
        z = z_posterior[i:i + m].unsqueeze(0)
    elif len(shape) == 2 + len(ev) and shape[1:] == (n,) + ev and shape[0] in (1, chains):
        z = z_posterior[:, i:i + m]
    else:
        raise ValueError(
            f"z_posterior: expected shape ({n}, *{ev}) or (1 or {chains}, {n}, *{ev}), got {shape}"
        )
    if not torch.isfinite(z).all():
        raise ValueError("z_posterior: contains NaN or inf")
    return z.to(device=x.device, dtype=x.dtype).expand((chains, m) + ev)


def ais(log_joint: LogJoint, proposal, x, settings: AisSettings | None = None, *,
        seed: int = 0) -> Evidence:
    """Forward AIS: per-point stochastic lower bound log mean_c w_c (module docstring).

    ``log_joint(x, z)`` returns log p(x_n, z_n) shaped (chains, n) for z shaped
    (chains, n, *event) (e.g. :func:`elbolab.inference.tracing.pyro_log_joint`); ``proposal`` is the
    normalized start q, a Distribution with batch shape (n,) or a callable ``x_rows ->
    Distribution`` (needed with ``batch_size``); ``settings`` an :class:`AisSettings` (default
    ``AisSettings()``). The :class:`Evidence` ``details`` hold the per-point values and ses, the
    log weights (C, n), the acceptance rates and the step sizes per temperature.
    """
    return _run(log_joint, proposal, x, settings, seed)


def bdmc(log_joint: LogJoint, proposal, x, z_posterior: torch.Tensor,
         settings: AisSettings | None = None, *, seed: int = 0) -> tuple[Evidence, Evidence]:
    """Bidirectional Monte Carlo: (forward AIS lower bound, reverse AIS upper bound) per point.

    ``z_posterior``: exact posterior draws, shaped (n, *event) (one per point, e.g. the z that
    simulated x; all reverse chains start there) or (num_chains, n, *event). Both runs use the
    same step sizes, fixed before either starts (pilot or ``step_size``); ``adapt="online"`` is
    refused, as both bounds need kernels fixed in advance.
    """
    if isinstance(settings, AisSettings) and settings.adapt == "online":
        raise ValueError("adapt: bdmc needs frozen kernels; use 'pilot' or 'none'")
    return _run(log_joint, proposal, x, settings, seed, z_posterior=z_posterior)
