"""PSIS k-hat, importance ESS, the tightest evidence, reference tables and trace figures.

Oracles: the Pareto tail index of importance weights between Gaussians (q = N(0, s^2) for
p = N(0, 1): w = exp(z^2 (1/s^2 - 1) / 2), so P(w > t) ~ t^(-1/(1 - s^2)) and k = 1 - s^2; for a
mean-field q at its optimum for a Gaussian posterior with precision L, u = D^1/2 z ~ N(0, I) and
log w = -u^T (R - I) u / 2 with R = D^-1/2 L D^-1/2, so k = 1 - lambda_min(R)); Pyro's own
generalized-Pareto fit; the closed-form FA evidence (scipy) and CAVI's closed-form ELBO; numpy /
scipy for the reference table; the W1 distance between two Gaussians with equal means,
|s1 - s2| sqrt(2 / pi).
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.stats import multivariate_normal

from elbolab import guides, inference
from elbolab.experiments.core.plots import bounds_figure, label_of
from elbolab.inference.evaluation import diagnostics as D
from elbolab.inference.evaluation.reference import mcmc_table, reference_table
from elbolab.inference.runtime import isolated
from elbolab.models.base import ModelFamily
from elbolab.models.capabilities import Evidence
from elbolab.models.fa.model import FactorAnalysis
from elbolab.models.gmm.model import BayesianGMM
from elbolab.models.validate import as_data


def gaussian_log_weights(s, shape, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=shape) * s
    return -0.5 * z**2 + 0.5 * (z / s) ** 2 + np.log(s)  # log N(z; 0, 1) - log N(z; 0, s^2)


def test_khat_of_equal_weights_is_minus_inf_and_ess_is_s():
    lw = np.full((3, 100), -7.25)
    assert np.all(D.pareto_khat(lw) == -np.inf)
    np.testing.assert_allclose(D.importance_ess(lw), 100.0)
    assert math.isnan(D.pareto_khat(np.linspace(0, 1, 10)))  # too few draws: not estimated


@pytest.mark.parametrize("s", [0.2, 0.3, 0.6, 0.8])
def test_khat_of_gaussian_weights_near_tail_index(s):
    """Mean k-hat of 20 runs of 4000 draws within 0.15 of k = 1 - s^2 (measured: finite-S
    k-hats run up to ~0.12 low near k = 1, where the tail reaches its index slowly; the mean's
    sd is ~0.03)."""
    k = D.pareto_khat(gaussian_log_weights(s, (20, 4000), seed=1))
    assert k.shape == (20,)
    assert abs(k.mean() - (1 - s**2)) < 0.15
    if s <= 0.3:
        assert k.mean() > D.KHAT_THRESHOLD  # q much narrower than p: not reliable


def test_khat_of_wider_q_is_negative_and_agrees_with_pyro():
    from pyro.ops.stats import fit_generalized_pareto

    lw = gaussian_log_weights(1.5, 4000, seed=2)  # bounded weights
    k = D.pareto_khat(lw)
    assert k < 0
    # the same Zhang-Stephens fit (with its weak prior) implemented by Pyro
    lw_s = torch.as_tensor(np.sort(lw - lw.max()))
    cut = lw_s[-int(math.ceil(min(0.2 * 4000, 3 * math.sqrt(4000)))) - 1]
    tail = lw_s[lw_s > cut]
    k_pyro, _ = fit_generalized_pareto(tail.exp() - cut.exp())
    assert k == pytest.approx(k_pyro, abs=1e-8)
    lw2 = gaussian_log_weights(0.5, 4000, seed=3)
    lw2_s = torch.as_tensor(np.sort(lw2 - lw2.max()))
    cut2 = lw2_s[-int(math.ceil(3 * math.sqrt(4000))) - 1]
    k2, _ = fit_generalized_pareto(lw2_s[lw2_s > cut2].exp() - cut2.exp())
    assert D.pareto_khat(lw2) == pytest.approx(k2, abs=1e-8)


def test_importance_ess_formula():
    lw = np.log(np.array([1.0, 2.0, 3.0, 4.0]))
    w = np.exp(lw)
    assert D.importance_ess(lw) == pytest.approx(w.sum() ** 2 / (w**2).sum())
    with pytest.raises(ValueError, match="^log_weights:"):
        D.pareto_khat(np.full(30, np.nan))


def fa_setup(n=200, d=6, k=2, seed=0):
    x, truth = FactorAnalysis(k, dim=d).simulate(n, seed=seed)
    return FactorAnalysis(k, params=truth), x, truth


def test_exact_guide_weights_are_the_log_evidence_and_khat_minus_inf():
    fam, x, truth = fa_setup(n=30)
    C = (truth.W @ truth.W.T + torch.diag(truth.psi)).numpy()
    exact = multivariate_normal(truth.mu.numpy(), C).logpdf(x.numpy())
    with isolated(0):
        g = guides.make("exact", fam, x)
        w = D.importance_log_weights(fam.model, g, x, num_samples=50)
        d = D.psis_khat((fam.model, g), x, family=fam, num_samples=50)
    np.testing.assert_allclose(w.pointwise.numpy(), np.broadcast_to(exact, (50, 30)), atol=1e-9)
    np.testing.assert_allclose(w.joint.numpy(), exact.sum(), atol=1e-8)
    assert d.khat == -np.inf and np.all(d.khat_points == -np.inf) and d.reliable
    assert d.ess == pytest.approx(50) and d.frac_points_above == 0.0


def test_mean_field_khat_per_point_matches_posterior_correlation():
    """q_n = prod_j N(m_nj, 1 / L_jj), the mean-field optimum: k = 1 - lambda_min(R) for every
    point (module docstring). The median of 200 per-point k-hats (S = 1000): within 0.06
    (measured 0.374 against 0.357)."""
    fam, x, truth = fa_setup()
    mean, cov = fam.exact_posterior(x)
    prec = torch.linalg.inv(cov.reshape(-1, 2, 2)[0])
    diag = prec.diagonal()
    R = prec / torch.sqrt(diag[:, None] * diag[None, :])
    theory = float(1 - torch.linalg.eigvalsh(R).min())
    with isolated(0):
        g = guides.make("mean-field", fam, x)
        g.set_moments(mean, torch.diag_embed(diag.rsqrt()).expand(200, 2, 2))
        d = D.psis_khat((fam.model, g), x, family=fam, num_samples=1000, seed=1)
    assert d.khat_points.shape == (200,)
    assert abs(np.median(d.khat_points) - theory) < 0.06


def test_gmm_cavi_weights_average_to_the_closed_form_elbo():
    fam = BayesianGMM(K=2, prior_var=4.0)
    x, _ = fam.simulate(40, seed=0)
    cavi = inference.fit("cavi", fam, x, seed=0)
    g = D.cavi_guide(cavi, fam, x)
    w = D.importance_log_weights(fam.model, g, x, num_samples=4000, seed=0).joint
    se = float(w.std()) / math.sqrt(4000)
    assert abs(float(w.mean()) - cavi.elbo) < 4.5 * se
    d = D.psis_khat(cavi, x, family=fam, num_samples=500)
    assert d.khat_points is None and "outside plate 'data'" in d.note
    with pytest.raises(ValueError, match="^family:"):
        D.psis_khat(cavi, x)


def test_gmm_collapsed_weights_sum_the_assignments_out():
    """Weights of the collapsed guide against an independent computation: mu ~ q drawn here,
    w = log p(x, mu) (eq. 5 of models/gmm.py, c summed out) - log q(mu); means agree within
    4.5 SE, sds within 10%."""
    fam = BayesianGMM(K=2, prior_var=4.0)
    x, _ = fam.simulate(40, seed=1)
    r = inference.fit("svi", fam, x, seed=0, guide="collapsed", num_steps=100)
    S = 4000
    with r.fitted() as (model, guide):
        w = D.importance_log_weights(model, guide, x, num_samples=S, seed=3).joint
    loc, scale = r.state.params["q_mu_loc"], r.state.params["q_mu_scale"]
    g = torch.Generator().manual_seed(5)
    mu = loc + scale[:, None] * torch.randn((S, *loc.shape), generator=g, dtype=loc.dtype)
    ref = fam.log_joint(x, mu) - dist.Normal(loc, scale[:, None]).log_prob(mu).sum((-1, -2))
    se = math.sqrt(float(w.var()) / S + float(ref.var()) / S)
    assert abs(float(w.mean() - ref.mean())) < 4.5 * se
    assert float(w.std() / ref.std()) == pytest.approx(1.0, abs=0.1)


def test_psis_on_results_of_every_engine():
    fam, x, _ = fa_setup(n=60)
    svi = inference.fit("svi", fam, x, seed=0, guide="linear-full", num_steps=200)
    d = D.psis_khat(svi, x, num_samples=400)
    assert d.khat_points.shape == (60,) and d.khat_max_point < D.KHAT_THRESHOLD
    row = D.psis_row(svi, x, num_samples=400)
    assert set(row) >= {"khat", "khat_max_point", "khat_frac_points_above", "is_ess"}
    cavi = inference.fit("cavi", fam, x, seed=0)
    dc = D.psis_khat(cavi, x, family=fam, num_samples=400)
    assert dc.khat_points.shape == (60,)
    em = inference.fit("em", FactorAnalysis(2), x, seed=0)
    row = D.psis_row(em, x)
    assert math.isnan(row["khat"]) and "em fit has no variational" in row["psis_note"]
    with pytest.raises(D.NotVariational, match="^fit:"):
        D.psis_khat(em, x)
    with pytest.raises(TypeError, match="^fit:"):
        D.psis_khat("svi", x)


class GlobalPlusLocal(ModelFamily):
    """A researcher's model: global theta, local z_n, x_n ~ N(theta + z_n, 0.5)."""

    name = "global-plus-local"

    def check_data(self, x):
        return as_data(x, "x", ndim=2)

    def model(self, x, subsample_size=None):
        theta = pyro.sample("theta", dist.Normal(x.new_zeros(1), 2.0).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1) as i:
            z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(theta + z, math.sqrt(0.5)).to_event(1), obs=x[i])


