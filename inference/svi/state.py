"""What an SVI fit keeps (:class:`SviState`) and how a guide argument becomes a GuideSpec."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import torch

from elbolab.guides.base import GuideSpec
from elbolab.guides.registry import default_for, for_family
from elbolab.inference.svi.run import SviRun
from elbolab.models.capabilities import MissingCapability
from elbolab.models.program import Program


@dataclass
class SviState:
    """``FitResult.state`` of the SVI engine: the fitted guide and everything to rebuild it."""

    guide: Any
    spec: GuideSpec
    params: dict[str, torch.Tensor]  # constrained values of every param, by name
    model_param_names: tuple[str, ...]
    guide_param_names: tuple[str, ...]
    guide_options: dict
    run: SviRun
    family: Any = None  # the fitted copy of the family (the caller's object is never changed)
    store: dict | None = None  # pyro param store state: unconstrained params and constraints
    data: Any = None  # the data the fit ran on (in memory only; a loaded fit has none)


def resolve_guide(family, guide) -> GuideSpec:
    """A guide given by name (one of ``elbolab.guides.for_family(family)``), a GuideSpec, or a callable."""
    if isinstance(guide, GuideSpec):
        return guide
    if callable(guide):  # a guide function or PyroModule, called like the model
        name = getattr(guide, "__name__", type(guide).__name__)
        return GuideSpec(name, lambda f, x: f.call(guide) if isinstance(f, Program) else guide,
                         description="a user's guide callable")
    specs = for_family(family)
    name = guide if guide is not None else default_for(family)
    if name is None or not specs:
        raise MissingCapability(
            f"SVI needs a guide; none is registered for the {family.name} family (pass "
            "guide=<GuideSpec or callable>, or give the family the LocalDensities capability)")
    if name not in specs:
        near = difflib.get_close_matches(str(name), list(specs), n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"guide: the {family.name} model has guides {sorted(specs)} (or pass a "
                         f"guide function), got {name!r}{hint}")
    return specs[name]
