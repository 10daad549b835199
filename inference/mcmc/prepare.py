"""The model NUTS samples: ``pyro.param``s and network weights fixed from ``fix_params`` (an SVI
fit or a dict), checked before any work: unknown or misshaped names, parameters left free, NaN or
inf in an observed site, nothing continuous to sample."""

from __future__ import annotations

import difflib
import warnings

import torch
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.poutine.messenger import Messenger
from torch.distributions import biject_to

from elbolab.inference.result import FitResult
from elbolab.inference.tracing import site_is_plate
from elbolab.models.capabilities import flat_point


def prepared(model, x, fix_params, family, loaded: list, init_params: dict | None = None):
    """The model with its ``pyro.param``s fixed (or an error naming them), its discrete latent
    sites and ``init_params`` as tensors of the sites' dtype and device; an error if nothing
    continuous is left to sample, if an observed site holds NaN/inf, or if ``init_params``
    misses, adds or misshapes a continuous latent site.

    Parameters of networks (``pyro.module`` or ``PyroModule``) compute with the module's own
    tensors whatever ``pyro.param`` returns, so their fixed values are copied into the module's
    parameters in place; ``loaded`` gets (parameter, its own value) to hand back after the run."""
    fixed = _fixed_values(fix_params)
    inits = _ParamInits()
    with torch.no_grad(), warnings.catch_warnings():
        # names of the family's model that the NUTS model (mcmc_model) lacks: checked below
        warnings.filterwarnings("ignore", "pyro.module data did not find params")
        tr = poutine.trace(inits(poutine.substitute(config_enumerate(model, default="parallel"),
                                                    data=fixed))).get_trace(x)
        names = {k for k, s in tr.nodes.items() if s["type"] == "param"}
        if fixed and model != family.model:  # the names an SVI fit of family.model knows
            with poutine.block():
                ftr = poutine.trace(inits(family.model)).get_trace(x)
            names |= {k for k, s in ftr.nodes.items() if s["type"] == "param"}
    _check_observed(tr)
    unknown = sorted(set(fixed) - names)
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(
            k, sorted(names), n=1)) else repr(k) for k in unknown]
        raise ValueError(
            f"fix_params: {', '.join(hints)} not a parameter of the {family.name} model "
            f"(its parameters: {sorted(names) or 'none'})")
    params = [k for k, s in tr.nodes.items() if s["type"] == "param" and k not in fixed]
    if params:
        raise ValueError(
            f"fix_params: the {family.name} model has learnable parameters {params} that NUTS "
            "would leave at their initial values; fix them (fix_params=<an SVI FitResult> or a "
            "dict name -> value)"
        )
    modules = {k: p for k, p in inits.parameters.items() if k in fixed}
    for k, p in modules.items():
        if tuple(fixed[k].shape) != tuple(p.shape):
            raise ValueError(f"fix_params: {k!r} has shape {tuple(fixed[k].shape)}; the model's "
                             f"network parameter has shape {tuple(p.shape)}")
    with torch.no_grad():
        for k, p in modules.items():
            loaded.append((p, p.detach().clone()))
            p.copy_(fixed[k].to(device=p.device, dtype=p.dtype))
    plain = {k: v for k, v in fixed.items() if k not in modules}
    if plain:
        model = poutine.substitute(model, data=plain)
    latent = {
        k: s for k, s in tr.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_plate(s)
    }
    discrete = [k for k, s in latent.items() if s["fn"].has_enumerate_support]
    countless = [f"{k!r} ({type(s['fn']).__name__})" for k, s in latent.items()
                 if not s["fn"].has_enumerate_support
                 and s["fn"].support.is_discrete]  # Poisson, Geometric, ...
    if countless:
        raise ValueError(
            f"model: latent site{'s' * (len(countless) > 1)} {', '.join(countless)} "
            f"{'are' if len(countless) > 1 else 'is'} discrete with unbounded support: NUTS "
            "samples continuous sites and sums out only discrete ones with finite support "
            "(Bernoulli, Categorical); observe it, bound it (e.g. a Categorical over 0..N), or "
            "fit it with SVI")
    if len(discrete) == len(latent):
        raise ValueError(
            f"model: the {family.name} model has no continuous latent site for NUTS to sample "
            f"(latent sites: {sorted(latent) or 'none'})"
        )
    if init_params is not None:  # every continuous site, unconstrained, in its own shape
        shapes = {k: tuple(biject_to(s["fn"].support).inv(s["value"]).shape)
                  for k, s in latent.items() if k not in discrete}
        flat_point(init_params, shapes, torch.empty(0, dtype=torch.float64))
        init_params = {k: torch.as_tensor(v).to(latent[k]["value"]) for k, v in init_params.items()}
    return model, discrete, init_params


class _ParamInits(Messenger):
    """Records the ``nn.Parameter`` each ``pyro.param`` statement is given, by name: the module's
    own tensor for ``pyro.module`` and a ``PyroModule``'s parameters."""

    def __init__(self):
        super().__init__()
        self.parameters: dict[str, torch.nn.Parameter] = {}

    def _pyro_param(self, msg):
        args = msg["args"]
        if len(args) > 1 and isinstance(args[1], torch.nn.Parameter):
            self.parameters.setdefault(msg["name"], args[1])


def hand_back(loaded: list) -> None:
    """The networks' own values back (a module outside the family copy is the caller's)."""
    with torch.no_grad():
        for p, value in reversed(loaded):
            p.copy_(value)
    loaded.clear()


def _check_observed(tr) -> None:
    """NaN or inf in an observed value is an error naming the site: NUTS would only say that it
    cannot find valid initial parameters (and under a mask, 0 x NaN still poisons gradients)."""
    for name, site in tr.nodes.items():
        if site["type"] != "sample" or not site["is_observed"] or site_is_plate(site):
            continue
        value = site["value"]
        if not torch.is_tensor(value) or not value.is_floating_point():
            continue
        nan, inf = int(value.isnan().sum()), int(value.isinf().sum())
        if not nan and not inf:
            continue
        counts = " and ".join(
            f"{c} {what} value{'s' if c > 1 else ''}"
            for c, what in ((nan, "NaN"), (inf, "infinite")) if c)
        masked = site["mask"] is not None and site["mask"] is not True
        raise ValueError(
            f"x: observed site {name!r} has {counts}; NUTS needs finite data (its gradients "
            "are NaN otherwise): drop or impute those entries"
            + ("; under a mask, still replace them with any finite value" if masked else ""))


def _fixed_values(fix_params) -> dict:
    if fix_params is None:
        return {}
    if isinstance(fix_params, FitResult):
        params = fix_params.model_params()
        if not params:
            raise ValueError("fix_params: the given FitResult holds no fitted model parameters")
        return params
    if isinstance(fix_params, dict):
        return {k: torch.as_tensor(v) for k, v in fix_params.items()}
    raise TypeError(f"fix_params: must be a FitResult or a dict, got {type(fix_params).__name__}")


__all__ = ["hand_back", "prepared"]
