"""The Bayesian Gaussian mixture (Blei, Kucukelbir & McAuliffe 2017).

``model.py`` the family and its equations; ``evidence.py`` and ``sequential.py`` the exact log
evidence; ``fit.py`` EM for the MAP and CAVI (the paper's updates); ``means.py`` label-free
summaries and k-means++ starts.
"""

from elbolab.models.gmm.evidence import MAX_ASSIGNMENTS
from elbolab.models.gmm.fit import CaviState, GMMCavi, GMMMap, MapState
from elbolab.models.gmm.means import sorted_means, spread_means
from elbolab.models.gmm.model import BayesianGMM, label_symmetry_term

__all__ = ["MAX_ASSIGNMENTS", "BayesianGMM", "CaviState", "GMMCavi", "GMMMap", "MapState",
           "label_symmetry_term", "sorted_means", "spread_means"]
