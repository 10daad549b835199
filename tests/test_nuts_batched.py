"""The batched NUTS kernel (all chains in one computation): against closed-form Gaussian
moments, against the exact GMM posterior (enumeration over assignments), and against Pyro's NUTS
on the same family; and how the kernel is chosen (declared capability, never guessed)."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from elbolab import inference
from elbolab.inference import arviz_io
from elbolab.inference.mcmc import adapt
from elbolab.inference.mcmc.arrays import Random, host_state, on_host
from elbolab.models.capabilities import BatchedPotential, CompiledPotential
from elbolab.models.gmm import BayesianGMM, sorted_means


def _gaussian(D=3):
    A = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]], dtype=torch.float64)
    cov = A @ A.T
    prec, mean = torch.linalg.inv(cov), torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def potential(q):
        d = q - mean
        return 0.5 * ((d @ prec) * d).sum(-1), d @ prec

    return potential, mean, cov


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_batched_chains_reproduce_a_correlated_gaussian(library):
    """Means within 4 MCSE (ArviZ), variances within 4 sd of the variance estimator (ESS-scaled),
    with the chains' state in NumPy (the CPU's) and in torch (a GPU's, run here on the CPU)."""
    potential, mean, cov = _gaussian()
    q0 = torch.zeros(4, 3, dtype=torch.float64)
    if library == "numpy":
        potential, q0 = on_host(potential), host_state(q0)
    draws = adapt.run(potential, q0, warmup=300, num_samples=800, target_accept=0.8,
                      max_depth=10, rng=Random(1, q0))
    q = np.asarray(draws.q)
    assert type(draws.q) is type(q0) and q.dtype == np.float64
    assert q.shape == (4, 800, 3) and not draws.diverging.any()
    assert (arviz_io.rhat(q) < 1.02).all()  # a sampler that does not mix is far above
    mcse = arviz_io.mcse_mean(q)
    assert (np.abs(q.reshape(-1, 3).mean(0) - mean.numpy()) < 4 * mcse).all()
    ess = arviz_io.ess(q)
    var = q.reshape(-1, 3).var(0)
    assert (np.abs(var / torch.diag(cov).numpy() - 1) < 4 * np.sqrt(2 / ess)).all()
    # the adapted diagonal inverse mass matrix estimates the marginal variances
    assert np.allclose(np.asarray(draws.inv_mass).mean(0), torch.diag(cov).numpy(), rtol=0.35)


def test_the_gmm_batched_potential_is_the_models_own_density():
    fam = BayesianGMM(3, 10.0)
    x, _ = fam.simulate(50, seed=0)
    flat = fam.batched_potential(x)
    q = torch.randn(4, 3, dtype=torch.float64)
    U, grad = flat.potential(q)
    qq = q.clone().requires_grad_(True)
    lp = torch.stack([pyro.poutine.trace(pyro.poutine.condition(
        fam.mcmc_model, data={"mu": qq[c].reshape(3, 1)})).get_trace(x).log_prob_sum()
        for c in range(4)])
    (g,) = torch.autograd.grad(lp.sum(), qq)
    assert torch.allclose(U, -lp.detach(), rtol=1e-12)
    assert torch.allclose(grad, -g, atol=1e-9)


def test_every_kernel_agrees_with_the_exact_gmm_posterior():
    """Sorted means: the compiled, batched and Pyro kernels each within 4 combined MCSE of the exact posterior moments (the
    mixture over all K^n assignments, Monte Carlo error of 20000 exact draws included)."""
    fam = BayesianGMM(2, 10.0)
    x, _ = fam.simulate(12, seed=3)
    exact = fam.exact_invariant_moments(x, num_samples=20000, seed=0)["mu_sorted"]
    for kernel in ("compiled", "batched", "pyro"):
        fit = inference.fit("mcmc", fam, x, seed=0, warmup=300, num_samples=400, num_chains=2,
                            kernel=kernel)
        assert ("batched kernel" in fit.message) == (kernel == "batched")
        assert ("compiled kernel" in fit.message) == (kernel == "compiled")
        mu = sorted_means(fit.samples["mu"]).numpy()[..., 0]  # (chain, draw, K)
        mcse = arviz_io.mcse_mean(mu)
        err = np.abs(mu.reshape(-1, 2).mean(0) - exact.mean[:, 0].numpy())
        assert (err < 4 * np.sqrt(mcse**2 + exact.mean_se[:, 0].numpy() ** 2)).all(), (kernel, err)
        assert fit.samples["mu"].dtype == torch.float64


def test_the_kernel_is_chosen_from_declared_capabilities():
    fam = BayesianGMM(2, 10.0)
    x, _ = fam.simulate(20, seed=0)
    assert isinstance(fam, BatchedPotential)
    auto = inference.fit("mcmc", fam, x, seed=0, warmup=20, num_samples=20, num_chains=2)
    assert isinstance(fam, CompiledPotential)  # and the data are on the CPU
    assert "compiled kernel" in auto.message and auto.settings["kernel"] == "auto"
    batched = inference.fit("mcmc", fam, x, seed=0, warmup=20, num_samples=20, num_chains=2,
                            kernel="batched")
    assert "batched kernel" in batched.message

    def program(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    plain = inference.fit("mcmc", program, torch.randn(10), seed=0, warmup=20, num_samples=20,
                          num_chains=1)
    assert "Pyro NUTS" in plain.message
    forced = inference.fit("mcmc", program, torch.randn(10), seed=0, warmup=20, num_samples=20,
                           num_chains=2, kernel="batched")  # asked for: read from the trace
    assert "batched kernel" in forced.message
    with pytest.raises(ValueError, match="kernel: 'compiled' needs a family declaring "
                                         "CompiledPotential"):
        inference.fit("mcmc", program, torch.randn(10), kernel="compiled")
    with pytest.raises(ValueError, match="kernel: must be one of"):
        inference.fit("mcmc", fam, x, kernel="fast")
    with pytest.raises(ValueError, match="chain_method: 'parallel' is for Pyro's kernel; "
                                         "kernel='compiled'"):
        inference.fit("mcmc", fam, x, kernel="compiled", chain_method="parallel")


def test_batched_runs_are_reproducible():
    fam = BayesianGMM(2, 10.0)
    x, _ = fam.simulate(20, seed=0)
    a = inference.fit("mcmc", fam, x, seed=5, warmup=30, num_samples=30, num_chains=3)
    b = inference.fit("mcmc", fam, x, seed=5, warmup=30, num_samples=30, num_chains=3)
    assert torch.equal(a.samples["mu"], b.samples["mu"])
    assert a.samples["mu"].dtype == torch.float64
    f32 = inference.fit("mcmc", fam, x.float(), seed=5, warmup=30, num_samples=30, num_chains=3)
    assert f32.samples["mu"].dtype == torch.float32  # the state, draws and output in float32


def test_the_gpu_path_of_a_fit_runs_with_torch_state(monkeypatch):
    """What a GPU runs (the chains' state kept in torch, not NumPy), here on the CPU through the
    whole fit: draws, divergences and summaries come back as from the NumPy path, and agree
    with it within 4 MCSE."""
    from elbolab.inference.mcmc import nuts

    fam = BayesianGMM(2, 10.0)
    x, _ = fam.simulate(40, seed=1)
    kw = dict(seed=0, warmup=150, num_samples=300, num_chains=2, kernel="batched")
    host = inference.fit("mcmc", fam, x, **kw)
    monkeypatch.setattr(nuts, "host_state", lambda q0: q0)  # keep torch, as on a GPU
    dev = inference.fit("mcmc", fam, x, **kw)
    assert "batched kernel" in dev.message and dev.samples["mu"].dtype == torch.float64
    assert dev.sample_stats["diverging"].shape == (2, 300)
    a, b = (sorted_means(f.samples["mu"]).numpy()[..., 0] for f in (host, dev))
    assert not np.array_equal(a, b)  # another generator: other draws
    tol = 4 * np.sqrt(arviz_io.mcse_mean(a) ** 2 + arviz_io.mcse_mean(b) ** 2)
    assert (np.abs(a.reshape(-1, 2).mean(0) - b.reshape(-1, 2).mean(0)) < tol).all()


@pytest.mark.cuda
def test_batched_chains_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    fam = BayesianGMM(3, 10.0)
    x, _ = fam.simulate(500, seed=0, device=torch.device("cuda"), dtype=torch.float32)
    fit = inference.fit("mcmc", fam, x, seed=0, warmup=200, num_samples=200, num_chains=4)
    assert fit.samples["mu"].device.type == "cuda" and "batched kernel" in fit.message
    cpu = inference.fit("mcmc", fam, x.cpu(), seed=0, warmup=200, num_samples=200, num_chains=4)
    a, b = (sorted_means(f.samples["mu"]).double().cpu().numpy()[..., 0] for f in (fit, cpu))
    tol = 4 * np.sqrt(arviz_io.mcse_mean(a) ** 2 + arviz_io.mcse_mean(b) ** 2)
    assert (np.abs(a.reshape(-1, 3).mean(0) - b.reshape(-1, 3).mean(0)) < tol).all()
    assert math.isfinite(float(fit.samples["mu"].sum()))


def test_both_kernels_agree_with_the_exact_posterior_of_a_plain_program():
    """A user's function (normal mean, known sds, eight schools' data): the batched kernel on the
    potential read from its trace and Pyro's NUTS, each within 4 MCSE of the conjugate posterior
    (mean and sd); tau's HalfCauchy goes through its log transform and Jacobian."""
    y = torch.tensor([28.0, 8, -3, 7, -1, 1, 18, 12], dtype=torch.float64)
    sigma = torch.tensor([15.0, 10, 16, 11, 9, 11, 10, 18], dtype=torch.float64)

    def pooled(J, sigma, y=None):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=sigma.dtype), 10.0))
        scale = pyro.sample("scale", dist.HalfCauchy(torch.tensor(1.0, dtype=sigma.dtype)))
        with pyro.plate("schools", J):
            pyro.sample("obs", dist.Normal(mu, sigma), obs=y)
        return scale  # a second site whose posterior is its prior: HalfCauchy(1), median 1

    prec = 1 / 10.0**2 + float((1 / sigma**2).sum())
    mean, sd = float((y / sigma**2).sum()) / prec, math.sqrt(1 / prec)
    for kernel in ("batched", "pyro"):
        fit = inference.fit("mcmc", pooled, {"J": 8, "sigma": sigma, "y": y}, seed=1,
                            warmup=300, num_samples=500, num_chains=2, kernel=kernel)
        mu = fit.samples["mu"].numpy()
        ess = float(arviz_io.ess(mu))
        assert abs(mu.mean() - mean) < 4 * sd / math.sqrt(ess), kernel
        assert abs(mu.std() / sd - 1) < 4 / math.sqrt(2 * ess) + 0.02, kernel
        med = float(np.median(fit.samples["scale"].numpy()))
        assert abs(med - 1.0) < 0.25, (kernel, med)  # the median of 1000 draws: se ~ 0.08


