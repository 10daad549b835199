"""Mixtures of factor analysers (Ghahramani & Hinton 1996): ``model.py`` the family, ``em.py`` its EM."""

from elbolab.models.mfa.model import MixtureOfFactorAnalysers

__all__ = ["MixtureOfFactorAnalysers"]
