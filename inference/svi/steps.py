"""The gradient steps of the SVI engine: Pyro's ELBOs and the torch-native (direct) step.

Both return ``(loss, refused)``: the loss of the step and, when the update was not applied, why
(a non-finite loss or gradient, or an update that broke a parameter, named; see
:meth:`elbolab.inference.svi.sparse_adam.LazyClippedAdam.guarded_step`), else ``""``. A refused step leaves
the parameters as they were. Both expose their optimizer as ``.optimizer`` (its state goes into
checkpoints); ``keep_state=True`` also undoes the optimizer's moments on a refusal (for runs that
skip such steps and go on).
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.infer import (
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    JitTraceMeanField_ELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceMeanField_ELBO,
)
from pyro.optim.clipped_adam import ClippedAdam
from torch.distributions import Independent, Normal

from elbolab.inference.svi.checkpoint import ParamCheck
from elbolab.inference.svi.settings import Settings
from elbolab.inference.svi.sparse_adam import LazyClippedAdam
from elbolab.models.capabilities import LocalDensities, MissingCapability
from elbolab.models.numerics import LOG_2PI, minibatch_indices

#: a finite loss this many times its scale away from the losses before it is a runaway
#: (:func:`runaway_bounds`): refused like a non-finite one.
RUNAWAY = 1e6


def runaway_bounds(previous: float, best: float, n: int) -> tuple[float, float]:
    """(lo, hi) a step's loss must lie in, given the loss of the step before (``previous``) and
    the lowest so far (``best``), over ``n`` data points: no rise above ``best`` and no drop below
    ``previous`` of more than :data:`RUNAWAY` times max(|loss|, n) (a nat per datum). An honest
    step moves the loss by about its own size; a learning rate that throws the parameters to
    1e10 moves it by 1e20 (and a loss that started huge, on data in large units, may still fall
    to its optimum: a fall is measured from the step before)."""
    return (previous - RUNAWAY * max(abs(previous), n), best + RUNAWAY * max(abs(best), n))


def make_loss(settings: Settings, collapsed: bool, max_plate_nesting: int):
    """The Pyro ELBO object for these settings (``collapsed``: any enumeration, model or guide)."""
    o = settings.objective
    kw = dict(
        num_particles=o.num_particles,
        vectorize_particles=o.vectorize_particles and o.num_particles > 1,
        max_plate_nesting=max_plate_nesting,
    )
    if collapsed:
        if o.mean_field_kl:
            raise ValueError("mean_field_kl: does not apply to a guide that needs enumeration")
        return (JitTraceEnum_ELBO if o.jit else TraceEnum_ELBO)(**kw)
    if o.mean_field_kl:
        return (JitTraceMeanField_ELBO if o.jit else TraceMeanField_ELBO)(**kw)
    return (JitTrace_ELBO if o.jit else Trace_ELBO)(**kw)


def adam(params, settings: Settings, num_steps: int) -> ClippedAdam:
    """Pyro's ClippedAdam; parameters with sparse gradients (local rows read by an embedding
    lookup) are updated lazily, only the rows of the minibatch (:mod:`elbolab.inference.svi.sparse_adam`)."""
    o = settings.optimizer
    gamma = o.lr_decay ** (1.0 / num_steps)
    return LazyClippedAdam(params, lr=o.lr, clip_norm=o.clip_norm or math.inf, lrd=gamma)


def apply(optimizer, value: float, params, check: ParamCheck, keep_state: bool,
          bounds: tuple[float, float] | None = None) -> str:
    """The guarded update after a loss and its gradients: ``""`` when applied, else why not.
    ``bounds``: (lo, hi) the loss must lie in (:func:`runaway_bounds`; None: any finite loss)."""
    try:
        if not math.isfinite(value):
            return f"loss became {value}"
        if bounds is not None and not bounds[0] <= value <= bounds[1]:
            return (f"the loss ran away to {value:.3g} (outside [{bounds[0]:.3g}, "
                    f"{bounds[1]:.3g}]: {RUNAWAY:.0e} times the scale of the losses before it)")
        if optimizer is None:  # a guide and model without parameters: nothing to move
            return ""
        refused, grads_finite = optimizer.guarded_step(check.valid, keep_state)
        return check.refusal(refused, grads_finite) if refused else ""
    finally:
        for p in params:
            p.grad = None


class PyroStep:
    """One gradient step of a Pyro ELBO on every param the model and guide touch (one ClippedAdam
    over all of them: per-element the same update as ``pyro.optim.ClippedAdam``), guarded."""

    def __init__(self, model, guide, args, kwargs, loss, settings, keep_state: bool = False):
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.loss, self.settings, self.keep_state = loss, settings, keep_state
        self.optimizer: ClippedAdam | None = None
        self._seen: set[int] = set()
        self._check = ParamCheck()
        self.bounds: tuple[float, float] | None = None  # set by the loop (runaway_bounds)

    def prepare(self) -> None:
        """Make the optimizer over the params one step would touch, in the same order (to load
        a checkpointed optimizer state before the first step). Draws random numbers: the caller
        restores the random state afterwards."""
        with torch.no_grad(), poutine.trace(param_only=True) as cap:
            gtr = poutine.trace(self.guide).get_trace(*self.args, **self.kwargs)
            poutine.replay(self.model, trace=gtr)(*self.args, **self.kwargs)
        self._register([s["value"].unconstrained() for s in cap.trace.nodes.values()])

    def __call__(self) -> tuple[float, str]:
        cap = poutine.trace(param_only=True)
        try:
            with cap:
                value = float(self.loss.loss_and_grads(self.model, self.guide, *self.args,
                                                       **self.kwargs))
        except BaseException:
            for site in cap.trace.nodes.values():  # a failed step leaves no gradients behind
                site["value"].unconstrained().grad = None
            raise
        params = [s["value"].unconstrained() for s in cap.trace.nodes.values()]
        self._register(params)
        return value, apply(self.optimizer, value, params, self._check, self.keep_state,
                            self.bounds)

    def _register(self, params) -> None:
        new = [p for p in params if id(p) not in self._seen]
        if new:
            self._seen.update(id(p) for p in new)
            if self.optimizer is None:
                self.optimizer = adam(new, self.settings, self.settings.stopping.num_steps)
            else:
                self.optimizer.add_param_group({"params": new})


def rsample_with_log_prob(q, particles: int):
    """``particles`` reparameterized draws z ~ q and log q(z) (one draw: no particle dimension,
    which spares the decoder a batched matmul). For a diagonal Gaussian
    (``Normal(m, s).to_event(1)``) log q is written in the standard draws eps of z = m + s eps:
    sum_k [-eps_k^2 / 2 - log s_k] - k/2 log 2 pi, the same value and the same total derivative
    in (m, s) as ``q.log_prob(z)``, with fewer operations to differentiate."""
    base = q.base_dist if isinstance(q, Independent) and q.reinterpreted_batch_ndims == 1 else None
    if isinstance(base, Normal):
        return diagonal_normal_draw(base.loc, base.scale, particles)
    z = q.rsample(() if particles == 1 else (particles,))
    return z, q.log_prob(z)


def diagonal_normal_draw(loc: torch.Tensor, scale: torch.Tensor, particles: int):
    """z = loc + scale * eps and log N(z; loc, diag scale^2) summed over the last dimension,
    written in eps (:func:`rsample_with_log_prob`); one draw has no particle dimension."""
    shape = loc.shape if particles == 1 else (particles, *loc.shape)
    eps = torch.empty(shape, dtype=loc.dtype, device=loc.device).normal_()
    log_q = (-0.5 * eps.pow(2) - scale.log()).sum(-1) - 0.5 * loc.shape[-1] * LOG_2PI
    return loc + scale * eps, log_q


def direct_step(family, guide, x: torch.Tensor, settings: Settings, keep_state: bool = False):
    """A torch-native SVI step: the same reparameterized ELBO estimate as ``Trace_ELBO``, without
    Pyro's tracing (for speed on small networks).

    Needs a :class:`~elbolab.models.capabilities.LocalDensities` family (``log_joint(x, z) -> (..., n)``)
    and ``guide.distribution(x, idx)`` (a reparameterizable q(z_n | x_n) with batch shape (B,)).
    Per step: idx ~ a uniform minibatch of size B, z_p ~ q (P particles,
    :func:`rsample_with_log_prob`), loss = -(n / B) * mean_p sum_n [log p(x_n, z_pn) - log q(z_pn)],
    the unbiased estimate of -ELBO that Trace_ELBO with plate subsampling computes. The optimized
    tensors are the param store's.
    Returns the step function; its ``optimizer`` attribute is the ClippedAdam it uses.
    """
    if not isinstance(family, LocalDensities):
        raise MissingCapability(
            f"direct: the torch-native step needs the LocalDensities capability; the "
            f"{family.name} family does not implement it")
    if not callable(getattr(guide, "distribution", None)):
        raise ValueError("direct: the guide has no distribution(x, idx)")
    with torch.no_grad():
        gtr = poutine.trace(guide).get_trace(x)
        mtr = poutine.trace(family.model).get_trace(x)
    names = {m["name"] for m in gtr.nodes.values() if m["type"] == "param"}
    if settings.objective.learn_model_params:
        names |= {m["name"] for m in mtr.nodes.values() if m["type"] == "param"}
    params = [p for k, p in pyro.get_param_store().named_parameters() if k in names]
    opt = adam(params, settings, settings.stopping.num_steps)
    n, batch = x.shape[0], settings.objective.subsample_size
    particles = settings.objective.num_particles
    check = ParamCheck()
    loc_scale = getattr(guide, "loc_scale", None)

    def step() -> tuple[float, str]:
        idx = None if batch is None else minibatch_indices(n, batch, x.device)
        xb = x if idx is None else x[idx]
        try:
            if loc_scale is not None:  # a diagonal Gaussian guide: no distribution object
                z, log_q = diagonal_normal_draw(*loc_scale(x, idx), particles)
            else:
                z, log_q = rsample_with_log_prob(guide.distribution(x, idx), particles)
            terms = (family.log_joint(xb, z) - log_q).sum(-1)  # (P,) or () for one draw
            elbo = (terms if particles == 1 else terms.mean(0)) * (n / xb.shape[0])
            (-elbo).backward()
        except BaseException:
            opt.zero_grad()
            raise
        value = float(-elbo.detach())
        return value, apply(opt, value, params, check, step.keep_state, step.bounds)

    step.optimizer, step.keep_state, step.bounds = opt, keep_state, None
    return step
