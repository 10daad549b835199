"""Which model and what runs in the ``fit`` study: the model named by import path (a family, or a
plain Pyro program wrapped as :class:`~elbolab.models.program.Program`), the engines its
capabilities allow, and the guides: those of ``elbolab.guides.for_family`` by name (marked
collapsed when the model's enumerated discrete sites are left to enumeration) or a user's guide
by import path.

What ``--model package.module:Name`` names:

* a family instance, or a class or factory function that ``--model-args`` builds into one: the
  family;
* a ``torch.nn.Module`` (e.g. a ``PyroModule``) instance, or such a class (built with
  ``--model-args``, none by default): a program, its ``forward`` the model;
* any other function: a program. A function given ``--model-args``, or one that takes no
  arguments and returns a family, is a factory.

Names resolve by ``importlib.import_module`` and ``getattr`` along the dotted name, never by
``eval``; every failure is a :class:`~elbolab.experiments.core.study.CliError` naming ``--model``,
``--model-args``, ``--engines`` or ``--guides`` (``--guide``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import inspect
import json
import os
import sys

import torch
from pyro import poutine

from elbolab.experiments.core.common import error_line
from elbolab.experiments.core.study import CliError
from elbolab.experiments.fit_evidence import local_plate, model_param_names
from elbolab.guides import registry as guide_registry
from elbolab.guides.auto import latent_sites
from elbolab.guides.base import GuideSpec
from elbolab.inference.runtime import isolated
from elbolab.models.capabilities import ClosedFormCAVI, ClosedFormEM, PyroFamily
from elbolab.models.program import Program

ENGINES = ("em", "cavi", "svi", "mcmc")
#: engine -> the capability it needs
NEEDS = {"em": ClosedFormEM, "cavi": ClosedFormCAVI, "svi": PyroFamily, "mcmc": PyroFamily}


# -- the model, by import path -------------------------------------------------------------------
def import_object(path: str, flag: str = "--model", what: str = "package.module:Name"):
    """The object named ``package.module:Name`` (import, then ``getattr`` along the dotted name);
    CliError naming ``flag`` otherwise."""
    module_name, sep, attr = str(path).partition(":")
    parts = module_name.split(".") + attr.split(".")
    if not sep or not all(p.isidentifier() for p in parts):
        raise CliError(f"{flag}: expected an import path {what!r}, got {path!r}")
    try:
        with _cwd_importable():
            obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise CliError(f"{flag}: no module named {exc.name or module_name!r} (importing "
                       f"{module_name!r}; is its folder on PYTHONPATH?)") from None
    except Exception as exc:  # a user's module failing to import: its error, one line
        raise CliError(f"{flag}: importing {module_name!r} failed: {type(exc).__name__}: "
                       f"{error_line(exc)}") from None
    for i, name in enumerate(attr.split(".")):
        if not hasattr(obj, name):
            where = module_name if i == 0 else f"{module_name}:{'.'.join(attr.split('.')[:i])}"
            raise CliError(f"{flag}: {where!r} has no attribute {name!r}")
        obj = getattr(obj, name)
    return obj


def resolve_family(path: str, model_args: str = "{}"):
    """The model named ``package.module:Name`` (the module docstring says what it may name): a
    family built with the JSON ``model_args``, or a :class:`Program`; CliError naming
    ``--model`` / ``--model-args`` otherwise."""
    if not path:
        raise CliError("--model: required: the model as 'package.module:Name', a family (e.g. "
                       "elbolab.models.mfa:MixtureOfFactorAnalysers) or a Pyro program (a "
                       "function or PyroModule)")
    obj = import_object(path)
    kwargs = _model_args(model_args)
    if isinstance(obj, PyroFamily) and not isinstance(obj, type):
        if kwargs:
            raise CliError(f"--model-args: {path} is a family instance; it takes no arguments")
        return obj
    if isinstance(obj, torch.nn.Module):
        if kwargs:
            raise CliError(f"--model-args: {path} is a module instance; it takes no arguments")
        return Program(obj)
    if callable(obj) and not isinstance(obj, type) and not kwargs and not _factory(obj):
        return Program(obj)  # a function (also one wrapped by config_enumerate or a handler)
    if not callable(obj):
        raise CliError(f"--model: {path} is a {type(obj).__name__}, not a family class, factory "
                       "or instance, nor a Pyro program (a function or PyroModule)")
    try:
        family = obj(**kwargs)
    except (TypeError, ValueError) as exc:
        hint = "" if isinstance(obj, type) else (" (a Pyro program takes its data from --data; "
                                                 "--model-args builds a family or a module)")
        raise CliError(f"--model-args: {error_line(exc)}{hint}") from None
    if isinstance(family, torch.nn.Module) and not isinstance(family, PyroFamily):
        return Program(family)  # a PyroModule class, built
    if not isinstance(family, PyroFamily) or isinstance(family, type):
        needed = ("name", "max_plate_nesting", "discrete_sites", "check_data", "model", "settings")
        lacks = [m for m in needed if not hasattr(family, m)]
        raise CliError(f"--model: {path} gives a {type(family).__name__}, not a model family: it "
                       f"lacks {lacks} (the PyroFamily capability, models/capabilities.py)")
    return family


def _factory(fn) -> bool:
    """Whether the function ``fn`` builds a family: it takes no required argument and, called
    once (blocked from any Pyro handler, the random state kept), returns a family."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    if any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                               p.KEYWORD_ONLY) for p in params):
        return False
    try:
        with torch.random.fork_rng(), torch.no_grad(), poutine.block(), isolated(0):
            made = fn()
    except Exception:  # noqa: BLE001 - a program failing without its data is a program
        return False
    return isinstance(made, PyroFamily) and not isinstance(made, type)


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


