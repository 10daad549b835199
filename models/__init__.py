"""Model families: Pyro models with whatever is tractable about them.

The contract between families and engines is :mod:`elbolab.models.capabilities`.
"""

from elbolab.models.base import LocalLatentFamily, ModelFamily
from elbolab.models.capabilities import (
    BOUNDS,
    Evidence,
    GaussianPosterior,
    MissingCapability,
    Moments,
    capabilities_of,
    has,
    require,
)

__all__ = [
    "BOUNDS", "Evidence", "GaussianPosterior", "LocalLatentFamily", "MissingCapability",
    "ModelFamily", "Moments", "capabilities_of", "has", "require",
]
