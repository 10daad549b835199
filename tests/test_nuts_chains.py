"""How several chains run: Pyro's kernel one chain after another or in worker processes
(``chain_method``), against a conjugate posterior; settings that cannot apply are errors."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from elbolab import inference

Y = torch.tensor([2.1, 0.4, 1.7, 3.0, 0.9, 1.5, 2.6, 1.2], dtype=torch.float64)


def normal_mean(y):
    """A user's program at module level (worker processes import it): mu ~ N(0, 10^2),
    y_i ~ N(mu, 1); the posterior of mu is normal with precision 1/100 + n."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 10.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_parallel_chains_give_the_sequential_draws_and_the_conjugate_posterior():
    """Chain c is seeded seed + c in both: the worker processes reproduce the sequential draws, and
    their mean sits within 4 MCSE of the exact posterior mean."""
    kw = dict(seed=3, warmup=150, num_samples=150, num_chains=2, jit=False)
    par = inference.fit("mcmc", normal_mean, Y, chain_method="parallel", **kw)
    seq = inference.fit("mcmc", normal_mean, Y, chain_method="sequential", **kw)
    assert "Pyro NUTS" in par.message and par.samples["mu"].shape == (2, 150)
    torch.testing.assert_close(par.samples["mu"], seq.samples["mu"])
    prec = 1 / 100 + len(Y)
    mean, sd = float(Y.sum()) / prec, math.sqrt(1 / prec)
    ess = par.diagnostics["ess_bulk_min"]
    assert abs(float(par.samples["mu"].mean()) - mean) < 4 * sd / math.sqrt(ess)


def test_a_model_that_cannot_reach_worker_processes_is_refused_before_any_work():
    def local(y):  # a closure: worker processes cannot import it
        normal_mean(y)

    with pytest.raises(ValueError, match="chain_method: 'parallel'.*pickle.*module level"):
        inference.fit("mcmc", local, Y, chain_method="parallel", num_chains=2, warmup=5,
                      num_samples=5)


def test_chain_methods_that_cannot_apply_are_errors():
    with pytest.raises(ValueError, match="chain_method: 'parallel' is for Pyro's kernel"):
        inference.fit("mcmc", normal_mean, Y, kernel="batched", chain_method="parallel")
    with pytest.raises(ValueError, match="chain_method: must be one of"):
        inference.fit("mcmc", normal_mean, Y, chain_method="vectorised")


def test_a_discrete_latent_with_unbounded_support_is_named_before_any_work():
    def counts(y):
        rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
        k = pyro.sample("k", dist.Poisson(rate))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(k, 1.0), obs=y)

    with pytest.raises(ValueError, match=r"latent site 'k' \(Poisson\) is discrete with "
                                         "unbounded support"):
        inference.fit("mcmc", counts, torch.randn(10), num_samples=10, warmup=10)


def test_init_params_for_pyros_kernel_are_checked_against_the_programs_sites():
    """Pyro's NUTS would take eta shaped (2, 8) and sample a different model, and meet a missing
    site with a KeyError mid-run: each is an error naming the site, before any work; plain
    numbers are taken as tensors of the site's dtype."""
    def eight(J, sigma, y=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("J", J):
            eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(mu + tau * eta, sigma), obs=y)

    data = {"J": 8, "sigma": torch.full((8,), 10.0), "y": torch.arange(8.0)}
    kw = dict(num_samples=5, warmup=5, num_chains=1, kernel="pyro")
    bad = [({"mu": 0.0, "tau": 0.0, "eta": torch.zeros(2, 8)}, r"'eta' must be shaped \(8,\)"),
           ({"mu": 0.0}, r"missing \['eta', 'tau'\]"),
           ({"mu": None, "tau": 0.0, "eta": torch.zeros(8)}, "'mu' must be a tensor"),
           ({"mu": 0.0, "tau": math.nan, "eta": torch.zeros(8)}, "'tau' has NaN")]
    for given, match in bad:
        with pytest.raises(ValueError, match="init_params: .*" + match):
            inference.fit("mcmc", eight, data, init_params=given, **kw)
    fit = inference.fit("mcmc", eight, data, init_params={"mu": 0.0, "tau": 0.0,
                                                          "eta": torch.zeros(8)}, **kw)
    assert fit.samples["eta"].shape == (1, 5, 8) and fit.samples["eta"].dtype == torch.float32
