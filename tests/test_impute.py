"""Generic imputation by importance resampling (inference/impute.py).

Oracles: the exact conditional Gaussian of FA, written out in numpy here
(E[x_m | x_o] = mu_m + C_mo C_oo^-1 (x_o - mu_o), C = W W^T + Psi) and elbolab.models.fa.missing.impute; for a
non-Gaussian model (Bernoulli likelihood, scalar z), quadrature on a fine grid of z.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from elbolab import guides
from elbolab.inference.impute import column_mean_impute, importance_impute, rmse
from elbolab.inference.runtime import isolated
from elbolab.models.fa.missing import impute
from elbolab.models.fa.model import FactorAnalysis


def fa_missing(n=60, d=6, k=2, frac=0.3, seed=1):
    x, truth = FactorAnalysis(k, dim=d).simulate(n, seed=seed)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(x.shape, generator=g, dtype=torch.float64) < frac
    return FactorAnalysis(k, params=truth), x, truth, mask, x.masked_fill(mask, float("nan"))


def np_conditional(x_nan, p):
    W, mu, psi = (t.numpy() for t in (p.W, p.mu, p.psi))
    C = W @ W.T + np.diag(psi)
    out, var = x_nan.numpy().copy(), np.zeros(x_nan.shape)
    logz = np.zeros(x_nan.shape[0])
    for i, row in enumerate(out):
        m, o = np.isnan(row), ~np.isnan(row)
        if o.any():
            K = C[np.ix_(m, o)] @ np.linalg.inv(C[np.ix_(o, o)])
            r = row[o] - mu[o]
            Coo = C[np.ix_(o, o)]
            logz[i] = -0.5 * (o.sum() * math.log(2 * math.pi) + np.linalg.slogdet(Coo)[1]
                              + r @ np.linalg.solve(Coo, r))
        else:
            K, r = np.zeros((m.sum(), 0)), np.zeros(0)
        row[m] = mu[m] + K @ r
        var[i, m] = np.diag(C[np.ix_(m, m)] - K @ C[np.ix_(o, m)])
    return out, var, logz


def test_prior_proposal_matches_exact_conditional_means():
    """z = (IS - exact) / SE per missing entry is ~N(0, 1) (delta-method SE of the
    self-normalized estimate); over ~110 entries, max |z| < 5 and mean z^2 in [0.5, 1.6]
    (sd of mean z^2 is sqrt(2 / 110) = 0.13; the SE itself is estimated, hence the margin)."""
    fam, x, truth, mask, xn = fa_missing()
    imp = importance_impute(fam, xn, num_particles=4000, seed=0)
    exact, _, logz = np_conditional(xn, truth)
    np.testing.assert_allclose(impute(xn, truth)[0].numpy(), exact, atol=1e-9)  # two oracles agree
    z = ((imp.mean.numpy() - exact) / np.where(mask, imp.mean_se.numpy(), 1.0))[mask.numpy()]
    assert np.abs(z).max() < 5
    assert 0.5 < (z**2).mean() < 1.6
    assert torch.equal(imp.mean[~mask], x[~mask])
    assert (imp.mean_se[~mask] == 0).all() and imp.mean.dtype == torch.float64
    # log p(x_obs) estimate: error ~ N(-1/(2 ESS), 1/ESS) per row (delta method)
    ess = imp.ess.numpy()
    err = imp.log_evidence_obs.numpy() - logz
    assert (np.abs(err + 0.5 / ess) < 5 / np.sqrt(ess)).all()


def test_guide_proposal_with_defensive_mixture_and_batching():
    fam, x, truth, mask, xn = fa_missing()
    with isolated(0):
        # q(z | x~) on the mean-filled rows is too narrow and off-centre: the defensive prior
        # share keeps the weights bounded
        enc = guides.make("exact", fam, x)
        imp = importance_impute(fam, xn, proposal=enc, num_particles=1500, particle_batch=500,
                                data_batch=30, seed=0)
    exact, _, _ = np_conditional(xn, truth)
    z = ((imp.mean.numpy() - exact) / np.where(mask, imp.mean_se.numpy(), 1.0))[mask.numpy()]
    assert np.abs(z).max() < 5 and 0.5 < (z**2).mean() < 1.6
    assert imp.proposal == "exact"


def test_multiple_imputations_have_the_conditional_distribution():
    """Pooled standardized draws (x - E) / sd over missing entries: mean ~ 0, var ~ 1.
    Draws of one row share resampled particles, so the effective count is below the raw
    ~40 entries x 200 draws; the bounds (0.15 on the mean, [0.8, 1.2] on the variance) allow
    for an effective count of ~200."""
    fam, x, truth, mask, xn = fa_missing(n=20)
    imp = importance_impute(fam, xn, num_particles=3000, num_imputations=200, seed=2)
    exact, var, _ = np_conditional(xn, truth)
    assert imp.draws.shape == (200, 20, 6)
    assert torch.equal(imp.draws[:, ~mask], x[~mask].expand(200, -1))
    m = mask.numpy()
    u = ((imp.draws.numpy() - exact) / np.sqrt(np.where(m, var, 1.0)))[:, m]
    assert abs(u.mean()) < 0.15 and 0.8 < u.var() < 1.2


def test_generic_route_on_a_bernoulli_model_against_quadrature():
    """z ~ N(0, 1), x_j ~ Bernoulli(sigmoid(a_j z + b_j)): E[x_m | x_o] by quadrature on z."""
    torch.manual_seed(0)
    n, d = 15, 5
    a = torch.tensor([2.0, -1.5, 1.0, 3.0, -2.5], dtype=torch.float64)
    b = torch.tensor([0.5, 0.0, -1.0, 0.2, 0.3], dtype=torch.float64)

    class Toy:
        max_plate_nesting = 1

        def model(self, x, subsample_size=None):
            with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1) as i:
                z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=z * a + b).to_event(1), obs=x[i])

    z_true = torch.randn(n, 1, dtype=torch.float64)
    x = torch.bernoulli(torch.sigmoid(z_true * a + b))
    mask = torch.rand(n, d) < 0.4
    imp = importance_impute(Toy(), x.masked_fill(mask, float("nan")), num_particles=4000, seed=0)
    grid = np.linspace(-8, 8, 4001)
    prior = np.exp(-0.5 * grid**2)
    pr = 1 / (1 + np.exp(-(grid[:, None] * a.numpy() + b.numpy())))  # (G, d)
    for i in range(n):
        o, m = ~mask[i].numpy(), mask[i].numpy()
        lik = np.prod(np.where(x[i].numpy()[o] == 1, pr[:, o], 1 - pr[:, o]), axis=1)
        post = prior * lik / np.sum(prior * lik)
        want = post @ pr[:, m]
        got, se = imp.mean[i, mask[i]].numpy(), imp.mean_se[i, mask[i]].numpy()
        assert (np.abs(got - want) < 5 * se + 1e-6).all(), (i, got, want, se)


def test_baselines_and_rmse_against_numpy():
    _, x, _, mask, xn = fa_missing()
    col = np.nanmean(xn.numpy(), axis=0)
    want = np.where(mask.numpy(), col, x.numpy())
    np.testing.assert_allclose(column_mean_impute(xn).numpy(), want)
    got = rmse(torch.as_tensor(want), x, mask)
    assert got == pytest.approx(np.sqrt(((want - x.numpy())[mask.numpy()] ** 2).mean()))


def test_bad_inputs_name_the_field():
    fam, x, _, mask, xn = fa_missing(n=10)
    with pytest.raises(ValueError, match="^mask:"):
        importance_impute(fam, xn, mask[:5])
    with pytest.raises(TypeError, match="^mask:"):
        importance_impute(fam, xn, mask.int())
    with pytest.raises(ValueError, match="^mask:"):
        importance_impute(fam, xn, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="^proposal:"):
        importance_impute(fam, xn, proposal="posterior")
    with pytest.raises(ValueError, match="^num_particles:"):
        importance_impute(fam, xn, num_particles=1)
    with pytest.raises(ValueError, match="^defensive:"):
        importance_impute(fam, xn, proposal=lambda *a, **k: None, defensive=1.0)
    with pytest.raises(ValueError, match="^x:"):
        column_mean_impute(torch.full((3, 2), float("nan"), dtype=torch.float64))