def lacking(family, engine: str) -> str:
    """Why ``family`` cannot run ``engine`` (it lacks the capability)."""
    if isinstance(family, Program):
        return (f"{engine} needs the closed-form updates of {NEEDS[engine].__name__}, which a "
                "plain Pyro program has not; write the model as a family for them")
    return f"it lacks {NEEDS[engine].__name__}"


def choose(args, family, x, given_guides: bool) -> tuple[list[str], list, dict]:
    """(engines, guide specs, engines skipped -> why) from ``--engines``/``--guides``, checked
    against the family. An engine asked for that cannot run is an error; one taken by default
    (no ``--engines``) that cannot run is skipped, with the reason (for a program, EM and CAVI
    too)."""
    ok = supported_engines(family)
    given = args.names("engines", ENGINES, what="engine", allow_empty=True)
    for e in given:
        if e not in ok:
            raise args.error("engines", f"{_kind(family)} does not support "
                             f"{e!r} ({lacking(family, e)}); it supports {', '.join(ok)}")
    names, skipped = list(given or ok), {}
    if not given and isinstance(family, Program):
        skipped.update({e: f"skipped: {lacking(family, e)}" for e in ENGINES if e not in ok})
    if "mcmc" in names:
        why = mcmc_problem(family, x, names)
        if why and given:
            raise args.error("engines", why)
        if why:
            names.remove("mcmc")
            skipped["mcmc"] = f"skipped: {why}"
    flag = "guide" if str(getattr(args, "guide", "")).strip() else "guides"
    if "svi" not in names:
        if given_guides and args.guides.strip():
            raise args.error(flag, "applies to SVI, which --engines leaves out")
        return names, [], skipped
    specs = guide_registry.for_family(family)
    chosen = [guide_spec(args, flag, family, specs, g) for g in _entries(args, flag)]
    chosen = chosen or [specs[guide_registry.default_for(family)]]
    return names, [prepared_spec(family, x, s, args.seed) for s in chosen], skipped


def _kind(family) -> str:
    if isinstance(family, Program):
        return f"the program {family.name!r}"
    return f"the {family.name} family ({type(family).__name__})"


def _entries(args, flag: str) -> list[str]:
    out = [t.strip() for t in str(args.guides).split(",") if t.strip()]
    dup = sorted({t for t in out if out.count(t) > 1})
    if dup:
        raise args.error(flag, f"repeated guide(s) {dup}")
    return out


def guide_spec(args, flag: str, family, specs: dict, entry: str) -> GuideSpec:
    """The guide ``entry`` names: one of ``specs`` by name (a misspelling gets "did you mean"),
    or a user's guide by import path (a function, a ``torch.nn.Module``/PyroModule instance, or
    such a class built with no arguments), called like the model."""
    if ":" not in entry:
        if entry in specs:
            return specs[entry]
        near = difflib.get_close_matches(entry, list(specs), n=1, cutoff=0.6)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise args.error(flag, f"unknown guide {entry!r}; {hint}valid: {', '.join(specs)}; or a "
                         "guide by import path 'package.module:guide'")
    obj = import_object(entry, args.flag(flag), "package.module:guide")
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        try:
            obj = obj()
        except (TypeError, ValueError) as exc:
            raise args.error(flag, f"{entry}: a guide class is built with no arguments: "
                             f"{error_line(exc)}") from None
    if not callable(obj) or isinstance(obj, type):
        raise args.error(flag, f"{entry} is a {type(obj).__name__}, not a guide (a function or a "
                         "PyroModule called like the model)")

    def build(fam, data, fn=obj):
        return fam.call(fn) if isinstance(fam, Program) else fn

    return GuideSpec(entry, build, description=f"the user's guide {entry}")


def mcmc_problem(family, x, names) -> str:
    """Why NUTS cannot run on this family with these engines ("" when it can)."""
    glob, loc, _ = latent_sites(family.model, x, local_plate(family))
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
    _, _, enum = latent_sites(family.model, x, local_plate(family))
    if not enum or spec.collapsed or spec.enumerated:
        return spec
    with isolated(seed), torch.no_grad():
        tr = poutine.trace(spec.build(family, x)).get_trace(x)
    if set(enum) & {k for k, s in tr.nodes.items() if s["type"] == "sample"}:
        return spec
    return dataclasses.replace(spec, collapsed=True)


__all__ = ["ENGINES", "NEEDS", "choose", "guide_spec", "import_object", "lacking", "mcmc_problem",
           "prepared_spec", "resolve_family", "supported_engines"]
