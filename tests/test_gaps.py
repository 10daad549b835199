"""Gap decomposition (inference/gaps.py) and per-point ELBOs (inference/pointwise.py) on FA.

Oracles written out here in numpy: log N(x; mu, W W^T + Psi); the Gaussian ELBO of FA,
E_q log p(x, z) + H[q] for q = N(m, S):
    -1/2 [(d + k) log 2pi + sum log psi + sum_i ((x_i - mu_i - W_i m)^2 + W_i S W_i^T) / psi_i
          + m^T m + tr S] + k/2 (1 + log 2pi) + 1/2 log det S;
and the mean-field approximation gap 1/2 (sum_j log L_jj - log det L), L = I + W^T Psi^-1 W.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from elbolab import guides
from elbolab.inference.evaluation import diagnostics as D
from elbolab.inference.evaluation import gaps
from elbolab.inference.evaluation.pointwise import log_weights, pointwise_elbo
from elbolab.inference.runtime import isolated
from elbolab.models.capabilities import Evidence, MissingCapability
from elbolab.models.fa.model import FactorAnalysis
from tests.toy import NormalMean

LOG2PI = math.log(2 * math.pi)



def fa_data(n=40, d=6, k=2, seed=0, dtype=torch.float64):
    x, truth = FactorAnalysis(k, dim=d).simulate(n, seed=seed, dtype=dtype)
    return FactorAnalysis(k, params=truth), x, truth


def np_params(p):
    return tuple(t.detach().double().cpu().numpy() for t in (p.W, p.mu, p.psi))


def np_log_evidence(x, p):
    W, mu, psi = np_params(p)
    C = W @ W.T + np.diag(psi)
    r = x.double().numpy() - mu
    _, logdet = np.linalg.slogdet(C)
    return -0.5 * (len(mu) * LOG2PI + logdet + np.einsum("ni,ij,nj->n", r, np.linalg.inv(C), r))


def np_gaussian_elbo(x, p, m, S):
    """Per-point ELBO of q_n = N(m_n, S_n) in FA (formula in the module docstring)."""
    W, mu, psi = np_params(p)
    d, k = W.shape
    r = x.double().numpy() - mu - m @ W.T
    trWSW = np.einsum("ij,njl,il->ni", W, S, W)
    e_lik = -0.5 * (d * LOG2PI + np.log(psi).sum() + ((r**2 + trWSW) / psi).sum(1))
    e_prior = -0.5 * (k * LOG2PI + (m**2).sum(1) + np.trace(S, axis1=1, axis2=2))
    entropy = 0.5 * k * (1 + LOG2PI) + 0.5 * np.linalg.slogdet(S)[1]
    return e_lik + e_prior + entropy


def np_mean_field_gap(p):
    W, _, psi = np_params(p)
    L = np.eye(W.shape[1]) + W.T @ (W / psi[:, None])
    return 0.5 * (np.log(np.diag(L)).sum() - np.linalg.slogdet(L)[1])


def moments_np(g, x):
    loc, tril = g.moments(x)
    loc, tril = loc.detach().double().numpy(), tril.detach().double().numpy()
    return loc, tril @ np.swapaxes(tril, -1, -2)


def test_exact_guide_weights_equal_log_evidence_in_every_sample():
    fam, x, truth = fa_data()
    g = guides.make("exact", fam, x)
    w = log_weights(fam.model, g, x, num_particles=25, particle_batch=10, data_batch=15)
    assert w.shape == (25, 40) and w.dtype == torch.float64
    np.testing.assert_allclose(w.numpy(), np.broadcast_to(np_log_evidence(x, truth), (25, 40)),
                               atol=1e-9)


def test_pointwise_elbo_matches_gaussian_closed_form_within_se():
    """MC per-point ELBOs vs the numpy formula; z = (mc - exact) / se is ~N(0, 1) per point,
    so max over 40 points below 4.5 fails with probability ~3e-4."""
    fam, x, truth = fa_data()
    with isolated(3):
        g = guides.make("full-rank", fam, x)
        with torch.no_grad():
            g.loc.normal_()
            g.raw_tril.mul_(0.0).add_(0.3 * torch.randn_like(g.raw_tril))
        # chunked over particles and data points: the local params must follow the row indices
        est = pointwise_elbo(fam.model, g, x, num_particles=400, particle_batch=150,
                             data_batch=13)
    m, S = moments_np(g, x)
    exact = np_gaussian_elbo(x, truth, m, S)
    z = (est.value.numpy() - exact) / est.se.numpy()
    assert np.abs(z).max() < 4.5
    assert abs(est.total - exact.sum()) < 4.5 * est.total_se
    # the KL route used by the closed-form estimator agrees with the direct formula
    np.testing.assert_allclose(gaps.closed_form_elbo(fam, x, g).detach().numpy(), exact,
                               atol=1e-9)


def test_mean_field_and_full_rank_gaps_closed_form():
    fam, x, truth = fa_data()
    with isolated(0):
        enc = guides.make("linear-diag", fam, x)
        mf = gaps.decompose_gaps(fam, x, enc, "mean-field")
        fr = gaps.decompose_gaps(fam, x, enc, "full-rank")
    pts = mf[mf.scope == "point"]
    assert len(pts) == 40 and list(mf.scope[-2:]) == ["total", "mean"]
    np.testing.assert_allclose(pts.approximation_gap, np_mean_field_gap(truth), atol=1e-3)
    np.testing.assert_allclose(pts.log_evidence, np_log_evidence(x, truth), atol=1e-9)
    np.testing.assert_allclose(pts.inference_gap, pts.approximation_gap + pts.amortization_gap,
                               atol=1e-9)
    assert (pts.amortization_gap > 0).all()  # an untrained encoder is far from q*
    # the encoder's ELBO against the numpy Gaussian-ELBO formula at its own moments, and the
    # amortization gap = ELBO(q*_MF) - ELBO(enc) with ELBO(q*_MF) = log p(x) - MF gap (closed form)
    m, S = moments_np(enc, x)
    elbo_enc = np_gaussian_elbo(x, truth, m, S)
    np.testing.assert_allclose(pts.elbo_amortized, elbo_enc, atol=1e-8)
    np.testing.assert_allclose(pts.amortization_gap, np_log_evidence(x, truth)
                               - np_mean_field_gap(truth) - elbo_enc, atol=1e-3)
    tot = gaps.summary_row(mf, "total")
    assert tot["approximation_gap"] == pytest.approx(40 * np_mean_field_gap(truth), abs=4e-2)
    assert tot["elbo_amortized"] == pytest.approx(pts.elbo_amortized.sum())
    assert gaps.summary_row(mf)["approximation_gap"] == pytest.approx(tot["approximation_gap"] / 40)
    assert mf.attrs["q_star_converged"] and mf.attrs["estimator"] == "closed-form"
    assert np.abs(fr[fr.scope == "point"].approximation_gap).max() < 1e-6
    # the amortized ELBO does not depend on F
    np.testing.assert_allclose(fr.elbo_amortized, mf.elbo_amortized)


def test_gaussian_approximation_gap_matches_numpy():
    """The closed form of the best mean-field / full-rank gap, from a posterior covariance built
    in numpy (L^-1, L = I + W^T Psi^-1 W), against the numpy formula on L."""
    _, _, truth = fa_data()
    W, _, psi = np_params(truth)
    cov = torch.as_tensor(np.linalg.inv(np.eye(W.shape[1]) + W.T @ (W / psi[:, None])))
    got = gaps.gaussian_approximation_gap(cov, "mean-field")
    assert float(got) == pytest.approx(np_mean_field_gap(truth), abs=1e-12)
    batched = gaps.gaussian_approximation_gap(cov.expand(3, -1, -1), "mean-field")
    assert batched.shape == (3,) and torch.allclose(batched, got.expand(3))
    assert float(gaps.gaussian_approximation_gap(cov, "full-rank")) == 0.0
    with pytest.raises(ValueError, match="^local_family:"):
        gaps.gaussian_approximation_gap(cov, "local-flow")


def test_converged_linear_full_encoder_has_no_amortization_gap():
    fam, x, truth = fa_data()
    with isolated(0):
        enc = guides.make("linear-full", fam, x)
        run = gaps.optimize_guide(fam, x, enc, method="closed-form",
                                  settings=gaps.QStarSettings(steps=2000, tol=1e-10))
        assert run.converged
        fr = gaps.decompose_gaps(fam, x, enc, "full-rank")
        mf = gaps.decompose_gaps(fam, x, enc, "mean-field")
    assert np.abs(fr[fr.scope == "point"].amortization_gap).max() < 1e-4
    assert np.abs(fr[fr.scope == "point"].inference_gap).max() < 1e-4
    # against the mean-field family the encoder's q beats q*_F: amortization gap = -approx gap
    np.testing.assert_allclose(mf[mf.scope == "point"].amortization_gap,
                               -np_mean_field_gap(truth), atol=1e-3)


def test_svi_trained_linear_full_encoder_amortization_gap_small():
    """Guide-only SVI (elbolab.inference.svi.fit) 1000 steps: the remaining KL(q || p(z | x)) per point
    is Adam noise, ~1e-3 nats (measured); 0.03 is a failure only if training is broken."""
    from elbolab.inference import svi

    fam, x, _ = fa_data(n=30)
    s = svi.Settings(num_steps=1000, lr=0.05, lr_decay=0.05, num_particles=4, eval_particles=10,
                     num_posterior_samples=0, learn_model_params=False)
    r = svi.fit(fam, x, s, guide=guides.spec("linear-full"), seed=0)
    df = gaps.decompose_gaps(fam, x, r.state.guide, "full-rank")
    row = gaps.summary_row(df)
    assert 0 <= row["amortization_gap"] < 0.03


def test_mc_estimator_agrees_with_closed_form_within_se():
    fam, x, truth = fa_data()
    with isolated(0):
        enc = guides.make("linear-diag", fam, x)
        mc = gaps.decompose_gaps(fam, x, enc, "mean-field", estimator="mc", num_particles=2000,
                                 particle_batch=500, seed=1)
        cf = gaps.decompose_gaps(fam, x, enc, "mean-field")
    m, c = gaps.summary_row(mc), gaps.summary_row(cf)
    for q in ("approximation_gap", "amortization_gap", "inference_gap", "elbo_q_star"):
        assert m[f"{q}_se"] > 0
        assert abs(m[q] - c[q]) < 4.5 * m[f"{q}_se"], q
    assert abs(m["approximation_gap"] - np_mean_field_gap(truth)) < 4.5 * m["approximation_gap_se"]
    assert mc.attrs["estimator"] == "mc" and mc.attrs["num_particles"] == 2000


def test_svi_optimizer_finds_mean_field_q_star():
    """The generic route (q* by SVI, ELBOs by MC) that the VAE uses, on FA where the answer is
    known. Remaining optimization error after the decayed-lr run: ~5e-3 nats (measured)."""
    fam, x, truth = fa_data(n=10)
    with isolated(0):
        enc = guides.make("linear-diag", fam, x)
        df = gaps.decompose_gaps(
            fam, x, enc, "mean-field", optimizer="svi", estimator="mc", num_particles=2000,
            settings=gaps.QStarSettings(steps=1500, lr=0.05, num_particles=16, tol=0), seed=0)
    row = gaps.summary_row(df)
    assert df.attrs["optimizer"] == "svi"
    assert abs(row["approximation_gap"] - np_mean_field_gap(truth)) < 0.02 + 4 * row[
        "approximation_gap_se"]


def test_log_evidence_inputs_and_errors():
    fam, x, truth = fa_data(n=10)
    lp = torch.as_tensor(np_log_evidence(x, truth))
    with isolated(0):
        enc = guides.make("linear-diag", fam, x)
        a = gaps.decompose_gaps(fam, x, enc, log_evidence=(lp, 0.01 * torch.ones(10)),
                                num_particles=50)
        assert a.attrs["estimator"] == "mc" and a.attrs["evidence_method"] == "given"
        assert a[a.scope == "point"].log_evidence_se.iloc[0] == pytest.approx(0.01)
        ev = Evidence(float(lp.sum()), 0.0, "iwae", 10, {"pointwise": lp})
        b = gaps.decompose_gaps(fam, x, enc, log_evidence=ev, num_particles=50)
        assert b.attrs["evidence_method"] == "iwae"
        with pytest.raises(ValueError, match="^log_evidence:"):
            gaps.decompose_gaps(fam, x, enc, log_evidence=lp[:5])
        with pytest.raises(ValueError, match="^log_evidence:"):
            gaps.decompose_gaps(fam, x, enc, log_evidence=Evidence(1.0, n=10))
        with pytest.raises(ValueError, match="^estimator:"):
            gaps.decompose_gaps(fam, x, enc, estimator="exact")

    class NoEvidence(FactorAnalysis):
        log_evidence_pointwise = None

    with pytest.raises(MissingCapability, match="IWAE"):
        gaps.decompose_gaps(NoEvidence(2, params=truth), x, enc)


def test_global_latent_is_rejected():
    fam = NormalMean()
    x = torch.randn(5, dtype=torch.float64)
    with isolated(0):
        g = guides.for_family(fam)["normal"].build(fam, x)
        with pytest.raises(ValueError, match="outside plate 'data'"):
            log_weights(fam.model, g, x, num_particles=3)


def test_float32_in_float32_out():
    fam, x, _ = fa_data(dtype=torch.float32)
    with isolated(0):
        enc = guides.make("linear-diag", fam, x)
        terms = gaps.gap_terms(fam, x, enc, "mean-field", estimator="mc", num_particles=20)
    assert all(v.dtype == torch.float32 for v in terms.values.values())
    assert terms.q_star.loc.dtype == torch.float32


def test_non_gaussian_guides_never_take_the_closed_form_path():
    """A guide with Gaussian ``moments`` but a non-Gaussian q (here exp-transformed) must be
    evaluated by Monte Carlo: its ELBO is not log p(x) - KL(N(moments) || posterior)."""
    import pyro.distributions as dist

    class SkewGuide(guides.MeanFieldGuide):
        def distribution(self, x, idx=None):
            base = super().distribution(x, idx)
            return dist.TransformedDistribution(base, [dist.transforms.ExpTransform()])

    fam, x, _ = fa_data(n=8)
    g = SkewGuide(8, 2, like=x)
    assert not gaps.closed_form_available(fam, x, g)
    assert gaps.closed_form_available(fam, x, guides.make("mean-field", fam, x))
    with isolated(0):
        enc = guides.make("linear-diag", fam, x)
        df = gaps.decompose_gaps(fam, x, enc, guides.GuideSpec("skew", lambda f, x, **o: g),
                                 num_particles=20, optimizer="svi",
                                 settings=gaps.QStarSettings(steps=5))
    assert df.attrs["estimator"] == "mc" and df.attrs["local_family"] == "skew"


# -- gap tools that protect the user (issue 8, section 6) ----------------------------------------
def test_local_family_defaults_to_the_guides_own_family():
    """A converged full-covariance encoder against the default family: no negative amortization
    gap (against mean-field it would be -(mean-field gap), as in the test above)."""
    fam, x, truth = fa_data()
    with isolated(0):
        full = guides.make("linear-full", fam, x)
        gaps.optimize_guide(fam, x, full, method="closed-form",
                            settings=gaps.QStarSettings(steps=2000, tol=1e-10))
        df = gaps.decompose_gaps(fam, x, full)
        diag = gaps.decompose_gaps(fam, x, guides.make("linear-diag", fam, x), num_particles=50)
    assert df.attrs["local_family"] == "full-rank" and diag.attrs["local_family"] == "mean-field"
    assert gaps.summary_row(df)["amortization_gap"] > -1e-6 and not df.flagged.any()
    assert gaps.matching_local_family(guides.make("mlp", fam, x)) == "mean-field"
    assert gaps.matching_local_family(guides.make("flow", fam, x)) == "local-flow"
    with pytest.raises(ValueError, match="^local_family:"):
        gaps.matching_local_family(lambda x: None)


def test_every_estimate_carries_ess_and_khat():
    fam, x, truth = fa_data(n=20)
    with isolated(0):
        exact = guides.make("exact", fam, x)
        df = gaps.decompose_gaps(fam, x, exact, "full-rank", num_particles=200)
    pts = df[df.scope == "point"]
    for col in gaps.DIAGNOSTICS:
        assert col in df.columns
    # q = p(z | x): every weight equal, k-hat -inf, ESS = S
    assert (pts.khat_amortized == -np.inf).all()
    np.testing.assert_allclose(pts.ess_amortized, 200.0)
    assert pts.log_evidence_ess.isna().all()  # an exact evidence has no weights
    assert not df.flagged.any() and df.attrs["diagnostic_particles"] == 200


def test_a_bad_evidence_estimate_is_flagged_and_warned_about():
    """An IWAE from the prior with 3 samples (ESS ~1) sits far below log p(x): the approximation
    gap comes out negative by many SEs, which the table flags and a warning names."""
    from elbolab.inference.evaluation.evidence import iwae

    fam, x, truth = fa_data(n=30)
    with isolated(0):
        enc = guides.make("linear-diag", fam, x)

        def prior_guide(x, subsample_size=None):
            with pyro.plate("data", x.shape[0], dim=-1):
                pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))

        bad = iwae(fam.model, prior_guide, x, num_samples=3, seed=0)
        assert bad.details["min_ess"] < 3
        with pytest.warns(UserWarning, match="guide 'linear-diag'.*approximation_gap"):
            df = gaps.decompose_gaps(fam, x, enc, log_evidence=bad, num_particles=100)
    mean = gaps.summary_row(df)
    assert mean["approximation_gap"] < -3 * mean["approximation_gap_se"]
    assert mean["flagged"] and "approximation_gap" in mean["flags"]
    assert df.attrs["evidence_method"] == "iwae"
    assert np.isfinite(df[df.scope == "point"].log_evidence_ess).all()


def test_a_narrow_guide_is_flagged_by_khat():
    """An encoder whose q is 10x narrower than p(z | x): k-hat of its weights ~1 - 0.01 > 0.7."""
    fam, x, truth = fa_data(n=15)
    with isolated(0):
        exact = guides.make("exact", fam, x)
        narrow = guides.make("full-rank", fam, x)
        loc, tril = exact.moments(x)
        narrow.set_moments(loc, 0.1 * tril)
        with pytest.warns(UserWarning, match="guide 'full-rank'.*khat_amortized"):
            df = gaps.decompose_gaps(fam, x, narrow, num_particles=1000)
    pts = df[df.scope == "point"]
    assert (pts.khat_amortized > 0.7).mean() > 0.8 and pts.flagged.mean() > 0.8


def test_library_evidence_objects_are_accepted():
    fam, x, truth = fa_data(n=10)
    with isolated(0):
        enc = guides.make("linear-full", fam, x)
        ev = fam.log_evidence(x)
        total_only = Evidence(ev.value, 0.0, "exact", 10)
        a = gaps.decompose_gaps(fam, x, enc, log_evidence=total_only, num_particles=50)
        np.testing.assert_allclose(a[a.scope == "point"].log_evidence, np_log_evidence(x, truth))
        with pytest.raises(ValueError, match="^log_evidence: the exact total"):
            gaps.decompose_gaps(fam, x, enc, log_evidence=Evidence(ev.value + 1, 0.0, "exact", 10))
        picked = gaps.decompose_gaps(fam, x, enc, num_particles=50,
                                     log_evidence=D.tightest_evidence(
                                         Evidence(ev.value - 1, 0.1, "ais", 10,
                                                  {"pointwise": ev.pointwise - 0.1}), ev))
        assert picked.attrs["evidence_method"] == "exact"
