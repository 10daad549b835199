"""Exact EM: closed-form E and M steps supplied by the family (``em_init/em_step/em_objective``)."""

from __future__ import annotations

from inference.loop import AscentSettings, fit_closed_form

Settings = AscentSettings


def fit(family, x, settings: AscentSettings | None = None, *, seed: int = 0, **_):
    """Run EM to convergence; the objective (``family.em_bound``) never decreases."""
    return fit_closed_form("EM", "em", "closed-form EM updates", family, x, settings, seed)
