"""One source for every density: what a family exposes equals its Pyro model's own trace.

For every built-in family (GMM, FA, PPCA, Bayesian FA, VAE Bernoulli and Gaussian with each
variance option), at random inputs, with and without subsampling:

* ``log_joint`` / ``log_likelihood`` / ``local_prior`` (LocalDensities) equal the per-point
  log-probabilities of the model's trace conditioned on the same latents;
* the GMM's ``log_joint(x, mu)`` (c summed out, eq. 5) equals the model's own marginal, computed by
  Pyro's ``TraceEnum_ELBO`` with a point-mass guide on mu (log q = 0), and its
  ``pointwise_log_likelihood`` equals the ``mcmc_model``'s observation site;
* every closed-form objective equals the shared Monte Carlo ELBO of ``family.model`` within 4
  standard errors (GMM CAVI, FA CAVI; EM's exact log likelihood is the ELBO of the exact posterior).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

from elbolab.inference.elbo import estimate_elbo
from elbolab.inference.runtime import isolated
from elbolab.models.ascent import AscentSettings, ascend
from elbolab.models.capabilities import LocalDensities, PointwiseLogLikelihood
from elbolab.models.fa.model import FactorAnalysis, FAParams
from elbolab.models.gmm.model import BayesianGMM
from elbolab.models.vae.model import VAE


def _fa(kind):
    fam = FactorAnalysis(2, dim=5, kind=kind)
    _, truth = fam.simulate(10, seed=1, dtype=torch.float64)
    return FactorAnalysis(2, kind=kind, params=truth)


LOCAL_FAMILIES = {
    "fa": lambda: _fa("fa"),
    "ppca": lambda: _fa("ppca"),
    "vae-bernoulli": lambda: VAE(6, latent_dim=2, hidden=(8,), likelihood="bernoulli"),
    "vae-gaussian-feature": lambda: VAE(6, latent_dim=2, hidden=(8,), likelihood="gaussian",
                                        variance="feature"),
    "vae-gaussian-point": lambda: VAE(6, latent_dim=2, hidden=(8,), likelihood="gaussian",
                                      variance="point"),
    "vae-linear-gaussian": lambda: VAE(6, latent_dim=2, hidden=(), likelihood="gaussian"),
}


def _data_for(fam, n, gen):
    d = fam.data_dim if isinstance(fam, VAE) else fam.current_params().dim
    if isinstance(fam, VAE) and fam.likelihood == "bernoulli":
        return torch.bernoulli(torch.full((n, d), 0.4, dtype=torch.float64), generator=gen)
    return torch.randn(n, d, generator=gen, dtype=torch.float64)


def _trace_per_point(fam, x, z, subsample_idx=None):
    """Per-point log p(z_n) and log p(x_n | z_n) from the model's own trace."""
    data = {fam.latent_site: z if subsample_idx is None else z[subsample_idx]}
    kw = {}
    if subsample_idx is not None:
        data["data"] = subsample_idx
        kw["subsample_size"] = len(subsample_idx)
    with torch.no_grad():
        tr = poutine.trace(poutine.condition(fam.model, data=data)).get_trace(x, **kw)
    tr.compute_log_prob()
    return (tr.nodes[fam.latent_site]["unscaled_log_prob"],
            tr.nodes[fam.obs_site]["unscaled_log_prob"])


@pytest.mark.parametrize("subsample", [False, True])
@pytest.mark.parametrize("name", sorted(LOCAL_FAMILIES))
def test_local_densities_equal_the_model_trace(name, subsample):
    fam = LOCAL_FAMILIES[name]()
    assert isinstance(fam, LocalDensities)
    gen = torch.Generator().manual_seed(0)
    n = 12
    if isinstance(fam, VAE):
        fam.decoder.double()
    x = _data_for(fam, n, gen)
    z = torch.randn(n, fam.latent_dim, generator=gen, dtype=torch.float64)
    idx = torch.tensor([1, 4, 7, 10]) if subsample else None
    with isolated(0):
        lp_z, lp_x = _trace_per_point(fam, x, z, idx)
        rows = slice(None) if idx is None else idx
        xb, zb = x[rows], z[rows]
        torch.testing.assert_close(fam.log_likelihood(xb, zb), lp_x, rtol=0, atol=1e-10)
        torch.testing.assert_close(fam.local_prior(xb).log_prob(zb), lp_z, rtol=0, atol=1e-10)
        torch.testing.assert_close(fam.log_joint(xb, zb), lp_z + lp_x, rtol=0, atol=1e-10)
        # batched latents (particles, n, k) broadcast the same way
        zz = torch.stack([zb, 0.5 * zb])
        torch.testing.assert_close(fam.log_joint(xb, zz)[1], fam.log_joint(xb, 0.5 * zb),
                                   rtol=0, atol=1e-10)


