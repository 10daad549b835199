"""Plain Pyro programs as researchers write them: a function (or PyroModule) and its data as its
own arguments, through every engine that applies. References are closed forms (a conjugate
normal mean), ordinary least squares, and the data's own simulation truth with a derived
tolerance."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import config_enumerate
from pyro.infer.autoguide import AutoDelta
from pyro.nn import PyroModule, PyroParam, PyroSample
from torch import nn

from elbolab import inference
from elbolab.models.program import Program

# -- a conjugate model: mu ~ N(0, s0^2), y_j ~ N(mu, sigma_j^2) (eight schools' data, tau = 0) ----
Y = torch.tensor([28.0, 8, -3, 7, -1, 1, 18, 12], dtype=torch.float64)
SIGMA = torch.tensor([15.0, 10, 16, 11, 9, 11, 10, 18], dtype=torch.float64)
S0 = 10.0


def pooled(J, sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=sigma.dtype), S0))
    with pyro.plate("schools", J):
        pyro.sample("obs", dist.Normal(mu, sigma), obs=y)


def exact_posterior():
    """Normal-normal conjugacy: precision 1/s0^2 + sum 1/sigma_j^2, mean = sum(y/sigma^2) / prec."""
    prec = 1 / S0**2 + float((1 / SIGMA**2).sum())
    return float((Y / SIGMA**2).sum()) / prec, math.sqrt(1 / prec)


DATA = {"J": 8, "sigma": SIGMA, "y": Y}


def test_a_plain_function_with_dict_data_through_nuts_and_svi():
    mean, sd = exact_posterior()
    nuts = inference.fit("mcmc", pooled, DATA, seed=0, num_samples=300, warmup=200, num_chains=2)
    draws = nuts.posterior_samples()["mu"]
    assert draws.shape == (2, 300) and draws.dtype == torch.float64  # float64 in, float64 out
    # NUTS mean within 4 MCSE (ESS >= 200 from the convergence rule) of the exact mean
    ess = nuts.diagnostics["ess_bulk_min"]
    assert abs(float(draws.mean()) - mean) < 4 * sd / math.sqrt(ess)
    assert abs(float(draws.std()) / sd - 1) < 4 / math.sqrt(2 * ess) + 0.02
    svi = inference.fit("svi", pooled, DATA, seed=0, num_steps=1500, lr=0.05)
    q = svi.posterior_samples(4000)["mu"]
    # AutoNormal is exact for a Gaussian posterior: its mean and sd converge to the closed form
    assert abs(float(q.mean()) - mean) < 0.1 * sd + 4 * sd / math.sqrt(4000)
    assert abs(float(q.std()) / sd - 1) < 0.1
    # the ELBO of an exact q equals log p(y): log N(y; 0, diag(sigma^2) + s0^2 11^T)
    cov = torch.diag(SIGMA**2) + S0**2
    log_py = float(dist.MultivariateNormal(torch.zeros(8, dtype=torch.float64), cov).log_prob(Y))
    assert svi.elbo <= log_py + 4 * svi.elbo_se
    assert svi.elbo > log_py - 0.05
    assert svi.n_data == 8 and svi.bound == "elbo"


def test_tuple_and_tensor_data_and_the_result_keeps_its_data():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = torch.randn(30) + 3.0
    a = inference.fit("svi", model, (y,), seed=0, num_steps=300, lr=0.05)
    b = inference.fit("svi", model, y, seed=0, num_steps=300, lr=0.05)
    assert a.elbo == b.elbo and a.n_data == 30
    assert a.posterior_samples(10)["mu"].shape == (1, 10)  # no need to pass the data again
    idata = inference.fit("mcmc", model, y, seed=0, num_samples=50, warmup=50,
                          num_chains=1).to_inference_data()
    assert "mu" in idata.posterior


# -- the Bayesian regression tutorial: PyroModule[nn.Linear] with PyroSample priors ----------------
class BayesianRegression(PyroModule):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear = PyroModule[nn.Linear](in_features, out_features)
        self.linear.weight = PyroSample(dist.Normal(0.0, 10.0).expand([out_features, in_features]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([out_features]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)
        return mean


def test_the_regression_tutorial_as_written_runs_under_the_default_settings():
    """nn.Linear cannot take a particle dim: the default vectorized particles are detected to
    fail before training and the particles are drawn one at a time, said in the message."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    beta, b0 = torch.tensor([1.5, -2.0, 0.5]), 0.7
    y = x @ beta + b0 + 0.5 * torch.randn(200, generator=g)
    fit = inference.fit("svi", BayesianRegression(3, 1), {"x": x, "y": y}, seed=0,
                        num_steps=600, lr=0.05, eval_particles=200)
    assert "one at a time" in fit.message
    draws = fit.posterior_samples(500)
    w = draws["linear.weight"].reshape(500, 3).mean(0)
    # OLS with an intercept; the posterior mean (flat-ish prior, n = 200) sits within a few
    # posterior sds (sigma / sqrt(n) ~ 0.035 per coefficient) of it
    design = torch.cat([x, torch.ones(200, 1)], 1)
    ols = torch.linalg.lstsq(design, y.unsqueeze(-1)).solution.squeeze(-1)
    assert torch.allclose(w, ols[:3], atol=0.15)
    assert abs(float(draws["sigma"].mean()) - 0.5) < 0.1


