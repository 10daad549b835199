"""Model families: Pyro models with whatever is tractable about them."""

from models.base import Evidence, MissingCapability, ModelFamily, require

__all__ = ["Evidence", "MissingCapability", "ModelFamily", "require"]
