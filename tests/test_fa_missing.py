"""Missing data under FA: exact conditional Gaussians and EM on the observed entries."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from elbolab.models.fa.missing import em_missing, impute, multiple_impute, observed_loglik
from elbolab.models.fa.model import FactorAnalysis, FAParams, fit_em


def setup(n=40, d=6, k=2, frac=0.3, seed=0):
    fam = FactorAnalysis(k, dim=d)
    x, truth = fam.simulate(n, seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    mask = torch.rand(n, d, generator=g) < frac
    mask[0] = False  # one complete row
    mask[1] = True  # one empty row
    mask[2, :] = False
    mask[2, :d - 1] = True  # one row with a single observed entry
    xm = x.clone()
    xm[mask] = float("nan")
    return x, xm, mask, truth


def numpy_conditional(x_row, miss, p):
    """p(x_mis | x_obs) by partitioning C = W W^T + Psi (brute force)."""
    C, mu = p.covariance().numpy(), p.mu.numpy()
    o, m = ~miss, miss
    Coo, Cmo, Cmm = C[np.ix_(o, o)], C[np.ix_(m, o)], C[np.ix_(m, m)]
    if o.sum() == 0:
        return mu[m], Cmm
    K = Cmo @ np.linalg.inv(Coo)
    return mu[m] + K @ (x_row[o] - mu[o]), Cmm - K @ Cmo.T


def test_impute_matches_numpy_conditioning():
    x, xm, mask, p = setup()
    filled, covs = impute(xm, p)
    assert filled.dtype == torch.float64 and not torch.isnan(filled).any()
    obs = ~mask
    assert torch.equal(filled[obs], x[obs])
    seen = set()
    for pc in covs:
        miss = np.zeros(6, bool)
        miss[pc.missing.numpy()] = True
        for r in pc.rows.tolist():
            assert np.array_equal(mask[r].numpy(), miss)
            mean, cov = numpy_conditional(xm[r].numpy(), miss, p)
            np.testing.assert_allclose(filled[r, pc.missing].numpy(), mean, atol=1e-10)
            np.testing.assert_allclose(pc.cov.numpy(), cov, atol=1e-10)
            seen.add(r)
    assert seen == {r for r in range(40) if mask[r].any()}
    # the family's ExactImputation capability: the same conditional means
    fam = FactorAnalysis(2, params=p)
    for r in range(40):
        if mask[r].any():
            mean, _ = numpy_conditional(xm[r].numpy(), mask[r].numpy(), p)
            np.testing.assert_allclose(fam.impute_exact(xm)[r, mask[r]].numpy(), mean, atol=1e-10)
    assert torch.equal(fam.impute_exact(xm)[obs], x[obs])
    with pytest.raises(ValueError, match="^params"):
        FactorAnalysis(2).impute_exact(xm)


def test_observed_loglik_matches_scipy():
    _, xm, mask, p = setup()
    ll = observed_loglik(xm, p)
    C, mu = p.covariance().numpy(), p.mu.numpy()
    for r in range(40):
        o = ~mask[r].numpy()
        ref = 0.0 if o.sum() == 0 else multivariate_normal(mu[o], C[np.ix_(o, o)]).logpdf(
            xm[r].numpy()[o])
        assert float(ll[r]) == pytest.approx(ref, rel=1e-11, abs=1e-12)


def test_multiple_impute_statistics():
    _, xm, mask, p = setup(n=5, d=4, k=1, seed=1)
    D = 20000
    draws = multiple_impute(xm, p, D, seed=3)
    assert draws.shape == (D, 5, 4) and draws.dtype == torch.float64
    assert torch.equal(draws[:, ~mask], xm[~mask].expand(D, -1))
    for r in range(5):
        miss = mask[r].numpy()
        if not miss.any():
            continue
        mean, cov = numpy_conditional(xm[r].numpy(), miss, p)
        dm = draws[:, r, mask[r]].numpy()
        # sample mean: SE = sqrt(var / D); sample variance: SE ~ var * sqrt(2 / D); 5 SE each
        sd = np.sqrt(np.diag(cov))
        assert np.all(np.abs(dm.mean(0) - mean) < 5 * sd / math.sqrt(D))
        assert np.all(np.abs(dm.var(0) - np.diag(cov)) < 5 * np.diag(cov) * math.sqrt(2 / D))
    assert torch.equal(draws, multiple_impute(xm, p, D, seed=3))


@pytest.mark.parametrize("kind", ["fa", "ppca"])
def test_em_missing_monotone(kind):
    _, xm, _, _ = setup(n=300, d=6, k=2, frac=0.25, seed=2)
    p, trace = em_missing(xm, 2, kind=kind, max_iter=300, tol=0.0)
    assert np.diff(trace).min() >= -1e-9 * abs(trace[-1])
    assert trace[-1] > trace[0]
    # the trace is the observed-data log-likelihood at the returned parameters (scipy)
    C, mu = p.covariance().numpy(), p.mu.numpy()
    obs = ~torch.isnan(xm)
    ref = sum(multivariate_normal(mu[o], C[np.ix_(o, o)]).logpdf(xm[r].numpy()[o])
              for r in range(300) if (o := obs[r].numpy()).any())
    assert trace[-1] == pytest.approx(ref, rel=1e-10)
    if kind == "ppca":
        assert torch.allclose(p.psi, p.psi[0].expand(6))


def test_em_missing_without_gaps_reaches_complete_data_optimum():
    x, _ = FactorAnalysis(2, dim=5).simulate(400, seed=4)
    p, trace = em_missing(x, 2, max_iter=20000, tol=1e-13)
    q, tr = fit_em(x, 2, method="svd", tol=1e-13, max_iter=20000)
    assert trace[-1] == pytest.approx(tr[-1], abs=1e-5)
    np.testing.assert_allclose(p.covariance().numpy(), q.covariance().numpy(), atol=1e-3)


def test_missing_validation_and_dtype():
    _, xm, _, p = setup()
    bad = xm.clone()
    bad[:, 3] = float("nan")
    with pytest.raises(ValueError, match="^x"):
        em_missing(bad, 2)
    with pytest.raises(ValueError, match="^latent_dim"):
        em_missing(xm, 6)
    with pytest.raises(ValueError, match="^x"):
        impute(xm[:, :5], p)
    with pytest.raises(TypeError, match="^params"):
        impute(xm, p.as_dict())
    with pytest.raises(ValueError, match="^num_draws"):
        multiple_impute(xm, p, 0)
    x32 = xm.float()
    filled, covs = impute(x32, p)
    assert filled.dtype == torch.float32 and covs[0].cov.dtype == torch.float32
    q, _ = em_missing(x32, 2, max_iter=3)
    assert isinstance(q, FAParams) and q.W.dtype == torch.float32
