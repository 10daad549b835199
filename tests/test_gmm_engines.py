"""The four engines on the Bayesian GMM, through ``elbolab.inference.fit``, against exact answers.

References, none of them the engines' own output: the exact log evidence by enumerating the K^n
assignments (itself checked against scipy in tests/test_gmm.py), a scipy brute force over
assignments with Clark's (1961) closed-form moments of the min/max of two Gaussians for the
sorted-mean posterior, and the label-symmetry term log K!.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from pyro import poutine
from pyro.poutine.subsample_messenger import _Subsample
from scipy import stats
from scipy.special import logsumexp

from elbolab import guides, inference
from elbolab.guides.gmm import build_collapsed, mean_field_guide_from
from elbolab.inference import mcmc, svi
from elbolab.inference.closed_form import cavi, em
from elbolab.inference.elbo import estimate_elbo
from elbolab.inference.runtime import isolated
from elbolab.models.gmm.model import BayesianGMM

GUIDES = ("mean-field", "collapsed", "auto-normal", "auto-mvn")
COLLAPSED = ("collapsed", "auto-normal", "auto-mvn")

#: Optimization tolerance (nats) for "SVI reached the optimum of its family". Adam ends at
#: lr = 0.2 * 0.005 = 0.001 with 4-particle gradient noise, which leaves the parameters jittering
#: about the optimum, and the mean-field q(c) logits need ~20 units of travel for points whose
#: cluster changes from the start. Over fit seeds 0-9 on these data, |ELBO - optimum| - 3 se was at
#: most 0.01 nats (0.02 leaves a margin), while a wrong mode or a wrong bound is off by > 0.5 nats.
OPT_TOL = 0.02

SVI_FAST = svi.Settings(
    num_steps=500,
    lr=0.2,
    lr_decay=0.005,
    num_particles=4,
    eval_particles=4000,
    eval_batch=1000,
    num_posterior_samples=20,
)
ASCENT = cavi.Settings(max_iter=2000, tol=1e-12, n_init=5)


def separated() -> tuple[BayesianGMM, torch.Tensor]:
    """K = 3 clusters of 3 points at -8, 0, 8 (unit noise): the K! label modes of p(mu | x) are
    ~14 posterior sds apart and the partition is nearly certain (the other partitions hold
    eps = 2.9e-5 of the posterior mass, by enumeration)."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([c + torch.randn(3, 1, generator=g, dtype=torch.float64) for c in (-8, 0, 8)])
    return BayesianGMM(3, 25.0), x


def overlapping() -> tuple[BayesianGMM, torch.Tensor]:
    """K = 2, n = 10 points from the prior with s2 = 4: clusters overlap, c is uncertain."""
    fam = BayesianGMM(2, 4.0, dim=1)
    return fam, fam.simulate(10, seed=3)[0]


DATA = {"separated": separated, "overlapping": overlapping}


@pytest.fixture(scope="module")
def fits():
    """Exact evidence, CAVI and the four SVI guides on both data sets (each fit once)."""
    out = {}
    for name, make in DATA.items():
        fam, x = make()
        ev = fam.log_evidence(x)
        assert ev.method == "enumeration" and ev.se == 0.0
        runs = {"cavi": inference.fit("cavi", fam, x, ASCENT, seed=0)}
        for g in GUIDES:
            runs[g] = inference.fit("svi", fam, x, SVI_FAST, seed=0, guide=g)
        out[name] = (fam, x, ev, runs)
    return out


