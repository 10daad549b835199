"""CAVI on FA with fixed parameters, variational Bayes and NUTS on the Bayesian FA."""

import dataclasses
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.stats import multivariate_normal

from elbolab.inference import mcmc
from elbolab.inference.closed_form import cavi
from elbolab.inference.runtime import isolated
from elbolab.models.fa.bayes import BayesianFactorAnalysis
from elbolab.models.fa.model import FactorAnalysis, FAParams, fit_em
from elbolab.models.numerics import one_thread


def fixed_family(d=6, k=3, seed=0):
    g = np.random.default_rng(seed)
    p = FAParams(torch.tensor(g.normal(size=(d, k))), torch.tensor(g.normal(size=d)),
                 torch.tensor(g.uniform(0.3, 1.0, size=d)))
    return FactorAnalysis(k, params=p), p


def test_cavi_converges_to_mean_field_optimum():
    fam, p = fixed_family()
    x = fam.sample(50, seed=1)
    r = cavi.fit(fam, x, cavi.Settings(max_iter=5000, tol=1e-14), seed=0)
    assert r.converged and r.bound == "elbo"
    assert r.diagnostics["max_decrease"] <= 1e-10 * abs(r.elbo)
    # independent numpy: posterior mean W^T C^-1 (x - mu), precision L = I + W^T Psi^-1 W
    W, mu, C = p.W.numpy(), p.mu.numpy(), p.covariance().numpy()
    mean = (W.T @ np.linalg.solve(C, (x.numpy() - mu).T)).T
    L = np.eye(3) + W.T @ (W / p.psi.numpy()[:, None])
    np.testing.assert_allclose(r.posterior["z_loc"].numpy(), mean, atol=1e-7)
    np.testing.assert_allclose(r.posterior["z_scale"][0].numpy() ** 2, 1 / np.diag(L), rtol=1e-12)
    # the mean-field gap per point is 1/2 (sum_j log L_jj - log det L) (Cremer et al. 2018)
    log_px = multivariate_normal(mu, C).logpdf(x.numpy()).sum()
    gap = 0.5 * (np.log(np.diag(L)).sum() - np.linalg.slogdet(L)[1])
    assert r.elbo == pytest.approx(log_px - 50 * gap, abs=1e-8)
    assert r.posterior["z_loc"].dtype == torch.float64


def test_cavi_elbo_matches_monte_carlo_off_optimum():
    fam, p = fixed_family(d=4, k=2, seed=3)
    x = fam.sample(10, seed=0)
    g = torch.Generator().manual_seed(0)
    algo = fam.cavi()
    state = algo.init(x, g)
    state = dataclasses.replace(state, v=torch.tensor([0.3, 2.0], dtype=torch.float64))
    closed = algo.objective(x, state)
    S = 40000
    q = dist.Normal(state.m, state.v.sqrt()).to_event(1)
    z = q.sample((S,))
    vals = (fam.log_joint(x, z) - q.log_prob(z)).sum(-1)
    mc, se = float(vals.mean()), float(vals.std() / math.sqrt(S))
    assert abs(mc - closed) < 5 * se, (mc, closed, se)


def test_cavi_needs_fixed_params():
    x = torch.randn(20, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="^params"):
        cavi.fit(FactorAnalysis(2), x, seed=0)


@pytest.fixture(scope="module")
def bfa_data():
    x, _ = FactorAnalysis(2, dim=5).simulate(60, seed=2)
    return x


def vb_monte_carlo(fam, x, state, S=20000, seed=0):
    """E_q[log p(x, z, W, mu, tau) - log q] by sampling, with torch distributions throughout."""
    torch.manual_seed(seed)
    k = fam.latent_dim
    q_tau = dist.Gamma(torch.tensor(state.tau_shape, dtype=x.dtype).expand_as(state.tau_rate),
                       state.tau_rate)
    q_w = dist.MultivariateNormal(state.w_loc, state.w_cov)
    q_z = dist.MultivariateNormal(state.z_loc, state.z_cov)
    tau, wt, z = q_tau.sample((S,)), q_w.sample((S,)), q_z.sample((S,))
    W, mu = wt[..., :k], wt[..., k]
    logp = (dist.Normal(0.0, fam.alpha**-0.5).log_prob(W).sum((-1, -2))
            + dist.Normal(0.0, fam.mu_scale).log_prob(mu).sum(-1)
            + dist.Gamma(fam.a0, fam.b0).log_prob(tau).sum(-1)
            + dist.Normal(0.0, 1.0).log_prob(z).sum((-1, -2)))
    loc = z @ W.transpose(-1, -2) + mu.unsqueeze(-2)
    logp = logp + dist.Normal(loc, tau.rsqrt().unsqueeze(-2)).log_prob(x).sum((-1, -2))
    logq = q_tau.log_prob(tau).sum(-1) + q_w.log_prob(wt).sum(-1) + q_z.log_prob(z).sum(-1)
    vals = logp - logq
    return float(vals.mean()), float(vals.std() / math.sqrt(S))


