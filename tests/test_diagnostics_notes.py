"""Diagnostics never stop a study: PSIS on a model whose latent site has batch dimensions outside
any plate (eight schools' ``eta`` of shape (J,)) draws its particles one at a time, a PSIS that
cannot apply is a NaN row with a note naming why, R-hat with one chain is a note, and the CLI's
one-line errors keep the cause after a trailing ':'.

Oracle for the weights: theta_j ~ N(0, s0^2) as ONE unplated site of batch shape (J,),
y_j ~ N(theta_j, sigma_j^2) in plate "data". The posterior is N(m_j, v_j) with
v_j = 1 / (1/s0^2 + 1/sigma_j^2), m_j = v_j y_j / sigma_j^2, and
log p(y) = sum_j log N(y_j; 0, s0^2 + sigma_j^2). With q = the exact posterior every log weight
equals log p(y); with a wider q, log mean w estimates log p(y) (standard error by the delta method).
"""

import math
import textwrap

import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

from elbolab import inference
from elbolab.experiments import cli
from elbolab.experiments.core import common
from elbolab.experiments.core.study import CliError
from elbolab.inference import mcmc
from elbolab.inference.evaluation import diagnostics as D
from elbolab.inference.evaluation.psis import importance_log_weights, reason

Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=torch.float64)
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=torch.float64)
S0 = 10.0
X = torch.stack([Y, SIGMA], -1)  # (J, 2): the family packs y and sigma in one tensor


def unplated_model(x, subsample_size=None):
    theta = pyro.sample("theta", dist.Normal(x.new_zeros(x.shape[0]), S0))  # batch (J,), no plate
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("y", dist.Normal(theta, x[:, 1]), obs=x[:, 0])


def posterior_guide(widen=1.0):
    v = 1.0 / (1.0 / S0**2 + 1.0 / SIGMA**2)
    m = v * Y / SIGMA**2

    def guide(x, subsample_size=None):
        pyro.sample("theta", dist.Normal(m, widen * v.sqrt()))

    return guide


def log_evidence():
    return float(dist.Normal(0.0, (S0**2 + SIGMA**2).sqrt()).log_prob(Y).sum())


def test_unplated_batch_site_gets_sequential_particles_with_exact_weights():
    w = importance_log_weights(unplated_model, posterior_guide(), X, num_samples=40, seed=0)
    assert w.joint.shape == (40,) and w.pointwise is None
    assert torch.allclose(w.joint, torch.full((40,), log_evidence(), dtype=torch.float64),
                          atol=1e-9, rtol=0)
    assert "one at a time" in w.note and "site 'theta'" in w.note  # the vectorized failure, named
    d = D.psis_khat((unplated_model, posterior_guide()), X, num_samples=40)
    assert d.khat == -math.inf and d.ess == pytest.approx(40)  # q = p: importance sampling exact


def test_sequential_weights_estimate_the_evidence():
    S = 2000
    w = importance_log_weights(unplated_model, posterior_guide(1.3), X, num_samples=S, seed=1)
    lw = w.joint
    assert lw.std() > 0.1  # a q that is not the posterior
    estimate = float(torch.logsumexp(lw, 0) - math.log(S))
    rel = torch.exp(lw - lw.max())
    se = float(rel.std() / rel.mean()) / math.sqrt(S)  # delta method: sd(log mean w)
    assert abs(estimate - log_evidence()) < 4 * se + 1e-9


def test_psis_that_cannot_apply_is_a_nan_row_naming_the_site():
    """An enumerated discrete site with batch dims outside any plate cannot be summed out, one
    particle at a time or not: the row is NaN and the note keeps the whole cause."""

    def model(x, subsample_size=None):
        c = pyro.sample("c", dist.Bernoulli(x.new_full((x.shape[0],), 0.5)))  # (J,), no plate
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), 10.0))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("y", dist.Normal(mu + c, x[:, 1]), obs=x[:, 0])

    def guide(x, subsample_size=None):
        pyro.sample("mu", dist.Normal(x.new_tensor(5.0), 3.0))

    row = D.psis_row((model, guide), X, num_samples=30)
    assert math.isnan(row["khat"]) and math.isnan(row["is_ess"])
    note = row["psis_note"]
    assert note.startswith("PSIS not computed: PSIS needs the latent sites inside the data plate "
                           "or vectorizable particles")
    assert "site 'c'" in note and "Invalid tensor shape" in note  # the cause after the ':'
    with pytest.raises(ValueError, match="site 'c'"):
        D.psis_khat((model, guide), X, num_samples=30)


def test_reason_keeps_what_follows_a_trailing_colon():
    try:
        try:
            raise ValueError("Invalid tensor shape.\n  Allowed dims: -2\n  Actual shape: (9, 8)")
        except ValueError as inner:
            raise ValueError("Error while packing tensors at site 'eta':\n  " + str(inner)
                             + "\n  Trace Shapes:\n  eta dist 9 | 8") from inner
    except ValueError as exc:
        text = reason(exc)
    assert text == ("Error while packing tensors at site 'eta': Invalid tensor shape. "
                    "Allowed dims: -2 Actual shape: (9, 8)")
    try:
        try:
            raise KeyError("eta")
        except KeyError as inner:
            raise ValueError("lookup failed:") from inner
    except ValueError as exc:
        assert reason(exc) == "lookup failed: 'eta'"


