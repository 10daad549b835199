"""Model families: Pyro models with whatever is tractable about them.

The contract between families and engines is :mod:`models.capabilities`.
"""

from models.base import LocalLatentFamily, ModelFamily
from models.capabilities import (
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
