"""A user model whose per-point latent is a scalar (event shape (), no ``.to_event(1)``).

Every per-point guide asked for must be the guide used for that site (before the fix, the site
fell silently to AutoNormal: one ELBO, bit for bit, under every guide name) or an error naming the
site. The model is conjugate:

    mu  ~ N(0, 25)                        (global)
    z_n ~ N(0, 1)                         (local, a scalar per point)
    x_n | mu, z_n ~ N(mu + z_n, 0.49)

so x ~ N(0, 1.49 I + 25 11^T) gives the exact log evidence.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from elbolab import inference
from elbolab.models.base import ModelFamily
from elbolab.models.validate import as_data


class OneFactor(ModelFamily):
    name = "one-factor"

    def check_data(self, x):
        return as_data(x, "x", ndim=2)

    def model(self, x, subsample_size=None):
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(1), 5.0).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1) as i:
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))  # scalar per point
            pyro.sample("x", dist.Normal(mu + z[..., None], 0.7).to_event(1), obs=x[i])


class OneFactorVector(OneFactor):
    """The same model with z_n written as a 1-vector (``.to_event(1)``)."""

    name = "one-factor-vector"

    def model(self, x, subsample_size=None):
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(1), 5.0).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1) as i:
            z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(mu + z, 0.7).to_event(1), obs=x[i])


class PositiveLocal(OneFactor):
    """A local site no per-point Gaussian guide can take (positive support)."""

    name = "positive-local"

    def model(self, x, subsample_size=None):
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(1), 5.0).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1) as i:
            s = pyro.sample("s", dist.LogNormal(x.new_zeros(()), 1.0))
            pyro.sample("x", dist.Normal(mu, s[..., None]).to_event(1), obs=x[i])


PER_POINT = ["mean-field", "full-rank", "linear-diag", "linear-full", "mlp"]
FAST = dict(num_steps=300, seed=0, eval_particles=500, num_posterior_samples=20)


@pytest.fixture(scope="module")
def data():
    return 2 + torch.randn(80, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def exact_log_evidence(x):
    n = x.shape[0]
    cov = 1.49 * torch.eye(n, dtype=torch.float64) + 25.0
    return float(dist.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov)
                 .log_prob(x[:, 0].double()))


@pytest.fixture(scope="module")
def auto_normal(data):
    return inference.fit("svi", OneFactor(), data, guide="auto-normal", **FAST)


@pytest.mark.parametrize("name", PER_POINT)
def test_per_point_guide_guides_a_scalar_site(data, auto_normal, name):
    res = inference.fit("svi", OneFactor(), data, guide=name, **FAST)
    assert res.guide == name
    with res.fitted() as (_, guide):
        assert guide.auto_local is None  # no AutoNormal took the site over
        assert [g.site for g in guide.local_guides] == ["z"]
        assert guide.local_guides[0].scalar_site and guide.local_guides[0].latent_dim == 1
    assert res.elbo != auto_normal.elbo
    assert res.elbo <= exact_log_evidence(data) + 3 * res.elbo_se
    # the same q as for the model written with a 1-vector z_n: the same fit, draw for draw
    vec = inference.fit("svi", OneFactorVector(), data, guide=name, **FAST)
    assert res.elbo == pytest.approx(vec.elbo, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("name", ["flow", "local-flow"])
def test_flow_on_a_scalar_site_is_an_error_naming_it(data, name):
    with pytest.raises(ValueError, match=rf"^z: the per-point guide '{name}' cannot guide .*"
                                         "latent_dim >= 2.*'mean-field' or 'auto-normal'"):
        inference.fit("svi", OneFactor(), data, guide=name, num_steps=2)


def test_non_real_local_site_is_an_error_not_autonormal(data):
    with pytest.raises(ValueError, match=r"^s: the per-point guide 'mlp' needs a real-valued "
                                         r".*guide='auto-normal'"):
        inference.fit("svi", PositiveLocal(), data, guide="mlp", num_steps=2)
    res = inference.fit("svi", PositiveLocal(), data, guide="auto-normal", num_steps=20,
                        eval_particles=10, num_posterior_samples=5)
    assert res.guide == "auto-normal"


def test_iwae_and_gaps_given_the_globals(data, auto_normal):
    logz = exact_log_evidence(data)
    ev = auto_normal.iwae(data, num_samples=200, fixed="median")
    assert "globals fixed" in ev.method
    res = inference.fit("svi", OneFactor(), data, guide="mlp", **FAST)
    ev = res.iwae(data, num_samples=200, fixed="median")
    assert res.elbo - 3 * res.elbo_se <= ev.value + 3 * ev.se
    # log p(x | mu) at one mu is at most max_mu log p(x | mu), which exceeds log p(x) here
    assert ev.value > logz - 5
    frame = res.decompose_gaps(data, fixed="median", num_particles=200)
    total = frame[frame["scope"] == "total"].iloc[0]
    assert total["amortization_gap"] > -3 * total["amortization_gap_se"]
    assert frame.attrs["conditioned_on"]["mu"]
