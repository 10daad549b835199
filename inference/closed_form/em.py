"""Exact EM: the family's closed-form algorithm ``family.em()`` (:class:`elbolab.models.capabilities.ClosedFormEM`).

``FitResult.state`` is that algorithm's dataclass state; ``bound`` names its objective (a MAP
objective or the exact log likelihood: never decreases under EM).
"""

from __future__ import annotations

from elbolab.inference.closed_form.loop import fit_closed_form
from elbolab.models.ascent import AscentSettings

Settings = AscentSettings


def fit(family, x, settings: AscentSettings | None = None, *, seed: int = 0):
    """Run EM to convergence (``settings``: :class:`Settings`)."""
    return fit_closed_form("em", family, x, settings, seed)
