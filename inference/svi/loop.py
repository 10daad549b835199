"""The SVI loop: steps, refused steps, held-out early stopping, convergence and checkpoints.

:func:`run_svi` optimizes a model/guide pair inside the current param store and never seeds or
clears anything: the engine (:func:`elbolab.inference.svi.fit`) runs it inside a fresh
store; tools that optimize a guide with the model fixed (the gaps' per-point q*) call it directly.
"""

from __future__ import annotations

import math
import sys

import pyro
import torch
from pyro import poutine
from tqdm.auto import tqdm

from elbolab.inference.elbo import estimate_elbo
from elbolab.inference.runtime import PROGRESS_DELAY, cpu_threads, show_progress
from elbolab.inference.svi.checkpoint import (
    restore_params,
    save_checkpoint,
    set_rng_state,
    snapshot_params,
)
from elbolab.inference.svi.run import MIN_JUDGED, SviRun, judge
from elbolab.inference.svi.settings import Settings
from elbolab.inference.svi.steps import PyroStep, make_loss, runaway_bounds


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

    A step whose loss or gradient is non-finite, whose loss ran away (finite, but a million times
    its scale away from the losses before it: :func:`elbolab.inference.svi.steps.runaway_bounds`),
    or whose update would break a parameter, is not applied (:mod:`elbolab.inference.svi.steps`);
    a non-finite or runaway loss also undoes the update before it (the parameters it produced
    gave that loss). The run stops with the step, the reason, and the last
    parameters whose loss was finite (``skip_nonfinite``: count both as skipped and go on). ``step_fn`` replaces the Pyro step (the direct path, :func:`direct_step`).
    ``resume``: a checkpoint payload (:func:`elbolab.inference.svi.checkpoint.read_checkpoint`) to continue.
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
    guard = hasattr(step_fn, "bounds")
    best = min((-v for v in run.trace), default=math.inf)
    for step in bar:
        bounds = runaway_bounds(-run.trace[-1], best, n) if run.trace else None
        if guard:
            step_fn.bounds = bounds
        try:  # a refused step (non-finite loss, gradient or update) changes no parameter
            value, refused = step_fn()
        except (ValueError, RuntimeError) as exc:  # distribution validation on NaN parameters
            if not _mentions_nonfinite(str(exc)):
                raise
            value, refused = math.nan, f"the step failed ({str(exc).splitlines()[0][:160]})"
        if refused:
            ran_away = bounds is not None and math.isfinite(value) and not (
                bounds[0] <= value <= bounds[1])
            undone = (ran_away or not math.isfinite(value)) and _undo_last(step_fn)
            if undone:  # the loss at these parameters is unusable: back to the last usable one
                run.trace.pop()
            if skip:
                run.skipped += 1 + undone
                continue
            run.diverged = True
            kept = step - undone
            run.steps = kept
            why = (f"the last at which the loss was {'in range' if ran_away else 'finite'}; step "
                   f"{step}'s update was undone" if undone else "the update was not applied" if math.isfinite(value) else
                   "the loss at them was non-finite; no earlier state was in memory")
            run.message = (f"diverged at step {step + 1}: {refused}; kept the parameters of step "
                           f"{kept} ({why})")
            return run
        run.trace.append(-value)
        best = min(best, value)
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


def _undo_last(step_fn) -> bool:
    opt = _optimizer(step_fn)
    return bool(opt is not None and hasattr(opt, "undo_last") and opt.undo_last())


def _mentions_nonfinite(text: str) -> bool:
    t = text.lower()
    return "nan" in t or "inf" in t or "invalid values" in t
