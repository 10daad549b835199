"""Factor analysis, probabilistic PCA as its special case, and Bayesian factor analysis.

``model.py`` the family (FA / PPCA) and its closed forms; ``params.py`` the parameter record;
``linalg.py`` the Gaussian marginal and the M-steps; ``fit.py`` EM and CAVI; ``missing.py`` EM,
likelihood and imputation with missing entries; ``bayes.py`` Bayesian FA with ``bayes_dists.py``
(identified loadings) and ``bayes_vb.py`` (variational Bayes).
"""

from elbolab.models.fa.bayes import BayesianFactorAnalysis
from elbolab.models.fa.model import FactorAnalysis
from elbolab.models.fa.params import FAParams

__all__ = ["BayesianFactorAnalysis", "FAParams", "FactorAnalysis"]
