"""The compiled NUTS kernel (the trajectory in machine code, Numba) and compiled potentials:
the vectorized exponential against NumPy's, the GMM's compiled potential against the model's own
trace and autograd, and the kernel against closed-form Gaussian moments on a potential written
here as a user would write one."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyro
import pytest
import torch
from numba import njit

from elbolab import inference
from elbolab.inference import arviz_io
from elbolab.inference.mcmc import adapt
from elbolab.inference.mcmc.arrays import Random
from elbolab.inference.mcmc.compiled import Compiled
from elbolab.models.compiled import SIGNATURE, exp_nonpositive
from elbolab.models.gmm import BayesianGMM
from elbolab.models.gmm.compiled import gmm_potential


def test_exp_nonpositive_is_within_two_ulp_of_numpys():
    a = -np.random.default_rng(0).uniform(0, 708, size=200_000)
    a[:6] = [0.0, -0.0, -1e-300, -0.5 * math.log(2), -700.0, -708.0]
    out, bits = np.empty_like(a), np.empty(a.shape, dtype=np.int64)
    exp_nonpositive(a, out, bits)
    ref = np.exp(a)
    assert (np.abs(out - ref) <= 2 * np.spacing(ref)).all()
    assert out[0] == out[1] == 1.0
    low = np.array([-709.0, -745.0, -1e10, -np.inf, np.nan])  # below -708: taken as -708
    out, bits = np.empty_like(low), np.empty(low.shape, dtype=np.int64)
    exp_nonpositive(low, out, bits)
    assert (np.abs(out[:4] - np.exp(-708.0)) <= 2 * np.spacing(np.exp(-708.0))).all()
    assert np.isnan(out[4])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_gmm_compiled_potential_is_the_models_own_density(dtype):
    """U and grad U at random points against -log p(mu, x) from the model's trace (c summed
    out) and its autograd gradient, d = 2; float32 data are read as float64."""
    fam = BayesianGMM(3, 10.0, dim=2)
    x, _ = fam.simulate(300, seed=1, dtype=dtype)
    potential = Compiled(*fam.compiled_potential(x))
    q = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    U, grad = potential(q.numpy())
    qq = q.clone().requires_grad_(True)
    xd = x.double()
    lp = torch.stack([pyro.poutine.trace(pyro.poutine.condition(
        fam.mcmc_model, data={"mu": qq[c].reshape(3, 2)})).get_trace(xd).log_prob_sum()
        for c in range(5)])
    (g,) = torch.autograd.grad(lp.sum(), qq)
    np.testing.assert_allclose(U, -lp.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(grad, -g.numpy(), rtol=1e-10, atol=1e-9)
    U, _ = potential(np.full((1, 6), np.nan))
    assert np.isnan(U).all()  # a NaN point is a NaN energy: the kernel's divergence


# A user's compiled potential: a correlated Gaussian, the precision as the data matrix and the
# mean as the numbers (elbolab.models.compiled.SIGNATURE).
@njit(SIGNATURE, error_model="numpy")
def gaussian(q, prec, mean, grad):
    D = q.shape[0]
    U = 0.0
    for i in range(D):
        g = 0.0
        for j in range(D):
            g += prec[i, j] * (q[j] - mean[j])
        grad[i] = g
        U += 0.5 * (q[i] - mean[i]) * g
    return U


@njit(SIGNATURE, error_model="numpy")
def walled(q, x, params, grad):
    """N(0, 1) cut at |q| < 1.5, NaN outside: the kernel must take NaN as a divergence."""
    if abs(q[0]) >= 1.5:
        return math.nan
    grad[0] = q[0]
    return 0.5 * q[0] * q[0]


def test_the_compiled_kernel_reproduces_a_correlated_gaussian():
    """Means within 4 MCSE (ArviZ), variances within 4 sd of the variance estimator
    (ESS-scaled), per-chain adaptation reaching the marginal variances; the same seed gives the
    same draws."""
    A = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]])
    cov, mean = A @ A.T, np.array([1.0, -2.0, 0.5])
    potential = Compiled(gaussian, np.linalg.inv(cov), mean)
    q0 = np.zeros((4, 3))

    def run(seed):
        return adapt.run(potential, q0, warmup=400, num_samples=1500, target_accept=0.8,
                         max_depth=10, rng=Random(seed, q0), step=potential.transition)

    draws = run(1)
    q = draws.q
    assert q.shape == (4, 1500, 3) and not draws.diverging.any()
    assert (arviz_io.rhat(q) < 1.02).all()
    assert (np.abs(q.reshape(-1, 3).mean(0) - mean) < 4 * arviz_io.mcse_mean(q)).all()
    ess = arviz_io.ess(q)
    var = q.reshape(-1, 3).var(0)
    assert (np.abs(var / np.diag(cov) - 1) < 4 * np.sqrt(2 / ess)).all()
    assert np.allclose(draws.inv_mass.mean(0), np.diag(cov), rtol=0.35)
    assert np.array_equal(run(1).q, q) and not np.array_equal(run(2).q, q)


def test_a_nan_energy_is_a_divergence_not_a_crash():
    potential = Compiled(walled, np.zeros((1, 1)), np.zeros(1))
    q0 = np.zeros((2, 1))
    draws = adapt.run(potential, q0, warmup=200, num_samples=2000, target_accept=0.8,
                      max_depth=8, rng=Random(0, q0), step=potential.transition)
    assert draws.diverging.any() and (np.abs(draws.q) < 1.5).all()
    # the truncated normal's sd: 0.8 of N(0, 1)'s at |q| < 1.5, within 4 sd of its estimator
    sd = math.sqrt(1 - 2 * 1.5 * math.exp(-1.125) / math.sqrt(2 * math.pi) / math.erf(1.5 / 2**0.5))
    ess = float(arviz_io.ess(draws.q[..., 0]))
    assert abs(draws.q.std() / sd - 1) < 4 / math.sqrt(2 * ess) + 0.02


class _WrongPrior(BayesianGMM):
    """A family whose compiled potential forgot a factor of its prior variance."""

    def compiled_potential(self, x):
        fn, data, params = super().compiled_potential(x)
        return fn, data, params * np.array([1.0, 2.0, 1.0])


class _TwoItems(BayesianGMM):
    def compiled_potential(self, x):
        return super().compiled_potential(x)[:2]


class _CompiledOnly(BayesianGMM):
    batched_potential = None  # declares compiled_potential alone


def _python_potential(q, x, params, grad):
    return 0.0


@njit(SIGNATURE)
def _default_error_model(q, x, params, grad):
    return 0.0


@njit(SIGNATURE, error_model="numpy")
def _flipped(q, x, params, grad):
    U = gmm_potential(q, x, params, grad)
    grad[0] = -grad[0]
    return U


class _WithFn(BayesianGMM):
    """The GMM with its compiled potential's function replaced by ``fn``."""

    def __init__(self, fn):
        super().__init__(2, 10.0)
        self.fn = fn

    def compiled_potential(self, x):
        _, data, params = super().compiled_potential(x)
        return self.fn, data, params


