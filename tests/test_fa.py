"""Factor analysis / PPCA: closed forms against scipy, numpy conditioning and scikit-learn."""

import numpy as np
import pyro
import pytest
import torch
from scipy.stats import multivariate_normal, norm
from sklearn.decomposition import FactorAnalysis as SkFA

from elbolab import guides
from elbolab.inference.closed_form import em
from elbolab.inference.runtime import isolated
from elbolab.models.capabilities import (
    ClosedFormCAVI,
    ClosedFormEM,
    CoordinateAscent,
    ExactImputation,
    ExactLocalPosterior,
    GaussianPosterior,
    LocalDensities,
    PointwiseEvidence,
    PyroFamily,
    Simulator,
)
from elbolab.models.fa.model import FactorAnalysis, FAParams, fit_em, ppca_ml


def random_params(d=6, k=2, seed=0, dtype=torch.float64):
    g = np.random.default_rng(seed)
    return FAParams(
        torch.tensor(g.normal(size=(d, k)), dtype=dtype),
        torch.tensor(g.normal(size=d), dtype=dtype),
        torch.tensor(g.uniform(0.2, 1.5, size=d), dtype=dtype),
    )


@pytest.fixture(scope="module")
def data():
    fam = FactorAnalysis(2, dim=8)
    x, truth = fam.simulate(1500, seed=3)
    return x, truth


def test_evidence_matches_scipy():
    p = random_params()
    x = FactorAnalysis(2, params=p).sample(40, seed=1)
    fam = FactorAnalysis(2, params=p)
    C = (p.W @ p.W.T + torch.diag(p.psi)).numpy()
    ref = multivariate_normal(p.mu.numpy(), C).logpdf(x.numpy())
    np.testing.assert_allclose(fam.log_evidence_pointwise(x).numpy(), ref, rtol=1e-11)
    ev = fam.log_evidence(x)
    assert ev.method == "exact" and ev.n == 40
    assert ev.value == pytest.approx(ref.sum(), rel=1e-12)


def test_posterior_matches_numpy_conditioning():
    p = random_params(d=5, k=3, seed=1)
    fam = FactorAnalysis(3, params=p)
    x = fam.sample(7, seed=2)
    mean, cov = fam.exact_posterior(x)
    # joint Gaussian of (z, x): Cov(z, x) = W^T, Cov(x) = C; condition z on x
    W, mu, C = p.W.numpy(), p.mu.numpy(), p.covariance().numpy()
    ref_mean = (W.T @ np.linalg.solve(C, (x.numpy() - mu).T)).T
    ref_cov = np.eye(3) - W.T @ np.linalg.solve(C, W)
    np.testing.assert_allclose(mean.numpy(), ref_mean, atol=1e-11)
    np.testing.assert_allclose(cov.numpy(), ref_cov, atol=1e-12)