def test_user_model_with_a_global_latent_gets_the_overall_khat():
    x = torch.randn(30, 1, dtype=torch.float64) + 1.0
    fit = inference.fit("svi", GlobalPlusLocal(), x, seed=0, guide="mean-field", num_steps=300)
    d = D.psis_khat(fit, x, num_samples=300)
    assert math.isfinite(d.khat) and d.khat_points is None
    assert "theta" in d.note and math.isnan(d.row()["khat_max_point"])

    def partial_guide(x, subsample_size=None):  # forgets z
        pyro.sample("theta", dist.Normal(x.new_zeros(1), 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"^guide: .*\['z'\]"):
        D.importance_log_weights(GlobalPlusLocal().model, partial_guide, x, num_samples=10)


def test_tightest_evidence_takes_the_larger_lower_bound_and_keeps_the_upper():
    pw = torch.tensor([-1.0, -2.0])
    ais = Evidence(-3.02, 0.01, "ais", 2, {"pointwise": pw - 0.01})
    iwae = Evidence(-3.0, 0.01, "iwae", 2, {"pointwise": pw})
    upper = Evidence(-2.9, 0.01, "bdmc-upper", 2, {"pointwise": pw + 0.05})
    best = D.tightest_evidence(ais, iwae, upper)
    assert best.method == "iwae" and best.value == -3.0
    assert best.details["upper"] is upper and best.details["candidates"] == {"ais": -3.02,
                                                                             "iwae": -3.0}
    exact = Evidence(-2.95, 0.0, "exact", 2, {"pointwise": pw})
    assert D.tightest_evidence(iwae, exact).method == "exact"
    assert "upper" not in ais.details  # inputs untouched
    with pytest.raises(ValueError, match="^evidences:"):
        D.tightest_evidence(upper)
    with pytest.raises(TypeError, match="^evidences:"):
        D.tightest_evidence(-3.0)
    with pytest.raises(ValueError, match="^evidences:"):
        D.tightest_evidence(iwae, Evidence(-1.0, 0.0, "ais", 3))


def test_reference_table_against_numpy_scipy_and_gaussian_w1():
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20000, 2)) * [1.0, 2.0]
    narrow = rng.normal(size=(20000, 2)) * [0.5, 2.0] + [0.0, 1.0]
    point = np.array([[0.3, -0.2]])
    df = reference_table({"nuts": ref, "vi": narrow, "map": point}, "nuts", ["a", "b"])
    vi = df[df.method == "vi"].set_index("quantity")
    assert vi.loc["a", "sd_ratio"] == pytest.approx(narrow[:, 0].std(ddof=1) / ref[:, 0].std(ddof=1))
    assert vi.loc["b", "mean_error"] == pytest.approx(narrow[:, 1].mean() - ref[:, 1].mean())
    assert vi.loc["a", "w1"] == pytest.approx(wasserstein_distance(narrow[:, 0], ref[:, 0]))
    assert vi.loc["a", "w1"] == pytest.approx(0.5 * math.sqrt(2 / math.pi), abs=0.02)
    assert vi.loc["b", "w1"] == pytest.approx(1.0, abs=0.03)  # a shift by 1
    mp = df[df.method == "map"].set_index("quantity")
    assert math.isnan(mp.loc["a", "sd_ratio"])
    assert mp.loc["a", "w1"] == pytest.approx(np.abs(ref[:, 0] - 0.3).mean())
    assert set(df.method) == {"vi", "map"} and (df.reference == "nuts").all()
    with pytest.raises(ValueError, match="^reference:"):
        reference_table({"vi": narrow}, "nuts")