class _Starts(BayesianGMM):
    """Starting points from ``start(C, D)`` instead of the family's."""

    def __init__(self, start):
        super().__init__(2, 10.0)
        self.start = start

    def batched_potential(self, x):
        flat = super().batched_potential(x)
        return dataclasses.replace(flat, init=lambda C, generator: self.start(C, flat.dim).to(x))


def test_a_compiled_potential_is_checked_before_any_step():
    """One that disagrees with the family's batched potential (another posterior, silently)
    is an error naming both values; one missing its batched potential, or not compiled for
    SIGNATURE, is an error saying what is missing."""
    x, _ = BayesianGMM(2, 10.0).simulate(30, seed=0)
    kw = dict(seed=0, warmup=5, num_samples=5, num_chains=2)
    with pytest.raises(ValueError, match="compiled_potential: disagrees with batched_potential"):
        inference.fit("mcmc", _WrongPrior(2, 10.0), x, **kw)
    for kernel in ("auto", "compiled"):
        with pytest.raises(ValueError, match="declares compiled_potential but no "
                                             "batched_potential"):
            inference.fit("mcmc", _CompiledOnly(2, 10.0), x, kernel=kernel, **kw)
    with pytest.raises(ValueError, match="'_python_potential' must be a Numba @njit function of "
                                         "elbolab.models.compiled.SIGNATURE"):
        inference.fit("mcmc", _WithFn(_python_potential), x, **kw)
    with pytest.raises(ValueError, match=r"compiled_potential: must return \(fn, data, params\)"):
        inference.fit("mcmc", _TwoItems(2, 10.0), x, **kw)
    with pytest.raises(ValueError, match="'_default_error_model' must be compiled with "
                                         "error_model='numpy'"):
        inference.fit("mcmc", _WithFn(_default_error_model), x, **kw)
    with pytest.raises(ValueError, match="the same U as batched_potential at q = .*, but not the "
                                         "same gradient: coordinate 0"):
        inference.fit("mcmc", _WithFn(_flipped), x, **kw)
    for kernel in ("compiled", "batched"):
        with pytest.raises(ValueError, match=r"init\(2, generator\) must give the starting points "
                                             r"as \(2, 2\)"):
            inference.fit("mcmc", _Starts(lambda C, D: torch.zeros(4, D)), x, kernel=kernel,
                          **kw)
        with pytest.raises(ValueError, match="U or its gradient is not finite at the start of "
                                             "chain 0"):
            inference.fit("mcmc", _Starts(lambda C, D: torch.full((C, D), math.nan)), x,
                          kernel=kernel, **kw)