@pytest.mark.parametrize("kernel", ["compiled", "batched"])
def test_batched_chains_start_where_init_params_says(kernel):
    """Every chain starts at the given point: started at the sorted true means (-6.9, -0.9, 4.9:
    near the posterior mode, where the gradient is small), one draw of one leapfrog (no warm-up,
    Hoffman & Gelman's step size, here <= 0.25) stays next to them, out of reach of the default
    start (uniform in (-2, 2)); bad starts are errors naming the site."""
    fam = BayesianGMM(3, 10.0)
    x, truth = fam.simulate(200, seed=0)
    start = truth["mu"].sort(0).values.double()
    fit = inference.fit("mcmc", fam, x, seed=0, warmup=0, num_samples=1, num_chains=3,
                        init_params={"mu": start}, max_tree_depth=1, kernel=kernel)
    assert f"{kernel} kernel" in fit.message
    assert (fit.samples["mu"] - start).abs().max() < 1.0
    with pytest.raises(ValueError, match=r"init_params: 'mu' must be shaped \(3, 1\)"):
        inference.fit("mcmc", fam, x, init_params={"mu": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"init_params: the latent sites are \['mu'\]; missing "
                                         r"\['mu'\], unknown \['m'\]"):
        inference.fit("mcmc", fam, x, init_params={"m": start})


def test_a_program_under_the_batched_kernel_starts_at_init_params():
    """A wide posterior (sd ~ 45) started 1000 away: one draw of one leapfrog stays far out,
    where the default start (uniform in (-2, 2)) cannot be."""
    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 100.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, 100.0), obs=y)

    y = torch.zeros(5, dtype=torch.float64)
    kw = dict(seed=0, warmup=0, num_samples=1, num_chains=2, kernel="batched", max_tree_depth=1)
    far = inference.fit("mcmc", model, y, init_params={"mu": torch.tensor(1000.0)}, **kw)
    near = inference.fit("mcmc", model, y, **kw)
    assert (far.samples["mu"] > 500).all() and (near.samples["mu"].abs() < 500).all()


