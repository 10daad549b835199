"""Bayesian GMM (models/gmm.py, guides/gmm.py) against independent references.

References: scipy/numpy brute force over assignments (x | c is Gaussian), a numpy grid integral
of the posterior, scipy.optimize for the MAP, Pyro's Monte Carlo ELBO, and the closed-form
marginal for K = 1. Nothing is compared with the code's own earlier output.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from scipy import optimize, stats
from scipy.special import logsumexp

from elbolab import guides
from elbolab.guides.gmm import build_collapsed, mean_field_guide_from
from elbolab.inference.closed_form import cavi, em
from elbolab.inference.elbo import estimate_elbo
from elbolab.inference.runtime import isolated
from elbolab.models.ascent import AscentSettings, ascend
from elbolab.models.capabilities import BOUNDS, CoordinateAscent, PointwiseEvidence
from elbolab.models.gmm.fit import CaviState, MapState
from elbolab.models.gmm.model import BayesianGMM, label_symmetry_term, sorted_means

# ----------------------------------------------------------------------------- numpy references


def brute_force_log_evidence(x: np.ndarray, K: int, s2: float) -> float:
    """log p(x) = log sum_c K^-n prod_j N(x[:, j]; 0, I + s2 A_c A_c^T), A_c the (n, K) one-hot
    of c: given c, each coordinate of x is jointly Gaussian (independent across coordinates)."""
    n, d = x.shape
    terms = []
    for c in itertools.product(range(K), repeat=n):
        A = np.eye(K)[list(c)]
        cov = np.eye(n) + s2 * A @ A.T
        terms.append(sum(stats.multivariate_normal(np.zeros(n), cov).logpdf(x[:, j]) for j in range(d)))
    return float(logsumexp(terms) - n * math.log(K))


def np_log_joint(x: np.ndarray, mu: np.ndarray, s2: float) -> float:
    """log p(x, mu) = sum log N(mu; 0, s2) + sum_i log sum_k (1/K) N(x_i; mu_k, I)."""
    K = mu.shape[0]
    prior = stats.norm(0, math.sqrt(s2)).logpdf(mu).sum()
    comp = stats.norm(mu[None, :, :], 1.0).logpdf(x[:, None, :]).sum(-1) - math.log(K)
    return float(prior + logsumexp(comp, axis=1).sum())


def data(K, d, n, s2=10.0, seed=0, dtype=torch.float64):
    return BayesianGMM(K, s2, dim=d).simulate(n, seed=seed, dtype=dtype)[0]


# ----------------------------------------------------------------------------- exact evidence


@pytest.mark.parametrize("K,d,n,s2", [(2, 1, 7, 4.0), (3, 2, 5, 10.0), (3, 1, 6, 1.0)])
def test_enumeration_matches_brute_force(K, d, n, s2):
    x = data(K, d, n, s2, seed=n)
    ev = BayesianGMM(K, s2).log_evidence(x, "enumeration")
    assert ev.method == "enumeration" and ev.se == 0.0 and ev.n == n
    assert ev.value == pytest.approx(brute_force_log_evidence(x.numpy(), K, s2), abs=1e-9)


def test_enumeration_single_component_closed_form():
    # K = 1: x[:, j] ~ N(0, I + s2 11^T) exactly
    x = data(1, 2, 9, 3.0, seed=2)
    cov = np.eye(9) + 3.0 * np.ones((9, 9))
    ref = sum(stats.multivariate_normal(np.zeros(9), cov).logpdf(x[:, j].numpy()) for j in range(2))
    for method in ("enumeration", "quadrature", "importance"):
        ev = BayesianGMM(1, 3.0).log_evidence(x, method, num_samples=4000)
        assert ev.value == pytest.approx(ref, abs=1e-6 if method != "importance" else 4 * ev.se)


@pytest.mark.parametrize("K,d,n,s2,seed", [(2, 1, 12, 4.0, 0), (3, 1, 11, 10.0, 1), (2, 2, 10, 4.0, 5)])
def test_quadrature_and_importance_match_enumeration(K, d, n, s2, seed):
    x = data(K, d, n, s2, seed=seed)
    fam = BayesianGMM(K, s2)
    exact = fam.log_evidence(x, "enumeration").value
    quad = fam.log_evidence(x, "quadrature")
    # the quadrature's error indicator must cover its actual error (floor: 1e-3 nats)
    assert abs(quad.value - exact) <= max(2 * quad.se, 1e-3)
    imp = fam.log_evidence(x, "importance", num_samples=10_000, seed=seed)
    # log of a mean of i.i.d. weights: ~ N(log p, se^2) for large ESS (delta method); 4 se
    assert abs(imp.value - exact) <= 4 * imp.se + 1e-4
    assert imp.details["ess"] > 1000


def test_importance_covers_overlapping_clusters():
    # two true means 0.27 apart: the posterior is far from Gaussian and the quadrature flags it
    x = data(3, 1, 14, 10.0, seed=3)
    fam = BayesianGMM(3, 10.0)
    exact = fam.log_evidence(x, "enumeration").value
    quad = fam.log_evidence(x, "quadrature")
    assert abs(quad.value - exact) <= quad.se
    imp = fam.log_evidence(x, "importance", num_samples=10_000)
    assert abs(imp.value - exact) <= 4 * imp.se + 1e-4


def test_quadrature_matches_importance_for_large_n():
    x = data(2, 1, 150, 4.0, seed=4)
    fam = BayesianGMM(2, 4.0)
    quad = fam.log_evidence(x, "quadrature")
    imp = fam.log_evidence(x, "importance", num_samples=10_000)
    assert quad.se < 1e-3
    assert abs(quad.value - imp.value) <= 4 * imp.se + quad.se
    auto = fam.log_evidence(x)
    assert auto.method == "quadrature" and auto.value == quad.value


def test_auto_method():
    fam = BayesianGMM(3, 10.0)
    assert fam.log_evidence(data(3, 1, 8)).method == "enumeration"
    big = fam.log_evidence(data(3, 2, 40), num_samples=2000)
    assert big.method == "importance" and big.se > 0


# ----------------------------------------------------------------------------- exact posterior


def test_exact_sorted_posterior_moments_match_grid_integral():
    # K = 2, d = 1: p(mu | x) on a 1201 x 1201 grid over [-12, 12]^2 (6 prior sd), numpy only
    s2 = 4.0
    x = data(2, 1, 8, s2, seed=6)
    xs = x.numpy()[:, 0]
    g = np.linspace(-12, 12, 1201)
    m1, m2 = np.meshgrid(g, g, indexing="ij")
    logf = stats.norm(0, 2.0).logpdf(m1) + stats.norm(0, 2.0).logpdf(m2)
    for xi in xs:
        logf += np.logaddexp(stats.norm(m1, 1).logpdf(xi), stats.norm(m2, 1).logpdf(xi))
    w = np.exp(logf - logf.max())
    w /= w.sum()
    lo, hi = np.minimum(m1, m2), np.maximum(m1, m2)
    ref_mean = np.array([(w * lo).sum(), (w * hi).sum()])
    ref_sd = np.sqrt(np.array([(w * lo**2).sum(), (w * hi**2).sum()]) - ref_mean**2)
    out = BayesianGMM(2, s2).exact_invariant_moments(x, num_samples=200_000, seed=1)["mu_sorted"]
    assert out.mean.dtype == torch.float64 and out.mean.shape == (2, 1)
    assert out.num_samples == 200_000
    # Monte Carlo error of the draws from the exact mixture (4 se) + grid error (1e-3)
    assert np.all(np.abs(out.mean[:, 0].numpy() - ref_mean) <= 4 * out.mean_se[:, 0].numpy() + 1e-3)
    assert np.all(np.abs(out.sd[:, 0].numpy() - ref_sd) <= 4 * out.sd_se[:, 0].numpy() + 1e-3)


# ----------------------------------------------------------------------------- EM


def test_em_monotone_float64_and_objective_is_log_joint():
    x = data(3, 2, 80, seed=7)
    fam = BayesianGMM(3, 10.0)
    r = em.fit(fam, x, AscentSettings(n_init=3, max_iter=300), seed=0)
    assert r.bound == "log-joint-map" and r.dtype == "float64"
    assert r.diagnostics["max_decrease"] <= 1e-9 * abs(r.elbo)
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(r.trace, r.trace[1:]))
    assert r.posterior["mu"].dtype == torch.float64
    assert r.elbo == pytest.approx(np_log_joint(x.numpy(), r.posterior["mu"].numpy(), 10.0), abs=1e-8)
    # float32 in -> float32 out
    r32 = em.fit(fam, x.float(), AscentSettings(max_iter=50), seed=0)
    assert r32.dtype == "float32" and r32.posterior["mu"].dtype == torch.float32


def test_em_map_matches_scipy_optimize():
    s2 = 4.0
    x = data(2, 2, 40, s2, seed=8).numpy()
    fam = BayesianGMM(2, s2)
    r = em.fit(fam, x, AscentSettings(n_init=10, max_iter=2000, tol=1e-12), seed=0)
    rng = np.random.default_rng(0)
    best = None
    for _ in range(15):
        start = x[rng.choice(len(x), 2, replace=False)].ravel()
        res = optimize.minimize(lambda v: -np_log_joint(x, v.reshape(2, 2), s2), start, method="BFGS")
        if best is None or res.fun < best.fun:
            best = res
    assert r.elbo == pytest.approx(-best.fun, abs=1e-6)
    em_mu = sorted_means(r.posterior["mu"]).numpy()
    ref_mu = sorted_means(torch.as_tensor(best.x.reshape(2, 2))).numpy()
    np.testing.assert_allclose(em_mu, ref_mu, atol=1e-4)


# ----------------------------------------------------------------------------- CAVI


def test_cavi_monotone_and_below_exact_evidence():
    x = data(3, 1, 12, seed=9)
    fam = BayesianGMM(3, 10.0)
    r = cavi.fit(fam, x, AscentSettings(n_init=4), seed=0)
    assert r.bound == "elbo" and r.guide == "mean-field" and r.dtype == "float64"
    assert r.diagnostics["max_decrease"] <= 1e-9 * abs(r.elbo)
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(r.trace, r.trace[1:]))
    assert all(v.dtype == torch.float64 for v in r.posterior.values())
    exact = fam.log_evidence(x, "enumeration").value
    assert isinstance(exact, float) and r.elbo <= exact
    r32 = cavi.fit(fam, x.float(), AscentSettings(max_iter=50), seed=0)
    assert r32.dtype == "float32" and all(v.dtype == torch.float32 for v in r32.posterior.values())
    assert label_symmetry_term(3) == pytest.approx(math.log(6))


def np_elbo(x, m, s2, phi, s2p):
    """Mean-field ELBO written from its definition, term by term (numpy)."""
    n, d = x.shape
    K = m.shape[0]
    e_mu2 = (m**2).sum(1) + d * s2  # E ||mu_k||^2
    e_log_prior = np.sum(-0.5 * d * np.log(2 * np.pi * s2p) - e_mu2 / (2 * s2p))
    e_log_pc = -n * np.log(K)
    e_sq = (x**2).sum(1)[:, None] - 2 * x @ m.T + e_mu2[None]  # E ||x_i - mu_k||^2
    e_log_lik = np.sum(phi * (-0.5 * d * np.log(2 * np.pi) - 0.5 * e_sq))
    entropy_mu = np.sum(0.5 * d * (1 + np.log(2 * np.pi * s2)))
    entropy_c = -np.sum(phi * np.log(np.where(phi > 0, phi, 1.0)))
    return e_log_prior + e_log_pc + e_log_lik + entropy_mu + entropy_c


def test_cavi_fixed_point_is_stationary():
    # at CAVI's fixed point the ELBO's gradient in (m, log s2, logits of phi) vanishes
    # (central differences on the numpy ELBO, step 1e-5: error ~ 1e-14/1e-5 + 1e-10 ~ 1e-9)
    s2p = 10.0
    x = data(2, 1, 25, s2p, seed=14)
    fam = BayesianGMM(2, s2p)
    r = cavi.fit(fam, x, AscentSettings(max_iter=5000, tol=1e-14), seed=0)
    xs = x.numpy()
    m, s2, phi = (getattr(r.state, k).numpy() for k in ("m", "s2", "phi"))
    assert fam.cavi().objective(x, r.state) == pytest.approx(np_elbo(xs, m, s2, phi, s2p), abs=1e-9)
    logits = np.log(phi)
    theta = np.concatenate([m.ravel(), np.log(s2), logits.ravel()])

    def f(t):
        mm, ls, lg = t[:2].reshape(2, 1), t[2:4], t[4:].reshape(-1, 2)
        p = np.exp(lg - lg.max(1, keepdims=True))
        return np_elbo(xs, mm, np.exp(ls), p / p.sum(1, keepdims=True), s2p)

    eye = np.eye(len(theta)) * 1e-5
    grad = np.array([(f(theta + e) - f(theta - e)) / 2e-5 for e in eye])
    assert np.abs(grad).max() < 1e-6


def _cavi_states(fam, x):
    """The CAVI optimum and a diffuse state after one sweep from the init (phi far from one-hot)."""
    r = cavi.fit(fam, x, AscentSettings(n_init=3), seed=0)
    algo = fam.cavi()
    init = algo.init(x, torch.Generator().manual_seed(1))
    init = dataclasses.replace(init, s2=torch.full_like(init.s2, 4.0))
    return [r.state, algo.step(x, init)]


def test_cavi_closed_form_elbo_equals_pyro_monte_carlo():
    # overlapping clusters (s2 = 1) so q(c) is not one-hot and the Monte Carlo ELBO varies
    x = data(3, 2, 40, 1.0, seed=10)
    fam = BayesianGMM(3, 1.0)
    for state in _cavi_states(fam, x):
        closed = fam.cavi().objective(x, state)
        with isolated(0):
            # c sampled from q(c) (Trace_ELBO): batch means are i.i.d., so by the CLT the estimate
            # is ~ N(ELBO, se^2); |diff| <= 3 se fails with probability 0.27% if the forms agree
            mc = estimate_elbo(
                fam.model, mean_field_guide_from(state, enumerate_c=False), x,
                num_particles=4000, batch_size=200,
            )
            # c summed over q(c) in the guide (TraceEnum_ELBO): the same mean-field ELBO
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                en = estimate_elbo(
                    fam.model, mean_field_guide_from(state), x,
                    num_particles=1000, batch_size=100, collapsed=True,
                )
        # (+ 1e-10 relative for rounding: at the CAVI optimum q(mu) ∝ exp E_q(c) log p(x, c, mu),
        # so the enumerated estimator has zero variance)
        assert abs(mc.value - closed) <= 3 * mc.se + 1e-10 * abs(closed), (mc, closed)
        assert abs(en.value - closed) <= 3 * en.se + 1e-10 * abs(closed), (en, closed)


# ----------------------------------------------------------------------------- model and guides


def test_model_density_matches_scipy():
    # the Pyro model at mu0 with c enumerated: log p(mu0) + sum_i logsumexp_c [log p(c) + log p(x_i|c)]
    x = data(3, 2, 30, seed=11)
    fam = BayesianGMM(3, 10.0)
    mu0 = torch.tensor([[-1.0, 0.5], [2.0, 2.0], [0.0, -3.0]], dtype=torch.float64)
    model = poutine.enum(poutine.condition(fam.model, data={"mu": mu0}), first_available_dim=-2)
    tr = poutine.trace(model).get_trace(x)
    tr.compute_log_prob()
    assert tr.nodes["c"]["value"].shape == (3, 1) and tr.nodes["mu"]["value"].shape == (3, 2)
    joint = tr.nodes["c"]["log_prob"] + tr.nodes["obs"]["log_prob"]  # (3 values of c, 30 points)
    value = tr.nodes["mu"]["log_prob"].sum() + torch.logsumexp(joint, 0).sum()
    ref = np_log_joint(x.numpy(), mu0.numpy(), 10.0)
    assert float(value) == pytest.approx(ref, abs=1e-9)
    # mcmc_model sums c out in closed form: the same density
    tr = poutine.trace(poutine.condition(fam.mcmc_model, data={"mu": mu0})).get_trace(x)
    assert float(tr.log_prob_sum()) == pytest.approx(ref, abs=1e-9)
    # the family's log_joint (eq. 5) and its per-point likelihood are that same density
    assert float(fam.log_joint(x, mu0)) == pytest.approx(ref, abs=1e-9)
    tr.compute_log_prob()
    np.testing.assert_allclose(
        fam.log_likelihood(x, mu0).numpy(), tr.nodes["obs"]["log_prob"].numpy(), atol=1e-12
    )
    # batched over draws of mu: (S, K, d) -> (S,), each the scipy value
    mus = torch.stack([mu0, mu0 + 1.0])
    np.testing.assert_allclose(
        fam.log_joint(x, mus).numpy(),
        [np_log_joint(x.numpy(), m.numpy(), 10.0) for m in mus],
        atol=1e-9,
    )


@pytest.mark.parametrize("name", ["mean-field", "collapsed", "auto-normal", "auto-mvn"])
def test_guides_run_with_pyro_svi(name):
    x = data(2, 2, 30, seed=12)
    fam = BayesianGMM(2, 10.0)
    spec = guides.for_family(fam)[name]
    assert guides.default_for(fam) in guides.for_family(fam)
    loss_cls = pyro.infer.TraceEnum_ELBO if spec.collapsed else pyro.infer.Trace_ELBO
    with isolated(0), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # torch's Adam takes no sparse gradients: the mean-field guide's minibatch steps need
        # sparse_grad=False with it (the engine's LazyClippedAdam takes them)
        opts = {"sparse_grad": False} if name == "mean-field" else {}
        guide = spec.build(fam, x, seed=0, **opts)
        svi = pyro.infer.SVI(fam.model, guide, pyro.optim.Adam({"lr": 0.05}),
                             loss_cls(max_plate_nesting=1, num_particles=2, vectorize_particles=True))
        losses = [svi.step(x) for _ in range(20)] + [svi.step(x, subsample_size=10) for _ in range(5)]
        params = dict(pyro.get_param_store().items())
        est = estimate_elbo(fam.model, guide, x, num_particles=50, batch_size=25, collapsed=spec.collapsed)
    assert all(math.isfinite(v) for v in losses) and math.isfinite(est.value)
    assert all(p.dtype == torch.float64 for p in params.values())
    # any guide's ELBO (collapsed or not) is below log p(x); quadrature is checked against brute
    # force enumeration above, its se is an error indicator (< 0.01 nats)
    logz = fam.log_evidence(x, "quadrature")
    assert est.value <= logz.value + 3 * est.se + logz.se, (est.value, est.se, logz.value)


# ----------------------------------------------------------------------------- the contract


def test_capabilities_declared():
    fam = BayesianGMM(2, 1.0)
    assert set(fam.capabilities()) == {
        "PyroFamily", "Simulator", "ExactEvidence", "ExactInvariantPosterior", "ClosedFormEM",
        "ClosedFormCAVI", "McmcModel", "PosteriorInvariants", "PointwiseLogLikelihood",
        "BatchedPotential", "CompiledPotential",
    }
    # mu is global: log p(x) does not split into per-point terms
    assert not isinstance(fam, PointwiseEvidence)
    for old in ("guides", "default_guide", "em_init", "em_step", "em_objective", "em_posterior",
                "em_bound", "em_guide_name", "cavi_init", "cavi_step", "cavi_objective",
                "cavi_posterior", "cavi_bound", "cavi_guide_name", "mcmc_invariants",
                "exact_posterior", "exact_posterior_sorted_moments"):
        assert not hasattr(fam, old), old
    assert fam.mcmc_init(data(2, 1, 5)) is None
    for algo, bound, guide in ((fam.em(), "log-joint-map", "map"),
                               (fam.cavi(), "elbo", "mean-field")):
        assert isinstance(algo, CoordinateAscent)
        assert (algo.bound, algo.guide) == (bound, guide) and bound in BOUNDS
    assert guides.default_for(fam) == "mean-field"
    assert set(guides.for_family(fam)) == {"mean-field", "collapsed", "auto-normal", "auto-mvn"}


def test_em_algorithm_with_ascend_reaches_scipy_map():
    # the algorithm object alone, run by the shared loop: typed state, monotone, MAP of eq. 5
    s2 = 4.0
    x = data(2, 2, 40, s2, seed=8)
    algo = BayesianGMM(2, s2).em()
    run = ascend(lambda g: algo.init(x, g), lambda st: algo.step(x, st),
                 lambda st: algo.objective(x, st), x.shape[0],
                 AscentSettings(n_init=10, max_iter=2000, tol=1e-12))
    assert isinstance(run.state, MapState) and run.converged
    assert run.max_decrease <= 1e-9 * abs(run.trace[-1])
    xs = x.numpy()
    assert run.trace[-1] == pytest.approx(np_log_joint(xs, run.state.mu.numpy(), s2), abs=1e-9)
    res = min(
        (optimize.minimize(lambda v: -np_log_joint(xs, v.reshape(2, 2), s2), xs[[i, j]].ravel(),
                           method="BFGS") for i, j in [(0, 1), (0, 39), (5, 20), (10, 30)]),
        key=lambda r: r.fun,
    )
    assert run.trace[-1] == pytest.approx(-res.fun, abs=1e-6)
    post = algo.posterior(x, run.state)
    np.testing.assert_allclose(post["responsibilities"].sum(-1).numpy(), 1.0)


def test_cavi_algorithm_with_ascend_matches_numpy_elbo_and_bound():
    s2p = 10.0
    x = data(3, 1, 8, s2p, seed=9)  # 3^8 assignments for the brute-force evidence
    fam = BayesianGMM(3, s2p)
    algo = fam.cavi()
    run = ascend(lambda g: algo.init(x, g), lambda st: algo.step(x, st),
                 lambda st: algo.objective(x, st), x.shape[0], AscentSettings(n_init=4))
    st = run.state
    assert isinstance(st, CaviState) and run.converged
    assert run.max_decrease <= 1e-9 * abs(run.trace[-1])
    ref = np_elbo(x.numpy(), st.m.numpy(), st.s2.numpy(), st.phi.numpy(), s2p)
    assert run.trace[-1] == pytest.approx(ref, abs=1e-9)
    assert run.trace[-1] <= brute_force_log_evidence(x.numpy(), 3, s2p)
    # eqs. 7-8 at the fixed point: s2_k = 1 / (1/s2 + sum_i phi_ik), m_k = s2_k sum_i phi_ik x_i
    lam = 1 / s2p + st.phi.sum(0)
    np.testing.assert_allclose(st.s2.numpy(), (1 / lam).numpy(), rtol=1e-6)
    np.testing.assert_allclose(st.m.numpy(), ((st.phi.T @ x) / lam[:, None]).numpy(), atol=1e-6)


def test_guides_take_a_typed_cavi_state():
    x = data(2, 1, 10, seed=1)
    fam = BayesianGMM(2, 10.0)
    st = fam.cavi().init(x, torch.Generator().manual_seed(0))
    with isolated(0):
        tr = poutine.trace(mean_field_guide_from(st)).get_trace(x)
    np.testing.assert_allclose(tr.nodes["mu"]["fn"].base_dist.loc.numpy(), st.m.numpy())
    with pytest.raises(TypeError, match="^state: expected a elbolab.models.gmm.fit.CaviState"):
        mean_field_guide_from({"m": st.m, "s2": st.s2, "phi": st.phi})
    with pytest.raises(TypeError, match="^init: expected a elbolab.models.gmm.fit.CaviState"):
        build_collapsed(fam, x, init={"m": st.m})


# ----------------------------------------------------------------------------- MCMC hooks


def test_pointwise_log_likelihood_and_invariants():
    x = data(3, 2, 15, seed=13)
    fam = BayesianGMM(3, 10.0)
    mu = torch.randn(2, 4, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ll = fam.pointwise_log_likelihood({"mu": mu}, x)
    assert ll.shape == (2, 4, 15) and ll.dtype == torch.float64
    comp = stats.norm(mu.numpy()[:, :, None], 1).logpdf(x.numpy()[None, None, :, None, :]).sum(-1)
    np.testing.assert_allclose(ll.numpy(), logsumexp(comp, -1) - math.log(3), atol=1e-10)
    inv = fam.posterior_invariants({"mu": mu.numpy()}, x)
    assert inv["mu_sorted"].shape == (2, 4, 3, 2)
    assert (inv["mu_sorted"][..., 1:, 0] >= inv["mu_sorted"][..., :-1, 0]).all()
    np.testing.assert_allclose(inv["log_likelihood"].numpy(), ll.sum(-1).numpy())


def test_simulate_seeded_and_typed():
    fam = BayesianGMM(4, 2.0, dim=3)
    x1, t1 = fam.simulate(50, seed=3, dtype=torch.float32)
    x2, _ = fam.simulate(50, seed=3, dtype=torch.float32)
    assert torch.equal(x1, x2) and x1.shape == (50, 3) and x1.dtype == torch.float32
    assert t1["mu"].shape == (4, 3) and t1["c"].shape == (50,)
    assert not torch.equal(x1, fam.simulate(50, seed=4, dtype=torch.float32)[0])


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,field,exc",
    [
        ({"K": 0}, "K", ValueError),
        ({"K": 1.5}, "K", TypeError),
        ({"prior_var": 0.0}, "prior_var", ValueError),
        ({"prior_var": -1.0}, "prior_var", ValueError),
        ({"prior_var": math.inf}, "prior_var", ValueError),
        ({"prior_var": math.nan}, "prior_var", ValueError),
        ({"dim": 0}, "dim", ValueError),
    ],
)
def test_bad_hyperparameters_name_the_field(kwargs, field, exc):
    with pytest.raises(exc, match=f"^{field}"):
        BayesianGMM(**kwargs)


@pytest.mark.parametrize(
    "x",
    [
        np.array([[0.0, np.nan], [1.0, 2.0]]),
        np.array([[0.0, np.inf], [1.0, 2.0]]),
        np.zeros((0, 2)),
        np.zeros((2, 2, 2)),
        np.zeros((4, 3)),  # dim mismatch (family has dim=2)
    ],
)
def test_bad_data_names_the_field(x):
    fam = BayesianGMM(2, 1.0, dim=2)
    with pytest.raises(ValueError, match="^x"):
        fam.check_data(x)
    with pytest.raises(ValueError, match="^x"):
        em.fit(fam, x)


def test_one_dimensional_input_and_bad_method():
    fam = BayesianGMM(2, 1.0)
    assert fam.check_data(np.arange(5.0)).shape == (5, 1)
    with pytest.raises(ValueError, match="^method"):
        fam.log_evidence(np.arange(5.0), "magic")
    with pytest.raises(ValueError, match="^max_assignments"):
        fam.log_evidence(np.arange(30.0), "enumeration")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_everything_runs_on_cuda():
    x = data(3, 1, 10, seed=15).cuda()
    fam = BayesianGMM(3, 10.0)
    cpu = fam.log_evidence(x.cpu(), "enumeration").value
    assert fam.log_evidence(x, "enumeration").value == pytest.approx(cpu, abs=1e-9)
    for method in ("quadrature", "importance"):
        assert math.isfinite(fam.log_evidence(x, method, num_samples=2000).value)
    assert fam.exact_invariant_moments(x, num_samples=1000)["mu_sorted"].mean.is_cuda
    for engine in (em, cavi):
        r = engine.fit(fam, x, AscentSettings(max_iter=20), seed=0)
        assert r.device.startswith("cuda") and all(v.is_cuda for v in r.posterior.values())
    for name, spec in guides.for_family(fam).items():
        with isolated(0), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            guide = spec.build(fam, x, seed=0)
            est = estimate_elbo(fam.model, guide, x, num_particles=20, batch_size=10,
                                collapsed=spec.collapsed)
        assert math.isfinite(est.value), name
    mu = torch.randn(2, 3, 3, 1, dtype=x.dtype, device=x.device)
    assert fam.pointwise_log_likelihood({"mu": mu}, x).is_cuda
