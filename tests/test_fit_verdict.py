"""The fit study's verdict on each SVI row (experiments/fit_verdict.py).

The README's worked example (a mixture of factor analysers, EM and SVI) ended with mean-field SVI
hundreds of nats below EM, ``converged=False``, and no word why. With point parameters,
ELBO(theta_svi) <= log p(x | theta_svi) <= max log p(x) ~ EM's log-likelihood, so the shortfall
splits exactly into a parameters part and a guide part. These tests check the split against
log-likelihoods computed independently (scipy's dense Gaussians), the bound itself, and that a
fit short of EM or not converged is never reported without saying so.
"""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from elbolab.experiments import fit, fit_verdict
from elbolab.models.capabilities import Evidence
from elbolab.models.mfa.model import PARAM_NAMES, MFAParams, MixtureOfFactorAnalysers
from tests.test_mfa import scipy_log_evidence


def _svi(elbo, *, se=0.1, converged=True, steps=2000, cap=2000, gain=1e-4, gain_se=1e-4,
         diverged=False, guide="mean-field"):
    return SimpleNamespace(
        engine="svi", guide=guide, bound="elbo-collapsed", elbo=elbo, elbo_se=se,
        converged=converged, message="diverged at step 7: loss became nan; kept ...",
        diagnostics={"steps": steps, "projected_gain_per_datum": gain,
                     "projected_gain_se": gain_se, "diverged": diverged},
        settings={"num_steps": cap, "window": 500, "converged_tol": 2e-3})


def _em(ll, converged=True):
    return SimpleNamespace(engine="em", guide="exact-posterior", bound="log-likelihood", elbo=ll,
                           elbo_se=0.0, converged=converged)


def _exact(v, n=300):
    return Evidence(v, 0.0, "exact", n)


def test_tolerance_is_a_per_datum_allowance_plus_three_standard_errors():
    assert fit_verdict.tolerance(300, 0.3, 0.4) == pytest.approx(3.0 + 3 * 0.5)
    assert fit_verdict.tolerance(20) == 1.0  # at least one nat
    assert fit_verdict.tolerance(300, math.nan, None) == 3.0


def test_the_shortfall_splits_into_parameters_and_guide():
    em = (-2280.3, 0.0, _em(-2280.3))
    r = _svi(-2924.4, converged=False, gain=5e-3, gain_se=8.6e-4)
    (split, why) = fit_verdict.verdict(r, _exact(-2901.5), em, 300)
    # 644.1 = 621.2 (EM - log p at SVI's parameters) + 22.9 (log p - ELBO)
    assert "EM - ELBO = 644.1 nats = 621.2 from its parameters" in split
    assert "+ 22.9 its guide's gap" in split and "worse" in split
    assert why.startswith("not converged: stopped at the step cap (2000 steps)")
    assert "5.0e-03 +- 8.6e-04" in why and "--svi-steps 4000" in why


def test_a_tight_converged_fit_says_so_and_nothing_else():
    em = (-2280.3, 0.0, _em(-2280.3))
    parts = fit_verdict.verdict(_svi(-2282.1), _exact(-2280.7), em, 300)
    assert parts == ["ELBO -2282.1, within 1.8 nats of EM (tolerance 3.3): 0.4 from its "
                     "parameters + 1.4 its guide's gap"]


def test_a_converged_fit_at_a_worse_optimum_is_named():
    em = (-2280.3, 0.0, _em(-2280.3))
    parts = fit_verdict.verdict(_svi(-2455.2), _exact(-2381.0), em, 300)
    assert "100.7 from its parameters" in parts[0]
    assert parts[1].startswith("converged there")


def test_parameters_better_than_ems_blame_em_and_a_large_guide_gap_is_not_hidden():
    em = (-2619.1, 0.0, _em(-2619.1, converged=False))
    (split,) = fit_verdict.verdict(_svi(-2400.0), _exact(-2300.0), em, 300)
    assert "EM - ELBO = -219.1 nats = -319.1 from its parameters" in split
    assert "EM stopped at a worse optimum" in split
    assert "100.0 its guide's gap at them (0.333 nats/datum)" in split
    head = fit_verdict.header([_em(-2619.1, converged=False)], [_exact(-2619.1)], 1)
    assert "EM not converged" in head