def test_a_program_that_would_mix_the_chains_is_refused_before_any_step():
    """``w.unsqueeze(-2)`` moves the chains' dim: the likelihood comes out (C, C, n), summing
    over other chains' values (a wrong posterior, R-hat in the millions) unless refused; a
    ``.sum()`` of the whole likelihood keeps every shape and adds the chains together (found by
    computing the chains together and alone); the model written as Pyro's batching asks runs
    and matches the closed form."""
    def unsqueezed(X, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 2.0).to_event(1))
        b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=X.dtype), 2.0))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Normal((X * w.unsqueeze(-2)).sum(-1) + b, 0.5), obs=y)

    def batched(X, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 2.0).to_event(1))
        b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=X.dtype), 2.0))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Normal((X * w).sum(-1) + b, 0.5), obs=y)

    def summed(X, y=None):  # every shape right, but .sum() adds the chains' likelihoods
        w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 2.0).to_event(1))
        b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=X.dtype), 2.0))
        pyro.factor("ll", dist.Normal((X * w).sum(-1) + b, 0.5).log_prob(y).sum())

    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 3, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 \
        + 0.5 * torch.randn(60, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"site 'y' has log-density shape \(3, 3, 60\) under 3 "
                                         r"chains, not \(3, 60\).*kernel='pyro'"):
        inference.fit("mcmc", unsqueezed, {"X": X, "y": y}, kernel="batched", num_chains=2)
    with pytest.raises(ValueError, match=r"computed together, .* is not each chain's alone.*"
                                         r"reduces over the chains' dim.*kernel='pyro'"):
        inference.fit("mcmc", summed, {"X": X, "y": y}, kernel="batched", num_chains=2)
    fit = inference.fit("mcmc", batched, {"X": X, "y": y}, kernel="batched", num_chains=2,
                        seed=0, warmup=200, num_samples=300)
    A = torch.cat([X, torch.ones(60, 1, dtype=X.dtype)], 1)  # conjugate: prior sd 2, noise 0.5
    prec = A.T @ A / 0.25 + torch.eye(4, dtype=X.dtype) / 4.0
    mean = torch.linalg.solve(prec, A.T @ y / 0.25)
    sd = torch.linalg.inv(prec).diagonal().sqrt()
    b = fit.samples["b"].numpy()
    assert abs(b.mean() - float(mean[3])) < 4 * float(sd[3]) / math.sqrt(arviz_io.ess(b))


def test_a_scale_that_underflows_on_a_wild_leapfrog_is_a_divergence_not_an_error():
    """A positive scale through exp: a leapfrog with a large early step reaches exp(u) = 0,
    which Pyro's argument checks raise on mid-run; the potential read from the trace gives
    +inf or nan there (a divergence to the sampler), with the caller's checks on, and a fit
    runs to the conjugate answer."""
    from elbolab.inference.mcmc.potential import trace_potential

    def model(y):
        sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=y.dtype)))
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 10.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, sigma), obs=y)

    y = 1.5 + 0.3 * torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with pyro.validation_enabled(True):
        flat = trace_potential(model, y, 1)
        U, _ = flat.potential(torch.tensor([[-1000.0, 1.0], [0.0, 1.0]], dtype=torch.float64))
        assert not math.isfinite(float(U[0])) and math.isfinite(float(U[1]))
        fit = inference.fit("mcmc", model, y, kernel="batched", num_chains=2, seed=0,
                            warmup=200, num_samples=300)
    mu = fit.samples["mu"].numpy()
    se = float(y.std()) / math.sqrt(len(y))  # the posterior sd of mu, about
    assert abs(mu.mean() - float(y.mean())) < 4 * se
