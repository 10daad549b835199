"""Variational families, swappable by name in code and on the command line.

For any model whose latent site is a per-data-point z of shape (n, k) in ``pyro.plate("data")``::

    import guides
    elbolab.guides.names()                                  # ['exact', 'mean-field', 'full-rank', ...]
    guide = elbolab.guides.make("linear-full", family, x)   # a Pyro guide: guide(x, subsample_size=None)
    family.guides = lambda: elbolab.guides.latent_guides()  # what a family returns from ``guides()``

Options (keyword arguments of ``make`` / ``guide_options`` of the SVI engine): ``latent_dim``
(default ``family.latent_dim``), ``site`` ("z"), ``plate`` ("data"), ``name`` (Pyro module name),
``init_scale``; ``hidden`` and ``activation`` for ``mlp``; ``params`` for ``exact``.
"""

from elbolab.guides.amortized import EncoderGuide, LinearEncoderGuide, MLPEncoderGuide
from elbolab.guides.base import GuideSpec
from elbolab.guides.exact import ExactPosteriorGuide
from elbolab.guides.flow import FlowEncoderGuide, LocalFlowGuide
from elbolab.guides.latent import LATENT_GUIDES, latent_guides, make, names, spec
from elbolab.guides.local import FullRankGuide, LatentGuide, LocalGuide, MeanFieldGuide
from elbolab.guides.registry import default_for, for_family, parse_names, register

__all__ = [
    "LATENT_GUIDES", "default_for", "for_family", "register", "EncoderGuide", "ExactPosteriorGuide", "FlowEncoderGuide", "LocalFlowGuide", "FullRankGuide", "GuideSpec",
    "LatentGuide", "LinearEncoderGuide", "LocalGuide", "MLPEncoderGuide", "MeanFieldGuide",
    "latent_guides", "make", "names", "parse_names", "spec",
]
