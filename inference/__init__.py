"""Inference engines behind one interface: ``fit(engine, family, x, settings, seed=...)``.

Each engine module exposes ``Settings`` (a dataclass with defaults) and
``fit(family, x, settings=None, *, seed=0, **options) -> FitResult``. An engine that cannot
handle a family raises :class:`elbolab.models.MissingCapability` naming the engine, the family and what
is missing.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect

from elbolab.inference.result import BOUNDS, FitResult
from elbolab.inference.runtime import validate_seed
from elbolab.models.program import as_family

ENGINES = {
    "em": "elbolab.inference.closed_form.em",
    "cavi": "elbolab.inference.closed_form.cavi",
    "svi": "elbolab.inference.svi",
    "mcmc": "elbolab.inference.mcmc",
}


#: names Pyro, NumPyro or PyTorch users type for ours (for "did you mean")
SYNONYMS = {"nuts": "mcmc", "hmc": "mcmc", "vi": "svi", "learning_rate": "lr",
            "num_warmup": "warmup", "warmup_steps": "warmup", "chains": "num_chains",
            "steps": "num_steps", "n_steps": "num_steps", "max_iter_em": "max_iter"}


def engine(name: str):
    """The engine module called ``name`` (one of :data:`ENGINES`)."""
    if name not in ENGINES:
        near = SYNONYMS.get(str(name).lower()) or next(
            iter(difflib.get_close_matches(str(name), list(ENGINES), n=1, cutoff=0.6)), None)
        hint = f"; did you mean {near!r}?" if near in ENGINES else ""
        raise ValueError(f"engine: must be one of {sorted(ENGINES)}, got {name!r}{hint}")
    return importlib.import_module(ENGINES[name])


def fit(name: str, family, x, settings=None, *, seed: int = 0, data_plate: str | None = None,
        **options) -> FitResult:
    """Run engine ``name`` on ``family`` and data ``x``.

    ``family`` is a model family or any plain Pyro program (a callable; then ``x`` is its data:
    a dict of keyword arguments, a tuple of positional ones, or one tensor; ``data_plate`` names
    the plate over data points when the trace cannot tell, :mod:`elbolab.models.program`).
    ``options`` are the engine's keyword options (e.g. ``guide=`` for SVI) or, when ``settings``
    is not given, the names of its settings (``fit("svi", fam, x, num_steps=500)``). Anything
    else is an error that lists what the engine takes.
    """
    mod = engine(name)
    validate_seed(seed)
    family = as_family(family, data_plate)
    params = inspect.signature(mod.fit).parameters
    own = {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k != "seed"}
    setting_names = _setting_names(mod.Settings)
    flat = {k: v for k, v in options.items() if k not in own}
    unknown = sorted(set(flat) - setting_names)
    if unknown:
        near = {u: [SYNONYMS[u]] if SYNONYMS.get(u) in (*own, *setting_names) else
                difflib.get_close_matches(u, [*own, *setting_names], n=1, cutoff=0.6)
                for u in unknown}
        hint = "".join(f"; did you mean {m[0]!r} for {u!r}?" for u, m in near.items() if m)
        raise TypeError(
            f"{name}: unknown option(s) {unknown}{hint}; the {name} engine takes "
            f"{sorted(own) or 'no options'} and the settings {sorted(setting_names)}"
        )
    if flat:
        if settings is not None:
            raise TypeError(
                f"{name}: settings given both as settings= and as options {sorted(flat)}")
        settings = mod.Settings(**flat)
    return mod.fit(family, x, settings, seed=seed, **{k: options[k] for k in options if k in own})


def _setting_names(cls) -> set[str]:
    flat = getattr(cls, "FLAT_OPTIONS", None)
    if flat is not None:
        return set(flat) | set(getattr(cls, "RUNTIME_OPTIONS", ("validate", "progress")))
    return {f.name for f in dataclasses.fields(cls)}


__all__ = ["BOUNDS", "ENGINES", "FitResult", "cavi", "em", "engine", "fit", "mcmc", "svi"]

# the engines as attributes: ``inference.svi.Settings`` after ``from elbolab import inference``
from elbolab.inference import mcmc, svi  # noqa: E402
from elbolab.inference.closed_form import cavi, em  # noqa: E402
