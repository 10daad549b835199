"""The mixture of factor analysers (models/mfa.py) against independent computations.

* evidence, the model's joint with (c, z) and its marginal over c: scipy densities at random inputs;
* EM: the exact log likelihood never decreases; K = 1 is factor analysis (scikit-learn's
  FactorAnalysis within 1e-4 nats); on simulated data the fitted log likelihood exceeds the truth's
  by the chi-square amount Wilks's theorem allows (p/2 on average for p free parameters);
* SVI with c summed out by enumeration: ELBO <= the exact evidence, fixed and learned parameters;
* NUTS over z with c enumerated: posterior means match the exact mixture posterior.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, norm
from sklearn.decomposition import FactorAnalysis as SkFA

from elbolab import guides, inference
from elbolab.guides.auto import composed_specs
from elbolab.models.capabilities import (
    ClosedFormCAVI,
    ClosedFormEM,
    ExactEvidence,
    ExactLocalPosterior,
    LocalDensities,
    PointwiseEvidence,
    PyroFamily,
    Simulator,
)
from elbolab.models.fa.model import FactorAnalysis, FAParams
from elbolab.models.mfa.model import MFAParams, MixtureOfFactorAnalysers


def random_params(K=3, d=4, k=2, seed=0, dtype=torch.float64) -> MFAParams:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(K, generator=g, dtype=torch.float64) + 0.2
    return MFAParams(w / w.sum(), torch.randn(K, d, k, generator=g, dtype=torch.float64),
                     2 * torch.randn(K, d, generator=g, dtype=torch.float64),
                     0.2 + torch.rand(d, generator=g, dtype=torch.float64)).to("cpu", dtype)


def scipy_log_evidence(x, p: MFAParams) -> np.ndarray:
    """log sum_j pi_j N(x_n; mu_j, W_j W_j^T + Psi), with scipy's dense Gaussian."""
    x = x.numpy()
    W, mu, psi, pi = p.W.numpy(), p.mu.numpy(), p.psi.numpy(), p.pi.numpy()
    comps = [np.log(pi[j]) + multivariate_normal(mu[j], W[j] @ W[j].T + np.diag(psi)).logpdf(x)
             for j in range(len(pi))]
    return logsumexp(np.stack(comps, -1), axis=-1)


def scipy_joint(x, z, c, p: MFAParams) -> np.ndarray:
    """log p(z_n) + log pi_{c_n} + log N(x_n; W_c z_n + mu_c, diag psi) per point."""
    x, z, c = x.numpy(), z.numpy(), c.numpy()
    W, mu, psi, pi = p.W.numpy(), p.mu.numpy(), p.psi.numpy(), p.pi.numpy()
    loc = np.einsum("ndk,nk->nd", W[c], z) + mu[c]
    return (norm.logpdf(z).sum(-1) + np.log(pi[c])
            + norm.logpdf(x, loc, np.sqrt(psi)).sum(-1))


def test_capabilities_are_the_declared_ones():
    fam = MixtureOfFactorAnalysers(3, 2, params=random_params())
    for cap in (PyroFamily, Simulator, ExactEvidence, PointwiseEvidence, LocalDensities,
                ClosedFormEM):
        assert isinstance(fam, cap), cap.__name__
    for cap in (ClosedFormCAVI, ExactLocalPosterior):
        assert not isinstance(fam, cap), cap.__name__
    assert fam.discrete_sites == ("c",)


def test_exact_evidence_equals_scipy_and_keeps_the_dtype():
    p = random_params()
    fam = MixtureOfFactorAnalysers(3, 2, params=p)
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    lp = fam.log_evidence_pointwise(x)
    np.testing.assert_allclose(lp.numpy(), scipy_log_evidence(x, p), rtol=0, atol=1e-10)
    ev = fam.log_evidence(x)
    assert ev.method == "exact" and ev.se == 0 and ev.n == 40
    assert ev.value == pytest.approx(float(scipy_log_evidence(x, p).sum()), abs=1e-9)
    assert lp.dtype == torch.float64
    assert fam.log_evidence_pointwise(x.float()).dtype == torch.float32


def test_model_joint_with_c_and_z_equals_scipy():
    p = random_params(seed=2)
    fam = MixtureOfFactorAnalysers(3, 2, params=p)
    g = torch.Generator().manual_seed(3)
    n = 25
    x = 2 * torch.randn(n, 4, generator=g, dtype=torch.float64)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    c = torch.randint(3, (n,), generator=g)
    tr = poutine.trace(poutine.condition(fam.model, data={"z": z, "c": c})).get_trace(x)
    tr.compute_log_prob()
    per_point = sum(tr.nodes[s]["log_prob"] for s in ("z", "c", "x"))
    np.testing.assert_allclose(per_point.numpy(), scipy_joint(x, z, c, p), rtol=0, atol=1e-10)


