"""Keep a fit: evaluate the fitted model/guide pair again, and save or load a result.

A saved result is a folder with ``result.json`` (the numbers, settings, guide name and options,
the family's class and settings, the parameters' constraints by name) and ``params.pt`` (the
unconstrained parameters, the ELBO trace, and the result's ``samples``, ``log_likelihood`` and
``sample_stats`` (the posterior draws made at fit time, which ``to_inference_data`` converts):
tensors only, loaded with ``weights_only=True``).
Loading needs the family and data the guide was built for (local guides hold one q per point):
``FitResult.load(folder, family, x)`` rebuilds the guide by name with the saved options and puts
the saved parameters into it, bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pyro
import torch
from pyro.distributions import constraints as pyro_constraints

from elbolab.inference.runtime import isolated

#: constraints a saved parameter may carry, by name
CONSTRAINTS = {
    name: getattr(pyro_constraints, name)
    for name in ("real", "real_vector", "positive", "lower_cholesky", "simplex", "unit_interval",
                 "positive_definite", "corr_cholesky", "nonnegative", "boolean",
                 "softplus_positive", "softplus_lower_cholesky", "unit_lower_cholesky")
    if hasattr(pyro_constraints, name)
}


def constraint_name(c) -> str:
    for name, known in CONSTRAINTS.items():
        if c is known:
            return name
    raise ValueError(f"save: parameter constraint {c!r} cannot be saved (known: {sorted(CONSTRAINTS)})")


@contextlib.contextmanager
def fitted_pair(result):
    """``(model, guide)`` of an SVI fit with its fitted parameters, in an isolated param store."""
    state = result.state
    if getattr(state, "store", None) is None:
        raise ValueError(f"result: a {result.engine} fit has no fitted model/guide pair (SVI only)")
    with isolated(None) as store:
        store.set_state({"params": {k: v.clone() for k, v in state.store["params"].items()},
                         "constraints": dict(state.store["constraints"])})
        _sync_modules(state.guide)
        yield state.family.model, state.guide


def _sync_modules(guide) -> None:
    """Copy the store's values into a guide's ``pyro.module``-registered parameters (modules with
    a ``pyro_name``; PyroModules such as autoguides read the store themselves)."""
    if not isinstance(guide, torch.nn.Module):
        return
    store = pyro.get_param_store()
    with torch.no_grad():
        for m in guide.modules():
            name = getattr(m, "pyro_name", None)
            if name is None:
                continue
            for pname, p in m.named_parameters():
                key = f"{name}$$${pname}"
                if key in store and store[key].shape == p.shape:
                    p.copy_(store[key])


def save(result, folder: str | Path) -> Path:
    """Write ``result.json`` and ``params.pt`` into ``folder`` (created; files replaced whole)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"folder: {str(folder)!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only parent, a file on the way, ...
        raise type(exc)(f"folder: cannot create {str(folder)!r} ({exc.strerror or exc})") from exc
    state = result.state
    meta = {
        "model": result.model, "engine": result.engine, "guide": result.guide,
        "bound": result.bound, "n_data": result.n_data, "elbo": result.elbo,
        "elbo_se": result.elbo_se, "seconds": result.seconds, "device": result.device,
        "dtype": result.dtype, "seed": result.seed, "converged": result.converged,
        "message": result.message, "settings": _jsonable(result.settings),
        "diagnostics": _jsonable(result.diagnostics),
    }
    tensors = {"trace": torch.tensor(result.trace, dtype=torch.float64)}
    if getattr(state, "store", None) is not None:
        meta["guide_options"] = _jsonable(state.guide_options)
        meta["constraints"] = {k: constraint_name(c) for k, c in state.store["constraints"].items()}
        meta["model_param_names"] = list(state.model_param_names)
        meta["guide_param_names"] = list(state.guide_param_names)
        fam = state.family
        meta["family"] = {"class": f"{type(fam).__module__}:{type(fam).__qualname__}",
                          "settings": _jsonable(fam.settings())}
        tensors["params"] = {k: v.detach().cpu() for k, v in state.store["params"].items()}
    tensors["posterior"] = {k: v.detach().cpu() for k, v in result.posterior.items()
                            if isinstance(v, torch.Tensor)}
    # the draws made at fit time: without them a reloaded fit's InferenceData would hold the
    # guide's parameters instead of the latent sites (and no log_likelihood group)
    for group in DRAW_GROUPS:
        tensors[group] = _as_tensors(getattr(result, group), group)
    _atomic(folder / "params.pt", lambda p: torch.save(tensors, p))
    _atomic(folder / "result.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
    return folder


def load(cls, folder: str | Path, family=None, x=None, *, guide=None):
    """A FitResult from ``folder``; with ``family`` and ``x`` the SVI guide is rebuilt and filled."""
    folder = Path(folder)
    for f in ("result.json", "params.pt"):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"folder: {folder} holds no saved result (missing {f})")
    meta = json.loads((folder / "result.json").read_text())
    tensors = torch.load(folder / "params.pt", weights_only=True, map_location="cpu")
    fields = {k: meta[k] for k in ("model", "engine", "guide", "bound", "n_data", "elbo", "elbo_se",
                                   "seconds", "device", "dtype", "seed", "converged", "message",
                                   "settings", "diagnostics")}
    draws = {g: tensors.get(g, {}) for g in DRAW_GROUPS}
    result = cls(**fields, trace=tensors["trace"].tolist(), posterior=tensors["posterior"], **draws)
    if "params" in tensors and family is not None:
        if x is None:
            raise ValueError("x: rebuilding the fitted guide needs the data it was fitted on "
                             "(FitResult.load(folder, family, x))")
        result.state = _rebuild(meta, tensors, family, x, guide)
        if "samples" not in tensors:  # a folder saved before the draws were kept: draw them again
            _redraw(result, meta, x)
    return result