def test_vb_elbo_monotone_and_closed_form(bfa_data):
    x = bfa_data
    fam = BayesianFactorAnalysis(2, alpha=0.5, a0=2.0, b0=1.5)
    r = cavi.fit(fam, x, cavi.Settings(max_iter=3000, tol=1e-11), seed=0)
    assert r.converged and r.bound == "elbo"
    assert r.diagnostics["max_decrease"] <= 1e-10 * abs(r.elbo)
    assert len(r.trace) > 3 and r.trace[-1] > r.trace[0]
    # the closed-form ELBO against a Monte Carlo estimate, at the optimum and at the start
    algo = fam.cavi()
    for state in (r.state, algo.init(x, torch.Generator().manual_seed(1))):
        closed = algo.objective(x, state)
        with one_thread(x):
            mc, se = vb_monte_carlo(fam, x, state)
        assert abs(mc - closed) < 5 * se, (mc, closed, se)
    # rotation-invariant check: E_q[W] E_q[W]^T + 1/E[tau] is near the ML covariance
    post = r.posterior
    C_vb = post["W_loc"] @ post["W_loc"].T + torch.diag(post["tau_rate"] / post["tau_shape"])
    p_ml, _ = fit_em(x, 2, method="svd", tol=1e-10)
    rel = (C_vb - p_ml.covariance()).abs().max() / p_ml.covariance().abs().max()
    assert rel < 0.25  # loose: priors and 60 points; a wrong update is off by O(1)
    assert post["W_loc"].dtype == torch.float64


def test_bayes_fa_likelihood_and_invariants():
    fam = BayesianFactorAnalysis(2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(15, 4, generator=g, dtype=torch.float64)
    samples = {"W": torch.randn(2, 3, 4, 2, generator=g, dtype=torch.float64),
               "mu": torch.randn(2, 3, 4, generator=g, dtype=torch.float64),
               "tau": torch.rand(2, 3, 4, generator=g, dtype=torch.float64) + 0.5}
    ll = fam.pointwise_log_likelihood(samples, x)
    assert ll.shape == (2, 3, 15) and ll.dtype == torch.float64
    W, mu, tau = samples["W"][1, 2].numpy(), samples["mu"][1, 2].numpy(), samples["tau"][1, 2]
    C = W @ W.T + np.diag(1 / tau.numpy())
    np.testing.assert_allclose(ll[1, 2].numpy(), multivariate_normal(mu, C).logpdf(x.numpy()),
                               rtol=1e-11)
    inv = fam.posterior_invariants(samples, x)
    assert inv["cov"].shape == (2, 3, 10) and inv["log_lik"].shape == (2, 3)
    # values, not just shapes: the upper triangle of C (numpy) and the scipy total log-likelihood
    np.testing.assert_allclose(inv["cov"][1, 2].numpy(), C[np.triu_indices(4)], rtol=1e-12)
    assert float(inv["log_lik"][1, 2]) == pytest.approx(
        multivariate_normal(mu, C).logpdf(x.numpy()).sum(), rel=1e-11)
    # rotating W leaves every invariant unchanged
    R = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
    inv2 = fam.posterior_invariants({**samples, "W": samples["W"] @ R}, x)
    assert torch.allclose(inv["cov"], inv2["cov"])
    assert torch.allclose(inv["log_lik"], inv2["log_lik"])
    # the collapsed Pyro model's likelihood term equals the exact marginal
    one = {k: v[1, 2] for k, v in samples.items()}
    with isolated(0):
        tr = pyro.poutine.trace(pyro.poutine.condition(fam.collapsed_model, one)).get_trace(x)
        assert float(tr.nodes["x"]["fn"].log_prob(x).sum()) == pytest.approx(
            float(ll[1, 2].sum()), rel=1e-11)
        tr = pyro.poutine.trace(fam.model).get_trace(x, subsample_size=5)
        assert tr.nodes["z"]["value"].shape == (5, 2)


def test_bayes_fa_validation():
    with pytest.raises(ValueError, match="^latent_dim"):
        BayesianFactorAnalysis(3, dim=3)
    with pytest.raises(ValueError, match="^alpha"):
        BayesianFactorAnalysis(1, alpha=0)
    with pytest.raises(ValueError, match="^x"):
        BayesianFactorAnalysis(1).check_data(torch.full((3, 4), float("nan")))


def test_nuts_runs_on_bayes_fa():
    x, _ = FactorAnalysis(1, dim=3).simulate(30, seed=0)
    s = mcmc.Settings(num_samples=8, warmup=8, num_chains=1, max_tree_depth=3)
    with one_thread(x):  # torch's CPU Cholesky is slow on two busy OpenMP threads
        r = mcmc.fit(BayesianFactorAnalysis(1), x, s, seed=0)
    assert r.samples["W"].shape == (1, 8, 3, 1) and r.samples["cov"].shape == (1, 8, 6)
    assert r.log_likelihood["x"].shape == (1, 8, 30)
    assert "r_hat_max" in r.diagnostics


@pytest.mark.slow
def test_nuts_posterior_concentrates_on_ml_covariance():
    # Bernstein-von Mises: with n = 200 and weak priors the posterior of the identified
    # C = W W^T + Psi centres on the ML estimate within a few posterior standard deviations
    x, _ = FactorAnalysis(1, dim=3).simulate(200, seed=0)
    s = mcmc.Settings(num_samples=150, warmup=150, num_chains=2, max_tree_depth=6)
    with one_thread(x):
        r = mcmc.fit(BayesianFactorAnalysis(1), x, s, seed=0)
    assert r.diagnostics["r_hat_max"] < 1.05
    C = r.samples["cov"].reshape(-1, 6)
    p, _ = fit_em(x, 1, tol=1e-12)
    iu = torch.triu_indices(3, 3)
    ml = p.covariance()[iu[0], iu[1]]
    assert torch.all((C.mean(0) - ml).abs() < 3 * C.std(0) + 0.05)
