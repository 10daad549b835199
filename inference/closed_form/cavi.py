"""CAVI: the family's closed-form coordinate ascent ``family.cavi()`` (:class:`elbolab.models.capabilities.ClosedFormCAVI`).

The algorithm's ``objective`` is the closed-form ELBO with every constant kept; it never decreases
along the iterations. ``FitResult.state`` is the algorithm's dataclass state.
"""

from __future__ import annotations

from elbolab.inference.closed_form.loop import fit_closed_form
from elbolab.models.ascent import AscentSettings

Settings = AscentSettings


def fit(family, x, settings: AscentSettings | None = None, *, seed: int = 0):
    """Run CAVI to convergence (``settings``: :class:`Settings`)."""
    return fit_closed_form("cavi", family, x, settings, seed)
