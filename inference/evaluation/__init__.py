"""Evaluating fits: evidence estimators, gaps, PSIS and diagnostics, reference posteriors.

``evidence.py`` IWAE and exact evidences; ``ais.py`` annealed importance sampling;
``pointwise.py`` per-point importance weights; ``psis.py`` Pareto k-hat and importance ESS;
``diagnostics.py`` PSIS of a fit; ``gaps.py`` the inference-gap decomposition (Cremer, Li &
Duvenaud 2018) with ``gap_closed_form.py`` and ``gap_table.py``; ``reference.py`` tables against
a reference posterior.
"""