def test_enumerated_model_sums_c_out_to_the_log_joint():
    """TraceEnum_ELBO of the model with z fixed and an empty guide is -sum_n log sum_c p(x, z, c)."""
    p = random_params(seed=4)
    fam = MixtureOfFactorAnalysers(3, 2, params=p)
    g = torch.Generator().manual_seed(5)
    n = 20
    x = 2 * torch.randn(n, 4, generator=g, dtype=torch.float64)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    by_c = np.stack([scipy_joint(x, z, torch.full((n,), j), p) for j in range(3)], -1)
    expected = logsumexp(by_c, axis=-1)
    np.testing.assert_allclose(fam.log_joint(x, z).numpy(), expected, rtol=0, atol=1e-10)
    model = poutine.condition(fam.model, data={"z": z})
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model, lambda x: None, x)
    assert -loss == pytest.approx(float(expected.sum()), abs=1e-8)


def test_em_is_monotone_and_converges():
    fam = MixtureOfFactorAnalysers(3, 2, dim=6)
    x, _ = fam.simulate(200, seed=0)
    r = inference.fit("em", MixtureOfFactorAnalysers(3, 2), x, seed=0, max_iter=3000, tol=1e-8)
    assert r.bound == "log-likelihood" and r.converged, r.message
    steps = np.diff(np.array(r.trace))
    assert steps.min() >= -1e-9 * abs(r.trace[-1])
    assert r.diagnostics["max_decrease"] <= 1e-9 * abs(r.trace[-1])
    # the objective is the exact log likelihood at the fitted parameters
    fitted = MFAParams(*(r.posterior[k] for k in ("pi", "W", "mu", "psi")))
    assert r.elbo == pytest.approx(float(scipy_log_evidence(x, fitted).sum()), abs=1e-7)


def test_one_component_is_factor_analysis():
    g = torch.Generator().manual_seed(0)
    truth = FAParams(1.5 * torch.randn(5, 2, generator=g, dtype=torch.float64),
                     torch.randn(5, generator=g, dtype=torch.float64),
                     0.1 + 0.4 * torch.rand(5, generator=g, dtype=torch.float64))
    x, _ = FactorAnalysis(2, params=truth).simulate(300, seed=1)
    r = inference.fit("em", MixtureOfFactorAnalysers(1, 2), x, seed=0, max_iter=5000, tol=1e-11)
    sk = SkFA(2, tol=1e-12, max_iter=10000).fit(x.numpy())
    assert r.converged, r.message
    assert r.elbo == pytest.approx(sk.score(x.numpy()) * x.shape[0], abs=1e-4)
    C = r.posterior["W"][0] @ r.posterior["W"][0].T + torch.diag(r.posterior["psi"])
    np.testing.assert_allclose(C.numpy(), sk.get_covariance(), atol=1e-4)


def test_simulate_then_em_recovers_the_truth():
    """Wilks: 2 (l(theta_hat) - l(theta_0)) ~ chi2_p, so 0 <= l_hat - l_0 <= p/2 + 4 sqrt(p/2)."""
    K, d, k, n = 2, 5, 1, 2000
    fam = MixtureOfFactorAnalysers(K, k, dim=d)
    x, truth = fam.simulate(n, seed=7)
    ll_truth = float(scipy_log_evidence(x, truth).sum())
    r = inference.fit("em", MixtureOfFactorAnalysers(K, k), x, seed=0, max_iter=3000, tol=1e-9,
                      n_init=3)
    p = (K - 1) + K * (d * k + d) + d
    excess = r.elbo - ll_truth
    assert 0 <= excess <= p / 2 + 4 * math.sqrt(p / 2), excess
    # component covariances, matched by their means
    order = torch.cdist(truth.mu, r.posterior["mu"]).argmin(1)
    fitted = MFAParams(*(r.posterior[k_] for k_ in ("pi", "W", "mu", "psi")))
    C_hat, C = fitted.covariances()[order], truth.covariances()
    assert float(torch.linalg.norm(C_hat - C) / torch.linalg.norm(C)) < 0.15
    np.testing.assert_allclose(r.posterior["pi"][order].numpy(), truth.pi.numpy(), atol=0.05)


