"""The SVI engine's fitted pair: the guide's coverage of the model's latent sites, the parameters
of model and guide, and draws from q for a result's ``samples`` (plate index sites left out).
"""

from __future__ import annotations

import dataclasses

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from elbolab.guides.base import GuideSpec
from elbolab.inference.svi.checkpoint import restore_params
from elbolab.inference.tracing import site_is_plate
from elbolab.models.capabilities import PointwiseLogLikelihood


def check_coverage(family, guide_fn, x, spec: GuideSpec) -> None:
    """Every latent site of the model is sampled by the guide, or summed out (enumerated, with a
    guide that enumerates): else an error naming the uncovered sites."""
    from elbolab.guides.auto import latent_sites

    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the training draws stay those of the seed
        glob, loc, enum = latent_sites(family.model, x)
        with torch.no_grad(), poutine.block():
            gtr = poutine.trace(guide_fn).get_trace(x)
            mtr = poutine.trace(family.model).get_trace(x)
    in_model = {k for k, s in mtr.nodes.items() if s["type"] == "sample"}
    sampled = {k for k, s in gtr.nodes.items() if s["type"] == "sample" and not site_is_plate(s)}
    needed = set(glob) | set(loc) | (set() if (spec.collapsed or spec.enumerated) else set(enum))
    missing = sorted(needed - sampled)
    if missing:
        discrete = [k for k in missing if k in enum or k in family.discrete_sites]
        fix = ("sample them in the guide, or let them be summed out: mark them in the model with "
               "infer={'enumerate': 'parallel'} (or pyro.infer.config_enumerate) and declare "
               "them in the family's discrete_sites" if discrete else
               "use a guide that samples them (e.g. 'auto-normal', which guides every continuous "
               "latent site of any model) or make them observed")
        raise ValueError(f"guide: {spec.name!r} does not cover the latent site(s) {missing} of "
                         f"the {family.name} model; {fix}")
    extra = sorted(k for k, s in gtr.nodes.items() if s["type"] == "sample" and not
                   site_is_plate(s) and not s["infer"].get("is_auxiliary")
                   and k not in in_model)
    if extra:
        raise ValueError(f"guide: {spec.name!r} samples site(s) {extra} that the {family.name} "
                         "model does not have (a misspelled name?)")


def check_val_data(family, guide_fn, val, spec: GuideSpec) -> None:
    """The guide and the model traced once on the held-out data, before any step: a guide that
    cannot evaluate them (a local guide holds one q per training point) is a one-line error
    naming ``val_data``, without Pyro's table of trace shapes."""
    from elbolab.inference.evaluation.psis import reason

    devices = [val.device] if val.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), poutine.block():
            gtr = poutine.trace(guide_fn).get_trace(val)
            poutine.trace(poutine.replay(family.model, trace=gtr)).get_trace(val)
    except (ValueError, RuntimeError, IndexError) as exc:
        why = reason(exc)
    else:
        return
    raise ValueError(f"val_data: guide {spec.name!r} cannot evaluate the {val.shape[0]} held-out "
                     f"points ({why})")


def enumeration_of(family, guide_fn, x, spec: GuideSpec) -> GuideSpec:
    """``spec`` marked for ``TraceEnum_ELBO`` when the model has discrete sites to enumerate:
    ``collapsed`` when the guide leaves them to be summed out, ``enumerated`` when it samples one
    (e.g. a user's guide function)."""
    if not family.discrete_sites or spec.collapsed or spec.enumerated:
        return spec
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), poutine.block():
        gtr = poutine.trace(guide_fn).get_trace(x)
    sampled = {k for k, s in gtr.nodes.items() if s["type"] == "sample"}
    if sampled & set(family.discrete_sites):
        return dataclasses.replace(spec, enumerated=True)
    return dataclasses.replace(spec, collapsed=True)


def vectorization_problem(family, guide_fn, x, nest: int, enum: bool) -> str:
    """Empty when two particles run vectorized (an outer particle plate) through model and
    guide, else why not (when one particle runs). Run in a scratch param store and random state,
    so the fit's parameters and draws are those it would have had. (Not on copies: deepcopy of a
    Pyro autoguide drops its model.)"""
    fam, guide = family, guide_fn
    cls = TraceEnum_ELBO if enum else Trace_ELBO
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), pyro.get_param_store().scope():
        try:
            cls(num_particles=2, vectorize_particles=True, max_plate_nesting=nest).loss(
                fam.model, guide, x)
            return ""
        except Exception as e:  # noqa: BLE001 - whatever a user's code raises under a plate
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        try:
            cls(num_particles=1, max_plate_nesting=nest).loss(fam.model, guide, x)
        except Exception:  # noqa: BLE001 - it fails either way: training says why
            return ""
    return why


def load_params_from(payload: dict, model, guide, x) -> None:
    """Create the params of model and guide, then copy a checkpoint's values in."""
    with torch.no_grad():
        gtr = poutine.trace(guide).get_trace(x)
        poutine.trace(poutine.replay(model, trace=gtr)).get_trace(x)
    store = dict(pyro.get_param_store().named_parameters())
    missing = [k for k in payload["params"] if k not in store]
    if missing:
        raise KeyError(f"resume: parameters {missing} are not created by this model/guide")
    restore_params({k: v.to(store[k].device) for k, v in payload["params"].items()})


def store_state() -> dict:
    state = pyro.get_param_store().get_state()
    return {"params": {k: v.detach().clone() for k, v in state["params"].items()},
            "constraints": dict(state["constraints"])}


def param_names(fn, x) -> set[str]:
    with torch.no_grad():
        tr = poutine.trace(fn).get_trace(x)
    return {s["name"] for s in tr.nodes.values() if s["type"] == "param"}


def posterior_draws(family, guide_fn, x, num_samples: int):
    """Draws from q, shaped (1 chain, draw, ...), and the pointwise log likelihood if the family
    can compute it (for ArviZ). Vectorized with an outer plate; shapes taken from one plain draw."""
    if num_samples <= 0:
        return {}, {}

    def latent(tr):
        return {
            name: site["value"]
            for name, site in tr.nodes.items()
            if site["type"] == "sample"
            and not site["is_observed"]
            and not site["infer"].get("is_auxiliary")
            and not site_is_plate(site)
        }

    nest = family.max_plate_nesting
    with torch.no_grad():
        shapes = {k: v.shape for k, v in latent(poutine.trace(guide_fn).get_trace(x)).items()}
        try:
            with pyro.plate("_posterior_draws", num_samples, dim=-(nest + 1)):
                vec = latent(poutine.trace(guide_fn).get_trace(x))
            samples = {k: vec[k].reshape(num_samples, *shapes[k]).unsqueeze(0) for k in shapes}
        except (RuntimeError, ValueError, KeyError):  # guides that cannot be vectorized
            draws = [latent(poutine.trace(guide_fn).get_trace(x)) for _ in range(num_samples)]
            samples = {k: torch.stack([d[k] for d in draws]).unsqueeze(0) for k in shapes}
    log_lik = {}
    if isinstance(family, PointwiseLogLikelihood):
        try:
            log_lik = {"x": family.pointwise_log_likelihood(samples, x)}
        except KeyError:  # the guide's sites are not the ones the family reads
            log_lik = {}
    return samples, log_lik
