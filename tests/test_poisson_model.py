"""A researcher's Poisson factor model through SVI, NUTS, IWAE and AIS, against exact quadrature.

The model (written here, nothing added to the package) has fixed loadings W (d, k) and offsets b:

    z_n ~ N(0, I_k),    x_nj | z_n ~ Poisson(exp(w_j . z_n + b_j)),

with k = 2, so log p(x_n) = log int N(z; 0, I) prod_j Poisson(x_nj; exp(w_j . z + b_j)) dz is
computed here by a Riemann sum on a 281 x 281 grid over [-7, 7]^2 in numpy/scipy (the integrand is
smooth and decays like the prior, so the uniform-grid sum converges faster than any power of the
spacing; a finer, wider grid agrees to 1e-8 nats, tested). That is the exact oracle.

Tolerances. IWAE and AIS are stochastic lower bounds with a delta-method se per point (independent
across points; the total's se is the root sum of squares). "Within their errors" means within
4 combined standard errors plus their possible downward bias, which for a log-mean of weights is
about se_n^2 / 2 per point (summed below as ``bias``), plus 0.02 nats per point because the
delta-method se underestimates both with heavy-tailed weights. (Measured on three data seeds: IWAE
and AIS within 0.43 nats of the exact total of about -200, i.e. within 1.7 of their se's.)
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.special import gammaln, logsumexp

from elbolab import inference
from elbolab.inference.evaluation.ais import AisSettings, ais
from elbolab.models.base import LocalLatentFamily, ModelFamily
from elbolab.models.validate import as_data

K, D, N = 2, 5, 20


class PoissonFactor(LocalLatentFamily):
    """z_n ~ N(0, I_k), x_nj ~ Poisson(exp(W z_n + b)_j) with W, b fixed constants."""

    name = "user-poisson-factor"

    def __init__(self, W, b):
        self.W, self.b = torch.as_tensor(W), torch.as_tensor(b)
        self.latent_dim = self.W.shape[1]

    def check_data(self, x):
        x = as_data(x, "x", ndim=2)
        if x.shape[1] != self.W.shape[0] or (x < 0).any() or (x != x.round()).any():
            raise ValueError(f"x: needs non-negative counts with {self.W.shape[0]} columns")
        return x

    def local_prior(self, x):
        return dist.Normal(x.new_zeros(x.shape[0], self.latent_dim), 1.0).to_event(1)

    def observation_dist(self, z):
        rate = (z @ self.W.to(z).T + self.b.to(z)).exp()
        return dist.Poisson(rate).to_event(1)


def quadrature_log_evidence(W, b, X, half_width=7.0, points=281):
    """log p(x_n) per point by the grid sum of the module docstring (numpy only)."""
    grid = np.linspace(-half_width, half_width, points)
    h = grid[1] - grid[0]
    Z = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    log_rate = Z @ W.T + b  # (G, d)
    log_prior = -0.5 * (Z**2).sum(1) - math.log(2 * math.pi)
    log_lik = log_rate @ X.T - np.exp(log_rate).sum(1, keepdims=True) - gammaln(X + 1).sum(1)
    return logsumexp(log_prior[:, None] + log_lik, axis=0) + 2 * math.log(h)


@pytest.fixture(scope="module")
def problem():
    g = np.random.default_rng(0)
    W = g.normal(scale=0.6, size=(D, K))
    b = g.normal(1.0, 0.3, size=D)
    z = g.normal(size=(N, K))
    X = g.poisson(np.exp(z @ W.T + b)).astype(np.float64)
    exact = quadrature_log_evidence(W, b, X)
    return PoissonFactor(W, b), torch.tensor(X), exact


def test_quadrature_oracle_is_converged(problem):
    fam, x, exact = problem
    finer = quadrature_log_evidence(fam.W.numpy(), fam.b.numpy(), x.numpy(), 8.0, 401)
    np.testing.assert_allclose(exact, finer, atol=1e-8)


def _bias(*estimates):
    return sum(float((e.details["pointwise_se"] ** 2).sum()) / 2 for e in estimates)


def _agree_with_exact(est, exact_total):
    # a stochastic lower bound: not above the truth by more than noise, not below by more than
    # noise plus its bias
    assert est.value <= exact_total + 4 * est.se, (est.method, est.value, est.se, exact_total)
    assert est.value >= exact_total - 4 * est.se - _bias(est) - 0.02 * N, (est.method, est.value)


def test_svi_iwae_and_ais_with_default_estimators_against_quadrature(problem):
    fam, x, exact = problem
    total = float(exact.sum())
    fit = inference.fit("svi", fam, x, seed=0, num_steps=800, lr=0.05)  # a user's shorter run
    # the ELBO of any q is below log p(x): 4 se of the ELBO's Monte Carlo error to spare
    assert fit.elbo <= total + 4 * fit.elbo_se
    w = fit.iwae(x)  # default: 1000 samples from the fitted guide
    with torch.no_grad():
        q = fit.state.guide.distribution(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a healthy run flags nothing
        a = ais(fam.log_joint, q, x, seed=0)  # default AisSettings (this used to crash)
        a_prior = ais(fam.log_joint, fam.local_prior(x), x, seed=0)
    for est in (w, a, a_prior):
        assert est.pointwise.shape == (N,) and est.pointwise.dtype == torch.float64
        _agree_with_exact(est, total)
    # AIS and IWAE agree with each other within their errors
    assert abs(a.value - w.value) <= 4 * math.hypot(a.se, w.se) + _bias(a, w) + 0.02 * N
    assert fit.elbo <= w.value + 4 * math.hypot(fit.elbo_se, w.se)
    assert "warning" not in a.details and 0 <= a.details["divergent_fraction"] < 0.5


def test_ais_too_large_a_step_is_rejected_not_a_crash_and_is_flagged(problem):
    fam, x, exact = problem
    # far too large, not adapted: most leapfrog paths overflow exp(W z + b); those moves are
    # rejected, the estimate stays a finite lower bound, and the failure is named
    s = AisSettings(num_steps=20, num_chains=4, step_size=8.0, adapt="none", leapfrog_steps=10)
    with pytest.warns(RuntimeWarning, match="acceptance below"):
        a = ais(fam.log_joint, fam.local_prior(x), x, s, seed=0)
    assert "acceptance below" in a.details["warning"]
    assert a.details["divergent_fraction"] > 0.5
    assert math.isfinite(a.value) and a.value <= float(exact.sum()) + 4 * a.se


def test_nuts_samples_z_with_w_and_b_constant_and_reports_r_hat(problem):
    fam, x, exact = problem
    m = 8  # a few points keep the short chains quick
    res = inference.fit("mcmc", fam, x[:m], seed=0, num_samples=80, warmup=80, num_chains=2)
    assert set(res.samples) == {"z"} and res.samples["z"].shape == (2, 80, m, K)
    assert math.isfinite(res.diagnostics["r_hat_max"]) and res.diagnostics["r_hat_max"] < 1.1
    assert res.diagnostics["ess_bulk_min"] > 20
    assert "data" not in res.to_inference_data().posterior.data_vars


# -- plate index sites are never latent variables ---------------------------------------------


def _assert_no_plate_sites(res, plates=("data", "components")):
    names = set(res.samples) | set(res.posterior)
    idata = res.to_inference_data()
    names |= set(idata.posterior.data_vars)
    assert not names & set(plates), (res.engine, res.guide, sorted(names))


class WithGlobalRate(ModelFamily):
    """log-rate offset c ~ N(0, 1) shared by all points (global), z_n as above (local)."""

    name = "user-poisson-global"

    def check_data(self, x):
        return as_data(x, "x", ndim=2)

    def model(self, x, subsample_size=None):
        c = pyro.sample("c", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1) as i:
            z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
            rate = (0.5 * z + c).exp()
            pyro.sample("x", dist.Poisson(rate.expand(*rate.shape[:-1], x.shape[1]))
                        .to_event(1), obs=x[i])


def test_plate_index_sites_are_not_latent_variables_in_any_engine(problem):
    from elbolab.models.gmm.model import BayesianGMM

    fam, x, _ = problem
    _assert_no_plate_sites(inference.fit("svi", fam, x, seed=0, num_steps=20))
    _assert_no_plate_sites(inference.fit("svi", fam, x, seed=0, num_steps=20, guide="mlp"))
    user = WithGlobalRate()
    for guide in ("auto-normal", "mean-field"):  # composed: an autoguide over c
        res = inference.fit("svi", user, x, seed=0, num_steps=20, guide=guide)
        assert set(res.samples) == {"c", "z"}
        _assert_no_plate_sites(res)
    res = inference.fit("mcmc", user, x[:5], seed=0, num_samples=20, warmup=20, num_chains=1)
    assert set(res.samples) == {"c", "z"}
    _assert_no_plate_sites(res)
    gmm = BayesianGMM(K=2, prior_var=10.0)
    xg, _ = gmm.simulate(30, seed=0)
    runs = [inference.fit("em", gmm, xg, seed=0), inference.fit("cavi", gmm, xg, seed=0),
            inference.fit("mcmc", gmm, xg, seed=0, num_samples=20, warmup=20, num_chains=1)]
    for guide in ("mean-field", "collapsed", "auto-normal"):
        runs.append(inference.fit("svi", gmm, xg, seed=0, num_steps=20, guide=guide))
    for res in runs:
        _assert_no_plate_sites(res)


@pytest.mark.slow
def test_every_engine_with_default_settings(problem):
    """SVI, NUTS, IWAE and AIS, all with their defaults (minutes on 2 cores)."""
    fam, x, exact = problem
    total = float(exact.sum())
    fit = inference.fit("svi", fam, x, seed=0)
    assert fit.elbo <= total + 4 * fit.elbo_se
    w = fit.iwae(x)
    with torch.no_grad():
        a = ais(fam.log_joint, fit.state.guide.distribution(x), x, seed=0)
    _agree_with_exact(w, total)
    _agree_with_exact(a, total)
    assert abs(a.value - w.value) <= 4 * math.hypot(a.se, w.se) + _bias(a, w) + 0.02 * N
    nuts = inference.fit("mcmc", fam, x, seed=0)
    assert nuts.diagnostics["r_hat_max"] < 1.01 and nuts.converged, nuts.message
    assert set(nuts.samples) == {"z"}
