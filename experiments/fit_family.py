"""Which family and what runs in the ``fit`` study: the family named by import path, the engines
its capabilities allow, and the guides of ``elbolab.guides.for_family`` (marked collapsed when the model's
enumerated discrete sites are left to enumeration).

Names resolve by ``importlib.import_module`` and ``getattr`` along the dotted name, never by
``eval``; every failure is a :class:`~elbolab.experiments.core.study.CliError` naming ``--model``,
``--model-args``, ``--engines`` or ``--guides``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import sys

import torch
from pyro import poutine

from elbolab import guides as guide_registry
from elbolab.experiments.core.study import CliError
from elbolab.experiments.fit_evidence import model_param_names
from elbolab.guides.auto import latent_sites
from elbolab.inference.runtime import isolated
from elbolab.models.capabilities import ClosedFormCAVI, ClosedFormEM, PyroFamily

ENGINES = ("em", "cavi", "svi", "mcmc")
#: engine -> the capability it needs
NEEDS = {"em": ClosedFormEM, "cavi": ClosedFormCAVI, "svi": PyroFamily, "mcmc": PyroFamily}


# -- the family, by import path ------------------------------------------------------------------
def resolve_family(path: str, model_args: str = "{}"):
    """The family named ``package.module:Name`` built with the JSON ``model_args``; CliError
    naming ``--model`` / ``--model-args`` otherwise."""
    if not path:
        raise CliError("--model: required: the family as 'package.module:Name' "
                       "(e.g. elbolab.models.mfa:MixtureOfFactorAnalysers)")
    module_name, sep, attr = str(path).partition(":")
    parts = module_name.split(".") + attr.split(".")
    if not sep or not all(p.isidentifier() for p in parts):
        raise CliError(f"--model: expected an import path 'package.module:Name', got {path!r}")
    try:
        with _cwd_importable():
            obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise CliError(f"--model: no module named {exc.name or module_name!r} (importing "
                       f"{module_name!r}; is its folder on PYTHONPATH?)") from None
    except Exception as exc:  # a user's module failing to import: its error, one line
        raise CliError(f"--model: importing {module_name!r} failed: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    for i, name in enumerate(attr.split(".")):
        if not hasattr(obj, name):
            where = module_name if i == 0 else f"{module_name}:{'.'.join(attr.split('.')[:i])}"
            raise CliError(f"--model: {where!r} has no attribute {name!r}")
        obj = getattr(obj, name)
    kwargs = _model_args(model_args)
    if isinstance(obj, PyroFamily) and not isinstance(obj, type):
        if kwargs:
            raise CliError(f"--model-args: {path} is a family instance; it takes no arguments")
        family = obj
    elif callable(obj):
        try:
            family = obj(**kwargs)
        except (TypeError, ValueError) as exc:
            raise CliError(f"--model-args: {str(exc).splitlines()[0]}") from None
    else:
        raise CliError(f"--model: {path} is a {type(obj).__name__}, not a family class, factory "
                       "or instance")
    if not isinstance(family, PyroFamily) or isinstance(family, type):
        needed = ("name", "max_plate_nesting", "discrete_sites", "check_data", "model", "settings")
        lacks = [m for m in needed if not hasattr(family, m)]
        raise CliError(f"--model: {path} gives a {type(family).__name__}, not a model family: it "
                       f"lacks {lacks} (the PyroFamily capability, models/capabilities.py)")
    return family


@contextlib.contextmanager
def _cwd_importable():
    """The current folder on the import path while the family's module is imported (as under
    ``python -m``; the ``elbolab`` console script does not put it there)."""
    cwd = os.getcwd()
    added = "" not in sys.path and cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _model_args(text) -> dict:
    if isinstance(text, dict):
        return dict(text)
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise CliError(f"--model-args: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise CliError(f"--model-args: expected a JSON object of keyword arguments, got {text!r}")
    return value


# -- what runs --------------------------------------------------------------------------------
def supported_engines(family) -> list[str]:
    return [e for e in ENGINES if isinstance(family, NEEDS[e])]


def choose(args, family, x, given_guides: bool) -> tuple[list[str], list, dict]:
    """(engines, guide specs, engines skipped -> why) from ``--engines``/``--guides``, checked
    against the family. An engine asked for that cannot run is an error; one taken by default
    (no ``--engines``) that cannot run is skipped, with the reason."""
    ok = supported_engines(family)
    given = args.names("engines", ENGINES, what="engine", allow_empty=True)
    for e in given:
        if e not in ok:
            raise args.error("engines", f"the {family.name} family ({type(family).__name__}) does "
                             f"not support {e!r} (it lacks {NEEDS[e].__name__}); it supports "
                             f"{', '.join(ok)}")
    names, skipped = list(given or ok), {}
    if "mcmc" in names:
        why = mcmc_problem(family, x, names)
        if why and given:
            raise args.error("engines", why)
        if why:
            names.remove("mcmc")
            skipped["mcmc"] = f"skipped: {why}"
    specs = guide_registry.for_family(family)
    if "svi" not in names:
        if given_guides and args.guides.strip():
            raise args.error("guides", "applies to SVI, which --engines leaves out")
        return names, [], skipped
    chosen = args.names("guides", list(specs), what="guide", allow_empty=True)
    chosen = chosen or [guide_registry.default_for(family)]
    return names, [prepared_spec(family, x, specs[g], args.seed) for g in chosen], skipped


def mcmc_problem(family, x, names) -> str:
    """Why NUTS cannot run on this family with these engines ("" when it can)."""
    glob, loc, _ = latent_sites(family.model, x)
    if not [k for k, s in {**glob, **loc}.items() if not s["fn"].has_enumerate_support]:
        return f"mcmc needs a continuous latent site; the {family.name} model has none"
    params = model_param_names(family, x)
    if params and not ({"em", "svi"} & set(names)):
        return (f"mcmc needs the model's learnable parameters {params} fixed; add em or svi to "
                "--engines (NUTS then runs at their estimate)")
    return ""


def prepared_spec(family, x, spec, seed: int):
    """``spec``, marked ``collapsed`` when the model has enumerated discrete sites that the guide
    does not sample (they are then summed out: TraceEnum_ELBO, bound ``elbo-collapsed``)."""
    _, _, enum = latent_sites(family.model, x)
    if not enum or spec.collapsed or spec.enumerated:
        return spec
    with isolated(seed), torch.no_grad():
        tr = poutine.trace(spec.build(family, x)).get_trace(x)
    if set(enum) & {k for k, s in tr.nodes.items() if s["type"] == "sample"}:
        return spec
    return dataclasses.replace(spec, collapsed=True)


__all__ = ["ENGINES", "NEEDS", "choose", "mcmc_problem", "prepared_spec", "resolve_family",
           "supported_engines"]