def test_rhat_with_one_chain_is_a_note():
    def model(x, subsample_size=None):
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), 10.0))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=x)

    class One:
        name = "one-chain"
        max_plate_nesting = 1
        discrete_sites = ()

        def check_data(self, x):
            return torch.as_tensor(x, dtype=torch.float64)

        def settings(self):
            return {}

    One.model = staticmethod(model)
    res = inference.fit("mcmc", One(), torch.tensor([0.2, -0.1, 0.4]),
                        mcmc.Settings(num_samples=60, warmup=60, num_chains=1), seed=0)
    assert math.isnan(res.diagnostics["r_hat_max"]) and not res.converged
    assert "no R-hat (1 chain; it needs >= 2)" in res.message
    assert res.diagnostics["ess_bulk_min"] > 0


def _cut(message_from_user_code: str) -> int:
    """The study CLI's pattern: a one-line CliError from an exception's first line, from None."""

    def fn(argv):
        try:
            try:
                raise KeyError("inner detail")
            except KeyError as inner:
                raise ValueError(message_from_user_code) from inner
        except ValueError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CliError(f"--model: the model raised ValueError: {first}") from None

    return common.entry("fit", fn, [])


def test_cli_error_cut_at_a_colon_keeps_the_cause(capsys):
    with pytest.raises(CliError) as err:
        _cut("Error while packing tensors at site 'eta':\n  Invalid tensor shape.\n"
             "  Actual shape: (200, 8)\n  Trace Shapes:\n   eta dist 200 | 8")
    line = capsys.readouterr().err.strip().splitlines()[0]
    assert line == ("fit: --model: the model raised ValueError: Error while packing tensors at "
                    "site 'eta': Invalid tensor shape. Actual shape: (200, 8)")
    assert err.value.message == line.removeprefix("fit: ")
    with pytest.raises(CliError):  # nothing after the ':' but the chained cause
        _cut("lookup failed:")
    assert capsys.readouterr().err.strip() == (
        "fit: --model: the model raised ValueError: lookup failed: 'inner detail'")
    with pytest.raises(CliError):  # a message not cut at a colon stays as it was
        _cut("plain message\nsecond line")
    assert capsys.readouterr().err.strip() == "fit: --model: the model raised ValueError: " \
                                              "plain message"


def test_data_and_field_errors_keep_the_cause():
    exc = ValueError("x: cannot parse:\n  column 'y' has text")
    assert common.data_error(exc).message == "--data: x: cannot parse: column 'y' has text"


EIGHT = textwrap.dedent('''
    import pyro
    import pyro.distributions as dist
    from elbolab.models.base import ModelFamily
    from elbolab.models.validate import as_data

    class EightSchools(ModelFamily):
        """Non-centred eight schools as Pyro's example writes it: eta (J,) outside any plate."""

        name = "eight-schools"

        def check_data(self, x):
            return as_data(x, "x", ndim=2)

        def model(self, x, subsample_size=None):
            J = x.shape[0]
            mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), 5.0))
            tau = pyro.sample("tau", dist.HalfCauchy(x.new_tensor(5.0)))
            eta = pyro.sample("eta", dist.Normal(x.new_zeros(()), 1.0).expand([J]).to_event(1))
            with pyro.plate("data", J, dim=-1):
                pyro.sample("obs", dist.Normal(mu + tau * eta, x[:, 1]), obs=x[:, 0])
''')


def test_eight_schools_study_goes_on_with_a_psis_note(tmp_path, monkeypatch):
    folder = tmp_path / "usercode"
    folder.mkdir()
    (folder / "my_eight_schools.py").write_text(EIGHT)
    monkeypatch.syspath_prepend(str(folder))
    data = tmp_path / "schools.csv"
    pd.DataFrame({"y": Y.numpy(), "sigma": SIGMA.numpy()}).to_csv(data, index=False)
    out = tmp_path / "run"
    assert cli.main(["run", "fit", "--model", "my_eight_schools:EightSchools", "--data", str(data),
                     "--quick", "--svi-steps", "60", "--eval-particles", "50",
                     "--iwae-particles", "0", "--psis-samples", "50", "--ais-steps", "0",
                     "--nuts-samples", "30", "--nuts-warmup", "30", "--nuts-chains", "1",
                     "--nuts-depth", "3", "--engines", "svi,mcmc", "--guides", "auto-normal",
                     "--no-progress", "--out", str(out)]) == 0
    s = pd.read_csv(out / "summary.csv")
    svi_row = s[s.engine == "svi"].iloc[0]
    assert math.isfinite(svi_row.khat)  # the joint k-hat, from particles drawn one at a time
    assert "one at a time" in svi_row.psis_note and "site 'obs'" in svi_row.psis_note
    nuts_row = s[s.engine == "mcmc"].iloc[0]
    assert not nuts_row.converged and math.isnan(nuts_row.diag_r_hat_max)


def test_an_optional_estimate_that_fails_is_a_note(monkeypatch):
    """fit_evidence.evaluate: IWAE raising on a model (here: Pyro's cut-at-colon packing error)
    is a note with the whole cause; the row's IWAE is NaN and the evaluation goes on."""
    from types import SimpleNamespace

    from elbolab.experiments import fit_evidence

    def failing(fam, guide, x, args):
        try:
            raise ValueError("Invalid tensor shape.")
        except ValueError as inner:
            raise ValueError("Error while packing tensors at site 'eta':\n  Invalid tensor "
                             "shape.") from inner

    monkeypatch.setattr(fit_evidence, "iwae_evidence", failing)
    args = SimpleNamespace(ais_steps=0, ais_chains=1, iwae_particles=10, psis_samples=0, seed=0)
    result = SimpleNamespace(engine="em", state=SimpleNamespace(guide=None))
    best, cols = fit_evidence.evaluate(None, X, result, {}, args, variational=True)
    assert best is None and math.isnan(cols["iwae"])
    assert ("iwae: not computed: Error while packing tensors at site 'eta': Invalid tensor "
            "shape.") in cols["notes"]
