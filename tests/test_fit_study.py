"""``elbolab run fit``: any family through a study, from the command line and from Python.

The runs use tiny settings (seconds); their numbers are checked against what must hold whatever
the settings: every ELBO below the exact evidence at its own parameters (to 4 standard errors),
EM's objective equal to the exact log likelihood, IWAE between the ELBO and the evidence.
"""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from elbolab.experiments import cli
from elbolab.experiments import fit as fit_study
from elbolab.experiments.core import common

TINY = ["--quick", "--svi-steps", "60", "--eval-particles", "50", "--iwae-particles", "50",
        "--psis-samples", "50", "--ais-steps", "5", "--ais-chains", "2", "--qstar-steps", "20",
        "--gap-particles", "20", "--nuts-samples", "20", "--nuts-warmup", "20",
        "--nuts-depth", "3", "--no-progress"]

MFA = ["--model", "elbolab.models.mfa:MixtureOfFactorAnalysers",
       "--model-args", '{"K": 2, "latent_dim": 1, "dim": 4}']

# A user's module, written to a temporary folder and imported by path: one local latent per point,
# x_n = a z_n + b + noise, so p(x_n) = N(b, a^2 + v) is the exact evidence.
USER_MODULE = textwrap.dedent('''
    import math
    import pyro
    import pyro.distributions as dist
    import torch
    from elbolab.models.base import ModelFamily
    from elbolab.models.capabilities import Evidence
    from elbolab.models.validate import as_data

    A, B, V = 2.0, 1.0, 0.5

    class LocalOnly(ModelFamily):
        name = "local-only"

        def check_data(self, x):
            return as_data(x, "x", ndim=2)

        def model(self, x, subsample_size=None):
            with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1) as i:
                z = pyro.sample("u", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(A * z + B, math.sqrt(V)).to_event(1), obs=x[i])

        def log_evidence(self, x):
            x = self.check_data(x)
            lp = dist.Normal(B, math.sqrt(A * A + V)).log_prob(x).sum(-1)
            return Evidence(float(lp.sum()), 0.0, "exact", x.shape[0], {"pointwise": lp})

    NOT_A_FAMILY = 3

    class BadScale(LocalOnly):
        """A user's model that fails on its own bad argument (scale < 0) when run."""

        name = "bad-scale"

        def __init__(self, scale=1.0):
            self.scale = scale

        def model(self, x, subsample_size=None):
            with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1) as i:
                pyro.sample("x", dist.Normal(x.new_zeros(1), self.scale).to_event(1), obs=x[i])
                pyro.sample("u", dist.Normal(x.new_zeros(1), self.scale).to_event(1))
''')


def _columns_ok(summary: pd.DataFrame):
    assert list(summary.columns[:len(common.SUMMARY_COLUMNS)]) == common.SUMMARY_COLUMNS
    for col in ("params", "iwae", "iwae_se", "ais", "ais_se", "khat", "notes"):
        assert col in summary.columns, col


def _honest(summary: pd.DataFrame):
    """ELBO <= log p(x) at the row's own parameters, up to 4 Monte Carlo standard errors."""
    rows = summary[summary.bound.isin(["elbo", "elbo-collapsed"])]
    assert len(rows)
    for _, r in rows.iterrows():
        assert r.log_evidence_method == "exact"
        assert r.gap >= -4 * r.elbo_se, (r.guide, r.gap, r.elbo_se)