#: the FitResult fields of draws (``(chain, draw, ...)`` tensors) that a saved result keeps
DRAW_GROUPS = ("samples", "log_likelihood", "sample_stats")


def _as_tensors(d: dict, group: str) -> dict:
    """``d`` with every value a CPU tensor (numpy arrays converted); an error for anything else."""
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().cpu()
            continue
        try:
            out[k] = torch.as_tensor(v)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"save: {group}[{k!r}] is a {type(v).__name__}, not an array of "
                             "numbers; it cannot be saved as a tensor") from exc
    return out


def _redraw(result, meta, x) -> None:
    """An SVI result saved without its draws: draw them again from the rebuilt guide with the
    fit's seed and number of draws (the same distribution, not the same draws), and say so."""
    from elbolab.inference.runtime import seed_everything
    from elbolab.inference.svi.pair import posterior_draws

    n = meta["settings"].get("num_posterior_samples", 0)
    if not isinstance(n, int) or n <= 0:
        return
    with fitted_pair(result) as (_, guide):
        seed_everything(result.seed)
        result.samples, result.log_likelihood = posterior_draws(
            result.state.family, guide, result.state.family.check_data(x), n)
    result.message += " [posterior draws redrawn on load: saved without them]"


def _rebuild(meta, tensors, family, x, user_guide=None):
    import copy

    from elbolab import guides as registry
    from elbolab.inference.svi.pair import enumeration_of
    from elbolab.inference.svi.run import SviRun
    from elbolab.inference.svi.state import SviState, resolve_guide
    from elbolab.models.program import as_family

    family = copy.deepcopy(as_family(family))
    x = family.check_data(x)  # a program learns its plates from its data
    saved = meta.get("family", {})
    here = {"class": f"{type(family).__module__}:{type(family).__qualname__}",
            "settings": _jsonable(family.settings())}
    if saved and saved != here:
        raise ValueError(
            f"family: the result was fitted with {saved['class']} {saved['settings']}, got "
            f"{here['class']} {here['settings']}")
    if user_guide is not None:
        spec = resolve_guide(family, user_guide)
        if spec.name != meta["guide"]:
            raise ValueError(f"guide: the result was fitted with guide {meta['guide']!r}, got "
                             f"{spec.name!r}")
    else:
        spec = registry.for_family(family).get(meta["guide"])
    if spec is None:
        raise ValueError(f"guide: {meta['guide']!r} is not a guide of the {family.name} model; if "
                         "it was a guide function or PyroModule, pass it: "
                         "FitResult.load(folder, model, x, guide=...)")
    if not spec.amortized and x.shape[0] != meta["n_data"]:
        raise ValueError(
            f"x: the {meta['guide']!r} guide was fitted on {meta['n_data']} points and is not "
            f"amortized (a per-point guide holds one q per point; a guide function may too), so "
            f"it is rebuilt on those points only; got {x.shape[0]}")
    ref = x
    store = {"params": {k: v.to(ref.device) for k, v in tensors["params"].items()},
             "constraints": {k: CONSTRAINTS[c] for k, c in meta["constraints"].items()}}
    with isolated(0), torch.no_grad():
        guide = spec.build(family, x, **meta.get("guide_options", {}))
        pyro.poutine.trace(guide).get_trace(x)  # autoguides set up their parameters lazily
        spec = enumeration_of(family, guide, x, spec)
    values = {}
    for k, u in store["params"].items():
        values[k] = torch.distributions.transform_to(store["constraints"][k])(u).detach()
    return SviState(guide, spec, values, tuple(meta["model_param_names"]),
                    tuple(meta["guide_param_names"]), meta.get("guide_options", {}),
                    SviRun(trace=tensors["trace"].tolist()), family, store, x)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(u) for k, u in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(u) for u in v]
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return str(v)
