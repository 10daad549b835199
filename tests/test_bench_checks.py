"""The benchmarks' own agreement checks and bookkeeping (bench/): they pass when both sides reach
the same answer and fail when they do not; the table says "no (answers differ)" then. Fast: small
data, no timing asserted.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench import common
from bench.common import Row, agree, interleaved, table


def test_agree_and_met():
    assert agree("x", 1.0, 1.0 + 1e-9, 1e-6).ok
    assert not agree("x", 1.0, 1.1, 1e-6).ok
    assert not agree("x", math.nan, 1.0, 1e9).ok  # a NaN answer never agrees
    ok, bad = agree("a", 0, 0, 1), agree("b", 0, 2, 1)
    row = Row("w", "1", "2", 30.0, ">= 20x", 20.0, 0.5, [ok])
    assert row.met == "yes"
    assert Row("w", "1", "2", 30.0, ">= 20x", 20.0, 0.5, [ok, bad]).met == "no (answers differ)"
    assert Row("w", "1", "2", 10.0, ">= 20x", 20.0, 0.5, [ok]).met == "no"
    flat = Row("w", "1", "2", 1.2, "<= 1.5x", 1.5, 0.5, [ok], lower_is_better=True)
    assert flat.met == "yes"
    own = Row("w", "1", "2", 0.1, ">= 250 it/s", 250.0, 0.5, [ok], goal_on="ours", ours_value=300)
    assert own.met == "yes"
    assert common.skipped_row("w", "g", "not installed").met == "skipped"
    text = table([row, flat])
    assert text.splitlines()[0].startswith("| workload | elbolab | alternative | ratio | goal")
    assert "| yes |" in text and "30x" in text


def test_interleaved_alternates_and_keeps_reported_seconds():
    calls = []
    t = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b") or 0.5}, 4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert t["b"].seconds == [0.5] * 4 and t["b"].median == 0.5
    assert len(t["a"].loads) == 4 and len(t["a"].cpu) == 4


def test_bgmm_settings_make_the_same_model_and_the_check_can_fail():
    from bench.gmm_cavi import _fit_bgmm, bgmm
    from elbolab import inference
    from elbolab.models.gmm.fit import CaviState
    from elbolab.models.gmm.model import BayesianGMM

    fam = BayesianGMM(3, 10.0)
    x, _ = fam.simulate(400, seed=1)
    ours = inference.fit("cavi", fam, x, seed=0, tol=1e-13, max_iter=5000)

    def elbo_at(model):
        m = torch.tensor(model.means_)
        s2 = torch.tensor(1.0 / model.mean_precision_)
        return fam.cavi().closed_form_elbo(x, CaviState(m, s2, fam.cavi().phi(x, m, s2)))

    same = _fit_bgmm(bgmm(3, 10.0, 0, max_iter=2000, tol=1e-9, init_params="k-means++"),
                     x.numpy())
    assert agree("elbo", elbo_at(same) / 400, ours.elbo / 400, 1e-6).ok
    # another prior on the means (s2 = 0.01): a different model, the check must fail
    other = _fit_bgmm(bgmm(3, 0.01, 0, max_iter=2000, tol=1e-9, init_params="k-means++"),
                      x.numpy())
    assert not agree("elbo", elbo_at(other) / 400, ours.elbo / 400, 1e-6).ok


def test_fa_check_against_sklearn_passes_and_fails():
    from sklearn.decomposition import FactorAnalysis as SkFA

    from elbolab import inference
    from elbolab.models.fa.model import FactorAnalysis, FAParams

    fam = FactorAnalysis(2, dim=6)
    x, _ = fam.simulate(800, seed=2, dtype=torch.float64)
    sk = SkFA(2, random_state=0, tol=1e-8, max_iter=5000).fit(x.numpy())
    ll_sk = float(sk.score(x.numpy()))
    res = inference.fit("em", FactorAnalysis(2), x, seed=0)
    ll = FactorAnalysis(2).log_evidence(x, FAParams.from_dict(res.posterior)).value / 800
    assert agree("ll", ll, ll_sk, 1e-6).ok
    one = inference.fit("em", FactorAnalysis(1), x, seed=0)  # a different model: k = 1
    assert not agree("ll", one.elbo / 800, ll_sk, 1e-6).ok


def test_plain_vae_elbo_is_log_joint_minus_log_q():
    # the independent loop's estimator, against torch.distributions at the same draw
    from bench.vae_default import LATENT, PlainVAE

    torch.manual_seed(0)
    net = PlainVAE(10)
    xb = (torch.rand(5, 10) > 0.5).float()
    torch.manual_seed(1)
    got = net.elbo(xb)
    torch.manual_seed(1)
    h = net.enc(xb)
    loc, scale = net.loc(h), torch.nn.functional.softplus(net.raw(h)) + 1e-6
    z = loc + scale * torch.randn_like(loc)
    d = torch.distributions
    ref = (d.Bernoulli(logits=net.dec(z)).log_prob(xb).sum(-1)
           + d.Normal(torch.zeros(LATENT), 1.0).log_prob(z).sum(-1)
           - d.Normal(loc, scale).log_prob(z).sum(-1))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_nuts_ess_helper_on_independent_draws():
    pytest.importorskip("arviz")
    from bench.nuts_gmm import _ess_and_means

    rng = np.random.default_rng(0)
    draws = rng.normal(size=(2000, 3)) + np.array([-3.0, 0.0, 3.0])
    ess, means, mcse = _ess_and_means(draws[None, :, :, None])  # (chain, draw, K, d)
    assert 1500 < ess < 2600  # i.i.d. draws: ESS ~ the number of draws
    np.testing.assert_allclose(means, np.sort(draws, -1).mean(0))
    np.testing.assert_allclose(mcse, 1 / np.sqrt(2000), rtol=0.2)
