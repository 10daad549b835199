"""One loop for every closed-form coordinate-ascent engine (EM and CAVI differ only in hooks).

As in scikit-learn's mixture code: ``init`` -> repeat ``step`` until the objective stops rising,
``n_init`` restarts, best objective kept. A non-finite objective stops the run with the reason and
keeps the last good state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from inference.result import FitResult, data_fields
from inference.runtime import Timer, isolated
from models.base import require
from models.validate import integer, non_negative


@dataclass
class AscentSettings:
    """Settings shared by EM and CAVI.

    ``tol`` is on the change of the objective per data point (nats), as in scikit-learn.
    """

    max_iter: int = 500
    tol: float = 1e-8
    n_init: int = 1
    progress: bool = False

    def __post_init__(self):
        integer(self.max_iter, "max_iter", minimum=1)
        integer(self.n_init, "n_init", minimum=1)
        non_negative(self.tol, "tol")


@dataclass
class AscentRun:
    state: Any
    trace: list[float] = field(default_factory=list)
    converged: bool = False
    message: str = ""
    max_decrease: float = 0.0
    restart: int = 0


def ascend(
    init: Callable[[torch.Generator], Any],
    step: Callable[[Any], Any],
    objective: Callable[[Any], float],
    n: int,
    settings: AscentSettings,
    generator: torch.Generator,
    label: str = "ascent",
) -> AscentRun:
    """Run ``settings.n_init`` restarts of coordinate ascent; return the best run.

    ``max_decrease`` records the largest drop of the objective between iterations (should be
    ~0 for exact EM/CAVI; tests assert it).
    """
    best: AscentRun | None = None
    for restart in range(settings.n_init):
        run = _one_run(init(generator), step, objective, n, settings, f"{label} #{restart}")
        run.restart = restart
        if best is None or _final(run) > _final(best):
            best = run
    return best


def _final(run: AscentRun) -> float:
    return run.trace[-1] if run.trace and math.isfinite(run.trace[-1]) else -math.inf


def _one_run(state, step, objective, n, settings, label) -> AscentRun:
    value = float(objective(state))
    if not math.isfinite(value):
        return AscentRun(state, [value], False, f"{label}: initial objective is {value}")
    run = AscentRun(state, [value])
    bar = tqdm(range(settings.max_iter), desc=label, disable=not settings.progress, leave=False)
    for it in bar:
        new_state = step(state)
        new_value = float(objective(new_state))
        if not math.isfinite(new_value):
            run.message = (
                f"stopped at iteration {it + 1}: objective became {new_value}; kept last good state"
            )
            return run
        run.max_decrease = max(run.max_decrease, value - new_value)
        run.trace.append(new_value)
        state, run.state = new_state, new_state
        if abs(new_value - value) <= settings.tol * n:
            run.converged = True
            run.message = f"converged after {it + 1} iterations"
            return run
        value = new_value
    run.message = f"reached max_iter={settings.max_iter} without converging"
    return run


def _as_dict(state) -> dict:
    if isinstance(state, dict):
        return dict(state)
    if hasattr(state, "__dataclass_fields__"):
        return {k: getattr(state, k) for k in state.__dataclass_fields__}
    return {"state": state}


def fit_closed_form(engine: str, prefix: str, what: str, family, x, settings, seed: int):
    """Shared body of the EM and CAVI engines: hooks ``{prefix}_init/_step/_objective``.

    Optional hooks: ``{prefix}_posterior(x, state) -> dict`` for the reported posterior and
    ``{prefix}_bound`` (attribute) naming the objective (default ``elbo``).
    """
    hooks = tuple(f"{prefix}_{h}" for h in ("init", "step", "objective"))
    require(family, engine, hooks, what)
    settings = settings or AscentSettings()
    x = family.check_data(x)
    init, step, objective = (getattr(family, h) for h in hooks)
    with isolated(seed), Timer(x.device) as timer:
        gen = torch.Generator().manual_seed(seed)
        run = ascend(
            lambda g: init(x, g),
            lambda s: step(x, s),
            lambda s: objective(x, s),
            x.shape[0],
            settings,
            gen,
            label=engine,
        )
    post_hook = getattr(family, f"{prefix}_posterior", None)
    posterior = post_hook(x, run.state) if callable(post_hook) else _as_dict(run.state)
    return FitResult(
        **data_fields(family, x, seed),
        engine=engine.lower(),
        guide=getattr(family, f"{prefix}_guide_name", "closed-form"),
        bound=getattr(family, f"{prefix}_bound", "elbo"),
        elbo=run.trace[-1],
        elbo_se=0.0,
        trace=run.trace,
        posterior=posterior,
        seconds=timer.seconds,
        converged=run.converged,
        message=run.message,
        settings={**family.settings(), **vars(settings)},
        diagnostics={"max_decrease": run.max_decrease, "restart": run.restart},
        state=run.state,
    )