# -- the GMM tutorial: an enumerated assignment site ------------------------------------------------
K = 2


@config_enumerate
def gmm(data):
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


GMM_DATA = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])


def test_the_gmm_tutorial_sums_its_assignment_out_with_any_guide():
    auto = inference.fit("svi", gmm, GMM_DATA, seed=0, num_steps=100, lr=0.05, eval_particles=100)
    assert auto.bound == "elbo-collapsed" and auto.n_data == 5
    # the tutorial's own guide: MAP of the globals (AutoDelta over the exposed sites), started
    # as the tutorial starts it (equal weights, half the data's sd, locs at data points)
    def init_loc_fn(site):
        if site["name"] == "weights":
            return torch.ones(K) / K
        if site["name"] == "scale":
            return (GMM_DATA.var() / 2).sqrt()
        return GMM_DATA[torch.tensor([0, 3])]

    guide = AutoDelta(pyro.poutine.block(gmm, expose=["weights", "locs", "scale"]),
                      init_loc_fn=init_loc_fn)
    own = inference.fit("svi", gmm, GMM_DATA, guide=guide, seed=0, num_steps=200, lr=0.1,
                        eval_particles=100)
    assert own.bound == "elbo-collapsed"
    locs = sorted(own.posterior_samples(1)["locs"].flatten().tolist())
    assert abs(locs[0] - 0.5) < 1.0 and abs(locs[1] - 11.0) < 1.0  # the two clusters' means


# -- guides written as functions or PyroModules -------------------------------------------------------
def pooled_guide(J, sigma, y=None):
    loc = pyro.param("mu_loc", torch.tensor(0.0, dtype=sigma.dtype))
    scale = pyro.param("mu_scale", torch.tensor(1.0, dtype=sigma.dtype),
                       constraint=dist.constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale))


class PooledGuide(PyroModule):
    def __init__(self):
        super().__init__()
        self.loc = PyroParam(torch.tensor(0.0, dtype=torch.float64))
        self.scale = PyroParam(torch.tensor(1.0, dtype=torch.float64),
                               constraint=dist.constraints.positive)

    def forward(self, J, sigma, y=None):
        pyro.sample("mu", dist.Normal(self.loc, self.scale))