def test_an_elbo_above_its_own_log_likelihood_is_flagged():
    em = (-1000.0, 0.0, _em(-1000.0))
    parts = fit_verdict.verdict(_svi(-990.0, se=0.5), _exact(-1000.0, 100), em, 100)
    assert "not a bound" in parts[1]


def test_without_em_only_convergence_is_judged():
    r = _svi(-100.0, converged=False, diverged=True)
    assert fit_verdict.verdicts([r], [None], 50) == {
        "svi/mean-field": ["diverged (diverged at step 7: loss became nan)"]}
    r = _svi(-100.0, converged=False, gain=math.nan, steps=30)
    assert fit_verdict.verdicts([r], [None], 50)["svi/mean-field"] == [
        "not converged after 30 steps (too few to judge)"]
    assert fit_verdict.verdicts([_svi(-100.0)], [None], 50) == {}


def test_the_worked_example_states_its_numbers_and_why(tmp_path):
    """The README's ``elbolab run fit --model elbolab.models.mfa.model:MixtureOfFactorAnalysers`` (K=3, k=2,
    d=6, n=300) with a short SVI budget: every number in the verdict is recomputed here from
    the fitted parameters with scipy, and the bound holds."""
    fam = MixtureOfFactorAnalysers(K=3, latent_dim=2, dim=6)
    x, _ = fam.simulate(300, seed=0)
    out = fit.run(fam, x, engines="em,svi", guides="mean-field", out=str(tmp_path / "mfa"),
                  quick=True, svi_steps=300, no_progress=True)
    summary, (em, svi) = out["summary"], out["results"]
    em_ll = float(scipy_log_evidence(x, MFAParams(*(em.posterior[k] for k in PARAM_NAMES))).sum())
    theta = MFAParams(*(svi.state.params[k] for k in PARAM_NAMES))
    own = float(scipy_log_evidence(x, theta).sum())
    row = summary[summary.engine == "svi"].iloc[0]
    assert row.log_evidence == pytest.approx(own, abs=1e-6)
    assert svi.elbo <= own + 3 * svi.elbo_se  # a bound at SVI's own parameters
    said = row.notes
    assert f"EM - ELBO = {em_ll - svi.elbo:.1f} nats" in said or "within" in said
    assert f"{em_ll - own:.1f} from its parameters" in said
    assert f"{own - svi.elbo:.1f} its guide's gap" in said
    if not svi.converged:
        assert "not converged: stopped at the step cap (300 steps)" in said
    run = json.loads((out["out"] / "run.json").read_text())
    assert run["verdicts"]["svi/mean-field"] == said


def test_no_svi_row_short_of_em_or_unconverged_goes_without_a_note():
    """The rule the study applies to every row, on the verdicts of made-up fits spanning the
    cases: an unconverged fit, or one more than the tolerance below EM, always has a sentence
    saying which."""
    em = (-1000.0, 0.0, _em(-1000.0))
    for elbo, own, conv in [(-1001.0, -1000.5, True), (-1001.0, -1000.5, False),
                            (-1100.0, -1090.0, True), (-1020.0, -1000.2, True),
                            (-1100.0, -1090.0, False)]:
        parts = fit_verdict.verdict(_svi(elbo, converged=conv), _exact(own, 100), em, 100)
        short = -1000.0 - elbo > fit_verdict.tolerance(100, 0.1)
        assert bool(parts) and (not short or re.search(r"EM - ELBO = [\d.]+ nats", parts[0]))
        assert conv or any(p.startswith("not converged") for p in parts)
        torch.testing.assert_close(torch.tensor(own - elbo),
                                   torch.tensor(float(re.search(r"([\d.]+) its guide", " ".join(
                                       parts)).group(1))), atol=0.051, rtol=0)
