"""The SVI engine's distributed path: :func:`elbolab.inference.svi.fit` with a ``strategy`` trains on
PyTorch Lightning's DDP (:func:`elbolab.inference.svi.ddp.fit_ddp`) and evaluates the fitted pair in this
process like any other fit. Settings the distributed trainer does not run are errors naming them.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine

from elbolab.guides.base import GuideSpec
from elbolab.inference.runtime import show_progress
from elbolab.inference.svi.run import MIN_JUDGED, SviRun, judge
from elbolab.inference.svi.settings import Settings

#: settings the distributed trainer does not run, with their defaults
_NOT_DISTRIBUTED = {"direct": False, "jit": False, "skip_nonfinite": False, "tol": 0.0,
                    "patience": 0, "eval_every": 0, "checkpoint": None, "checkpoint_every": 0,
                    "learn_model_params": True}


def check(settings: Settings, resume, x, spec: GuideSpec) -> None:
    """Every setting the distributed path cannot honour is an error naming it (before any
    process starts)."""
    flat = settings.flat()
    for name, default in _NOT_DISTRIBUTED.items():
        if flat[name] != default:
            raise ValueError(f"{name}: not available with strategy="
                             f"{settings.distributed.strategy!r} (the distributed trainer runs "
                             f"a fixed number of Pyro ELBO steps); leave it at {default!r}")
    if settings.stopping.val_data is not None:
        raise ValueError("val_data: held-out evaluation is not available with a distributed "
                         "strategy")
    if resume is not None:
        raise ValueError("resume: a distributed run cannot resume from a checkpoint")
    if spec.collapsed or spec.enumerated:
        raise ValueError(f"strategy: guide {spec.name!r} needs enumeration, which the "
                         "distributed trainer does not run")
    world, batch = settings.distributed.world_size, settings.objective.subsample_size
    if batch is None or batch % world:
        raise ValueError(f"subsample_size: a distributed run needs a global minibatch size that "
                         f"is a multiple of the {world} processes, got {batch}")


def train(family, guide_fn, x, guide, guide_options, settings, seed) -> SviRun | None:
    """Train with :func:`elbolab.inference.svi.ddp.fit_ddp`, then load the fitted parameters into this
    process's param store (the pair is created by tracing it once). ``guide``: the guide's name
    (each process builds it; a family's composed guides are closures that do not pickle) or a
    GuideSpec."""
    from elbolab.inference.svi.ddp import fit_ddp

    d = settings.distributed
    accelerator = d.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if x.device.type == "cuda" else "cpu"
    out = fit_ddp(family, x, settings, guide=guide, guide_options=guide_options,
                  devices=d.devices, num_nodes=d.num_nodes, accelerator=accelerator,
                  strategy=d.strategy, seed=seed,
                  progress=show_progress(settings.progress))
    if out is None:
        return None
    with torch.no_grad(), poutine.trace(param_only=True):
        trace = poutine.trace(guide_fn).get_trace(x)
        poutine.replay(family.model, trace=trace)(x)
    store = pyro.get_param_store()
    kinds = store.get_state()["constraints"]
    with torch.no_grad():
        for name, u in store.named_parameters():
            if name in out.unconstrained:  # the optimized tensor itself: nothing lost
                u.copy_(out.unconstrained[name].to(device=u.device, dtype=u.dtype))
            elif name in out.params:
                value = out.params[name].to(device=u.device, dtype=u.dtype)
                u.copy_(torch.distributions.transform_to(kinds[name]).inv(value))
            else:
                raise RuntimeError(f"strategy: parameter {name!r} was not trained by the "
                                   "distributed run")
    run = SviRun(trace=list(out.trace), steps=len(out.trace))
    st = settings.stopping
    bad = next((i for i, v in enumerate(run.trace) if not math.isfinite(v)), None)
    if bad is not None:  # the distributed trainer does not guard or undo its updates
        run.diverged = True
        run.message = (f"diverged: the all-reduced ELBO of step {bad + 1} of {run.steps} on "
                       f"{out.world_size} processes was {run.trace[bad]}; the parameters are "
                       "those after the last step (the distributed trainer does not undo steps)")
        return run
    if len(run.trace) >= 2 * MIN_JUDGED:
        judge(run, st, x.shape[0], st.converged_tol)
        gain = (f"projected gain over one more window {run.slope:.2e} +- {run.slope_se:.1e} "
                f"nats/datum ({'<' if run.converged else '>='} converged_tol "
                f"{st.converged_tol:g} with 2 se)")
    else:
        gain = f"too few to judge convergence (needs {2 * MIN_JUDGED})"
    run.message = (f"ran {run.steps} steps on {out.world_size} processes (strategy {d.strategy}; "
                   f"largest parameter difference between ranks {out.rank_spread:.1e}); {gain}")
    return run


__all__ = ["check", "train"]
