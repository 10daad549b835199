"""A researcher's own model, off the built-in path: global and local latents, strict options, a fit
that can be kept, NUTS on any model, and no side effects on the caller.

The model (written here, nothing added to the package) is conjugate:

    theta ~ N(0, s2)                      (global)
    z_n   ~ N(0, 1)                       (local, one per point, event dim 1)
    x_n | theta, z_n ~ N(theta + z_n, v)

so x ~ N(0, (1 + v) I + s2 11^T) gives the exact evidence, and for any Gaussian q(theta) q(z) the
ELBO has a closed form (below), an independent computation of what SVI reports.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from elbolab import inference
from elbolab.inference import mcmc, svi
from elbolab.inference.result import FitResult
from elbolab.models.base import ModelFamily
from elbolab.models.validate import as_data

S2, V = 4.0, 0.5


class ShiftedNoise(ModelFamily):
    name = "user-shifted-noise"

    def check_data(self, x):
        return as_data(x, "x", ndim=2)

    def model(self, x, subsample_size=None):
        theta = pyro.sample("theta", dist.Normal(x.new_zeros(1), math.sqrt(S2)).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1) as i:
            z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(theta + z, math.sqrt(V)).to_event(1), obs=x[i])


def exact_log_evidence(x):
    n = x.shape[0]
    cov = (1 + V) * torch.eye(n, dtype=torch.float64) + S2
    return float(dist.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov).log_prob(x[:, 0]))


def closed_form_elbo(x, m, s, a, b):
    """ELBO for q(theta) = N(m, s^2), q(z_n) = N(a_n, b_n^2), every constant kept."""
    L2P = math.log(2 * math.pi)
    x = x[:, 0]
    e_theta = -0.5 * L2P - 0.5 * math.log(S2) - (m**2 + s**2) / (2 * S2)
    e_z = (-0.5 * L2P - 0.5 * (a**2 + b**2)).sum()
    e_x = (-0.5 * L2P - 0.5 * math.log(V) - ((x - m - a) ** 2 + s**2 + b**2) / (2 * V)).sum()
    h = 0.5 * (1 + L2P) + math.log(s) + (0.5 * (1 + L2P) + torch.log(b)).sum()
    return float(e_theta + e_z + e_x + h)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    n = 30
    theta = math.sqrt(S2) * torch.randn(1, generator=g, dtype=torch.float64)
    z = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return theta + z + math.sqrt(V) * torch.randn(n, 1, generator=g, dtype=torch.float64)


FAST = dict(num_steps=1500, lr=0.05, eval_particles=2000, num_posterior_samples=50)


@pytest.mark.parametrize("local", ["auto-normal", "mean-field", "full-rank", "linear-diag", "mlp"])
def test_user_model_with_a_global_latent_gets_an_honest_elbo(data, local):
    fam = ShiftedNoise()
    res = inference.fit("svi", fam, data, seed=0, guide=local, **FAST)
    logz = exact_log_evidence(data)
    assert res.elbo <= logz + 3 * res.elbo_se
    with res.fitted() as (_, guide):
        q = guide.global_guide
        m, s = float(q.locs.theta), float(q.scales.theta)
        if guide.local_guides:
            loc, tril = guide.local_guides[0].moments(data)
            a, b = loc[:, 0].detach(), tril[:, 0, 0].detach().abs()
        else:
            a = guide.auto_local.locs.z[:, 0].detach()
            b = guide.auto_local.scales.z[:, 0].detach()
    # the engine's Monte Carlo ELBO agrees with the closed form of the same q (4 SE)
    assert res.elbo == pytest.approx(closed_form_elbo(data, m, s, a, b), abs=4 * res.elbo_se + 1e-6)
    # and every generic guide gets close to the evidence (posterior correlation theta-z is the gap)
    assert (logz - res.elbo) / data.shape[0] < 0.5


def test_uncovered_latent_site_is_an_error(data):
    def only_z(x, subsample_size=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"does not cover the latent site\(s\) \['theta'\]"):
        inference.fit("svi", ShiftedNoise(), data, guide=only_z, num_steps=5)


def test_unknown_and_misplaced_options_are_errors(data):
    fam = ShiftedNoise()
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['guid'\].*guide"):
        inference.fit("svi", fam, data, guid="auto-mvn")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['guide'\]"):
        inference.fit("mcmc", fam, data, guide="auto-normal")
    with pytest.raises(TypeError, match="settings: the svi engine takes elbolab.inference.svi.Settings"):
        inference.fit("svi", fam, data, mcmc.Settings())
    with pytest.raises(TypeError, match=r"svi.Settings: unknown option\(s\) \['num_step'\]"):
        svi.Settings(num_step=10)
    with pytest.raises(ValueError, match="jit: does not apply with direct=True"):
        svi.Settings(direct=True, jit=True)
    with pytest.raises(ValueError, match="seed"):
        inference.fit("svi", fam, data, seed=2**64, num_steps=2)
    with pytest.raises(ValueError, match="subsample_size: 100 is larger than the data"):
        inference.fit("svi", fam, data, subsample_size=100, num_steps=2)
    res = inference.fit("svi", fam, data, num_steps=10, eval_particles=10)
    assert res.diagnostics["steps"] == 10


def test_a_short_run_is_not_converged(data):
    res = inference.fit("svi", ShiftedNoise(), data, num_steps=250, window=200, lr=0.001,
                        eval_particles=10)
    assert not res.converged and "projected gain" in res.message


def test_fit_is_kept_saved_and_loaded_bit_for_bit(data, tmp_path):
    fam = ShiftedNoise()
    res = inference.fit("svi", fam, data, seed=3, guide="mean-field", num_steps=300,
                        eval_particles=100)
    again = res.elbo_estimate(data, num_particles=2000, batch_size=200)
    assert again.value == pytest.approx(res.elbo, abs=4 * (again.se + res.elbo_se))
    folder = res.save(tmp_path / "fit")
    back = FitResult.load(folder, fam, data)
    assert back.elbo == res.elbo and back.trace == res.trace
    for k, v in res.state.store["params"].items():
        assert torch.equal(back.state.store["params"][k], v)
    with pytest.raises(ValueError, match="family: the result was fitted with"):
        FitResult.load(folder, WithParam(), data)
    with pytest.raises(ValueError, match="x: the 'mean-field' guide was fitted on .* not amortized"):
        FitResult.load(folder, fam, data[:7])
    with pytest.raises(ValueError, match="^x: rebuilding the fitted guide needs the data"):
        FitResult.load(folder, fam)
    with pytest.raises(ValueError, match="x: the 'mean-field' guide was fitted on .* not amortized"):
        res.elbo_estimate(data[:7])
    e1 = res.elbo_estimate(data, num_particles=200, seed=1)
    e2 = back.elbo_estimate(data, num_particles=200, seed=1)
    assert e1.value == e2.value


def _same_inference_data(a, b, exact: bool):
    """Same groups, variables and shapes; posterior means identical or within Monte Carlo error."""
    assert a.groups() == b.groups()
    for g in a.groups():
        ga, gb = getattr(a, g), getattr(b, g)
        assert sorted(ga.data_vars) == sorted(gb.data_vars), g
        for v in ga.data_vars:
            assert ga[v].shape == gb[v].shape, (g, v)
    for v in a.posterior.data_vars:
        pa, pb = a.posterior[v].values, b.posterior[v].values
        if exact:
            assert np.array_equal(pa, pb), v
        else:  # two independent sets of draws from the same q: 5 standard errors of the difference
            se = np.sqrt(2 * pa.var(axis=(0, 1)) / (pa.shape[0] * pa.shape[1])) + 1e-6
            assert np.all(np.abs(pa.mean(axis=(0, 1)) - pb.mean(axis=(0, 1))) < 5 * se), v


def _gmm_fit():
    from elbolab.models.gmm.model import BayesianGMM

    fam = BayesianGMM(K=3, prior_var=10.0)
    x, _ = fam.simulate(200, seed=0)
    return fam, x, inference.fit("svi", fam, x, seed=0, guide="collapsed", num_steps=300,
                                 eval_particles=20)


@pytest.mark.parametrize("case", ["gmm-collapsed", "user-auto-normal", "user-linear-diag"])
def test_a_reloaded_fit_gives_the_same_inference_data(data, tmp_path, case):
    if case == "gmm-collapsed":
        fam, x, res = _gmm_fit()
        latents = ["mu"]
    else:
        fam, x = ShiftedNoise(), data
        res = inference.fit("svi", fam, x, seed=0, guide=case.removeprefix("user-"),
                            num_steps=200, eval_particles=20, num_posterior_samples=50)
        latents = ["theta", "z"]
    a = res.to_inference_data()
    assert sorted(a.posterior.data_vars) == latents  # draws of the latent sites, by their names
    if case == "gmm-collapsed":
        assert "log_likelihood" in a.groups()
    folder = res.save(tmp_path / "fit")
    _same_inference_data(a, FitResult.load(folder, fam, x).to_inference_data(), exact=True)
    _same_inference_data(a, FitResult.load(folder).to_inference_data(), exact=True)


def test_a_fit_saved_without_its_draws_redraws_them_on_load(tmp_path):
    fam, x, res = _gmm_fit()
    folder = res.save(tmp_path / "fit")
    tensors = torch.load(folder / "params.pt", weights_only=True)
    for group in ("samples", "log_likelihood", "sample_stats"):  # as saved before they were kept
        del tensors[group]
    torch.save(tensors, folder / "params.pt")
    back = FitResult.load(folder, fam, x)
    assert "redrawn on load" in back.message
    _same_inference_data(res.to_inference_data(), back.to_inference_data(), exact=False)


def test_fit_leaves_family_and_global_random_state_alone(data):
    from elbolab.models.vae.model import VAE

    vae = VAE(1, latent_dim=1, hidden=(4,), likelihood="gaussian")
    before = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    random.seed(5)
    np.random.seed(5)  # noqa: NPY002
    torch.manual_seed(5)
    expect = (random.random(), np.random.rand(), torch.rand(1))  # noqa: NPY002
    random.seed(5)
    np.random.seed(5)  # noqa: NPY002
    torch.manual_seed(5)
    r1 = inference.fit("svi", vae, data, seed=0, guide="mlp", num_steps=30, eval_particles=10)
    got = (random.random(), np.random.rand(), torch.rand(1))  # noqa: NPY002
    assert got[0] == expect[0] and got[1] == expect[1] and torch.equal(got[2], expect[2])
    for k, v in vae.decoder.state_dict().items():
        assert torch.equal(v, before[k])
    r2 = inference.fit("svi", vae, data, seed=0, guide="mlp", num_steps=30, eval_particles=10)
    assert r1.elbo == r2.elbo and r1.trace == r2.trace


class WithParam(ShiftedNoise):
    name = "user-with-param"

    def model(self, x, subsample_size=None):
        log_v = pyro.param("log_v", x.new_zeros(()))
        theta = pyro.sample("theta", dist.Normal(x.new_zeros(1), math.sqrt(S2)).to_event(1))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("x", dist.Normal(theta, log_v.exp().sqrt()).to_event(1), obs=x)


def test_nuts_samples_every_site_and_refuses_frozen_params(data):
    quick = mcmc.Settings(num_samples=150, warmup=150, num_chains=2)
    res = inference.fit("mcmc", ShiftedNoise(), data, quick, seed=0)
    assert set(res.samples) >= {"theta", "z"} and "data" not in res.samples
    assert math.isfinite(res.diagnostics["r_hat_max"]) and "ess_bulk_min" in res.diagnostics
    with pytest.raises(ValueError, match=r"fix_params: .*\['log_v'\]"):
        inference.fit("mcmc", WithParam(), data, quick)
    fixed = inference.fit("mcmc", WithParam(), data, quick, fix_params={"log_v": torch.tensor(0.3)})
    assert "theta" in fixed.samples
    fitted = inference.fit("svi", WithParam(), data, num_steps=200, eval_particles=10)
    assert "log_v" in fitted.model_params()
    inference.fit("mcmc", WithParam(), data, quick, fix_params=fitted)


class OnlyDiscrete(ModelFamily):
    name = "user-discrete"
    discrete_sites = ("c",)

    def check_data(self, x):
        return as_data(x, "x", ndim=2)

    def model(self, x, subsample_size=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            c = pyro.sample("c", dist.Bernoulli(x.new_tensor(0.5)))
            pyro.sample("x", dist.Normal(c.unsqueeze(-1), 1.0).to_event(1), obs=x)


def test_nuts_without_a_continuous_latent_is_an_error(data):
    with pytest.raises(ValueError, match="no continuous latent site"):
        inference.fit("mcmc", OnlyDiscrete(), data, mcmc.Settings(num_samples=5, warmup=5))


def test_iwae_of_a_kept_fit_conditions_on_the_globals(data):
    """With theta fixed at t, log p(x | t) = sum_n log N(x_n; t, 1 + v): the IWAE of the fitted
    local guide must sit below it (a bound) and close to it (the local posterior is Gaussian)."""
    res = inference.fit("svi", ShiftedNoise(), data, seed=0, guide="full-rank", num_steps=1500,
                        lr=0.05, eval_particles=100)
    with pytest.raises(ValueError, match=r"fixed: the model has global latent\(s\) \['theta'\]"):
        res.iwae(data, num_samples=10)
    ev = res.iwae(data, num_samples=500, fixed="median")
    t = float(ev.details["conditioned_on"]["theta"])
    exact = float(dist.Normal(t, math.sqrt(1 + V)).log_prob(data[:, 0]).sum())
    assert "globals fixed" in ev.method
    assert ev.value <= exact + 4 * ev.se + 1e-6
    assert (exact - ev.value) / data.shape[0] < 0.02


def test_gap_decomposition_of_a_kept_fit_conditions_on_the_globals(data):
    """Given theta = t the model is z_n ~ N(0, 1), x_n | z_n ~ N(t + z_n, v): Gaussian, with a
    1-D posterior, so a diagonal Gaussian family holds it (approximation gap 0) and a linear
    encoder can represent the exact posterior mean (x_n - t) / (1 + v) (amortization gap ~ 0)."""
    res = inference.fit("svi", ShiftedNoise(), data, seed=0, guide="linear-diag", num_steps=2000,
                        lr=0.05, eval_particles=100)
    frame = res.decompose_gaps(data, num_particles=200, seed=0, fixed="median")
    assert "theta" in frame.attrs["conditioned_on"]
    mean = frame[frame["scope"] == "mean"].iloc[0]
    assert abs(mean["approximation_gap"]) < 4 * mean["approximation_gap_se"] + 0.01
    assert -4 * mean["amortization_gap_se"] - 1e-3 < mean["amortization_gap"] < 0.05
    draws = res.posterior_samples(100, seed=1, x=data)
    assert draws["theta"].shape[:2] == (1, 100) and "data" not in draws
