"""Stochastic variational inference with Pyro, for any family and any guide.

``fit`` learns the guide (and, unless ``learn_model_params=False``, the model's ``pyro.param``s)
by stochastic gradient ascent on the ELBO, then reports the ELBO of the fitted pair with the one
evaluator every engine shares (:func:`inference.elbo.estimate_elbo`). ``run_svi`` is the bare loop,
for tools that optimize a guide inside the current parameter store (e.g. per-point q*).

Guides whose family sums the discrete sites out (``GuideSpec.collapsed``) are trained with
``TraceEnum_ELBO`` and their bound is labelled ``elbo-collapsed``; the others use ``Trace_ELBO``
(or ``TraceMeanField_ELBO``, analytic KL where available, with ``mean_field_kl=True``), or the
torch-native step (``direct=True``, :func:`direct_step`: the same estimator without tracing).

The run's record and its convergence test (the slope of the per-datum ELBO over the last window,
with its standard error) are in :mod:`inference.svi_run`; training over several processes
(``strategy``) in :mod:`inference.svi_distributed`.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from tqdm.auto import tqdm

import guides as guide_registry
from guides.base import GuideSpec
from inference import svi_distributed
from inference.budget import check_svi
from inference.checkpoint import (
    read_checkpoint,
    restore_params,
    save_checkpoint,
    set_rng_state,
    snapshot_params,
)
from inference.elbo import estimate_elbo
from inference.result import FitResult, check_settings, data_fields
from inference.runtime import (
    PROGRESS_DELAY,
    Timer,
    cpu_threads,
    device_note,
    isolated,
    show_progress,
)
from inference.svi_pair import (
    check_coverage,
    load_params_from,
    param_names,
    posterior_draws,
    store_state,
)
from inference.svi_run import MIN_JUDGED, SviRun, judge
from inference.svi_settings import Settings
from inference.svi_steps import PyroStep, direct_step, make_loss
from models.capabilities import MissingCapability


@dataclass
class SviState:
    """``FitResult.state`` of the SVI engine: the fitted guide and everything to rebuild it."""

    guide: Any
    spec: GuideSpec
    params: dict[str, torch.Tensor]  # constrained values of every param, by name
    model_param_names: tuple[str, ...]
    guide_param_names: tuple[str, ...]
    guide_options: dict
    run: SviRun
    family: Any = None  # the fitted copy of the family (the caller's object is never changed)
    store: dict | None = None  # pyro param store state: unconstrained params and constraints


def run_svi(
    model,
    guide,
    args: tuple,
    settings: Settings,
    kwargs: dict | None = None,
    *,
    collapsed: bool = False,
    max_plate_nesting: int = 1,
    n: int | None = None,
    step_fn=None,
    resume: dict | None = None,
) -> SviRun:
    """Optimize inside the current param store; never seeds or clears anything.

    A step whose loss or gradient is non-finite, or whose update would break a parameter, is not
    applied (:mod:`inference.svi_steps`); a non-finite loss also undoes the update before it (the
    parameters it produced gave that loss). The run stops with the step, the reason, and the last
    parameters whose loss was finite (``skip_nonfinite``: count both as skipped and go on). ``step_fn`` replaces the Pyro step (the direct path, :func:`direct_step`).
    ``resume``: a checkpoint payload (:func:`inference.checkpoint.read_checkpoint`) to continue.
    The steps run on ``settings.threads`` CPU threads (data on the CPU; restored afterwards).
    """
    kwargs = dict(kwargs or {})
    if settings.objective.subsample_size is not None:
        kwargs["subsample_size"] = settings.objective.subsample_size
    n = n or (args[0].shape[0] if args and hasattr(args[0], "shape") else 1)
    if not settings.objective.learn_model_params:
        model = poutine.block(model, hide_types=["param"])
    if step_fn is None:
        loss = make_loss(settings, collapsed, max_plate_nesting)
        step_fn = PyroStep(model, guide, args, kwargs, loss, settings,
                           keep_state=settings.objective.skip_nonfinite)
    if settings.objective.skip_nonfinite and hasattr(step_fn, "keep_state"):
        step_fn.keep_state = True  # skipped steps must not leave their moments behind
    run = SviRun()
    data = args[0] if args and isinstance(args[0], torch.Tensor) else None
    with pyro.validation_enabled(settings.validate), cpu_threads(settings.threads, data):
        _loop(step_fn, run, settings, n, model, guide, collapsed, max_plate_nesting, resume)
    return run


def _optimizer(step_fn):
    return getattr(step_fn, "optimizer", None)


def _resume(step_fn, run: SviRun, payload: dict) -> int:
    restore_params(payload["params"])
    run.trace = [float(v) for v in payload["trace"]]
    start = int(payload["step"])
    opt_state = payload.get("optimizer")
    if opt_state is not None:
        if _optimizer(step_fn) is None:  # the Pyro step makes its optimizer on its first step
            step_fn.prepare()
        _optimizer(step_fn).load_state_dict(opt_state)
    set_rng_state(payload["rng"])
    run.val_trace = [(int(k), float(v)) for k, v in payload.get("val_trace", torch.empty(0)).tolist()]
    run.skipped = int(payload.get("skipped", 0))
    return start


def _loop_state(payload: dict) -> tuple:
    """(best_val, best_snap, bad_evals) saved with a checkpoint."""
    return (float(payload.get("best_val", -math.inf)), payload.get("best_params"),
            int(payload.get("bad_evals", 0)))


def _loop_payload(run, best_val, best_snap, bad_evals) -> dict:
    """What the loop must carry over a resume, beyond params, optimizer, step, trace and RNG."""
    out = {"val_trace": torch.tensor(run.val_trace, dtype=torch.float64).reshape(-1, 2),
           "skipped": torch.tensor(run.skipped),
           "best_val": torch.tensor(best_val, dtype=torch.float64),
           "bad_evals": torch.tensor(bad_evals)}
    if best_snap is not None:
        out["best_params"] = best_snap
    return out


def _loop(step_fn, run, settings, n, model, guide, collapsed, max_plate_nesting, resume):
    st, ck = settings.stopping, settings.checkpointing
    best_val, best_snap, bad_evals = -math.inf, None, 0
    start = _resume(step_fn, run, resume) if resume is not None else 0
    if resume is not None:
        best_val, best_snap, bad_evals = _loop_state(resume)
    run.steps = start
    if resume is None and _optimizer(step_fn) is None and hasattr(step_fn, "prepare"):
        step_fn.prepare()  # create the params and the optimizer before the first step
    skip = settings.objective.skip_nonfinite
    progress = show_progress(settings.progress)
    bar = tqdm(range(start, st.num_steps), desc="svi", disable=not progress, leave=False,
               delay=PROGRESS_DELAY, file=sys.stderr)
    for step in bar:
        try:  # a refused step (non-finite loss, gradient or update) changes no parameter
            value, refused = step_fn()
        except (ValueError, RuntimeError) as exc:  # distribution validation on NaN parameters
            if not _mentions_nonfinite(str(exc)):
                raise
            value, refused = math.nan, f"the step failed ({str(exc).splitlines()[0][:160]})"
        if refused:
            undone = not math.isfinite(value) and _undo_last(step_fn)
            if undone:  # the loss at these parameters is non-finite: back to the last finite one
                run.trace.pop()
            if skip:
                run.skipped += 1 + undone
                continue
            run.diverged = True
            kept = step - undone
            run.steps = kept
            why = (f"the last at which the loss was finite; step {step}'s update was undone"
                   if undone else "the update was not applied" if math.isfinite(value) else
                   "the loss at them was non-finite; no earlier state was in memory")
            run.message = (f"diverged at step {step + 1}: {refused}; kept the parameters of step "
                           f"{kept} ({why})")
            return run
        run.trace.append(-value)
        run.steps = step + 1
        if progress and step % 50 == 0:
            bar.set_postfix(elbo_per_datum=f"{-value / n:.4f}", refresh=False)
        if st.eval_every and st.val_data is not None and run.steps % st.eval_every == 0:
            val = estimate_elbo(
                model, guide, st.val_data, num_particles=max(2, st.val_particles),
                batch_size=st.val_particles, collapsed=collapsed,
                max_plate_nesting=max_plate_nesting,
            ).value / st.val_data.shape[0]
            run.val_trace.append((run.steps, val))
            if val > best_val:
                best_val, best_snap, bad_evals = val, snapshot_params(), 0
            else:
                bad_evals += 1
                if st.patience and bad_evals >= st.patience:
                    restore_params(best_snap)
                    run.stopped_early, run.converged = True, True
                    run.message = (
                        f"early stop at step {run.steps}: held-out ELBO did not improve for "
                        f"{bad_evals} evaluations; restored best ({best_val:.4f}/datum)"
                    )
                    return run
        if st.tol and len(run.trace) >= st.window and run.steps % st.window == 0:
            if judge(run, st, n, st.tol):
                run.message = (f"converged at step {run.steps}: projected gain "
                               f"{run.slope:.2e} +- {run.slope_se:.1e} nats/datum < tol")
                return run
        if ck.path is not None and ck.every and run.steps % ck.every == 0:
            # last in the step: the held-out evaluation above draws random numbers too
            opt = _optimizer(step_fn)
            save_checkpoint(ck.path, run.steps, run.trace, opt.state_dict() if opt else None,
                            _loop_payload(run, best_val, best_snap, bad_evals))
    if best_snap is not None:
        restore_params(best_snap)
    if len(run.trace) >= 2 * MIN_JUDGED:
        judge(run, st, n, st.converged_tol)
        run.message = run.message or (
            f"ran {run.steps} steps; projected gain over one more window {run.slope:.2e} +- "
            f"{run.slope_se:.1e} nats/datum ({'<' if run.converged else '>='} converged_tol "
            f"{st.converged_tol:g} with 2 se)"
        )
    run.message = run.message or (
        f"ran {run.steps} steps, too few to judge convergence (needs {2 * MIN_JUDGED})")
    if run.skipped:
        run.message += f"; skipped {run.skipped} non-finite steps"
    return run


def _notes(elbo: float, x) -> str:
    """What the message must add: a non-finite ELBO at the kept parameters, small data on CUDA."""
    out = "" if math.isfinite(elbo) else "; the ELBO estimate at the kept parameters is not finite"
    note = device_note("svi", x)
    return out + (f"; {note}" if note else "")


def _undo_last(step_fn) -> bool:
    opt = _optimizer(step_fn)
    return bool(opt is not None and hasattr(opt, "undo_last") and opt.undo_last())


def _mentions_nonfinite(text: str) -> bool:
    t = text.lower()
    return "nan" in t or "inf" in t or "invalid values" in t


def resolve_guide(family, guide) -> GuideSpec:
    """A guide given by name (one of ``guides.for_family(family)``), a GuideSpec, or a callable."""
    if isinstance(guide, GuideSpec):
        return guide
    if callable(guide):
        name = getattr(guide, "__name__", type(guide).__name__)
        return GuideSpec(name, lambda f, x: guide, description="a user's guide callable")
    specs = guide_registry.for_family(family)
    name = guide if guide is not None else guide_registry.default_for(family)
    if name is None or not specs:
        raise MissingCapability(
            f"SVI needs a guide; none is registered for the {family.name} family (pass "
            "guide=<GuideSpec or callable>, or give the family the LocalDensities capability)")
    if name not in specs:
        raise ValueError(f"guide: the {family.name} family has guides {sorted(specs)}, got {name!r}")
    return specs[name]


def fit(
    family,
    x,
    settings: Settings | None = None,
    *,
    seed: int = 0,
    guide=None,
    guide_options: dict | None = None,
    resume=None,
) -> FitResult:
    """Fit ``guide`` (name, GuideSpec or callable) to ``family.model`` on data ``x``.

    ``guide_options`` go to the guide's builder; ``resume`` is a checkpoint path written by a run
    with the same settings (``checkpoint=..., checkpoint_every=N``) to continue from. With a
    distributed ``strategy`` the steps run data-parallel on Lightning (:mod:`inference.ddp`) and
    the fitted pair is evaluated here; on the processes other than global rank 0 (strategy
    ``"ddp"`` under a launcher) it returns None.
    """
    settings = check_settings(settings, Settings, "svi")
    family = copy.deepcopy(family)  # a fit never changes the caller's family (e.g. a decoder)
    x = family.check_data(x)
    st = settings.stopping
    if st.val_data is not None:
        settings = settings.replace(val_data=family.check_data(st.val_data))
    if settings.objective.subsample_size is not None and settings.objective.subsample_size > x.shape[0]:
        raise ValueError(
            f"subsample_size: {settings.objective.subsample_size} is larger than the data "
            f"({x.shape[0]} points)")
    spec = resolve_guide(family, guide)
    if settings.distributed.strategy is not None:
        svi_distributed.check(settings, resume, x, spec)
    payload = read_checkpoint(resume) if resume is not None else None
    nest = family.max_plate_nesting
    guide_options = dict(guide_options or {})
    threads = settings.threads if settings.distributed.strategy is None else None
    with isolated(seed), cpu_threads(threads, x), Timer(x.device) as timer:
        guide_fn = spec.build(family, x, **guide_options)
        enum = spec.collapsed or spec.enumerated
        step_fn = None
        if settings.objective.direct:
            if enum:
                raise ValueError(f"direct: guide {spec.name!r} needs enumeration (use Pyro's ELBO)")
            step_fn = direct_step(family, guide_fn, x, settings,
                                  keep_state=settings.objective.skip_nonfinite)
        elif payload is not None:
            load_params_from(payload, family.model, guide_fn, x)
        check_coverage(family, guide_fn, x, spec)
        check_svi(family.model, guide_fn, x, settings, enum)  # memory, before any step
        if settings.distributed.strategy is not None:
            by_name = guide if guide is None or isinstance(guide, str) else spec
            run = svi_distributed.train(family, guide_fn, x, by_name, guide_options, settings,
                                        seed)
            if run is None:
                return None  # a process other than global rank 0: rank 0 reports
        else:
            run = run_svi(
                family.model, guide_fn, (x,), settings, collapsed=enum, max_plate_nesting=nest,
                step_fn=step_fn, resume=payload,
            )
        ev = settings.evaluation
        est = estimate_elbo(
            family.model,
            guide_fn,
            x,
            num_particles=ev.eval_particles,
            batch_size=ev.eval_batch,
            collapsed=spec.collapsed,
            enumerate=enum,
            max_plate_nesting=nest,
        )
        params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
        store = store_state()
        guide_names = param_names(guide_fn, x)
        model_names = param_names(family.model, x) - guide_names
        samples, log_lik = posterior_draws(family, guide_fn, x, ev.num_posterior_samples)
    converged = run.converged and not run.diverged
    return FitResult(
        **data_fields(family, x, seed),
        engine="svi",
        guide=spec.name,
        bound=est.bound,
        elbo=est.value,
        elbo_se=est.se,
        trace=run.trace,
        posterior={k: v for k, v in params.items() if k in guide_names},
        samples=samples,
        log_likelihood=log_lik,
        seconds=timer.seconds,
        converged=converged,
        message=run.message + _notes(est.value, x),
        settings={**family.settings(), **settings.flat(), "guide_options": guide_options},
        diagnostics={"steps": run.steps, "eval_particles": est.num_particles,
                     "projected_gain_per_datum": run.slope, "projected_gain_se": run.slope_se,
                     "diverged": run.diverged, "skipped_steps": run.skipped},
        state=SviState(guide_fn, spec, params, tuple(sorted(model_names)),
                       tuple(sorted(guide_names)), guide_options, run, family, store),
    )
