"""How a guide is named and built, so guides can be swapped by name in code and on the CLI."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class GuideSpec:
    """A named variational family.

    ``build(family, x, **options)`` returns a Pyro guide callable with the model's signature
    (an ``AutoGuide``, a ``PyroModule`` or a plain function using ``pyro.param``).
    ``collapsed``: the family's discrete sites are not in the guide but summed out exactly
    (the SVI engine then uses ``TraceEnum_ELBO``, and the bound is labelled ``elbo-collapsed``).
    ``enumerated``: the guide's own discrete sites are marked for enumeration, so expectations
    over them are exact (``TraceEnum_ELBO``); the bound is still the plain ``elbo``.
    ``amortized``: q(z_n | x_n) comes from an encoder shared across data points.
    """

    name: str
    build: Callable
    collapsed: bool = False
    amortized: bool = False
    description: str = ""
    enumerated: bool = False
