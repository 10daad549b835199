"""Inference engines behind one interface: ``fit(engine, family, x, settings, seed=...)``.

Each engine module exposes ``Settings`` (a dataclass with defaults) and
``fit(family, x, settings=None, *, seed=0, **options) -> FitResult``. An engine that cannot
handle a family raises :class:`models.MissingCapability` naming the engine, the family and what
is missing.
"""

from __future__ import annotations

import importlib

from inference.result import BOUNDS, FitResult

ENGINES = {
    "em": "inference.em",
    "cavi": "inference.cavi",
    "svi": "inference.svi",
    "mcmc": "inference.mcmc",
}


def engine(name: str):
    """The engine module called ``name`` (one of :data:`ENGINES`)."""
    if name not in ENGINES:
        raise ValueError(f"engine: must be one of {sorted(ENGINES)}, got {name!r}")
    return importlib.import_module(ENGINES[name])


def fit(name: str, family, x, settings=None, *, seed: int = 0, **options) -> FitResult:
    """Run engine ``name`` on ``family`` and data ``x``."""
    return engine(name).fit(family, x, settings, seed=seed, **options)


__all__ = ["BOUNDS", "ENGINES", "FitResult", "engine", "fit"]
