"""Smoke test of ``elbolab run fa_gaps --quick``: files, columns, and the identities that must hold
whatever the (tiny) settings: the EM row's gap is 0 (its bound is the exact log-likelihood), the
CAVI row's gap per datum is the closed-form mean-field gap (CAVI reaches q*), and the gap
decomposition reproduces the closed-form approximation gap. The Bayesian FA rows (VB, NUTS), the
posterior comparison and the NUTS netCDF file are there, with the inequalities that must hold."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from elbolab import inference
from elbolab.experiments import cli
from elbolab.experiments.core.common import SUMMARY_COLUMNS
from elbolab.experiments.fa_bayes_impute import (
    POSTERIOR_COLUMNS,
    posterior_table,
    run_bayes,
    vb_covariance_moments,
)
from elbolab.experiments.fa_gaps import GAP_COLUMNS, parse
from elbolab.inference.closed_form import cavi
from elbolab.models.fa.bayes import BayesianFactorAnalysis
from elbolab.models.fa.model import FactorAnalysis


def test_quick_run_writes_everything(tmp_path):
    out = tmp_path / "fa"
    assert cli.main(["run", "fa_gaps", "--quick", "--out", str(out), "--seed", "3"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"summary.csv", "gaps.csv", "gaps_points.csv", "imputation.csv", "run.json",
            "params.pt", "elbo_traces.png", "gaps.png", "imputation_scatter.png"} <= names

    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns[: len(SUMMARY_COLUMNS)]) == SUMMARY_COLUMNS
    bayes, summary = summary[summary.model == "bayes-fa"], summary[summary.model != "bayes-fa"]
    assert np.isfinite(summary.log_evidence).all()
    em = summary[summary.engine == "em"].iloc[0]
    assert abs(em.gap) < 1e-6 and em.bound == "log-likelihood"
    run = json.loads((out / "run.json").read_text())
    cf = run["closed_form_mean_field_gap_per_datum"]
    cavi = summary[summary.engine == "cavi"].iloc[0]
    assert cavi.gap_per_datum == pytest.approx(cf, abs=1e-6)
    svi = summary[summary.engine == "svi"]
    assert set(svi.guide) >= {"mean-field", "full-rank", "linear-diag", "linear-full", "mlp"}
    assert set(svi.params) == {"fixed-em", "learned"}

    g = pd.read_csv(out / "gaps.csv")
    assert list(g.columns) == GAP_COLUMNS
    np.testing.assert_allclose(g.approximation_gap_exact, g.closed_form_approximation_gap,
                               atol=1e-6)
    assert (np.abs(g.approximation_gap - g.closed_form_approximation_gap)
            <= 5 * g.approximation_gap_se + 1e-9).all()
    np.testing.assert_allclose(g.inference_gap, g.approximation_gap + g.amortization_gap,
                               atol=1e-9)

    imp = pd.read_csv(out / "imputation.csv")
    assert {"exact-conditional", "importance-prior", "column-mean", "em-missing+exact"} <= set(
        imp.method)
    assert (imp.rmse > 0).all()

    params = torch.load(out / "params.pt", weights_only=True)
    assert params["em.W"].shape == (5, 2) and params["em.W"].dtype == torch.float64
    assert "guide.linear-full.loc_net.weight" in params and "truth.psi" in params

    # Bayesian FA rows: VB (closed-form ELBO) and NUTS; the Bayesian evidence is not tractable
    assert {"mcmc.nc", "posterior.csv"} <= names
    vb = bayes[bayes.engine == "cavi"].iloc[0]
    nuts = bayes[bayes.engine == "mcmc"].iloc[0]
    assert (vb.guide, vb.bound, nuts.guide, nuts.bound) == ("vb", "elbo", "nuts", "none")
    assert bayes.log_evidence.isna().all() and bayes.gap.isna().all()
    # ELBO <= log int p(x|theta) p(theta) dtheta <= max_theta log p(x|theta) (prior integrates
    # to 1); EM's value is that maximum up to its tolerance, and the Occam factor is > 1 nat here
    assert vb.elbo < em.elbo and np.isfinite(vb.elbo)
    # every posterior draw's log-likelihood is at most the maximum
    assert nuts.diag_post_mean_log_lik < em.elbo
    assert np.isfinite([nuts.diag_r_hat_max, nuts.diag_ess_bulk_min, nuts.diag_ess_tail_min]).all()
    assert nuts.diag_divergences >= 0
    b = run["bayes_fa"]
    assert b["vb"]["elbo"] == pytest.approx(vb.elbo, rel=1e-12)
    assert {"r_hat_max", "ess_bulk_min", "ess_tail_min", "divergences"} <= set(b["nuts"])
    assert b["nuts"]["chains"] == 2 and b["nuts"]["samples"] == 30

    post = pd.read_csv(out / "posterior.csv")
    assert list(post.columns) == POSTERIOR_COLUMNS and len(post) == 15  # d (d + 1) / 2, d = 5
    iu = torch.triu_indices(5, 5)
    for col, key in (("em", "em"), ("truth", "truth")):
        W, psi = params[f"{key}.W"], params[f"{key}.psi"]
        C = W @ W.T + torch.diag(psi)
        np.testing.assert_allclose(post[col], C[iu[0], iu[1]].numpy(), rtol=1e-10)
    assert (post.vb_sd > 0).all() and (post.nuts_sd > 0).all() and (post.nuts_mcse > 0).all()
    assert (post[post.i == post.j].nuts_mean > 0).all()

    import arviz as az

    idata = az.from_netcdf(out / "mcmc.nc")
    assert idata.posterior["cov"].shape == (2, 30, 15)
    assert idata.log_likelihood["x"].shape[:2] == (2, 30)


def test_vb_covariance_moments_match_monte_carlo_from_q():
    g = torch.Generator().manual_seed(0)
    x, _ = FactorAnalysis(2, dim=4).simulate(25, seed=2)
    r = inference.fit("cavi", BayesianFactorAnalysis(2), x, cavi.Settings(max_iter=200), seed=0)
    mean, sd = vb_covariance_moments(r.posterior)
    post, S, k = r.posterior, 200_000, 2
    # independent sampler: rows w~_i ~ N(loc_i, cov_i), tau_i ~ Gamma(a, b_i)
    L = torch.linalg.cholesky(post["Wmu_cov"])
    eps = torch.randn(S, 4, k + 1, generator=g, dtype=torch.float64)
    loc = torch.cat([post["W_loc"], post["mu_loc"][:, None]], 1)
    W = (loc + (L @ eps.unsqueeze(-1)).squeeze(-1))[..., :k]
    tau = torch.distributions.Gamma(post["tau_shape"], post["tau_rate"]).sample((S,))
    C = W @ W.transpose(-1, -2) + torch.diag_embed(1 / tau)
    mc_mean, mc_sd = C.mean(0), C.std(0)
    # 5 Monte Carlo standard errors: SE(mean) = sd / sqrt(S); SE(sd) = sd(dev^2) / (2 sd sqrt(S))
    dev2 = (C - mc_mean) ** 2
    se_sd = dev2.std(0) / (2 * mc_sd * S**0.5)
    assert ((mean - mc_mean).abs() <= 5 * mc_sd / S**0.5).all()
    assert ((sd - mc_sd).abs() <= 5 * se_sd).all()


def test_bayes_rows_without_nuts_and_flag_checks():
    args = parse(["--quick", "--engines", "em,cavi,svi"])
    assert "mcmc" not in args.engine_list and args.nuts_chains == 2 and args.nuts_samples == 30
    x, truth = FactorAnalysis(1, dim=3).simulate(30, seed=0)
    _, vb, nuts = run_bayes(args.__class__(**{**vars(args), "latent_dim": 1}), x, False)
    assert nuts is None and vb.model == "bayes-fa" and vb.guide == "vb"
    post = posterior_table(x, vb, None, truth, truth)
    assert post.nuts_mean.isna().all() and post.vb_mean.notna().all()
    for flags in (["--nuts-chains", "0"], ["--nuts-samples", "2"], ["--nuts-depth", "0"]):
        with pytest.raises(SystemExit):
            parse(flags)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_data_in_large_units_is_one_line_saying_what_to_do(tmp_path, capsys, dtype):
    """Issue 21: FA data x 1e6 tracebacked in the SVI/guide stages; now a one-line --data error
    before any work, nothing left behind."""
    x, _ = FactorAnalysis(2, dim=5).simulate(40, seed=0, dtype=torch.float64)
    np.save(tmp_path / "big.npy", x.numpy() * 1e6)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "fa_gaps", "--quick", "--data", str(tmp_path / "big.npy"), "--dtype",
                  dtype, "--out", str(out), "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fa_gaps: --data: ") and "standardize" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npy"]


def test_runaway_learning_rate_flags_rows_and_goes_on(tmp_path):
    """Issue 21: --svi-lr 1e6 tracebacked; now every SVI row stops at the step that ran away,
    keeps its last good state (an ELBO of the size of the EM row's, not 1e22) and is flagged."""
    out = tmp_path / "out"
    argv = ["--quick", "--no-progress", "--out", str(out), "--svi-lr", "1e6", "--engines",
            "em,svi", "--guides", "linear-full,mlp", "--joint-guides", "mlp"]
    assert cli.main(["run", "fa_gaps", *argv]) == 0
    s = pd.read_csv(out / "summary.csv")
    svi_rows = s[s.engine == "svi"]
    assert len(svi_rows) == 3 and svi_rows.diag_diverged.astype(bool).all()
    em_elbo = float(s[s.engine == "em"].elbo.iloc[0])
    assert np.isfinite(svi_rows.elbo).all()
    assert (svi_rows.elbo.abs() < 1e3 * abs(em_elbo)).all(), svi_rows.elbo.tolist()
    assert not svi_rows.converged.astype(bool).any()
