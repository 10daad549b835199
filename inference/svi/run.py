"""The record of an SVI optimization and its convergence test.

Convergence. Let y_t be the per-datum ELBO estimate of step t over the last ``window`` = w steps
(the last half of the run when it is shorter than 2w) and b the least-squares slope of y on t with
standard error se(b) (residual variance / sum (t - tbar)^2). The run counts as converged when the
projected gain over one more window is below ``converged_tol`` with 2 standard errors to spare:
w (b + 2 se(b)) < converged_tol. Monte Carlo noise widens se(b), so a noisy trace is not called
converged on a lucky window; a short fit window widens it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SviRun:
    """The optimization: ELBO estimate per step (nats, total), how it ended."""

    trace: list[float] = field(default_factory=list)
    converged: bool = False
    message: str = ""
    steps: int = 0
    val_trace: list[tuple[int, float]] = field(default_factory=list)
    stopped_early: bool = False
    diverged: bool = False
    skipped: int = 0
    slope: float = math.nan  # projected gain over one more window, nats/datum
    slope_se: float = math.nan


#: fewest steps the convergence slope is fitted on
MIN_JUDGED = 20


def judge(run: SviRun, st, n: int, tol: float) -> bool:
    """The slope test of the module docstring: the slope is fitted on the last ``window`` steps
    (on the last half of the run when it is shorter than two windows) and projected over one
    ``window``."""
    w = min(st.window, len(run.trace) // 2)
    y = torch.tensor(run.trace[-w:], dtype=torch.float64) / n
    t = torch.arange(w, dtype=torch.float64)
    tc = t - t.mean()
    b = float((tc * (y - y.mean())).sum() / (tc**2).sum())
    resid = y - y.mean() - b * tc
    se = float(((resid**2).sum() / (w - 2) / (tc**2).sum()).sqrt())
    run.slope, run.slope_se = b * st.window, se * st.window
    run.converged = run.slope + 2 * run.slope_se < tol
    return run.converged


__all__ = ["MIN_JUDGED", "SviRun", "judge"]