def test_mcmc_table_flags_a_stuck_chain():
    rng = np.random.default_rng(0)
    good = rng.normal(size=(4, 500, 2))
    bad = good.copy()
    bad[0, :, 1] += 3.0
    df = mcmc_table({"theta": bad})
    assert list(df.quantity) == ["theta[1]", "theta[0]"]  # worst R-hat first
    assert df.r_hat.iloc[0] > 1.1 and df.r_hat.iloc[1] < 1.01
    assert df.ess_bulk.iloc[1] > 1000  # independent draws
    with pytest.raises(ValueError, match="^var_names:"):
        mcmc_table({"theta": bad}, ["mu"])


def test_bounds_figure_separates_map_and_labels_fixed_from_learned():
    fam, x, _ = fa_setup(n=40)
    em = inference.fit("em", FactorAnalysis(2), x, seed=0)
    s1 = inference.fit("svi", fam, x, seed=0, guide="mlp", num_steps=20)
    s1.settings["params"] = "fixed-em"
    s2 = inference.fit("svi", FactorAnalysis(2), x, seed=0, guide="mlp", num_steps=20)
    s2.settings["params"] = "learned"
    ev = fam.log_evidence(x)
    fig = bounds_figure([em, s1, s2], "t", ev)
    left, right = fig.axes
    labels = [t.get_text() for t in left.get_legend().get_texts()]
    assert labels[:2] == [label_of(s1), label_of(s2)] and labels[0] != labels[1]
    assert "[fixed-em]" in labels[0] and "[learned]" in labels[1]
    assert any(ln.get_ydata()[0] == pytest.approx(ev.value / 40) for ln in left.get_lines())
    assert [t.get_text() for t in right.get_legend().get_texts()] == [label_of(em)]


