"""IWAE and AIS/BDMC log-evidence estimators against exact linear-Gaussian (FA) evidences.

Oracle: log p(x_n) = log N(x_n; mu, W W^T + Psi) from scipy, and the posterior
z_n | x_n ~ N(C W^T Psi^-1 (x_n - mu), C), C = (I + W^T Psi^-1 W)^-1, written here in numpy.

Statistical tolerances. Every estimate is a log-mean of independent weights per data point, with
a delta-method se per point; points use independent draws, so the se of a mean over n points is
sqrt(sum se_n^2) / n (= se / n of the total). "Agrees with exact" means |mean error| < 0.05 nats per
point where the test is designed so that 0.05 >= 5 x that se plus the bias (~ -se_n^2 / 2).
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, norm

from elbolab.inference.evaluation.ais import (
    AisSettings,
    AnnealingTarget,
    ais,
    annealing_schedule,
    bdmc,
    hmc_step,
)
from elbolab.inference.evaluation.evidence import iwae, iwae_from_log_joint, iwae_throughput
from elbolab.inference.tracing import proposal_from, pyro_log_joint
from elbolab.models.capabilities import Evidence

K = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors on a shared 2-core machine: one intra-op thread is faster; restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Problem:
    """FA data with fixed parameters and everything exact, in numpy (independent of the code)."""

    def __init__(self, n=20, d=5, k=K, seed=0, w_scale=0.6, psi_lo=0.5, psi_hi=1.5):
        g = np.random.default_rng(seed)
        self.W = g.normal(scale=w_scale, size=(d, k))
        self.mu = g.normal(size=d)
        self.psi = g.uniform(psi_lo, psi_hi, size=d)
        self.Z = g.normal(size=(n, k))  # (z, x) drawn jointly: Z[i] is an exact posterior draw
        self.X = self.Z @ self.W.T + self.mu + g.normal(size=(n, d)) * np.sqrt(self.psi)
        cov_x = self.W @ self.W.T + np.diag(self.psi)
        self.exact = multivariate_normal(self.mu, cov_x).logpdf(self.X)
        prec = np.eye(k) + self.W.T @ np.diag(1 / self.psi) @ self.W
        self.post_cov = np.linalg.inv(prec)
        self.post_mean = (self.X - self.mu) @ np.diag(1 / self.psi) @ self.W @ self.post_cov
        self.n, self.d, self.k = n, d, k

    def t(self, a, dtype=torch.float64):
        return torch.as_tensor(a, dtype=dtype)

    def x(self, dtype=torch.float64):
        return self.t(self.X, dtype)

    def log_joint(self, x, z):
        W, mu, sd = (self.t(a, x.dtype) for a in (self.W, self.mu, np.sqrt(self.psi)))
        lx = dist.Normal(z @ W.T + mu, sd).log_prob(x).sum(-1)
        return lx + dist.Normal(0.0, 1.0).log_prob(z).sum(-1)

    def prior(self, dtype=torch.float64, n=None):
        zeros = torch.zeros(n or self.n, self.k, dtype=dtype)
        return dist.Normal(zeros, 1.0).to_event(1)

    def posterior(self, x=None, dtype=torch.float64):
        """Exact q(z_n | x_n) for the rows of x (default: all data)."""
        X = self.X if x is None else x.detach().cpu().numpy()
        mean = (X - self.mu) @ np.diag(1 / self.psi) @ self.W @ self.post_cov
        return dist.MultivariateNormal(self.t(mean, dtype), self.t(self.post_cov, dtype))

    def model(self, x):
        W, mu, sd = (self.t(a, x.dtype) for a in (self.W, self.mu, np.sqrt(self.psi)))
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], self.k, dtype=x.dtype), 1.0)
                            .to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + mu, sd).to_event(1), obs=x)

    def posterior_guide(self, x):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", self.posterior(x, x.dtype))

    def prior_guide(self, x):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], self.k, dtype=x.dtype), 1.0)
                        .to_event(1))


@pytest.fixture(scope="module")
def easy():
    return Problem()


# -- the log joint from a Pyro model ------------------------------------------------------------


def test_pyro_log_joint_matches_scipy_with_leading_dims(easy):
    x = easy.x()
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, easy.n, K, dtype=torch.float64, generator=gen)
    got = pyro_log_joint(easy.model)(x, z)
    assert got.shape == (2, 3, easy.n) and got.dtype == torch.float64
    zn = z.numpy()
    want = norm.logpdf(zn).sum(-1) + norm.logpdf(
        easy.X, zn @ easy.W.T + easy.mu, np.sqrt(easy.psi)
    ).sum(-1)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-10)


def test_fa_family_model_log_joint_matches_scipy(easy):
    fa = pytest.importorskip("elbolab.models.fa.model")
    params = fa.FAParams(easy.t(easy.W), easy.t(easy.mu), easy.t(easy.psi))
    family = fa.FactorAnalysis(K, params=params)
    x = easy.x()
    z = torch.randn(4, easy.n, K, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = pyro_log_joint(family.model)(x, z)
    want = norm.logpdf(z.numpy()).sum(-1) + norm.logpdf(
        easy.X, z.numpy() @ easy.W.T + easy.mu, np.sqrt(easy.psi)
    ).sum(-1)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-10)
    # the exact-posterior proposal makes every weight p(x_n): IWAE is exact
    est = iwae_from_log_joint(pyro_log_joint(family.model), easy.posterior(), x, num_samples=50)
    np.testing.assert_allclose(est.pointwise.numpy(), easy.exact, atol=1e-8)


# -- IWAE -------------------------------------------------------------------------------------


def test_iwae_exact_posterior_proposal_is_exact_with_zero_se(easy):
    # w_s = p(x, z_s) / p(z_s | x) = p(x) for every draw: zero variance, the bound is tight
    for est in (
        iwae_from_log_joint(easy.log_joint, easy.posterior(), easy.x(), num_samples=64),
        iwae(easy.model, easy.posterior_guide, easy.x(), num_samples=64, chunk_size=20),
        iwae(easy.model, easy.posterior_guide, easy.x(), num_samples=16, batch_size=7),
    ):
        assert est.pointwise.dtype == torch.float64 and est.pointwise.shape == (easy.n,)
        np.testing.assert_allclose(est.pointwise.numpy(), easy.exact, atol=1e-8)
        assert float(est.details["pointwise_se"].max()) < 1e-6
        assert abs(est.value - easy.exact.sum()) < 1e-6
        assert est.method == "iwae"


def test_iwae_prior_proposal_agrees_with_exact(easy):
    # derivation: on this problem the per-point se at S = 5000 is <= ~0.05, so the se of the mean
    # over 20 points is ~0.01 and the bias (-se^2 / 2) < 0.002: 0.05 is > 4 se away from both.
    for est in (
        iwae_from_log_joint(easy.log_joint, easy.prior(), easy.x(), num_samples=5000, seed=3),
        iwae(easy.model, easy.prior_guide, easy.x(), num_samples=5000, chunk_size=1000, seed=4),
    ):
        err = est.pointwise.numpy() - easy.exact
        assert abs(err.mean()) < 0.05
        assert abs(err.mean()) < 4 * est.se / easy.n + 0.005
        # each point within 4 of its own se (and the bias) of the truth
        assert np.all(np.abs(err) < 4 * est.details["pointwise_se"].numpy() + 0.01)


def test_iwae_increases_with_num_samples_toward_exact():
    p = Problem(n=400, w_scale=1.0, seed=1)
    means, per = [], []
    for s in (1, 10, 100, 1000):
        est = iwae_from_log_joint(p.log_joint, p.prior(), p.x(), num_samples=s, seed=10 + s)
        per.append(est.pointwise.numpy())
        means.append(est)
    # E[L_S] increases with S. The per-point differences are independent across the 400 points
    # (independent draws), so their mean has se ~ sd(diff) / sqrt(n) (heterogeneity across points
    # only inflates sd: conservative). Expected z ~ 12 (1 -> 10) and ~ 6 (10 -> 100).
    for lo, hi in zip(per[:-2], per[1:-1]):
        diff = hi - lo
        assert diff.mean() > 3 * diff.std(ddof=1) / math.sqrt(len(diff))
    # ... and reaches the exact value: S = 1000 lies within 0.05 per point, below it up to MC error
    err = per[-1] - p.exact
    se_mean = means[-1].se / p.n
    assert -0.05 < err.mean() < 3 * se_mean


def test_iwae_delta_method_se_is_calibrated(easy):
    # the reported se should match the spread over independent repeats. With R = 30 repeats the
    # sample sd has ~13% relative error per point; the mean ratio over 20 points is within a few %
    reps = [
        iwae_from_log_joint(easy.log_joint, easy.prior(), easy.x(), num_samples=300, seed=100 + r)
        for r in range(30)
    ]
    values = torch.stack([r.pointwise for r in reps]).numpy()
    ses = torch.stack([r.details["pointwise_se"] for r in reps]).numpy()
    ratio = values.std(0, ddof=1) / ses.mean(0)
    assert 0.8 < ratio.mean() < 1.25


def test_iwae_brute_force_numpy_tiny_case():
    p = Problem(n=3, d=4, seed=5)
    s = 7
    est = iwae_from_log_joint(p.log_joint, p.prior(), p.x(), num_samples=s, chunk_size=3,
                              seed=9, return_samples=True)
    z = est.details["z"].numpy()
    assert z.shape == (s, 3, K)
    # independent log weights: scipy log densities, log q = prior
    log_w = np.empty((s, 3))
    for i in range(s):
        for n in range(3):
            lx = multivariate_normal(p.W @ z[i, n] + p.mu, np.diag(p.psi)).logpdf(p.X[n])
            log_w[i, n] = lx  # log p(z) - log q(z) = 0 for the prior proposal
    np.testing.assert_allclose(est.details["log_weights"].numpy(), log_w, atol=1e-10)
    want = logsumexp(log_w, axis=0) - math.log(s)
    np.testing.assert_allclose(est.pointwise.numpy(), want, atol=1e-10)
    w = np.exp(log_w - log_w.max(0))
    se = np.sqrt(w.var(0, ddof=1) / s) / w.mean(0)  # delta method: sd(mean w) / mean w
    np.testing.assert_allclose(est.details["pointwise_se"].numpy(), se, rtol=1e-8)
    np.testing.assert_allclose(est.se, math.sqrt((se**2).sum()), rtol=1e-8)


def test_iwae_per_point_with_a_global_latent_site(easy):
    W = easy.t(easy.W)

    def model(x):
        w = pyro.sample("W", dist.Normal(torch.zeros_like(W), 1.0).to_event(2))
        mu, sd = easy.t(easy.mu), easy.t(np.sqrt(easy.psi))
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], K, dtype=x.dtype), 1.0)
                            .to_event(1))
            pyro.sample("x", dist.Normal(z @ w.transpose(-1, -2) + mu, sd).to_event(1), obs=x)

    with pytest.raises(ValueError, match="^fixed: model site 'W'"):
        iwae(model, easy.posterior_guide, easy.x(), num_samples=4)
    est = iwae(model, easy.posterior_guide, easy.x(), num_samples=8, fixed={"W": W})
    # log p(W) is left out: the per-point value is log p(x_n | W), exactly
    np.testing.assert_allclose(est.pointwise.numpy(), easy.exact, atol=1e-8)


def test_iwae_batched_over_data_points_with_callable_proposal(easy):
    est = iwae_from_log_joint(easy.log_joint, lambda xb: easy.posterior(xb), easy.x(),
                              num_samples=10, batch_size=6)
    np.testing.assert_allclose(est.pointwise.numpy(), easy.exact, atol=1e-8)


def test_dtype_follows_data_and_seed_is_local(easy):
    x32 = easy.x(torch.float32)
    est = iwae_from_log_joint(easy.log_joint, easy.prior(torch.float32), x32, num_samples=50)
    assert est.pointwise.dtype == torch.float32
    assert est.details["pointwise_se"].dtype == torch.float32
    a = ais(easy.log_joint, easy.prior(torch.float32), x32, AisSettings(num_steps=3, num_chains=2))
    assert a.pointwise.dtype == torch.float32
    a64 = ais(easy.log_joint, easy.prior(), easy.x(), AisSettings(num_steps=3, num_chains=2))
    assert a64.pointwise.dtype == torch.float64
    state = torch.get_rng_state()
    e1 = iwae_from_log_joint(easy.log_joint, easy.prior(), easy.x(), num_samples=20, seed=7)
    e2 = iwae_from_log_joint(easy.log_joint, easy.prior(), easy.x(), num_samples=20, seed=7)
    assert torch.equal(e1.pointwise, e2.pointwise)
    assert torch.equal(state, torch.get_rng_state())  # no global RNG state leaks
    ev = e1
    assert isinstance(ev, Evidence) and ev.method == "iwae" and ev.n == easy.n
    assert ev.value == pytest.approx(float(e1.pointwise.sum()))


# -- AIS and BDMC -----------------------------------------------------------------------------


def test_schedules():
    for kind in ("linear", "sigmoid"):
        b = annealing_schedule(10, kind)
        assert len(b) == 11 and b[0] == 0.0 and b[-1] == 1.0
        assert all(b1 > b0 for b0, b1 in zip(b, b[1:]))
    lin = annealing_schedule(4, "linear")
    assert lin == [0.0, 0.25, 0.5, 0.75, 1.0]
    sig = annealing_schedule(10, "sigmoid")  # symmetric about t = T / 2
    np.testing.assert_allclose([sig[t] + sig[10 - t] for t in range(11)], 1.0, atol=1e-12)


def test_hmc_kernel_leaves_the_posterior_invariant(easy):
    # start 4000 chains at exact posterior draws, apply 25 HMC moves at beta = 1, check the mean
    # and variance of every coordinate: se of a mean over 4000 independent chains is sd / 63
    n = 3
    x = easy.x()[:n]
    q = easy.prior(n=n)
    post = easy.posterior(x)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        z = post.sample((4000,))
        target = AnnealingTarget(easy.log_joint, q, x, 1)
        state = target(z)
        eps = torch.full((n,), 0.4, dtype=torch.float64)
        minv = torch.ones_like(z)
        for _ in range(25):
            state, acc = hmc_step(state, 1.0, eps, minv, 5, target)
    assert 0.3 < float(acc.mean()) <= 1.0
    zf = state[0].numpy()
    sd = np.sqrt(np.diag(easy.post_cov))
    z_mean = np.abs(zf.mean(0) - post.mean.numpy()) / (sd / math.sqrt(4000))
    assert z_mean.max() < 4.5
    # var estimate from 4000 draws: relative se sqrt(2 / 4000) = 2.2%
    rel = zf.var(0, ddof=1) / sd**2
    assert np.abs(rel - 1).max() < 0.1


def test_ais_exact_posterior_start_is_exact_every_chain(easy):
    # q = p(z | x): log p(x, z) - log q(z) = log p(x) for all z, so every weight is exact
    for kw in ({}, {"schedule": "linear", "adapt": "none", "mass": "identity"},
               {"adapt": "online", "schedule": [0.0, 0.3, 1.0]}):
        est = ais(easy.log_joint, easy.posterior(), easy.x(),
                  AisSettings(num_steps=8, num_chains=4, **kw))
        np.testing.assert_allclose(est.pointwise.numpy(), easy.exact, atol=1e-8)
        assert est.method == "ais"
        acc = est.details["acceptance"]
        assert acc.shape == (easy.n,) and bool(((acc > 0) & (acc <= 1)).all())


def test_ais_prior_start_agrees_with_exact(easy):
    # measured here: se of the mean over 20 points ~0.008 at T = 200, 32 chains; 0.05 is > 5 se
    est = ais(easy.log_joint, easy.prior(), easy.x(), AisSettings(num_steps=200, num_chains=32),
              seed=1)
    err = est.pointwise.numpy() - easy.exact
    assert abs(err.mean()) < 0.05
    assert abs(err.mean()) < 4 * est.se / easy.n + 0.01
    assert np.all(np.abs(err) < 4 * est.details["pointwise_se"].numpy() + 0.05)
    assert 0.5 < est.details["mean_acceptance"] < 0.8  # adapted toward 0.65


def test_ais_more_steps_is_tighter():
    # a concentrated posterior (large W, small noise): 4 steps leave a gap of several nats (1.4 to
    # 113 over 12 problem seeds), 100 steps ~0.1; the difference must exceed 5 combined se of the
    # two means (the delta se even underestimates the spread of the short run: conservative here)
    p = Problem(n=20, w_scale=1.5, psi_lo=0.05, psi_hi=0.15, seed=2)
    gaps, ses = [], []
    for t in (4, 100):
        est = ais(p.log_joint, p.prior(), p.x(), AisSettings(num_steps=t, num_chains=8), seed=t)
        gaps.append(float(np.mean(p.exact - est.pointwise.numpy())))
        ses.append(est.se / p.n)
    assert gaps[0] - gaps[1] > 5 * math.hypot(*ses)
    assert gaps[1] > -3 * ses[1]  # still a lower bound up to MC error
    assert gaps[1] < 0.5


def test_bdmc_brackets_the_exact_value(easy):
    # (1) independent exact posterior draws per chain: se valid, bracket per point and in mean
    with torch.random.fork_rng():
        torch.manual_seed(3)
        z_post = easy.posterior().sample((16,))
    lo, up = bdmc(easy.log_joint, easy.prior(), easy.x(), z_post,
                  AisSettings(num_steps=100, num_chains=16))
    assert lo.method == "ais" and up.method == "bdmc-upper"
    m_lo, m_up, m_ex = lo.per_datum, up.per_datum, float(easy.exact.mean())
    assert m_lo <= m_ex + 3 * lo.se / easy.n
    assert m_up >= m_ex - 3 * up.se / easy.n
    lo_se, up_se = lo.details["pointwise_se"].numpy(), up.details["pointwise_se"].numpy()
    assert np.all(lo.pointwise.numpy() <= easy.exact + 4 * lo_se + 1e-9)
    assert np.all(up.pointwise.numpy() >= easy.exact - 4 * up_se - 1e-9)
    assert m_up - m_lo < 0.1  # and the bracket is informative
    # (2) the simulated z (one exact draw per point shared by all reverse chains): the mean brackets
    lo2, up2 = bdmc(easy.log_joint, easy.prior(), easy.x(), easy.t(easy.Z),
                    AisSettings(num_steps=100, num_chains=16), seed=5)
    assert lo2.per_datum <= m_ex + 3 * lo2.se / easy.n
    assert up2.per_datum >= m_ex - 3 * up2.se / easy.n


def test_ais_through_pyro_model_from_prior(easy):
    fa = pytest.importorskip("elbolab.models.fa.model")
    params = fa.FAParams(easy.t(easy.W), easy.t(easy.mu), easy.t(easy.psi))
    model = fa.FactorAnalysis(K, params=params).model
    x = easy.x()[:8]
    prior = proposal_from(model, x)
    assert tuple(prior.batch_shape) == (8,) and tuple(prior.event_shape) == (K,)
    est = ais(pyro_log_joint(model), prior, x, AisSettings(num_steps=30, num_chains=16), seed=2)
    # 30 steps on this easy posterior: se of the mean over 8 points ~0.03; 0.15 > 4 se
    assert abs(float(np.mean(est.pointwise.numpy() - easy.exact[:8]))) < 0.15


@pytest.mark.slow
def test_ais_and_iwae_every_point_within_005_nats(easy):
    # long runs: per-point se ~0.01 (AIS, T = 1000, 64 chains) and ~0.02 (IWAE, S = 20000 through
    # the Pyro model), so each of the 20 points must land within 0.05 of its exact value
    est = ais(easy.log_joint, easy.prior(), easy.x(), AisSettings(num_steps=1000, num_chains=64),
              seed=8)
    assert np.abs(est.pointwise.numpy() - easy.exact).max() < 0.05
    est = iwae(easy.model, easy.prior_guide, easy.x(), num_samples=20000, seed=8)
    assert np.abs(est.pointwise.numpy() - easy.exact).max() < 0.05


# -- boundary checks --------------------------------------------------------------------------


def test_validation_errors_name_the_field(easy):
    x, lj, q = easy.x(), easy.log_joint, easy.prior()
    cases = [
        (lambda: iwae_from_log_joint(lj, q, x, num_samples=0), "^num_samples"),
        (lambda: iwae_from_log_joint(lj, q, x, num_samples=2.5), "^num_samples"),
        (lambda: iwae_from_log_joint(lj, q, x, chunk_size=0), "^chunk_size"),
        (lambda: iwae_from_log_joint(lj, q, x, seed=-1), "^seed"),
        (lambda: iwae_from_log_joint(lj, q, x, batch_size=5), "^batch_size"),
        (lambda: iwae_from_log_joint(lj, easy.prior(n=3), x), "^proposal"),
        (lambda: iwae_from_log_joint(lj, "normal", x), "^proposal"),
        (lambda: iwae_from_log_joint(lj, q, x.clone().fill_(math.nan)), "^x"),
        (lambda: iwae_from_log_joint(lj, q, x[:0]), "^x"),
        (lambda: iwae(easy.model, easy.prior_guide, x, latent="u"), "^latent"),
        (lambda: ais(lj, q, x, AisSettings(num_steps=0)), "^num_steps"),
        (lambda: ais(lj, q, x, AisSettings(num_chains=0)), "^num_chains"),
        (lambda: ais(lj, q, x, AisSettings(leapfrog_steps=0)), "^leapfrog_steps"),
        (lambda: ais(lj, q, x, AisSettings(step_size=-0.1)), "^step_size"),
        (lambda: ais(lj, q, x, AisSettings(target_accept=1.5)), "^target_accept"),
        (lambda: ais(lj, q, x, AisSettings(schedule="cosine")), "^schedule"),
        (lambda: ais(lj, q, x, AisSettings(schedule=[0.0, 0.7, 0.5, 1.0])), "^schedule"),
        (lambda: ais(lj, q, x, AisSettings(adapt="sometimes")), "^adapt"),
        (lambda: ais(lj, q, x, AisSettings(mass="full")), "^mass"),
        (lambda: ais(lambda x, z: z.sum(), q, x, AisSettings(num_steps=2)), "^log_joint"),
        (lambda: bdmc(lj, q, x, torch.zeros(3, K, dtype=torch.float64)), "^z_posterior"),
        (lambda: bdmc(lj, q, x, easy.t(easy.Z), AisSettings(adapt="online")), "^adapt"),
    ]
    for call, pattern in cases:
        with pytest.raises((ValueError, TypeError), match=pattern):
            call()
    # settings come as one AisSettings: unknown or loose options are errors
    with pytest.raises(TypeError, match="^settings"):
        ais(lj, q, x, {"num_steps": 3})
    with pytest.raises(TypeError):
        ais(lj, q, x, num_steps=3)
    with pytest.raises(TypeError):
        AisSettings(num_step=3)


def test_global_observed_site_is_refused(easy):
    def model(x):
        pyro.sample("total", dist.Normal(0.0, 1.0), obs=x.sum())
        easy.model(x)

    with pytest.raises(ValueError, match="^model: observed site 'total'"):
        iwae(model, easy.prior_guide, easy.x(), num_samples=2)


def test_throughput_helper_reports_rate(easy):
    out = iwae_throughput(easy.log_joint, easy.prior(), easy.x(), num_samples=200, repeats=1)
    assert out["point_samples_per_s"] > 0 and out["n"] == easy.n


@pytest.mark.cuda
def test_estimators_run_on_cuda(easy):
    x = easy.x().cuda()
    W, mu, sd = (torch.as_tensor(a, device=x.device) for a in (easy.W, easy.mu, np.sqrt(easy.psi)))

    def log_joint(x, z):
        return (dist.Normal(z @ W.T + mu, sd).log_prob(x).sum(-1)
                + dist.Normal(0.0, 1.0).log_prob(z).sum(-1))

    q = dist.Normal(torch.zeros(easy.n, K, dtype=x.dtype, device=x.device), 1.0).to_event(1)
    est = iwae_from_log_joint(log_joint, q, x, num_samples=2000)
    assert est.pointwise.device == x.device
    assert abs(float(est.pointwise.mean().cpu()) - easy.exact.mean()) < 0.05
    a = ais(log_joint, q, x, AisSettings(num_steps=100, num_chains=16))
    assert a.pointwise.device == x.device
    assert abs(a.per_datum - easy.exact.mean()) < 0.05


def test_estimate_dataclass_roundtrip():
    e = Evidence(3.0, 0.14, "iwae", 2, {"pointwise": torch.tensor([1.0, 2.0]),
                                         "pointwise_se": torch.tensor([0.1, 0.1]),
                                         "num_samples": 5})
    assert e.n == 2 and e.per_datum == 1.5