@pytest.mark.parametrize("guide", [pooled_guide, PooledGuide()], ids=["function", "PyroModule"])
def test_a_guide_function_or_pyromodule_is_trained_and_kept(guide):
    mean, sd = exact_posterior()
    fit = inference.fit("svi", pooled, DATA, guide=guide, seed=0, num_steps=1500, lr=0.05)
    params = fit.posterior
    loc = params.get("mu_loc", params.get("loc"))
    scale = params.get("mu_scale", params.get("scale"))
    assert abs(float(loc) - mean) < 0.1 * sd and abs(float(scale) / sd - 1) < 0.1


# -- bad input, before any work ---------------------------------------------------------------------
def test_bad_programs_and_data_are_named_before_any_work():
    with pytest.raises(TypeError, match="model: expected a Pyro program"):
        inference.fit("svi", 42, DATA)
    with pytest.raises(ValueError, match=r"data: the arguments \['J', 'sig', 'y'\].*\['J', 'sigma', 'y'\]"):
        inference.fit("svi", pooled, {"J": 8, "sig": SIGMA, "y": Y})
    bad = Y.clone()
    bad[2] = float("nan")
    with pytest.raises(ValueError, match=r"data: 'y' has 1 NaN"):
        inference.fit("mcmc", pooled, {**DATA, "y": bad})

    def broken(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu, -1.0), obs=y)

    with pytest.raises(ValueError, match=r"model: the program failed.*after site 'mu'") as info:
        inference.fit("svi", broken, torch.zeros(3))
    assert info.value.__cause__ is not None

    def stray(J, sigma, y=None):
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("nu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"samples site\(s\) \['nu'\] that the pooled model does not have"):
        inference.fit("svi", pooled, DATA, guide=stray, num_steps=2)
    with pytest.raises(TypeError, match="did you mean 'num_steps'"):
        inference.fit("svi", pooled, DATA, num_step=10)
    with pytest.raises(ValueError, match="did you mean 'auto-normal'"):
        inference.fit("svi", pooled, DATA, guide="auto-normall")
    # the names Pyro and NumPyro users type
    with pytest.raises(ValueError, match="did you mean 'mcmc'"):
        inference.fit("nuts", pooled, DATA)
    with pytest.raises(TypeError, match="did you mean 'lr' for 'learning_rate'"):
        inference.fit("svi", pooled, DATA, learning_rate=0.1)
    with pytest.raises(TypeError, match="did you mean 'warmup' for 'num_warmup'"):
        inference.fit("mcmc", pooled, DATA, num_warmup=10)


def test_the_data_plate_is_found_or_named():
    def two_plates(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("rows", x.shape[0], dim=-2), pyro.plate("cols", x.shape[1], dim=-1):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"data_plate: .*\['cols', 'rows'\]"):
        inference.fit("svi", two_plates, x, num_steps=2)
    fit = inference.fit("svi", two_plates, x, data_plate="rows", num_steps=2, eval_particles=4,
                        num_posterior_samples=0)
    assert fit.n_data == 6
    prog = Program(two_plates, data_plate="rows")
    prog.check_data(x)
    assert prog.structure.plates == {"rows": (6, -2), "cols": (4, -1)}
    assert prog.max_plate_nesting == 2


def test_numpy_data_keep_their_dtype():
    y = np.array([0.5, 1.5, -0.2])

    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    fit = inference.fit("svi", model, {"y": y}, seed=0, num_steps=5, eval_particles=4)
    assert fit.dtype == "float64"


@pytest.mark.parametrize("make_guide", [lambda: pooled_guide, PooledGuide, lambda: "auto-normal"],
                         ids=["function", "PyroModule", "auto-normal"])
def test_a_programs_fit_is_saved_and_loaded_bit_for_bit(tmp_path, make_guide):
    from elbolab.inference.result import FitResult

    guide = make_guide()
    fit = inference.fit("svi", pooled, DATA, guide=guide, seed=0, num_steps=50, lr=0.05,
                        eval_particles=10)
    fit.save(tmp_path / "fit")
    with pytest.raises(ValueError, match="guide"):
        if not isinstance(guide, str):
            FitResult.load(tmp_path / "fit", pooled, DATA)
        else:
            raise ValueError("guide")
    back = FitResult.load(tmp_path / "fit", pooled, DATA,
                          guide=None if isinstance(guide, str) else guide)
    assert back.state.params.keys() == fit.state.params.keys()
    assert all(torch.equal(back.state.params[k], fit.state.params[k]) for k in fit.state.params)
    a = fit.posterior_samples(20, seed=3)["mu"]
    b = back.posterior_samples(20, seed=3)["mu"]
    assert torch.equal(a, b)
    assert back.elbo_estimate(DATA, num_particles=50, seed=1) == fit.elbo_estimate(
        DATA, num_particles=50, seed=1)


def test_the_engines_called_directly_take_a_program_too():
    from elbolab.inference import mcmc, svi
    from elbolab.inference.closed_form import em
    from elbolab.models.capabilities import MissingCapability

    y = torch.randn(10)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    nuts = mcmc.fit(model, y, mcmc.Settings(num_samples=20, warmup=20, num_chains=1))
    assert nuts.posterior_samples()["mu"].shape == (1, 20)
    fit = svi.fit(model, y, svi.Settings(num_steps=5, eval_particles=4))
    assert fit.n_data == 10
    with pytest.raises(MissingCapability, match="ClosedFormEM"):
        em.fit(model, y)


def test_a_result_prints_as_one_line():
    fit = inference.fit("svi", pooled, DATA, seed=0, num_steps=5, eval_particles=4,
                        num_posterior_samples=10)
    text = repr(fit)
    assert "\n" not in text and len(text) < 400
    assert "engine='svi'" in text and "'mu': (1, 10)" in text


def test_a_programs_draws_carry_their_pointwise_log_likelihood():
    """ArviZ's log_likelihood group (LOO, WAIC) for a plain program: log N(y_n; w x_n + b, sigma)
    of each draw, written out independently here."""
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 10.0))
        b = pyro.sample("b", dist.Normal(0.0, 10.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("rows", len(x)):
            pyro.sample("y", dist.Normal(w * x + b, sigma), obs=y)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, generator=g)
    y = 2 * x + 1 + 0.5 * torch.randn(30, generator=g)
    fit = inference.fit("mcmc", model, {"x": x, "y": y}, seed=0, num_samples=50, warmup=50,
                        num_chains=2)
    ll = fit.log_likelihood["x"]
    assert ll.shape == (2, 50, 30)
    w, b, s = (fit.samples[k] for k in ("w", "b", "sigma"))
    ref = dist.Normal(w[..., None] * x + b[..., None], s[..., None]).log_prob(y)
    torch.testing.assert_close(ll, ref)
    assert "log_likelihood" in fit.to_inference_data().groups()
    # summed out discrete sites: their conditional is not the likelihood, so no group
    auto = inference.fit("svi", gmm, GMM_DATA, seed=0, num_steps=5, eval_particles=4)
    assert auto.log_likelihood == {}


def test_psis_reads_a_programs_own_data_plate():
    """Per-point k-hats for a program whose plate over data points is not called "data"; with
    q = p(z | y) exactly (z_n | y_n ~ N(y_n / 2, 1/2)) every weight is equal: k-hat -inf."""
    from elbolab.inference.evaluation.diagnostics import psis_khat

    def model(y):
        with pyro.plate("obs", len(y)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(z, 1.0), obs=y)

    def exact(y):
        with pyro.plate("obs", len(y)):
            pyro.sample("z", dist.Normal(y / 2, math.sqrt(0.5)))

    y = torch.randn(20, dtype=torch.float64)
    fit = inference.fit("svi", model, y, guide=exact, num_steps=2, eval_particles=4)
    d = psis_khat(fit, y, num_samples=100)
    assert d.khat_points is not None and d.khat_points.shape == (20,)
    assert d.khat == -math.inf and np.all(d.khat_points == -math.inf)
