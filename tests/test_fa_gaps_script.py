"""Smoke test of ``elbolab run fa_gaps --quick``: files, columns, and the identities that must hold
whatever the (tiny) settings: the EM row's gap is 0 (its bound is the exact log-likelihood), the
CAVI row's gap per datum is the closed-form mean-field gap (CAVI reaches q*), and the gap
decomposition reproduces the closed-form approximation gap."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from experiments import cli
from experiments.common import SUMMARY_COLUMNS
from experiments.fa_gaps import GAP_COLUMNS


def test_quick_run_writes_everything(tmp_path):
    out = tmp_path / "fa"
    assert cli.main(["run", "fa_gaps", "--quick", "--out", str(out), "--seed", "3"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"summary.csv", "gaps.csv", "gaps_points.csv", "imputation.csv", "run.json",
            "params.pt", "elbo_traces.png", "gaps.png", "imputation_scatter.png"} <= names

    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns[: len(SUMMARY_COLUMNS)]) == SUMMARY_COLUMNS
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
