"""Which guides a family gets: ``for_family``, ``default_for``, ``register``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from elbolab.guides.auto import composed_specs
from elbolab.guides.base import GuideSpec
from elbolab.guides.latent import latent_guides, spec
from elbolab.models.capabilities import ExactLocalPosterior, LocalDensities

# -- which guides a family gets --------------------------------------------------------------
_REGISTERED: list[tuple[type, Callable[[], dict[str, GuideSpec]], str]] = []


def register(family_type: type, specs: Callable[[], dict[str, GuideSpec]], default: str) -> None:
    """Give every family of ``family_type`` the guides ``specs()`` (name -> GuideSpec), with
    ``default`` used when no guide is named. Later registrations take precedence."""
    _REGISTERED.insert(0, (family_type, specs, default))


def _registered(family):
    if not _BUILTIN_DONE:
        _register_builtin()
    for cls, specs, default in _REGISTERED:
        if isinstance(family, cls):
            return specs(), default
    return None


def for_family(family) -> dict[str, GuideSpec]:
    """The guides that apply to ``family``, by name: a registered family's own list; for a family
    with :class:`elbolab.models.capabilities.LocalDensities`, the per-point latent guides (``exact`` when it
    has an :class:`~elbolab.models.capabilities.ExactLocalPosterior`)."""
    found = _registered(family)
    if found is not None:
        return found[0]
    if isinstance(family, LocalDensities):
        specs = latent_guides(exact=isinstance(family, ExactLocalPosterior))
        if family.discrete_sites:  # per-point guides leave the enumerated sites to be summed out
            specs = {k: dataclasses.replace(s, collapsed=True) for k, s in specs.items()}
        return specs
    specs = composed_specs()
    if family.discrete_sites:  # autoguides leave the enumerated sites to be summed out
        specs = {k: dataclasses.replace(s, collapsed=True) for k, s in specs.items()}
    return specs


def default_for(family) -> str | None:
    """The guide used when none is named."""
    found = _registered(family)
    if found is not None:
        return found[1]
    return "mean-field" if isinstance(family, LocalDensities) else "auto-normal"


def parse_names(text: str) -> list[str]:
    """``"mean-field,mlp"`` -> ``["mean-field", "mlp"]``, checking every name."""
    out = [t.strip() for t in str(text).split(",") if t.strip()]
    if not out:
        raise ValueError("guides: empty list")
    for t in out:
        spec(t)
    return out


_BUILTIN_DONE = False


def _register_builtin() -> None:
    """The built-in families' guide lists (registered on first use: no import cycles)."""
    global _BUILTIN_DONE
    _BUILTIN_DONE = True
    from elbolab.guides.gmm import guide_specs
    from elbolab.models.gmm.model import BayesianGMM
    from elbolab.models.vae.model import VAE

    _REGISTERED.append((BayesianGMM, guide_specs, "mean-field"))
    _REGISTERED.append((VAE, lambda: latent_guides(exact=False), "mlp"))
