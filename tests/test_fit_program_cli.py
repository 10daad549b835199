"""``elbolab run fit --model pkg.mod:function --data FILE``: a plain Pyro program through the fit
study, written the way a user writes it (a module in their own folder, data in a JSON file).

Numbers are checked against what must hold whatever the settings: the ELBO of a conjugate model
is a lower bound on its exact log evidence and, with the exact posterior inside the guide's
family, reaches it; the data's keys reach the program's arguments unchanged.
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
from elbolab.inference import arviz_io

# Pyro's examples/eight_schools (non-centered, the schools in a plate), as a user writes it
SCHOOLS = textwrap.dedent('''
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.nn import PyroModule, PyroSample
    from torch import nn
    from torch.distributions import constraints


    def model(J, sigma, y=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("schools", J):
            eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
            theta = mu + tau * eta
            pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


    def pooled(y, sigma):
        """mu ~ N(0, 10^2), y_j ~ N(mu, sigma_j^2): conjugate, log p(y) in closed form."""
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("schools", len(y)):
            pyro.sample("obs", dist.Normal(mu, sigma), obs=y)


    def pooled_guide(y, sigma):
        loc = pyro.param("loc", torch.tensor(0.0))
        scale = pyro.param("scale", torch.tensor(1.0), constraint=constraints.positive)
        pyro.sample("mu", dist.Normal(loc, scale))


    class Line(PyroModule):
        """The regression tutorial's shape: PyroModule[nn.Linear] with PyroSample priors."""

        def __init__(self):
            super().__init__()
            self.linear = PyroModule[nn.Linear](1, 1)
            self.linear.weight = PyroSample(dist.Normal(0.0, 10.0).expand([1, 1]).to_event(2))
            self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([1]).to_event(1))

        def forward(self, x, y=None):
            mean = self.linear(x.unsqueeze(-1)).squeeze(-1)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)
