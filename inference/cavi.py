"""CAVI: closed-form coordinate ascent on the ELBO (``cavi_init/cavi_step/cavi_objective``).

The family's ``cavi_objective`` is the closed-form ELBO with every constant kept; it never
decreases along the iterations.
"""

from __future__ import annotations

from inference.loop import AscentSettings, fit_closed_form

Settings = AscentSettings


def fit(family, x, settings: AscentSettings | None = None, *, seed: int = 0, **_):
    return fit_closed_form("CAVI", "cavi", "closed-form updates", family, x, settings, seed)
