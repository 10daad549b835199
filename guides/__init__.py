"""Variational families, swappable by name in code and on the command line.

For any model whose latent site is a per-data-point z of shape (n, k) in ``pyro.plate("data")``::

    import guides
    guides.names()                                  # ['exact', 'mean-field', 'full-rank', ...]
    guide = guides.make("linear-full", family, x)   # a Pyro guide: guide(x, subsample_size=None)
    family.guides = lambda: guides.latent_guides()  # what a family returns from ``guides()``

Options (keyword arguments of ``make`` / ``guide_options`` of the SVI engine): ``latent_dim``
(default ``family.latent_dim``), ``site`` ("z"), ``plate`` ("data"), ``name`` (Pyro module name),
``init_scale``; ``hidden`` and ``activation`` for ``mlp``; ``params`` for ``exact``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from guides.amortized import (
    EncoderGuide,
    LinearEncoderGuide,
    MLPEncoderGuide,
    build_linear_diag,
    build_linear_full,
    build_mlp,
)
from guides.base import GuideSpec
from guides.exact import ExactPosteriorGuide, build_exact
from guides.flow import FlowEncoderGuide, LocalFlowGuide, build_flow, build_local_flow
from guides.local import (
    FullRankGuide,
    LatentGuide,
    LocalGuide,
    MeanFieldGuide,
    build_full_rank,
    build_mean_field,
)
from models.capabilities import ExactLocalPosterior, LocalDensities

#: The per-data-point latent guides, by name.
LATENT_GUIDES: dict[str, GuideSpec] = {
    "exact": GuideSpec("exact", build_exact, description="the family's exact posterior"),
    "mean-field": GuideSpec(
        "mean-field", build_mean_field, description="local diagonal Gaussian per data point"),
    "full-rank": GuideSpec(
        "full-rank", build_full_rank, description="local full-covariance Gaussian per data point"),
    "linear-diag": GuideSpec(
        "linear-diag", build_linear_diag, amortized=True,
        description="linear encoder, diagonal Gaussian"),
    "linear-full": GuideSpec(
        "linear-full", build_linear_full, amortized=True,
        description="linear encoder, full-covariance Gaussian"),
    "mlp": GuideSpec(
        "mlp", build_mlp, amortized=True, description="MLP encoder, diagonal Gaussian"),
    "flow": GuideSpec(
        "flow", build_flow, amortized=True,
        description="MLP diagonal Gaussian + normalizing flow (IAF/coupling/spline)"),
    "local-flow": GuideSpec(
        "local-flow", build_local_flow,
        description="per-point Gaussian + per-point affine couplings"),
    "semi-amortized": GuideSpec(
        "semi-amortized", lambda *a, **k: _semi(*a, **k), amortized=True,
        description="encoder output refined by K SVI steps per point (Kim et al. 2018)"),
}


def _semi(*args, **kwargs):
    from guides.semi_amortized import build_semi_amortized

    return build_semi_amortized(*args, **kwargs)


def names(*, amortized: bool | None = None) -> list[str]:
    """Guide names (only amortized / only local ones when ``amortized`` is given)."""
    return [k for k, s in LATENT_GUIDES.items() if amortized is None or s.amortized == amortized]


def latent_guides(*, exact: bool = True) -> dict[str, GuideSpec]:
    """A fresh dict of the specs, for a family's ``guides()`` (without ``exact`` if it has none)."""
    return {k: s for k, s in LATENT_GUIDES.items() if exact or k != "exact"}


def spec(name) -> GuideSpec:
    """The spec called ``name`` (a GuideSpec passes through)."""
    if isinstance(name, GuideSpec):
        return name
    if name not in LATENT_GUIDES:
        raise ValueError(f"guide: must be one of {list(LATENT_GUIDES)}, got {name!r}")
    return LATENT_GUIDES[name]


def make(name, family, x, **options) -> LatentGuide:
    """Build the guide ``name`` (or a GuideSpec) for ``family`` and data ``x``."""
    return spec(name).build(family, x, **options)


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
    with :class:`models.capabilities.LocalDensities`, the per-point latent guides (``exact`` when it
    has an :class:`~models.capabilities.ExactLocalPosterior`)."""
    found = _registered(family)
    if found is not None:
        return found[0]
    if isinstance(family, LocalDensities):
        specs = latent_guides(exact=isinstance(family, ExactLocalPosterior))
        if family.discrete_sites:  # per-point guides leave the enumerated sites to be summed out
            specs = {k: dataclasses.replace(s, collapsed=True) for k, s in specs.items()}
        return specs
    from guides.auto import composed_specs

    return composed_specs()


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
    from guides.gmm import guide_specs
    from models.gmm import BayesianGMM
    from models.vae import VAE

    _REGISTERED.append((BayesianGMM, guide_specs, "mean-field"))
    _REGISTERED.append((VAE, lambda: latent_guides(exact=False), "mlp"))

__all__ = [
    "LATENT_GUIDES", "default_for", "for_family", "register", "EncoderGuide", "ExactPosteriorGuide", "FlowEncoderGuide", "LocalFlowGuide", "FullRankGuide", "GuideSpec",
    "LatentGuide", "LinearEncoderGuide", "LocalGuide", "MLPEncoderGuide", "MeanFieldGuide",
    "latent_guides", "make", "names", "parse_names", "spec",
]