# ----------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("data", DATA)
def test_every_elbo_is_below_the_exact_evidence(fits, data):
    # ELBO <= log p(x) (Jensen). The estimate is the mean of i.i.d. batch means, ~N(ELBO, se^2)
    # by the CLT, so P(estimate > log p(x) + 3 se) <= 0.0013 for a valid bound. CAVI's ELBO is
    # closed form (se = 0): a float64 rounding allowance only.
    fam, x, ev, runs = fits[data]
    for name, r in runs.items():
        assert r.bound == ("elbo-collapsed" if name in COLLAPSED else "elbo"), name
        assert r.elbo <= ev.value + 3 * r.elbo_se + 1e-9, (name, r.elbo, ev.value)
        if r.engine == "svi":  # high precision, so the bound check has teeth
            assert r.elbo_se < 0.02 and r.diagnostics["eval_particles"] >= 4000, name
        row = r.to_row(ev)
        assert row["gap"] == pytest.approx(ev.value - r.elbo)


@pytest.mark.parametrize("data", DATA)
def test_svi_mean_field_reaches_the_cavi_optimum(fits, data):
    # Same family, same bound: SVI (TraceEnum over q(c), Monte Carlo over q(mu)) and CAVI
    # (closed-form coordinate ascent, 5 restarts) must reach the same ELBO when they find the same
    # mode; both data sets have one dominant mode up to relabelling. Error = 3 se + OPT_TOL.
    _, _, _, runs = fits[data]
    r, c = runs["mean-field"], runs["cavi"]
    assert c.converged and r.bound == c.bound == "elbo"
    assert abs(r.elbo - c.elbo) <= 3 * r.elbo_se + OPT_TOL, (r.elbo, c.elbo)


def test_collapsed_bound_is_tighter_than_the_mean_field_bound(fits):
    # For any fixed q(mu), with q(c) at its optimum the mean-field ELBO has
    # sum_i log sum_k pi_k exp(E_q log N(x_i; mu_k, 1)) where the collapsed bound has
    # sum_i E_q log sum_k pi_k N(x_i; mu_k, 1): the latter is larger by Jensen (log-sum-exp is
    # convex). So (a) collapsed(q_CAVI(mu)) >= ELBO_CAVI, and (b) the collapsed optimum >= that.
    fam, x, ev, runs = fits["overlapping"]
    c = runs["cavi"]
    with isolated(0):
        guide = build_collapsed(fam, x, init=c.state)
        est = estimate_elbo(
            fam.model, guide, x, num_particles=4000, batch_size=1000, collapsed=True
        )
    assert est.bound == "elbo-collapsed"
    assert c.elbo <= est.value + 3 * est.se
    assert est.value <= ev.value + 3 * est.se
    for g in COLLAPSED:
        r = runs[g]
        assert r.elbo >= est.value - 3 * (r.elbo_se + est.se) - OPT_TOL, (g, r.elbo, est.value)


def test_collapsed_gap_is_log_K_factorial_for_separated_clusters(fits):
    # p(mu | x) = (1/K!) sum_pi g(mu_pi) with g the posterior given the (certain) partition: a
    # product of N(S_k / lam_k, 1 / lam_k) (conjugate), which lies in every guide family here.
    # With the K! copies separated, KL(q || p(mu | x)) = log K! + KL(q || g) + O(eps), whose
    # minimum is log K!: collapsed gap = log K! within 3 se + OPT_TOL. CAVI's q(mu) q(c) can match
    # g(mu) delta(c = c*) exactly, so its gap is log K! - log(K! p(c* | x)) = log K! + eps
    # (eps = 2.9e-5, see `separated`); CAVI converges to 1e-12/datum, hence the 1e-3 tolerance.
    fam, x, ev, runs = fits["separated"]
    log_kf = math.lgamma(fam.K + 1)
    assert ev.value - runs["cavi"].elbo == pytest.approx(log_kf, abs=1e-3)
    for g in COLLAPSED:
        r = runs[g]
        assert abs(ev.value - r.elbo - log_kf) <= 3 * r.elbo_se + OPT_TOL, (g, ev.value - r.elbo)


def test_cavi_elbo_matches_plain_monte_carlo(fits):
    # The closed-form ELBO (eq. 9) against Pyro's Trace_ELBO sampling both mu and c from CAVI's q:
    # equal within 4 standard errors (false-alarm rate 6e-5).
    fam, x, _, runs = fits["overlapping"]
    c = runs["cavi"]
    with isolated(1):
        q = mean_field_guide_from(c.state, enumerate_c=False)
        est = estimate_elbo(fam.model, q, x, num_particles=20_000, batch_size=2000)
    assert abs(est.value - c.elbo) <= 4 * est.se, (est.value, est.se, c.elbo)