def test_mfa_through_the_cli(tmp_path):
    out = tmp_path / "mfa"
    assert cli.main(["run", "fit", *MFA, *TINY, "--n", "30", "--engines", "em,svi,mcmc",
                     "--guides", "mlp", "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"summary.csv", "gaps.csv", "run.json", "elbo_traces.png", "mcmc.nc",
            "mcmc_diagnostics.csv"} <= names
    s = pd.read_csv(out / "summary.csv")
    _columns_ok(s)
    assert list(s.engine) == ["em", "svi", "mcmc"]
    em_row, svi_row, nuts_row = (s.iloc[i] for i in range(3))
    assert em_row.bound == "log-likelihood" and em_row.log_evidence_method == "exact"
    assert em_row.elbo == pytest.approx(em_row.log_evidence, abs=1e-9)  # EM's objective is exact
    assert svi_row.bound == "elbo-collapsed" and svi_row.params == "learned"
    _honest(s)
    # IWAE with the fitted encoder lies between the ELBO and the evidence (to 4 se)
    assert svi_row.elbo - 4 * svi_row.elbo_se <= svi_row.iwae
    assert svi_row.iwae <= svi_row.log_evidence + 4 * svi_row.iwae_se
    assert np.isfinite(svi_row.khat) and np.isfinite(em_row.ais)
    assert nuts_row.bound == "none" and nuts_row.params == "fixed at em"
    assert nuts_row.log_evidence == pytest.approx(em_row.log_evidence)
    g = pd.read_csv(out / "gaps.csv")
    assert list(g.guide) == ["mlp"] and g.local_family[0] == "mean-field"
    assert g.inference_gap[0] == pytest.approx(g.approximation_gap[0] + g.amortization_gap[0])
    meta = json.loads((out / "run.json").read_text())
    assert meta["study"] == "fit" and meta["family"]["model"] == "elbolab.models.mfa:MixtureOfFactorAnalysers"
    assert "LocalDensities" in meta["family"]["capabilities"]
    assert meta["family"]["model_params"] == ["pi", "W", "mu", "psi"]
    assert meta["settings"]["engines"] == "em,svi,mcmc"


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    folder = tmp_path / "usercode"
    folder.mkdir()
    (folder / "my_fit_study_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    return "my_fit_study_models"


def test_a_users_module_with_data_from_a_csv(tmp_path, user_module):
    g = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn(25, 1, generator=g, dtype=torch.float64) + 1.0 \
        + math.sqrt(0.5) * torch.randn(25, 1, generator=g, dtype=torch.float64)
    data = tmp_path / "data.csv"
    pd.DataFrame({"x": x[:, 0].numpy()}).to_csv(data, index=False)
    out = tmp_path / "user"
    assert cli.main(["run", "fit", "--model", f"{user_module}:LocalOnly", "--data", str(data),
                     *TINY, "--engines", "svi,mcmc", "--guides", "mean-field,mlp",
                     "--out", str(out)]) == 0
    s = pd.read_csv(out / "summary.csv")
    _columns_ok(s)
    assert list(s.engine) == ["svi", "svi", "mcmc"] and list(s.guide[:2]) == ["mean-field", "mlp"]
    exact = float(torch.distributions.Normal(1.0, math.sqrt(4.5)).log_prob(x).sum())
    assert s.log_evidence.iloc[0] == pytest.approx(exact, abs=1e-9)  # the user's evidence
    _honest(s)
    # IWAE applies (one per-point latent, no global one): close to the exact evidence
    svi_rows = s[s.engine == "svi"]
    assert (svi_rows.iwae <= svi_rows.log_evidence + 4 * svi_rows.iwae_se).all()
    assert (svi_rows.iwae >= svi_rows.elbo - 4 * svi_rows.elbo_se).all()
    assert s.ais.isna().all()  # no LocalDensities: no AIS, and the notes say so
    assert "AIS needs the LocalDensities capability" in s.notes.iloc[0]
    assert not (out / "gaps.csv").exists()  # the decomposition needs LocalDensities
    meta = json.loads((out / "run.json").read_text())
    assert meta["family"]["name"] == "local-only" and meta["data"]["data_file"] == str(data)


def test_the_example_module_from_python(tmp_path):
    """examples/my_model.py (global latent): a fit reused after it returns, no per-point IWAE."""
    from examples.my_model import NoisyMean

    fam = NoisyMean(dim=2)
    x, _ = fam.simulate(20, seed=3)
    res = fit_study.run(fam, x, engines=["svi"], guides="auto-normal,mlp", out=tmp_path / "ex",
                        quick=True, svi_steps=80, eval_particles=50, psis_samples=50,
                        no_progress=True)
    s = res["summary"]
    assert list(s.guide) == ["auto-normal", "mlp"]
    _honest(s)
    assert s.iwae.isna().all() and s.notes.str.contains("global").all()
    assert (tmp_path / "ex" / "run.json").exists()
    # the fits come back usable: their ELBO again, on the same data
    again = res["results"][0].elbo_estimate(x, num_particles=200)
    assert again.value == pytest.approx(s.elbo.iloc[0], abs=6 * max(again.se, s.elbo_se.iloc[0]))


def _fails(capsys, argv, *words):
    with pytest.raises(SystemExit) as err:
        cli.main(["run", "fit", *argv])
    assert err.value.code == 2
    text = capsys.readouterr().err
    assert len(text.strip().splitlines()) <= 3, text
    for w in words:
        assert w in text, (w, text)
    return text


@pytest.mark.parametrize("path,words", [
    ("no_such_pkg.mod:Thing", ["--model:", "no module named 'no_such_pkg'"]),
    ("elbolab.models.mfa:NoSuchClass", ["--model:", "has no attribute 'NoSuchClass'"]),
    ("elbolab.models.mfa.MixtureOfFactorAnalysers", ["--model:", "package.module:Name"]),
    ("elbolab.models.mfa:MixtureOfFactorAnalysers; import os", ["--model:", "package.module:Name"]),
    ("", ["--model: required"]),
])
def test_bad_import_paths_are_clean_errors(tmp_path, capsys, path, words):
    out = tmp_path / "bad"
    _fails(capsys, ["--model", path, "--quick", "--out", str(out)], *words)
    assert not out.exists() and not (tmp_path / "bad.incomplete").exists()


def test_not_a_family_and_bad_arguments(tmp_path, capsys, user_module):
    _fails(capsys, ["--model", f"{user_module}:NOT_A_FAMILY", "--out", str(tmp_path / "o")],
           "--model:", "not a family")
    _fails(capsys, [*MFA[:2], "--model-args", "{K: 2}", "--out", str(tmp_path / "o")],
           "--model-args:", "JSON")
    _fails(capsys, [*MFA[:2], "--model-args", '{"K": 2, "latent": 1}', "--out",
                    str(tmp_path / "o")], "--model-args:", "latent")
    # no data and no simulator
    _fails(capsys, ["--model", f"{user_module}:LocalOnly", "--out", str(tmp_path / "o")],
           "--data:", "no simulator")


def test_an_engine_the_family_lacks_lists_what_it_supports(tmp_path, capsys):
    text = _fails(capsys, [*MFA, "--engines", "em,cavi", "--quick", "--out", str(tmp_path / "o")],
                  "--engines:", "'cavi'", "ClosedFormCAVI")
    assert "it supports em, svi, mcmc" in text
    _fails(capsys, [*MFA, "--engines", "svi,gibbs", "--quick", "--out", str(tmp_path / "o")],
           "--engines:", "'gibbs'")
    # NUTS alone cannot fix the MFA's learnable parameters
    _fails(capsys, [*MFA, "--engines", "mcmc", "--quick", "--out", str(tmp_path / "o")],
           "--engines:", "learnable parameters", "add em or svi")
    assert not (tmp_path / "o").exists()


def test_a_guide_that_does_not_exist(tmp_path, capsys):
    text = _fails(capsys, [*MFA, "--engines", "svi", "--guides", "mean-feild", "--quick",
                           "--out", str(tmp_path / "o")], "--guides:", "'mean-feild'")
    assert "mean-field" in text and "mlp" in text  # the valid names
    _fails(capsys, [*MFA, "--engines", "em", "--guides", "mlp", "--quick", "--out",
                    str(tmp_path / "o")], "--guides:", "SVI")


def test_python_errors_are_value_errors(tmp_path):
    from elbolab.models.mfa.model import MixtureOfFactorAnalysers

    fam = MixtureOfFactorAnalysers(2, 1, dim=4)
    with pytest.raises(ValueError, match="--engines: .*cavi"):
        fit_study.run(fam, engines="cavi", out=tmp_path / "o")
    with pytest.raises(TypeError, match="svi_stpes"):
        fit_study.run(fam, svi_stpes=3, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["run", "fit", "--help"])
    assert err.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--model-args", "--engines", "--guides", "--iwae-particles",
                 "--ais-steps", "--config"):
        assert flag in text


def test_an_error_inside_the_users_model_is_one_clear_line(tmp_path, user_module, capsys):
    data = tmp_path / "data.csv"
    pd.DataFrame({"x": [0.1, -0.3, 0.7, 1.2]}).to_csv(data, index=False)
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "fit", "--model", f"{user_module}:BadScale", "--model-args",
                  '{"scale": -1}', "--data", str(data), *TINY, "--engines", "svi",
                  "--guides", "auto-normal", "--out", str(out)])
    assert exc.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 3 and "--model: the model or an engine on it raised ValueError" in err[0]
