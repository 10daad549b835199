"""Closed forms of the gap decomposition (:mod:`elbolab.inference.evaluation.gaps`) for families with a Gaussian
exact local posterior and exact per-point evidences (e.g. FA / PPCA), and Gaussian guides.

For q_n = N(m_n, S_n) and p(z_n | x_n) = N(mu_n, Sigma_n), the ELBO identity gives
L_n[q] = log p(x_n) - KL(q_n || p(z_n | x_n)) exactly; the best member of a Gaussian family has a
closed-form KL (:func:`gaussian_approximation_gap`).
"""

from __future__ import annotations

import torch
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from elbolab.guides import LatentGuide
from elbolab.models.capabilities import ExactLocalPosterior, PointwiseEvidence, require


def closed_form_available(family, x, *guides_) -> bool:
    """Whether the closed-form path applies: the family has a Gaussian exact local posterior
    (:class:`ExactLocalPosterior`) and exact per-point evidences (:class:`PointwiseEvidence`), and
    every guide is a Gaussian :class:`elbolab.guides.LatentGuide` (its ``distribution`` is a
    MultivariateNormal or an Independent Normal; flows are not)."""
    if not (isinstance(family, ExactLocalPosterior) and isinstance(family, PointwiseEvidence)):
        return False
    return all(_is_gaussian(g, x) for g in guides_)


def _is_gaussian(guide, x) -> bool:
    if not isinstance(guide, LatentGuide):
        return False
    with torch.no_grad():
        d = guide.distribution(x, torch.zeros(1, dtype=torch.long, device=x.device))
    while isinstance(d, Independent):
        d = d.base_dist
    return isinstance(d, MultivariateNormal | Normal)


def exact_posterior_mvn(family, x) -> MultivariateNormal:
    """p(z_n | x_n) of a family with :class:`ExactLocalPosterior`, as one MultivariateNormal."""
    require(family, ExactLocalPosterior, "the closed-form gap decomposition")
    mean, cov = family.exact_posterior(x)
    return MultivariateNormal(mean, covariance_matrix=cov, validate_args=False)


def closed_form_elbo(family, x, guide, *, posterior=None, log_evidence=None) -> torch.Tensor:
    """L_n[q] = log p(x_n) - KL(q(z | x_n) || p(z | x_n)) per point (n,), exact for Gaussian q
    and a Gaussian posterior (the ELBO identity log p(x) = L[q] + KL(q || p(z | x)))."""
    post = posterior if posterior is not None else exact_posterior_mvn(family, x)
    if log_evidence is None:
        require(family, PointwiseEvidence, "closed_form_elbo without log_evidence")
        log_evidence = family.log_evidence_pointwise(x)
    loc, tril = guide.moments(x)
    return log_evidence - kl_divergence(mvn(loc, tril), post)


def gaussian_approximation_gap(cov: torch.Tensor, local_family: str) -> torch.Tensor:
    """Closed-form approximation gap of the best member of F for a Gaussian posterior N(m, cov).

    mean-field: min_q KL = 1/2 (sum_j log Lambda_jj - log det Lambda), Lambda = cov^-1 (the
    optimal factor j is N(m_j, 1 / Lambda_jj)); full-rank: 0 (the posterior is in F).
    """
    if local_family == "full-rank":
        return cov.new_zeros(cov.shape[:-2])
    if local_family != "mean-field":
        raise ValueError(f"local_family: closed form known for mean-field and full-rank, got "
                         f"{local_family!r}")
    prec = torch.cholesky_inverse(torch.linalg.cholesky(cov))
    return 0.5 * (prec.diagonal(dim1=-2, dim2=-1).log().sum(-1) - torch.logdet(prec))


def mvn(loc, tril):
    # no argument validation: the guides' parametrizations give valid Cholesky factors
    return MultivariateNormal(loc, scale_tril=tril, validate_args=False)


def detached_posterior(family, x):
    with torch.no_grad():
        return exact_posterior_mvn(family, x)


__all__ = ["closed_form_available", "closed_form_elbo", "detached_posterior",
           "exact_posterior_mvn", "gaussian_approximation_gap", "mvn"]