def test_em_objective_is_no_bound():
    fam, x = overlapping()
    r = inference.fit("em", fam, x, em.Settings(n_init=3), seed=0)
    assert r.bound == "log-joint-map"
    assert math.isnan(r.to_row(fam.log_evidence(x))["gap"])


# ----------------------------------------------------------------------------- NUTS


def sorted_moments_k2(x: np.ndarray, s2: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact posterior mean and sd of (min(mu), max(mu)) for K = 2, d = 1, by brute force.

    p(c | x) ∝ N(x; 0, I + s2 A_c A_c^T) (scipy, A_c one-hot of c); given c the two means are
    independent N(S_k / lam_k, 1 / lam_k), lam_k = 1/s2 + n_k, and for independent normals
    X ~ N(a, va), Y ~ N(b, vb), t = sqrt(va + vb), al = (a - b) / t (Clark 1961):
    E max = a Phi(al) + b Phi(-al) + t phi(al),
    E max^2 = (a^2 + va) Phi(al) + (b^2 + vb) Phi(-al) + (a + b) t phi(al);
    min = X + Y - max and min^2 = X^2 + Y^2 - max^2.
    """
    n = len(x)
    logw, m1, m2 = [], [], []
    for c in itertools.product(range(2), repeat=n):
        A = np.eye(2)[list(c)]
        logw.append(stats.multivariate_normal(np.zeros(n), np.eye(n) + s2 * A @ A.T).logpdf(x))
        lam = 1 / s2 + A.sum(0)
        a, b = (A.T @ x) / lam
        va, vb = 1 / lam
        t = math.sqrt(va + vb)
        al = (a - b) / t
        P, Q, f = stats.norm.cdf(al), stats.norm.cdf(-al), stats.norm.pdf(al)
        emax = a * P + b * Q + t * f
        emax2 = (a * a + va) * P + (b * b + vb) * Q + (a + b) * t * f
        m1.append([a + b - emax, emax])
        m2.append([a * a + va + b * b + vb - emax2, emax2])
    w = np.exp(np.array(logw) - logsumexp(logw))
    mean = w @ np.array(m1)
    return mean, np.sqrt(w @ np.array(m2) - mean**2)


def check_nuts(r, mean, sd, mean_se, z=4.0):
    """|NUTS mean - exact| <= z sqrt(sd^2 / ESS + mean_se^2): the NUTS mean's Monte Carlo error
    is sd / sqrt(ESS) (ESS: the smallest bulk ESS over the invariants, conservative), the
    reference's own error mean_se; z = 4 gives a false-alarm rate of 6e-5 per component."""
    ess = r.diagnostics["ess_bulk_min"]
    draws = r.samples["mu_sorted"].flatten(0, 1)[..., 0].double().numpy()  # (S, K) for d = 1
    tol = z * np.sqrt(sd**2 / ess + mean_se**2)
    assert np.all(np.abs(draws.mean(0) - mean) <= tol), (draws.mean(0), mean, tol, ess)
    # sd by the delta method: se(sd_hat) ~ sqrt(m4 - sd^4) / (2 sd sqrt(ESS)), m4 from the draws
    m4 = ((draws - draws.mean(0)) ** 4).mean(0)
    sd_tol = z * np.sqrt((m4 - sd**4).clip(min=0) / (4 * sd**2 * ess))
    assert np.all(np.abs(draws.std(0, ddof=1) - sd) <= sd_tol + 1e-12), (draws.std(0), sd)


class OnlyMcmcModel(BayesianGMM):
    """The GMM whose enumerated ``model`` must not be used by NUTS (it has ``mcmc_model``)."""

    def model(self, x, subsample_size=None):
        raise AssertionError("NUTS ran family.model; it should prefer family.mcmc_model")


@pytest.mark.parametrize(
    "settings,rhat",
    [
        (mcmc.Settings(num_samples=400, warmup=200, num_chains=2), 1.05),
        pytest.param(
            mcmc.Settings(num_samples=2000, warmup=500, num_chains=4),
            1.01,
            marks=pytest.mark.slow,
        ),
    ],
)
def test_nuts_matches_exact_sorted_posterior_k2(settings, rhat):
    fam, x = overlapping()
    mean, sd = sorted_moments_k2(x[:, 0].numpy(), fam.prior_var)
    r = inference.fit("mcmc", OnlyMcmcModel(2, fam.prior_var), x, settings, seed=0)
    shape = (settings.num_chains, settings.num_samples, 2, 1)
    assert r.bound == "none" and r.samples["mu"].shape == shape
    assert r.diagnostics["r_hat_max"] < rhat
    assert r.diagnostics["divergences"] <= 0.01 * settings.num_chains * settings.num_samples
    check_nuts(r, mean, sd, mean_se=0.0)
    # the exact-moment hook of the family agrees with the brute force (both exact)
    ex = fam.exact_invariant_moments(x, num_samples=200_000)["mu_sorted"]
    assert np.allclose(ex.mean[:, 0].numpy(), mean, atol=5 * ex.mean_se.max().item())


@pytest.mark.slow
def test_nuts_matches_exact_sorted_posterior_k3():
    fam = BayesianGMM(3, 10.0, dim=1)
    x = fam.simulate(12, seed=2)[0]
    ex = fam.exact_invariant_moments(x, num_samples=400_000, seed=1)["mu_sorted"]
    r = inference.fit("mcmc", fam, x, mcmc.Settings(num_samples=2000, warmup=500), seed=0)
    assert r.diagnostics["r_hat_max"] < 1.01
    check_nuts(r, ex.mean[:, 0].numpy(), ex.sd[:, 0].numpy(), ex.mean_se[:, 0].numpy())


# ----------------------------------------------------------------------------- dtype


TINY_SVI = svi.Settings(num_steps=5, eval_particles=4, eval_batch=2, num_posterior_samples=3)
RUNS = [
    ("em", None, em.Settings(max_iter=20)),
    ("cavi", None, cavi.Settings(max_iter=20)),
    *[("svi", g, TINY_SVI) for g in GUIDES],
    ("mcmc", None, mcmc.Settings(num_samples=5, warmup=5, num_chains=1, jit=False)),
]


def _tensors(d: dict):
    for k, v in d.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            yield k, v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "engine,guide,settings", RUNS, ids=lambda v: v if isinstance(v, str) else ""
)
def test_dtype_follows_the_data(engine, guide, settings, dtype):
    # A tensor created without the data's dtype would turn float32 results into float64 or
    # (default dtype) float64 results into float32: both directions are checked.
    fam, x = overlapping()
    x = x.to(dtype)
    r = inference.fit(engine, fam, x, settings, seed=0, **({"guide": guide} if guide else {}))
    assert r.dtype == str(dtype).replace("torch.", "")
    found = [*_tensors(r.posterior), *_tensors(r.samples), *_tensors(r.log_likelihood)]
    assert found and all(v.dtype == dtype for _, v in found), [(k, v.dtype) for k, v in found]
    assert math.isfinite(r.elbo) or engine == "mcmc"