def _collapsed(name: str):
    """A composed guide over z, with c left to enumeration (the SVI engine then uses TraceEnum)."""
    return dataclasses.replace(composed_specs()[name], collapsed=True)


def test_svi_with_c_enumerated_bounds_the_exact_evidence():
    p = random_params(K=2, d=4, k=1, seed=8)
    fam = MixtureOfFactorAnalysers(2, 1, params=p)
    x = fam.sample(60, seed=9)
    logz = fam.log_evidence(x).value
    r = inference.fit("svi", fam, x, seed=0, guide=_collapsed("auto-normal"), num_steps=500,
                      lr=0.05, eval_particles=1000)
    assert r.bound == "elbo-collapsed"
    assert r.elbo <= logz + 3 * r.elbo_se
    # q(z_n) is one Gaussian, p(z_n | x_n) a mixture: the gap is > 0 but small per point
    assert (logz - r.elbo) / x.shape[0] < 0.3


def test_svi_learned_parameters_bound_their_own_evidence():
    """A researcher's path: fit with learnable parameters, then reuse the fit after it returns."""
    fam = MixtureOfFactorAnalysers(2, 1, dim=4)
    x, _ = fam.simulate(80, seed=10)
    guide = dataclasses.replace(guides.for_family(fam)["mean-field"],
                                collapsed=True)
    r = inference.fit("svi", MixtureOfFactorAnalysers(2, 1), x, seed=0, guide=guide,
                      num_steps=400, lr=0.05, eval_particles=1000)
    assert set(r.model_params()) == {"pi", "W", "mu", "psi"}
    with r.fitted():
        own = r.state.family.log_evidence(x)
    learned = MFAParams(*(r.model_params()[k] for k in ("pi", "W", "mu", "psi")))
    assert own.value == pytest.approx(float(scipy_log_evidence(x, learned).sum()), abs=1e-8)
    assert r.elbo <= own.value + 3 * r.elbo_se
    assert pyro.get_param_store().keys() == set()  # nothing leaked into the caller's store


@pytest.mark.slow
def test_nuts_over_z_matches_the_exact_mixture_posterior():
    """E[z_n | x_n] = sum_j h_nj m_nj (elbolab.models.mfa.em eqs. 2-3), computed here with numpy."""
    p = random_params(K=2, d=3, k=1, seed=11)
    fam = MixtureOfFactorAnalysers(2, 1, params=p)
    x = fam.sample(4, seed=12)
    r = inference.fit("mcmc", fam, x, seed=0, num_samples=300, warmup=150, num_chains=2,
                      max_tree_depth=4, jit=False)
    W, mu, psi, pi = p.W.numpy(), p.mu.numpy(), p.psi.numpy(), p.pi.numpy()
    xs = x.numpy()
    mean, second = np.zeros(4), np.zeros(4)
    logw = np.stack([np.log(pi[j]) + multivariate_normal(mu[j], W[j] @ W[j].T + np.diag(psi))
                     .logpdf(xs) for j in range(2)], -1)
    h = np.exp(logw - logsumexp(logw, -1, keepdims=True))
    for j in range(2):
        G = 1 / (1 + (W[j, :, 0] ** 2 / psi).sum())
        m = G * ((xs - mu[j]) / psi) @ W[j, :, 0]
        mean += h[:, j] * m
        second += h[:, j] * (G + m**2)
    sd = np.sqrt(second - mean**2)
    draws = r.samples["z"][..., 0].reshape(-1, 4).numpy()
    ess = r.diagnostics["ess_bulk_min"]
    assert ess >= 50 and r.diagnostics["r_hat_max"] < 1.05, r.diagnostics
    np.testing.assert_array_less(np.abs(draws.mean(0) - mean), 4 * sd / math.sqrt(ess))


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="^latent_dim"):
        MixtureOfFactorAnalysers(2, 3, dim=3)
    with pytest.raises(ValueError, match="^psi"):
        MFAParams(torch.tensor([0.5, 0.5]), torch.zeros(2, 3, 1), torch.zeros(2, 3),
                  torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="^pi"):
        MFAParams(torch.tensor([0.5, 0.6]), torch.zeros(2, 3, 1), torch.zeros(2, 3), torch.ones(3))
    fam = MixtureOfFactorAnalysers(3, 2, params=random_params())
    with pytest.raises(ValueError, match="^x"):
        fam.log_evidence(torch.zeros(5, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="^params"):
        MixtureOfFactorAnalysers(2, 1).log_evidence(torch.zeros(5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="^dim"):
        MixtureOfFactorAnalysers(2, 1).simulate(10)
