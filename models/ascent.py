"""The one coordinate-ascent loop (EM, CAVI, variational Bayes, missing-data EM, Laplace starts).

As in scikit-learn's mixture code: ``init`` -> repeat ``step`` until the objective stops rising,
``n_init`` restarts, best objective kept. A non-finite objective stops the run with the reason and
keeps the last good state. The stopping rule is one: ``|L_t - L_{t-1}| <= tol * n`` (``tol`` in
nats per data point, as scikit-learn's), or an optional ``target`` objective reached.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from elbolab.models.validate import boolean, integer, non_negative


@dataclass
class AscentSettings:
    """Settings of the ascent loop: ``tol`` on the change of the objective per data point (nats),
    ``max_iter`` sweeps per restart, ``n_init`` restarts (best objective kept)."""

    max_iter: int = 500
    tol: float = 1e-8
    n_init: int = 1
    progress: bool = False

    def __post_init__(self):
        self.max_iter = integer(self.max_iter, "max_iter", minimum=1)
        self.n_init = integer(self.n_init, "n_init", minimum=1)
        non_negative(self.tol, "tol")
        boolean(self.progress, "progress")


@dataclass
class AscentRun:
    """The outcome of :func:`ascend`: the final state, the objective per iteration (nats, total),
    whether the stopping rule fired, the reason, the largest drop between iterations (~0 for exact
    EM/CAVI) and which restart won."""

    state: Any
    trace: list[float] = field(default_factory=list)
    converged: bool = False
    message: str = ""
    max_decrease: float = 0.0
    restart: int = 0

    @property
    def iterations(self) -> int:
        return len(self.trace) - 1


def ascend(
    init: Callable[[torch.Generator], Any],
    step: Callable[[Any], Any],
    objective: Callable[[Any], float],
    n: int,
    settings: AscentSettings,
    generator: torch.Generator | None = None,
    label: str = "ascent",
    target: float | None = None,
) -> AscentRun:
    """Run ``settings.n_init`` restarts of coordinate ascent; return the best run.

    ``target``: also stop (converged) once the objective reaches it.
    """
    best: AscentRun | None = None
    generator = generator or torch.Generator().manual_seed(0)
    for restart in range(settings.n_init):
        run = _one_run(init(generator), step, objective, n, settings, f"{label} #{restart}", target)
        run.restart = restart
        if best is None or _final(run) > _final(best):
            best = run
    return best


def _final(run: AscentRun) -> float:
    return run.trace[-1] if run.trace and math.isfinite(run.trace[-1]) else -math.inf


def _one_run(state, step, objective, n, settings, label, target) -> AscentRun:
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
        if target is not None and new_value >= target:
            run.converged = True
            run.message = f"reached the target objective after {it + 1} iterations"
            return run
        value = new_value
    run.message = f"reached max_iter={settings.max_iter} without converging"
    return run