@pytest.mark.parametrize("guide", GUIDES)
def test_elbo_evaluator_terms_follow_the_data_dtype(guide):
    # Every value and log density the ELBO evaluator sums (guide trace, model replayed on it).
    fam, x = overlapping()
    spec = guides.for_family(fam)[guide]
    for dtype in (torch.float64, torch.float32):
        xd = x.to(dtype)
        with isolated(0):
            q = spec.build(fam, xd)
            gtr = poutine.trace(q).get_trace(xd)
            mtr = poutine.trace(poutine.replay(fam.model, trace=gtr)).get_trace(xd)
            for tr in (gtr, mtr):
                tr.compute_log_prob()
                for name, site in tr.nodes.items():
                    if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
                        continue  # plates are traced as sample sites of constant 0
                    assert site["log_prob"].dtype == dtype, (guide, name)
                    if site["value"].is_floating_point():
                        assert site["value"].dtype == dtype, (guide, name)
            est = estimate_elbo(
                fam.model,
                q,
                xd,
                num_particles=4,
                batch_size=2,
                enumerate=True,
                collapsed=spec.collapsed,
            )
        assert math.isfinite(est.value)


# ----------------------------------------------------------------------------- errors


ENGINE_OPTIONS = {"em": {}, "cavi": {}, "svi": {"guide": "collapsed"}, "mcmc": {}}
BAD_X = {
    "nan": (np.array([[0.0], [np.nan], [1.0]]), ValueError, "NaN"),
    "inf": (np.array([[0.0], [np.inf]]), ValueError, "inf"),
    "empty": (np.empty((0, 1)), ValueError, "empty"),
    "rank3": (np.zeros((2, 2, 1)), ValueError, "dimensions"),
    "strings": (np.array([["a"], ["b"]]), TypeError, "numeric"),
    "none": (None, ValueError, "None"),
}