def test_settings_seeds_and_dtypes_at_the_boundary():
    """What a user passes: whole-number floats are taken as the integers they are (the fit runs
    and reports them as ints); seeds up to 2**63 - 1 under both kernels; half precision is an
    error before any work; one draw per chain says why there is no R-hat; the fit says which
    kernel ran and keeps the tree depth of every draw."""
    fam = BayesianGMM(2, 10.0)
    x, _ = fam.simulate(30, seed=0)
    fit = inference.fit("mcmc", fam, x, seed=2**63 - 1, warmup=20.0, num_samples=10.0,
                        num_chains=2.0, max_tree_depth=6.0)
    assert fit.samples["mu"].shape == (2, 10, 2, 1) and fit.settings["num_samples"] == 10
    assert type(fit.settings["num_chains"]) is int and fit.settings["kernel_used"] == "compiled"
    depth = fit.sample_stats["tree_depth"]
    assert depth.shape == (2, 10) and 1 <= int(depth.min()) and int(depth.max()) <= 6
    pyro_fit = inference.fit("mcmc", fam, x, seed=2**63 - 1, warmup=5, num_samples=5,
                             num_chains=2, kernel="pyro")
    assert pyro_fit.settings["kernel_used"] == "pyro"
    for dtype in (torch.float16, torch.bfloat16):
        with pytest.raises(ValueError, match=f"x: NUTS needs float32 or float64 data, got {dtype}"):
            inference.fit("mcmc", fam, x.to(dtype))
    one = inference.fit("mcmc", fam, x, warmup=5, num_samples=1, num_chains=4)
    assert not one.converged and "1 draw per chain; they need >= 4" in one.message
    with pytest.raises(ValueError, match="max_tree_depth: must be >= 1 and <= 30"):
        inference.fit("mcmc", fam, x, max_tree_depth=31)


def test_both_kernels_accept_nearly_everything_at_a_tiny_step():
    """As the step goes to 0 the energy is conserved and Stan's acceptance statistic (the mean of
    min(1, exp(H0 - H)) over the states the trajectory computed) goes to 1: the step-size
    adaptation reads it. The batched kernel completes every subtree it starts, and once counted
    states Stan never computes, which pulled the statistic to 0.86 here and left some chains'
    adapted step sizes 50 times too small."""
    from elbolab.inference.mcmc import batched

    A = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]])
    cov, mean = A @ A.T, np.array([1.0, -2.0, 0.5])
    compiled = Compiled(gaussian, np.linalg.inv(cov), mean)
    q0 = np.tile(mean, (500, 1)) + np.random.default_rng(0).normal(size=(500, 3)) * 0.1
    U, g = compiled(q0)
    z = batched.pack(q0, np.zeros_like(q0), g, U)
    step, inv_mass = np.full(500, 0.01), np.tile(np.diag(cov), (500, 1))
    for transition in (batched.transition, compiled.transition):
        tr = transition(z, step, inv_mass, compiled, 8, Random(0, q0))
        assert tr.accept.mean() > 0.999 and tr.accept.min() > 0.99, transition


