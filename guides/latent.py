"""The per-data-point latent guides by name: ``LATENT_GUIDES``, ``spec``, ``make``."""

from __future__ import annotations

from elbolab.guides.amortized import (
    build_linear_diag,
    build_linear_full,
    build_mlp,
)
from elbolab.guides.base import GuideSpec
from elbolab.guides.exact import build_exact
from elbolab.guides.flow import build_flow, build_local_flow
from elbolab.guides.local import (
    LatentGuide,
    build_full_rank,
    build_mean_field,
)
from elbolab.guides.semi_amortized import build_semi_amortized

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
        "semi-amortized", build_semi_amortized, amortized=True,
        description="encoder output refined by K SVI steps per point (Kim et al. 2018)"),
}


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