def test_log_joint_scipy_and_bayes_rule():
    p = random_params(d=4, k=2, seed=2)
    fam = FactorAnalysis(2, params=p)
    x = fam.sample(5, seed=0)
    z = torch.randn(3, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lj = fam.log_joint(x, z)
    assert lj.shape == (3, 5) and lj.dtype == torch.float64
    loc = (z @ p.W.T + p.mu).numpy()
    ref = norm.logpdf(z.numpy()).sum(-1) + norm.logpdf(x.numpy(), loc, p.psi.sqrt().numpy()).sum(-1)
    np.testing.assert_allclose(lj.numpy(), ref, rtol=1e-12)
    # log p(x) = log p(x, z) - log p(z | x) for every z
    mean, cov = fam.exact_posterior(x)
    lpost = np.stack([[multivariate_normal(mean[n].numpy(), cov.numpy()).logpdf(z[s, n].numpy())
                       for n in range(5)] for s in range(3)])
    np.testing.assert_allclose(lj.numpy() - lpost, np.broadcast_to(
        fam.log_evidence_pointwise(x).numpy(), (3, 5)), rtol=1e-10)


def test_em_monotone_and_engine(data):
    x, _ = data
    _, trace = fit_em(x, 2, max_iter=300, tol=0.0)
    diffs = np.diff(trace)
    assert diffs.min() >= -1e-9 * abs(trace[-1])
    r = em.fit(FactorAnalysis(2), x, em.Settings(max_iter=2000, tol=1e-10), seed=0)
    assert r.bound == "log-likelihood" and r.converged
    assert r.diagnostics["max_decrease"] <= 1e-9 * abs(r.elbo)
    # em_objective (from S) against the per-row evidence at the reported parameters
    p = FAParams.from_dict(r.posterior)
    assert r.elbo == pytest.approx(FactorAnalysis(2).log_evidence(x, p).value, rel=1e-12)


def test_em_matches_sklearn(data):
    x, _ = data
    n = x.shape[0]
    sk = SkFA(2, tol=1e-10, max_iter=20000, svd_method="lapack").fit(x.numpy())
    ll_sk = sk.score(x.numpy()) * n  # score = mean log-likelihood per row
    p_sk = FAParams(torch.tensor(sk.components_.T), torch.tensor(sk.mean_),
                    torch.tensor(sk.noise_variance_))
    fam = FactorAnalysis(2)
    # score(X) * n is the total log-likelihood: check against our exact evidence at their params
    assert fam.log_evidence(x, p_sk).value == pytest.approx(ll_sk, rel=1e-12)
    for method in ("em", "svd"):
        p, trace = fit_em(x, 2, method=method, tol=1e-13, max_iter=50000)
        ll = fam.log_evidence(x, p).value
        assert ll == pytest.approx(trace[-1], rel=1e-12)
        assert abs(ll - ll_sk) < 1e-4, (method, ll, ll_sk)  # 1e-4 nats in total over 1500 rows
        np.testing.assert_allclose(p.covariance().numpy(), sk.get_covariance(), atol=2e-4)


def test_ppca_em_reaches_closed_form(data):
    x, _ = data
    n, d, k = x.shape[0], x.shape[1], 2
    ml = ppca_ml(x, k)
    # Tipping & Bishop (1999) eq. 8 from numpy eigenvalues of the biased covariance
    lam = np.sort(np.linalg.eigvalsh(np.cov(x.numpy().T, bias=True)))[::-1]
    s2 = lam[k:].mean()
    ll_ref = -n / 2 * (d * np.log(2 * np.pi) + np.log(lam[:k]).sum() + (d - k) * np.log(s2) + d)
    np.testing.assert_allclose(ml.psi.numpy(), s2, rtol=1e-12)
    fam = FactorAnalysis(k, kind="ppca")
    assert fam.log_evidence(x, ml).value == pytest.approx(ll_ref, rel=1e-12)
    p, trace = fit_em(x, k, kind="ppca", tol=1e-14, max_iter=20000)
    assert np.diff(trace).min() >= -1e-9 * abs(trace[-1])
    assert torch.allclose(p.psi, p.psi[0].expand(d))
    assert trace[-1] <= ll_ref + 1e-8 * abs(ll_ref)
    assert trace[-1] == pytest.approx(ll_ref, abs=1e-6)


def test_float_dtypes_follow_data():
    for dtype in (torch.float64, torch.float32):
        fam = FactorAnalysis(2, dim=5)
        x, truth = fam.simulate(50, seed=0, dtype=dtype)
        assert x.dtype == dtype and truth.W.dtype == dtype
        f = FactorAnalysis(2, params=truth)
        assert f.log_evidence_pointwise(x).dtype == dtype
        m, c = f.exact_posterior(x)
        assert m.dtype == dtype and c.dtype == dtype
        p, _ = fit_em(x, 2, max_iter=5)
        assert p.W.dtype == dtype and p.psi.dtype == dtype
        assert ppca_ml(x, 2).W.dtype == dtype


def test_validation_names_fields():
    with pytest.raises(ValueError, match="^latent_dim"):
        FactorAnalysis(0)
    with pytest.raises(ValueError, match="^latent_dim"):
        FactorAnalysis(5, dim=5)
    with pytest.raises(ValueError, match="^kind"):
        FactorAnalysis(1, kind="pca")
    fam = FactorAnalysis(3)
    with pytest.raises(ValueError, match="^latent_dim"):
        fam.check_data(torch.zeros(4, 3, dtype=torch.float64))
    x = torch.randn(10, 4, dtype=torch.float64)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="^x"):
        fam.check_data(x)
    with pytest.raises(ValueError, match="^x"):
        fam.check_data(torch.zeros(3, 4, 2))
    with pytest.raises(ValueError, match="^x"):
        fit_em(x, 2)
    with pytest.raises(ValueError, match="^params"):
        fam.log_evidence(torch.randn(10, 4, dtype=torch.float64))
    p = random_params(d=6, k=2)
    with pytest.raises(ValueError, match="^x"):
        FactorAnalysis(2, params=p).log_evidence(torch.randn(10, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="^params"):
        FactorAnalysis(2).log_evidence(torch.randn(10, 4, dtype=torch.float64), p)
    with pytest.raises(ValueError, match="^psi"):
        FAParams(p.W, p.mu, -p.psi)
    with pytest.raises(ValueError, match="^mu"):
        FAParams(p.W, p.mu[:3], p.psi)
    with pytest.raises(ValueError, match="^W"):
        FAParams(p.W[0], p.mu, p.psi)
    with pytest.raises(ValueError, match="^dim"):
        FactorAnalysis(2).simulate(5)
    with pytest.raises(ValueError, match="^z"):  # (data that vary: constant data are refused)
        FactorAnalysis(2, params=p).log_joint(torch.randn(3, 6, dtype=torch.float64),
                                              torch.zeros(3, 3, dtype=torch.float64))


def test_pyro_model_log_prob_is_log_joint():
    p = random_params(d=5, k=2, seed=4)
    fam = FactorAnalysis(2, params=p)
    x = fam.sample(30, seed=0)
    with isolated(0):
        tr = pyro.poutine.trace(fam.model).get_trace(x)
        z = tr.nodes["z"]["value"]
        assert z.shape == (30, 2)
        ref = float(fam.log_joint(x, z).sum())
        assert float(tr.log_prob_sum()) == pytest.approx(ref, rel=1e-12)
        tr = pyro.poutine.trace(fam.model).get_trace(x, subsample_size=7)
        assert tr.nodes["x"]["value"].shape == (7, 5)
        assert len(pyro.get_param_store()) == 0  # fixed params are constants
    for kind, names in (("fa", {"W", "mu", "psi"}), ("ppca", {"W", "mu", "sigma2"})):
        with isolated(0):
            pyro.poutine.trace(FactorAnalysis(2, kind=kind).model).get_trace(x)
            store = pyro.get_param_store()
            assert set(store.keys()) == names
            assert all(store[k].dtype == torch.float64 for k in names)
    assert len(pyro.get_param_store()) == 0


def test_learnable_params_get_gradients_through_the_model():
    """Without fixed params the model's densities read the param store: the trace's log
    probability is log_joint at the stored values, and its gradient reaches W, mu and psi."""
    x = FactorAnalysis(2, params=random_params(d=5, k=2, seed=4)).sample(30, seed=0)
    for kind, noise in (("fa", "psi"), ("ppca", "sigma2")):
        fam = FactorAnalysis(2, kind=kind)
        with isolated(0):
            tr = pyro.poutine.trace(fam.model).get_trace(x)
            assert {"W", "mu", noise} <= {k for k, v in tr.nodes.items() if v["type"] == "param"}
            lp = tr.log_prob_sum()
            lp_value = float(lp.detach())
            store = pyro.get_param_store()
            W, mu = store["W"].detach(), store["mu"].detach()
            psi = store[noise].detach().expand(5)
            z = tr.nodes["z"]["value"]
            ref = norm.logpdf(z.numpy()).sum() + norm.logpdf(
                x.numpy(), (z @ W.T + mu).numpy(), psi.sqrt().numpy()).sum()
            assert lp_value == pytest.approx(ref, rel=1e-12)
            assert float(fam.log_joint(x, z).sum().detach()) == pytest.approx(ref, rel=1e-12)
            lp.backward()
            for _, p in store.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0


def test_capabilities_and_guides():
    fam = FactorAnalysis(2, params=random_params(d=6, k=2))
    for c in (PyroFamily, Simulator, PointwiseEvidence, LocalDensities, ExactLocalPosterior,
              ClosedFormEM, ClosedFormCAVI, ExactImputation):
        assert isinstance(fam, c), c.__name__
    assert not hasattr(fam, "guides") and not hasattr(fam, "default_guide")
    assert "exact" in guides.for_family(fam) and guides.default_for(fam) == "mean-field"
    assert isinstance(fam.em(), CoordinateAscent) and isinstance(fam.cavi(), CoordinateAscent)
    assert (fam.em().bound, fam.cavi().bound) == ("log-likelihood", "elbo")
    x = fam.sample(4, seed=0)
    assert isinstance(fam.exact_posterior(x), GaussianPosterior)


def test_simulate_and_sample_statistics():
    fam = FactorAnalysis(2, dim=4)
    x1, t1 = fam.simulate(20000, seed=5)
    x2, t2 = fam.simulate(20000, seed=5)
    assert torch.equal(x1, x2) and torch.equal(t1.W, t2.W)
    C = t1.covariance().numpy()
    S = np.cov(x1.numpy().T)
    # Var(S_ij) ~ (C_ii C_jj + C_ij^2) / n for Gaussian data (Wishart); 5 standard errors
    se = np.sqrt((np.outer(np.diag(C), np.diag(C)) + C**2) / 20000)
    assert np.all(np.abs(S - C) < 5 * se)
    assert np.all(np.abs(x1.numpy().mean(0) - t1.mu.numpy()) < 5 * np.sqrt(np.diag(C) / 20000))


def test_params_save_load(tmp_path):
    p = random_params()
    path = p.save(tmp_path / "fa.pt")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"W", "mu", "psi"}
    q = FAParams.load(path)
    assert all(torch.equal(a, b) for a, b in zip(p.as_dict().values(), q.as_dict().values(),
                                                  strict=True))
    assert q.to(torch.zeros(1, dtype=torch.float32)).W.dtype == torch.float32


