"""NUTS under fitted networks: ``fix_params`` carries every ``pyro.param`` and every parameter of a
network registered with ``pyro.module`` (or a ``PyroModule``) into NUTS.

The model is a researcher's linear-Gaussian "VAE", written as plain Pyro with its own decoder:
z_n ~ N(0, I_k), x_n | z_n ~ N(W z_n + b, s^2 I_D), W and b the weights of an ``nn.Linear``
registered by ``pyro.module("decoder", ...)``, s a ``pyro.param``. For a fixed decoder the
posterior of each z_n is Gaussian in closed form (the independent oracle):

    P = I + W^T W / s^2,   cov = P^{-1},   mean_n = cov W^T (x_n - b) / s^2.

NUTS's posterior means of z must match this closed form under the SVI-fitted decoder (tolerance
from the Monte Carlo standard error) and must not match it under the initial decoder.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule
from torch import nn

from elbolab import inference
from elbolab.inference import arviz_io, mcmc, svi
from elbolab.models.base import ModelFamily
from elbolab.models.validate import as_data

K, D, N = 2, 4, 12
NUTS = mcmc.Settings(num_samples=300, warmup=300, num_chains=2, jit=False)


class LinearVae(ModelFamily):
    """The decoder is this family's own ``nn.Module``, registered with ``pyro.module``."""

    name = "user-linear-vae"

    def __init__(self, seed=0, pyro_module=False):
        torch.manual_seed(seed)
        self.pyro_module = pyro_module
        if pyro_module:
            self.decoder = PyroModule[nn.Linear](K, D).double()
        else:
            self.decoder = nn.Linear(K, D).double()

    def check_data(self, x):
        return as_data(x, "x")

    def model(self, x, subsample_size=None):
        if not self.pyro_module:
            pyro.module("decoder", self.decoder)
        noise = pyro.param("noise", x.new_tensor(1.0), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1) as i:
            z = pyro.sample("z", dist.Normal(x.new_zeros(K), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), noise).to_event(1), obs=x[i])


def exact_posterior_mean(x, weight, bias, noise):
    """Closed-form E[z_n | x_n] (n, k) for the decoder (weight (D, k), bias (D,)) and noise s."""
    w, b, s2 = weight.double(), bias.double(), float(noise) ** 2
    precision = torch.eye(K, dtype=torch.float64) + w.T @ w / s2
    cov = torch.linalg.inv(precision)
    return (x - b) @ w @ cov.T / s2


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    w_true = 2.0 * torch.randn(D, K, generator=g, dtype=torch.float64)
    b_true = 3.0 + torch.randn(D, generator=g, dtype=torch.float64)
    z = torch.randn(N, K, generator=g, dtype=torch.float64)
    return z @ w_true.T + b_true + 0.3 * torch.randn(N, D, generator=g, dtype=torch.float64)


def z_scores(res, x, weight, bias, noise):
    z = res.samples["z"]  # (chain, draw, n, k)
    got = z.mean(dim=(0, 1))
    mcse = torch.as_tensor(arviz_io.mcse_mean(z.numpy()))
    exact = exact_posterior_mean(x, weight, bias, noise)
    return ((got - exact) / mcse).abs()


@pytest.mark.parametrize("pyro_module", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["pyro.module", "PyroModule"])
def test_nuts_samples_under_the_svi_fitted_decoder(data, pyro_module):
    fam = LinearVae(pyro_module=pyro_module)
    initial = {k: v.detach().clone() for k, v in fam.decoder.named_parameters()}
    fitted = inference.fit("svi", fam, data, svi.Settings(num_steps=600, lr=0.05,
                                                          eval_particles=10),
                           seed=0, guide="auto-normal")
    params = fitted.model_params()
    prefix = "" if pyro_module else "decoder$$$"  # a top-level PyroModule: bare names
    assert {f"{prefix}weight", f"{prefix}bias", "noise"} <= set(params)
    weight, bias, noise = params[f"{prefix}weight"], params[f"{prefix}bias"], params["noise"]
    # SVI moved the decoder far from where it started (else the test below could not fail)
    assert (weight - initial["weight"]).abs().max() > 0.5

    res = inference.fit("mcmc", fam, data, NUTS, seed=0, fix_params=fitted)
    z = res.samples["z"]
    assert z.shape == (2, 300, N, K)
    # 24 components: each within 4.5 MCSE of the closed form under the fitted decoder
    fitted_scores = z_scores(res, data, weight, bias, noise)
    assert fitted_scores.max() < 4.5, fitted_scores
    # ... and far from the closed form under the initial decoder (same noise)
    initial_scores = z_scores(res, data, initial["weight"], initial["bias"], noise)
    assert initial_scores.max() > 50, initial_scores
    # NUTS leaves the caller's family as it was: still the initial decoder
    for k, v in fam.decoder.named_parameters():
        assert torch.equal(v.detach(), initial[k])