def _gmm_case(dim):
    fam = BayesianGMM(K=3, prior_var=4.0, dim=dim)
    x, _ = fam.simulate(15, seed=2)
    mu = torch.randn(3, dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return fam, x, mu


def _point_mass_guide(mu):
    def guide(x, subsample_size=None):
        with pyro.plate("components", mu.shape[0], dim=-1):
            pyro.sample("mu", dist.Delta(mu).to_event(1))

    return guide


@pytest.mark.parametrize("dim", [1, 2])
def test_gmm_log_joint_is_the_model_marginal(dim):
    fam, x, mu = _gmm_case(dim)
    with isolated(0), torch.no_grad():
        model_value = -TraceEnum_ELBO(max_plate_nesting=1).loss(fam.model, _point_mass_guide(mu), x)
        tr = poutine.trace(poutine.condition(fam.mcmc_model, data={"mu": mu})).get_trace(x)
    assert float(fam.log_joint(x, mu)) == pytest.approx(model_value, abs=1e-9)
    assert tr.log_prob_sum().item() == pytest.approx(model_value, abs=1e-9)
    assert isinstance(fam, PointwiseLogLikelihood)
    tr.compute_log_prob()
    pll = fam.pointwise_log_likelihood({"mu": mu[None, None]}, x)[0, 0]
    torch.testing.assert_close(pll, tr.nodes["obs"]["log_prob"], rtol=0, atol=1e-10)


def test_gmm_subsampled_model_scales_the_same_density():
    fam, x, mu = _gmm_case(1)
    idx = torch.tensor([0, 3, 5, 9, 14])
    with isolated(0), torch.no_grad():
        tr = poutine.trace(poutine.condition(fam.mcmc_model, data={"mu": mu, "data": idx})).get_trace(
            x, subsample_size=len(idx))
        tr.compute_log_prob()
    full = fam.pointwise_log_likelihood({"mu": mu[None, None]}, x)[0, 0]
    torch.testing.assert_close(tr.nodes["obs"]["unscaled_log_prob"], full[idx], rtol=0, atol=1e-10)
    assert tr.nodes["obs"]["scale"] == pytest.approx(len(x) / len(idx))


def _run(algo, x, iters=30):
    return ascend(lambda g: algo.init(x, g), lambda s: algo.step(x, s),
                  lambda s: algo.objective(x, s), x.shape[0], AscentSettings(max_iter=iters),
                  torch.Generator().manual_seed(0)).state


def test_gmm_cavi_objective_is_the_monte_carlo_elbo_of_the_model():
    from elbolab.guides.gmm import mean_field_guide_from

    fam, x, _ = _gmm_case(2)
    algo = fam.cavi()
    state = _run(algo, x)
    with isolated(0):
        guide = mean_field_guide_from(state, fixed=True, enumerate_c=True)
        est = estimate_elbo(fam.model, guide, x, num_particles=4000, batch_size=400,
                            enumerate=True)
    assert algo.objective(x, state) == pytest.approx(est.value, abs=4 * est.se + 1e-6)


def test_fa_cavi_objective_is_the_monte_carlo_elbo_of_the_model():
    from elbolab import guides

    fam = _fa("fa")
    x, _ = fam.simulate(40, seed=4, dtype=torch.float64)
    algo = fam.cavi()
    state = _run(algo, x, iters=3)  # not converged: any q must match, not only the optimum
    post = algo.posterior(x, state)
    with isolated(0):
        g = guides.make("mean-field", fam, x)
        loc, scale = post["z_loc"], post["z_scale"]
        g.set_moments(loc, torch.diag_embed(scale))
        est = estimate_elbo(fam.model, g, x, num_particles=4000, batch_size=400)
    assert algo.objective(x, state) == pytest.approx(est.value, abs=4 * est.se + 1e-6)


@pytest.mark.parametrize("kind", ["fa", "ppca"])
def test_em_log_likelihood_is_the_elbo_of_the_exact_posterior(kind):
    from elbolab import guides

    fam = FactorAnalysis(2, dim=5, kind=kind)
    x, _ = fam.simulate(60, seed=5, dtype=torch.float64)
    algo = fam.em()
    state = _run(algo, x, iters=5)
    fitted = FactorAnalysis(2, kind=kind, params=FAParams(state.W, state.mu, state.psi))
    with isolated(0):
        g = guides.make("exact", fitted, x)
        est = estimate_elbo(fitted.model, g, x, num_particles=20, batch_size=10)
    # the exact posterior makes log p(x, z) - log q(z) = log p(x) in every draw: se ~ 0
    assert algo.objective(x, state) == pytest.approx(est.value, abs=1e-6)
    assert est.se < 1e-8