class _NoPrior(BayesianGMM):
    """A batched (and compiled) potential without the prior on mu: both agree, the model not."""

    def batched_potential(self, x):
        flat = super().batched_potential(x)

        def potential(q):
            U, g = flat.potential(q)
            return U - 0.5 * (q * q).sum(-1) / self.prior_var, g - q / self.prior_var

        return dataclasses.replace(flat, potential=potential)


class _Renamed(BayesianGMM):
    def batched_potential(self, x):
        flat = super().batched_potential(x)
        return dataclasses.replace(flat, to_sites=lambda q: {"means": flat.to_sites(q)["mu"]})


def test_a_declared_potential_is_checked_against_the_models_own_trace():
    """A term missing from the family's potential (here the prior; as well a log-Jacobian) gives
    another posterior under every kernel that reads it, unless the potential is compared with the
    model's own log density: it is, at the starts, before any step; a site name the model lacks
    is an error too."""
    x, _ = BayesianGMM(2, 10.0).simulate(30, seed=0)
    kw = dict(seed=0, warmup=5, num_samples=5, num_chains=2, kernel="batched")
    with pytest.raises(ValueError, match=r"batched_potential: from q to q \+ 1/2 .* U changes by "
                                         r".*, but the model's own -log p\(z, x\)"):
        inference.fit("mcmc", _NoPrior(2, 10.0), x, **kw)
    with pytest.raises(ValueError, match=r"to_sites gives \['means'\], which the model has no "
                                         "site of that name for"):
        inference.fit("mcmc", _Renamed(2, 10.0), x, **kw)


def test_the_kernels_uniform_stream_is_uniform():
    """splitmix64 from a seed: 20000 numbers in (0, 1) pass Kolmogorov-Smirnov against the
    uniform (p > 0.001 at this fixed seed; a wrong shift or mask fails at p ~ 0), their log is
    finite, and two seeds give two streams."""
    from scipy import stats

    from elbolab.inference.mcmc.compiled import _uniform

    def stream(seed, n=20000):
        state = np.array([seed], dtype=np.uint64)
        return np.array([_uniform(state) for _ in range(n)])

    u = stream(12345)
    assert 0 < u.min() and u.max() < 1 and np.isfinite(np.log(u)).all()
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert not np.array_equal(u[:100], stream(12346, 100))


_INTERRUPTED = """
import numpy as np, torch
from elbolab import inference
from elbolab.models.gmm import BayesianGMM
fam = BayesianGMM(4, 10.0, dim=2)
x, _ = fam.simulate(5000, seed=1)
inference.fit("mcmc", fam, x, num_samples=5, warmup=5)
state = torch.random.get_rng_state().clone()
print("start", flush=True)
try:
    inference.fit("mcmc", fam, x, num_samples=3000, warmup=1000)
    print("finished")
except KeyboardInterrupt:
    print("interrupted", torch.equal(state, torch.random.get_rng_state()))
print(inference.fit("mcmc", fam, x, num_samples=10, warmup=10).samples["mu"].shape)
"""


def test_ctrl_c_inside_the_compiled_kernel_is_a_keyboard_interrupt(tmp_path):
    """A user's Ctrl-C while the trajectory runs in compiled code: Numba reports it as a
    SystemError, which a caller would take for a crash; the fit raises KeyboardInterrupt, the
    caller's random state is restored, and the next fit runs."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "interrupted.py"
    script.write_text(_INTERRUPTED)
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "start"
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    assert out.splitlines()[0] == "interrupted True", out
    assert "torch.Size([4, 10, 4, 2])" in out