@pytest.mark.slow
def test_fix_params_as_a_dict_and_a_module_outside_the_family(data):
    """A decoder the model reads from outside the family object (a closure): NUTS samples under
    the dict's weights and hands the user's network back unchanged."""
    torch.manual_seed(3)
    decoder = nn.Linear(K, D).double()
    before = {k: v.detach().clone() for k, v in decoder.named_parameters()}

    class Closure(LinearVae):
        name = "user-closure-vae"

        def __init__(self):
            self.pyro_module = False

        def model(self, x, subsample_size=None):
            pyro.module("decoder", decoder)
            with pyro.plate("data", x.shape[0], dim=-1):
                z = pyro.sample("z", dist.Normal(x.new_zeros(K), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(decoder(z), 0.5).to_event(1), obs=x)

    g = torch.Generator().manual_seed(4)
    weight = 1.5 * torch.randn(D, K, generator=g, dtype=torch.float64)
    bias = data.mean(0)
    fixed = {"decoder$$$weight": weight, "decoder$$$bias": bias}
    res = inference.fit("mcmc", Closure(), data, NUTS, seed=0, fix_params=fixed)
    assert z_scores(res, data, weight, bias, 0.5).max() < 4.5
    for k, v in decoder.named_parameters():
        assert torch.equal(v.detach(), before[k])


def test_module_parameters_without_fix_params_are_an_error_naming_them(data):
    with pytest.raises(ValueError, match=r"fix_params: .*decoder\$\$\$weight.*noise"):
        inference.fit("mcmc", LinearVae(), data, NUTS)
    # a dict that leaves one out names the one left out
    fam = LinearVae()
    partial = {k: v.detach() for k, v in (("decoder$$$weight", fam.decoder.weight),
                                          ("decoder$$$bias", fam.decoder.bias))}
    with pytest.raises(ValueError, match=r"fix_params: .*\['noise'\]"):
        inference.fit("mcmc", fam, data, NUTS, fix_params=partial)


def test_fix_params_names_a_misspelled_or_misshaped_parameter(data):
    fam = LinearVae()
    good = {"decoder$$$weight": torch.zeros(D, K, dtype=torch.float64),
            "decoder$$$bias": torch.zeros(D, dtype=torch.float64), "noise": torch.tensor(1.0)}
    with pytest.raises(ValueError, match=r"fix_params: .*'nosie'.*did you mean 'noise'"):
        inference.fit("mcmc", fam, data, NUTS,
                      fix_params={**{k: v for k, v in good.items() if k != "noise"},
                                  "nosie": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"fix_params: 'decoder\$\$\$weight' has shape \(2, 4\)"):
        inference.fit("mcmc", fam, data, NUTS,
                      fix_params={**good, "decoder$$$weight": torch.zeros(K, D)})


class NanPassing(ModelFamily):
    """A family whose own check_data is minimal: NaN and inf pass through."""

    name = "user-nan-passing"

    def check_data(self, x):
        return torch.as_tensor(x, dtype=torch.float64)

    def model(self, x, subsample_size=None):
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), 10.0))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def test_nan_or_inf_in_observed_data_is_named_before_nuts_starts():
    x = torch.tensor([0.1, math.nan, 0.3, math.nan, math.inf, 0.2, math.nan])
    with pytest.raises(ValueError, match=r"^x: observed site 'obs' has 3 NaN values and 1 "
                                         r"infinite value"):
        inference.fit("mcmc", NanPassing(), x, NUTS)
    with pytest.raises(ValueError, match=r"^x: observed site 'obs' has 1 infinite value"):
        inference.fit("mcmc", NanPassing(), np.array([0.0, -math.inf]), NUTS)


def test_nan_under_a_mask_is_named_too():
    """NaN under a mask still poisons the gradients NUTS needs (0 * NaN = NaN): Pyro's own NUTS
    fails on it with "cannot find valid initial params"; the error says to fill the masked
    entries with any finite value."""

    class Masked(NanPassing):
        name = "user-masked"

        def model(self, x, subsample_size=None):
            mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), 10.0))
            with pyro.plate("data", x.shape[0], dim=-1), pyro.poutine.mask(mask=~x.isnan()):
                pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)

    x = torch.tensor([0.5, math.nan, 1.5, 1.0])
    with pytest.raises(ValueError, match=r"^x: observed site 'obs' has 1 NaN value;.*mask"):
        inference.fit("mcmc", Masked(), x, NUTS)
