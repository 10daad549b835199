"""Stochastic variational inference with Pyro, for any family and any guide.

``fit`` learns the guide (and, unless ``learn_model_params=False``, the model's ``pyro.param``s)
by stochastic gradient ascent on the ELBO, then reports the ELBO of the fitted pair with the one
evaluator every engine shares (:func:`elbolab.inference.elbo.estimate_elbo`). ``run_svi`` is the bare loop,
for tools that optimize a guide inside the current parameter store (e.g. per-point q*).

Guides whose family sums the discrete sites out (``GuideSpec.collapsed``) are trained with
``TraceEnum_ELBO`` and their bound is labelled ``elbo-collapsed``; the others use ``Trace_ELBO``
(or ``TraceMeanField_ELBO``, analytic KL where available, with ``mean_field_kl=True``), or the
torch-native step (``direct=True``, :func:`direct_step`: the same estimator without tracing).

The run's record and its convergence test (the slope of the per-datum ELBO over the last window,
with its standard error) are in :mod:`elbolab.inference.svi.run`; training over several processes
(``strategy``) in :mod:`elbolab.inference.svi.distributed`.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pyro

from elbolab.guides.base import GuideSpec
from elbolab.inference.budget import check_svi
from elbolab.inference.elbo import estimate_elbo
from elbolab.inference.result import FitResult, check_settings, data_fields
from elbolab.inference.runtime import (
    Timer,
    cpu_threads,
    device_note,
    isolated,
)
from elbolab.inference.svi import distributed as svi_distributed
from elbolab.inference.svi.checkpoint import (
    read_checkpoint,
)
from elbolab.inference.svi.loop import run_svi
from elbolab.inference.svi.pair import (
    check_coverage,
    check_val_data,
    enumeration_of,
    load_params_from,
    param_names,
    posterior_draws,
    store_state,
    vectorization_problem,
)
from elbolab.inference.svi.settings import Settings
from elbolab.inference.svi.state import SviState, resolve_guide
from elbolab.inference.svi.steps import direct_step, runaway_bounds
from elbolab.models.program import Program, as_family


def _notes(elbo: float, x) -> str:
    """What the message must add: a non-finite ELBO at the kept parameters, small data on CUDA."""
    out = "" if math.isfinite(elbo) else "; the ELBO estimate at the kept parameters is not finite"
    note = device_note("svi", x)
    return out + (f"; {note}" if note else "")


def _ran_away(elbo: float, run, n: int) -> str:
    """Why the ELBO at the kept parameters is not reported: it lies a runaway away (the loop's
    rule, :func:`elbolab.inference.svi.steps.runaway_bounds`) from the last training loss."""
    if not run.trace or not math.isfinite(elbo):
        return ""
    lo, hi = runaway_bounds(-run.trace[-1], -max(run.trace), n)
    if lo <= -elbo <= hi:
        return ""
    return (f"the ELBO at the kept parameters ran away to {elbo:.3g} (the last training ELBO was "
            f"{run.trace[-1]:.3g}): diverged, no ELBO reported")


def _users_code(family, guide) -> bool:
    """A program, a family or a guide written outside elbolab (vectorization is probed)."""
    own = type(family).__module__.startswith("elbolab.") and not isinstance(family, Program)
    return not own or not (guide is None or isinstance(guide, (str, GuideSpec)))


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
    distributed ``strategy`` the steps run data-parallel on Lightning (:mod:`elbolab.inference.svi.ddp`) and
    the fitted pair is evaluated here; on the processes other than global rank 0 (strategy
    ``"ddp"`` under a launcher) it returns None.
    """
    settings = check_settings(settings, Settings, "svi")
    users_code = _users_code(family, guide)
    family = copy.deepcopy(as_family(family))  # a fit never changes the caller's family
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
        spec = enumeration_of(family, guide_fn, x, spec)
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
        if st.val_data is not None and st.eval_every:
            check_val_data(family, guide_fn, settings.stopping.val_data, spec)
        sequential = ""
        if users_code and settings.objective.vectorize_particles and not settings.objective.direct:
            sequential = vectorization_problem(family, guide_fn, x, nest, enum)
            if sequential:  # e.g. a module or fancy indexing that a particle dim breaks
                settings = settings.replace(vectorize_particles=False)
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
            vectorize=not sequential,
        )
        params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
        store = store_state()
        guide_names = param_names(guide_fn, x)
        model_names = param_names(family.model, x) - guide_names
        samples, log_lik = posterior_draws(family, guide_fn, x, ev.num_posterior_samples)
    runaway = _ran_away(est.value, run, x.shape[0])
    if runaway:  # e.g. one step at a huge rate: no later step saw the update that broke it
        run.diverged, run.message = True, run.message + f"; {runaway}"
        est = dataclasses.replace(est, value=math.nan, se=math.nan)
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
        message=run.message + _notes(est.value, x) + (
            f"; particles drawn one at a time (vectorized particles fail on this model: "
            f"{sequential}; indexing such as locs[c] vectorizes with pyro.ops.indexing.Vindex)"
            if sequential else ""),
        settings={**family.settings(), **settings.flat(), "guide_options": guide_options},
        diagnostics={"steps": run.steps, "eval_particles": est.num_particles,
                     "projected_gain_per_datum": run.slope, "projected_gain_se": run.slope_se,
                     "diverged": run.diverged, "skipped_steps": run.skipped},
        state=SviState(guide_fn, spec, params, tuple(sorted(model_names)),
                       tuple(sorted(guide_names)), guide_options, run, family, store, x),
    )