def test_exact_posterior_follows_param_store_and_svi_exact_guide(data):
    from elbolab.inference import svi

    x, truth = data
    x = x[:200]
    fam = FactorAnalysis(2)
    with isolated(0):
        pyro.poutine.trace(fam.model).get_trace(x)  # registers W, mu, psi (PCA start)
        store = pyro.get_param_store()
        p = FAParams(store["W"].detach(), store["mu"].detach(), store["psi"].detach())
        m1, c1 = fam.exact_posterior(x)
        m2, c2 = fam.exact_posterior(x, p)
        assert torch.allclose(m1, m2) and torch.allclose(c1, c2)
    with pytest.raises(ValueError, match="^params"):
        fam.exact_posterior(x)
    # with the exact-posterior guide every ELBO sample equals log p(x): value exact, se ~ 0
    fixed = FactorAnalysis(2, params=truth)
    s = svi.Settings(num_steps=1, eval_particles=20, eval_batch=10, learn_model_params=False,
                     num_posterior_samples=0)
    r = svi.fit(fixed, x, s, seed=0, guide="exact")
    assert r.elbo == pytest.approx(fixed.log_evidence(x).value, rel=1e-10)
    assert r.elbo_se < 1e-8


def test_em_engine_ppca_reports_sigma2(data):
    x, _ = data
    r = em.fit(FactorAnalysis(2, kind="ppca"), x, em.Settings(max_iter=50), seed=0)
    assert r.posterior["sigma2"] == r.posterior["psi"][0]
    assert r.diagnostics["max_decrease"] <= 1e-9 * abs(r.elbo)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    from elbolab.models.fa.missing import em_missing, impute

    fam = FactorAnalysis(2, dim=6)
    x, truth = fam.simulate(300, seed=0)
    xc, tc = x.cuda(), truth.to(torch.device("cuda"), torch.float64)
    f_cpu, f_gpu = FactorAnalysis(2, params=truth), FactorAnalysis(2, params=tc)
    ev = f_gpu.log_evidence_pointwise(xc)
    assert ev.device.type == "cuda" and ev.dtype == torch.float64
    assert torch.allclose(ev.cpu(), f_cpu.log_evidence_pointwise(x), rtol=1e-10)
    m, c = f_gpu.exact_posterior(xc)
    assert m.device.type == "cuda"
    p, tr = fit_em(xc, 2, max_iter=200)
    q, tr2 = fit_em(x, 2, max_iter=200)
    assert p.W.device.type == "cuda" and tr[-1] == pytest.approx(tr2[-1], rel=1e-9)
    xm = xc.clone()
    xm[::3, 1] = float("nan")
    filled, covs = impute(xm, tc)
    assert filled.device.type == "cuda" and covs[0].cov.device.type == "cuda"
    pm, _ = em_missing(xm, 2, max_iter=20)
    assert pm.W.device.type == "cuda"
    with isolated(0):
        pyro.poutine.trace(FactorAnalysis(2).model).get_trace(xc, subsample_size=10)
        assert pyro.get_param_store()["W"].device.type == "cuda"