@pytest.mark.parametrize("bad", BAD_X)
@pytest.mark.parametrize("engine", ENGINE_OPTIONS)
def test_malformed_data_errors_name_the_field(engine, bad):
    x, exc, word = BAD_X[bad]
    with pytest.raises(exc, match=rf"^x: .*{word}"):
        inference.fit(engine, BayesianGMM(2, 4.0), x, seed=0, **ENGINE_OPTIONS[engine])


@pytest.mark.parametrize("engine", ENGINE_OPTIONS)
def test_wrong_columns_and_negative_seed_name_the_field(engine):
    opts = ENGINE_OPTIONS[engine]
    with pytest.raises(ValueError, match=r"^x: expected 2 columns"):
        inference.fit(engine, BayesianGMM(2, 4.0, dim=2), np.zeros((5, 3)), seed=0, **opts)
    with pytest.raises(ValueError, match=r"^seed: "):
        inference.fit(engine, BayesianGMM(2, 4.0), np.zeros((5, 1)), seed=-1, **opts)


@pytest.mark.parametrize(
    "kwargs,field,exc",
    [
        ({"K": 0}, "K", ValueError),
        ({"K": -2}, "K", ValueError),
        ({"K": 2.5}, "K", TypeError),
        ({"prior_var": 0.0}, "prior_var", ValueError),
        ({"prior_var": -1.0}, "prior_var", ValueError),
        ({"prior_var": math.nan}, "prior_var", ValueError),
        ({"prior_var": math.inf}, "prior_var", ValueError),
    ],
)
def test_impossible_hyperparameters_name_the_field(kwargs, field, exc):
    with pytest.raises(exc, match=rf"^{field}: "):
        BayesianGMM(**kwargs)


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: em.Settings(max_iter=0), "max_iter"),
        (lambda: cavi.Settings(n_init=0), "n_init"),
        (lambda: cavi.Settings(tol=-1.0), "tol"),
        (lambda: svi.Settings(num_steps=0), "num_steps"),
        (lambda: svi.Settings(lr=0.0), "lr"),
        (lambda: svi.Settings(eval_particles=1), "eval_particles"),
        (lambda: mcmc.Settings(num_chains=0), "num_chains"),
        (lambda: mcmc.Settings(target_accept=1.5), "target_accept"),
        (lambda: inference.fit("nuts", BayesianGMM(), np.zeros((3, 1))), "engine"),
        (lambda: inference.fit("svi", BayesianGMM(), np.zeros((3, 1)), guide="flow"), "guide"),
    ],
)
def test_impossible_settings_name_the_field(make, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        make()