''')

Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]
SMALL = ["--no-progress", "--eval-particles", "50", "--psis-samples", "50"]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A user's folder with schools.py and data.json, importable as the CLI's current folder."""
    (tmp_path / "schools.py").write_text(SCHOOLS)
    (tmp_path / "data.json").write_text(json.dumps({"J": 8, "sigma": SIGMA, "y": Y}))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(*argv):
    return cli.main(["run", "fit", *map(str, argv)])


def test_eight_schools_from_a_json_file(folder):
    out = folder / "out"
    assert run("--model", "schools:model", "--data", folder / "data.json", "--quick", *SMALL,
               "--out", out) == 0
    s = pd.read_csv(out / "summary.csv")
    assert list(s.engine) == ["svi", "mcmc"] and list(s.guide) == ["auto-normal", "nuts"]
    assert (s.n == 8).all()  # the data plate ("schools") has J = 8 points
    assert np.isfinite(s.elbo[0]) and np.isfinite(s.khat[0])
    meta = json.loads((out / "run.json").read_text())
    assert meta["family"]["model"] == "schools:model" and meta["family"]["kind"] == "program"
    assert meta["data"]["data_file"] == str(folder / "data.json")
    # J stays a number, the lists became tensors of torch's default dtype (the program's own)
    assert meta["data"]["arguments"] == {"J": 8, "sigma": [8], "y": [8]}
    assert meta["data"]["data_plate"] == "schools" and s.dtype[0] == "float32"
    for engine in ("em", "cavi"):  # no closed forms: skipped, saying why
        assert "closed-form" in meta["notes"][engine] and "skipped" in meta["notes"][engine]
    # the NUTS draws keep their plate as a named dimension
    idata = arviz_io.read_netcdf(out / "mcmc.nc")
    assert idata.posterior["eta"].dims == ("chain", "draw", "schools")
    assert (out / "mcmc_diagnostics.csv").exists() and (out / "elbo_traces.png").exists()
    assert cli.main(["report", str(out)]) == 0
    assert (out / "report.html").exists()


def test_csv_columns_and_a_guide_by_import_path_reach_the_exact_evidence(folder):
    """pooled: the posterior of mu is normal, so pooled_guide holds it and its ELBO converges
    to log p(y) = log N(y; 0, diag(sigma^2) + 100 11^T) from below."""
    pd.DataFrame({"y": Y, "sigma": SIGMA}).to_csv(folder / "pooled.csv", index=False)
    out = folder / "pooled"
    assert run("--model", "schools:pooled", "--data", "pooled.csv", "--guide",
               "schools:pooled_guide", "--engines", "svi", "--quick", *SMALL, "--dtype",
               "float64", "--svi-steps", "1500", "--eval-particles", "400", "--out", out) == 0
    s = pd.read_csv(out / "summary.csv")
    cov = torch.diag(torch.tensor(SIGMA, dtype=torch.float64) ** 2) + 100.0
    log_py = float(torch.distributions.MultivariateNormal(torch.zeros(8, dtype=torch.float64),
                                                          cov).log_prob(torch.tensor(Y).double()))
    assert list(s.guide) == ["schools:pooled_guide"] and s.dtype[0] == "float64"
    assert s.elbo[0] <= log_py + 4 * s.elbo_se[0]
    assert s.elbo[0] >= log_py - 0.05 - 4 * s.elbo_se[0]
    meta = json.loads((out / "run.json").read_text())
    assert meta["data"]["arguments"] == {"y": [8], "sigma": [8]}
    assert meta["settings"]["guides"] == "schools:pooled_guide"


def test_npz_and_a_pyromodule_class(folder):
    g = np.random.default_rng(0)
    x = g.normal(size=30)
    np.savez(folder / "line.npz", x=x, y=1.5 * x + 0.3 + 0.5 * g.normal(size=30))
    out = folder / "line"
    assert run("--model", "schools:Line", "--data", "line.npz", "--engines", "svi", "--quick",
               "--svi-steps", "20", "--no-progress", "--eval-particles", "10",
               "--psis-samples", "0", "--out", out) == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["family"]["kind"] == "program" and meta["data"]["arguments"] == {"x": [30],
                                                                                "y": [30]}
    np.savez(folder / "schools.npz", J=8, sigma=np.array(SIGMA), y=np.array(Y))
    out = folder / "npz"
    assert run("--model", "schools:model", "--data", "schools.npz", "--engines", "svi",
               "--quick", "--svi-steps", "20", *SMALL, "--out", out) == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["data"]["arguments"] == {"J": 8, "sigma": [8], "y": [8]}  # a 0-d array: a number


def fails(capsys, *argv):
    with pytest.raises(SystemExit) as err:
        run(*argv, "--quick", "--out", "bad")
    assert err.value.code == 2
    text = capsys.readouterr().err
    assert len(text.strip().splitlines()) <= 3, text
    return text


def test_bad_input_is_one_line_naming_the_flag_file_and_key(folder, capsys):
    model = ["--model", "schools:model"]
    text = fails(capsys, *model, "--data", "data.json", "--guide", "auto-normla")
    assert "--guide: unknown guide 'auto-normla'; did you mean 'auto-normal'?" in text
    text = fails(capsys, *model, "--data", "data.json", "--guides", "auto-normal,schools:nope")
    assert "--guides: 'schools' has no attribute 'nope'" in text
    (folder / "extra.json").write_text(json.dumps({"J": 8, "sigma": SIGMA, "y": Y, "z": 1.0}))
    text = fails(capsys, *model, "--data", "extra.json")
    assert "--data: 'extra.json'" in text
    assert "['J', 'sigma', 'y', 'z']" in text and "parameters ['J', 'sigma', 'y']" in text
    text = fails(capsys, *model)
    assert "--data: required" in text and "'model'" in text
    (folder / "nan.json").write_text(json.dumps({"J": 8, "sigma": SIGMA, "y": Y[:7] + [math.nan]}))
    text = fails(capsys, *model, "--data", "nan.json")
    assert "--data: 'nan.json': 'y' has 1 NaN" in text
    pd.DataFrame({"y": Y[:7] + [None], "sigma": SIGMA}).to_csv(folder / "nan.csv", index=False)
    assert "--data: 'nan.csv': column 'y' has 1 NaN" in fails(capsys, "--model",
                                                               "schools:pooled", "--data",
                                                               "nan.csv")
    (folder / "text.json").write_text(json.dumps({"J": 8, "sigma": SIGMA, "y": ["a"] * 8}))
    assert "'y' is not a rectangular list of numbers" in fails(capsys, *model, "--data",
                                                               "text.json")
    text = fails(capsys, *model, "--data", "data.json", "--engines", "em,svi")
    assert "--engines:" in text and "ClosedFormEM" in text and "it supports svi, mcmc" in text
    # a family takes one array: its JSON is refused, saying what it takes
    text = fails(capsys, "--model", "elbolab.models.mfa:MixtureOfFactorAnalysers", "--data",
                 "data.json")
    assert "--data: 'data.json'" in text and "one array" in text
    assert not (folder / "bad").exists()