def test_mcmc_figures_show_the_worst_quantities(tmp_path):
    from elbolab.experiments.core.plots import mcmc_outputs

    rng = np.random.default_rng(1)
    draws = rng.normal(size=(3, 200, 4))
    draws[1, :, 2] += 2.0  # one chain stuck elsewhere in component 2
    table = mcmc_outputs({"theta": draws, "lp": rng.normal(size=(3, 200))}, tmp_path,
                         max_quantities=2)
    assert table.quantity.iloc[0] == "theta[2]"
    for name in ("mcmc_diagnostics.csv", "mcmc_trace.png", "mcmc_rank.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_local_reference_table_against_the_mean_field_closed_form():
    """q_n = the mean-field optimum (exact mean, variances 1 / L_jj): sd ratio to the exact
    posterior sqrt(1 / (L_jj Sigma_jj)) in every coordinate, mean error 0 up to Monte Carlo
    (rms over points of (mean of 2000 draws - mean of 2000 draws) ~ sd sqrt(2 / 2000))."""
    from elbolab.inference.evaluation.reference import local_reference_table

    fam, x, _ = fa_setup(n=50)
    mean, cov = fam.exact_posterior(x)
    cov = cov.reshape(-1, 2, 2)[0]
    prec = torch.linalg.inv(cov)
    theory = torch.sqrt(1 / (prec.diagonal() * cov.diagonal())).numpy()
    with isolated(0):
        g = guides.make("mean-field", fam, x)
        g.set_moments(mean, torch.diag_embed(prec.diagonal().rsqrt()).expand(50, 2, 2))
        ex = guides.make("exact", fam, x)
        df = local_reference_table(fam, x, {"mf": g, "exact": ex}, num_samples=2000, seed=0)
    mf, exact = df[df.method == "mf"], df[df.method == "exact"]
    np.testing.assert_allclose(mf.sd_ratio, theory, atol=0.03)
    np.testing.assert_allclose(exact.sd_ratio, 1.0, atol=0.03)
    assert (exact.mean_error_in_ref_sd < 4 * math.sqrt(2 / 2000)).all()
    assert (mf.w1_in_ref_sd.to_numpy() > exact.w1_in_ref_sd.to_numpy()).all()


def test_guide_draws_shapes_and_psis_frame():
    from elbolab.inference.evaluation.reference import guide_draws

    fam = BayesianGMM(K=2, prior_var=4.0)
    x, _ = fam.simulate(20, seed=0)
    cavi = inference.fit("cavi", fam, x, seed=0)
    d = guide_draws(D.cavi_guide(cavi, fam, x), x, num_samples=30)
    assert d["mu"].shape == (30, 2, 1) and d["c"].shape == (30, 20)
    em = inference.fit("em", fam, x, seed=0)
    frame = D.psis_frame([em, cavi, cavi], x, family_of=lambda r: fam if r is cavi else None,
                         num_samples=100)
    assert len(frame) == 3 and math.isnan(frame.khat[0]) and math.isfinite(frame.khat[1])


def test_psis_leaves_the_callers_random_state_alone():
    fam, x, _ = fa_setup(n=20)
    with isolated(0):
        g = guides.make("mean-field", fam, x)
        torch.manual_seed(123)
        before = torch.get_rng_state()
        a = D.psis_khat((fam.model, g), x, num_samples=100, seed=4)
        assert torch.equal(before, torch.get_rng_state())
        b = D.psis_khat((fam.model, g), x, num_samples=100, seed=4)
    assert a.khat == b.khat and np.array_equal(a.khat_points, b.khat_points)
