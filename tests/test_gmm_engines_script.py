"""Smoke runs of ``python -m elbolab.experiments.gmm_engines --quick``: the files, their columns, and what
must hold whatever the (tiny) settings: every ELBO is a lower bound on the exact log evidence, the
CAVI gap is >= 0, EM's objective (log p(x, mu), no bound) has no gap, NUTS has no ELBO."""

from __future__ import annotations

import json
import math

import arviz as az
import numpy as np
import pandas as pd
import pytest

from elbolab.experiments import gmm_engines

#: the columns issue 2 (section 5) asks for in summary.csv
ISSUE_COLUMNS = [
    "model",
    "engine",
    "guide",
    "bound",
    "elbo",
    "elbo_se",
    "elbo_per_datum",
    "log_evidence",
    "log_evidence_se",
    "log_evidence_method",
    "gap",
    "seconds",
    "device",
    "seed",
    "converged",
]
ROWS = {
    ("em", "map"): "log-joint-map",
    ("cavi", "mean-field"): "elbo",
    ("svi", "mean-field"): "elbo",
    ("svi", "collapsed"): "elbo-collapsed",
    ("svi", "auto-normal"): "elbo-collapsed",
    ("svi", "auto-mvn"): "elbo-collapsed",
    ("mcmc", "nuts"): "none",
}
FILES = {
    "summary.csv",
    "posterior.csv",
    "run.json",
    "elbo_traces.png",
    "posterior_marginals.png",
    "mcmc.nc",
}


def check_outputs(out, K: int, d: int, n: int, seed: int) -> pd.DataFrame:
    assert FILES <= {p.name for p in out.iterdir()}
    for png in ("elbo_traces.png", "posterior_marginals.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    s = pd.read_csv(out / "summary.csv")
    assert set(ISSUE_COLUMNS) <= set(s.columns)
    assert {(e, g): b for e, g, b in zip(s.engine, s.guide, s.bound, strict=True)} == ROWS
    assert (s.model == "gmm").all() and (s.n == n).all() and (s.seed == seed).all()
    assert np.isfinite(s.log_evidence).all() and s.log_evidence.nunique() == 1
    assert np.allclose(s.log_K_factorial, math.lgamma(K + 1))
    bounds = s[s.bound.isin(["elbo", "elbo-collapsed"])]
    assert len(bounds) == 5 and np.isfinite(bounds.elbo).all()
    # ELBO <= log p(x): both estimates ~Gaussian about their values (CLT), so a valid bound
    # exceeds the evidence by 3 combined se with probability <= 0.0013
    se = np.sqrt(bounds.elbo_se**2 + bounds.log_evidence_se**2)
    assert (bounds.elbo <= bounds.log_evidence + 3 * se + 1e-9).all(), bounds
    np.testing.assert_allclose(bounds.gap, bounds.log_evidence - bounds.elbo)
    np.testing.assert_allclose(s.elbo_per_datum[bounds.index], bounds.elbo / n)
    cavi = s[s.engine == "cavi"].iloc[0]
    assert cavi.elbo_se == 0 and cavi.gap >= -3 * cavi.log_evidence_se - 1e-9
    assert math.isnan(s[s.engine == "em"].iloc[0].gap)
    nuts = s[s.engine == "mcmc"].iloc[0]
    assert math.isnan(nuts.elbo) and math.isnan(nuts.gap)

    p = pd.read_csv(out / "posterior.csv")
    assert {"engine", "quantity", "mean", "sd", "reference", "ref_mean", "ref_sd"} <= set(p.columns)
    assert {f"{e}/{g}" for e, g in ROWS} <= set(p.engine)
    # named as in mcmc_diagnostics.csv: mu_sorted[k,j], mean k (sorted), coordinate j
    assert set(p.quantity) == {f"mu_sorted[{k},{j}]" for k in range(K) for j in range(d)}
    assert np.isfinite(p.ref_mean).all() and (p.ref_sd > 0).all()
    # means sorted by their first coordinate (entries 0, d, 2d, ...) have ordered expectations
    for _, g in p.groupby("engine"):
        assert np.all(np.diff(g["mean"].to_numpy()[::d]) >= 0), g

    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == seed and run["device"] == "cpu" and run["n"] == n
    assert {"torch", "pyro", "arviz"} <= set(run["versions"])
    assert run["settings"]["K"] == K and run["log_evidence"]["method"]

    idata = az.from_netcdf(out / "mcmc.nc")
    mu = idata.posterior["mu"]
    assert mu.sizes["chain"] == run["settings"]["nuts_chains"] and mu.shape[-2] == K
    ll = idata.log_likelihood["x"]
    assert ll.shape == (mu.sizes["chain"], mu.sizes["draw"], n)
    return s


def test_quick_run_writes_everything(tmp_path):
    out = tmp_path / "gmm"
    assert gmm_engines.main(["--quick", "--out", str(out), "--no-progress", "--seed", "2"]) == 0
    s = check_outputs(out, K=3, d=1, n=30, seed=2)
    assert s.log_evidence_method.iloc[0] in ("quadrature", "importance")


def test_data_file_csv(tmp_path):
    # 12 two-dimensional points in two clusters, with a header row: d is read from the file and
    # n = 12, K = 2 is small enough for the exact evidence and exact posterior reference.
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-3, 1, (6, 2)), rng.normal(3, 1, (6, 2))])
    path = tmp_path / "points.csv"
    pd.DataFrame(x, columns=["a", "b"]).to_csv(path, index=False)
    out = tmp_path / "gmm"
    argv = ["--quick", "--data", str(path), "--K", "2", "--out", str(out), "--no-progress"]
    assert gmm_engines.main(argv) == 0
    s = check_outputs(out, K=2, d=2, n=12, seed=0)
    assert (s.log_evidence_method == "enumeration").all() and (s.log_evidence_se == 0).all()
    assert (pd.read_csv(out / "posterior.csv").reference == "exact").all()
    assert json.loads((out / "run.json").read_text())["data"]["data_file"] == str(path)


@pytest.mark.parametrize(
    "content,words",
    [
        ("a,b\n1,2\n3,\n", "x: contains NaN"),
        ("a,b\n1,x\n3,4\n", "--data: .*is not a number"),
        ("a\n", "--data:"),
    ],
)
def test_bad_data_file_exits_naming_the_field(tmp_path, content, words):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(SystemExit, match=words):
        gmm_engines.main(["--quick", "--data", str(path), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize(
    "flags,field",
    [(["--K", "0"], "K:"), (["--prior-var", "-1"], "prior_var:"), (["--svi-lr", "0"], "lr:")],
)
def test_bad_flags_exit_naming_the_field(tmp_path, flags, field):
    with pytest.raises(SystemExit, match=field):
        gmm_engines.main(["--quick", "--out", str(tmp_path / "o"), *flags])


def test_settings_too_large_to_finish_are_refused_before_any_work(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(SystemExit, match="--K: .*reasonable time"):
        gmm_engines.main(["--K", "200000", "--n", "100", "--out", str(out)])
    assert not out.exists() and not list(tmp_path.iterdir())


def test_quick_run_with_a_huge_K_is_refused_before_any_work(tmp_path, capsys):
    """Issue 21: --quick --K 200000 ran past 150 s; now one line naming --K, nothing written."""
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as info:
        gmm_engines.main(["--quick", "--K", "200000", "--out", str(out), "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gmm_engines: --K: "), err
    assert not list(tmp_path.iterdir())
