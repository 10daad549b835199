"""Minibatch SVI on the Bayesian GMM (guides/gmm.py, inference/sparse_adam.py): the batch's
indices, the minibatch ELBO, and that a step touches only the batch's rows.

References: exact counting arguments for the index sampler (chi-square), the full-data ELBO of
the same guide (the minibatch estimate is unbiased: N/B scaling), Pyro's ClippedAdam for dense
gradients and a per-row Adam written out in numpy for sparse ones.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import TraceEnum_ELBO
from pyro.optim.clipped_adam import ClippedAdam

from elbolab import guides, inference
from elbolab.guides import gmm as gg
from elbolab.inference import svi
from elbolab.inference.runtime import isolated
from elbolab.inference.svi.sparse_adam import LazyClippedAdam
from elbolab.inference.svi.steps import PyroStep, make_loss
from elbolab.models import numerics
from elbolab.models.gmm.model import BayesianGMM

# ----------------------------------------------------------------------------- the index sampler


@pytest.mark.parametrize("n", [1500, 20_000])  # the permutation path (n <= 4B) and the other
def test_minibatch_indices_are_a_uniform_subset(n):
    B, draws = 400, 400
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(n)
    first = torch.zeros(n)
    for _ in range(draws):
        idx = numerics.minibatch_indices(n, B, generator=g)
        assert idx.shape == (B,) and idx.dtype == torch.long
        assert int(idx.min()) >= 0 and int(idx.max()) < n
        assert len(torch.unique(idx)) == B  # without replacement
        counts[idx] += 1
        first[idx[0]] += 1
    # each index is in a batch with probability B/n: chi-square over the n counts, n - 1 dof,
    # approximately normal: |z| < 5 fails with probability ~6e-7 under uniform inclusion
    expected = draws * B / n
    var = draws * (B / n) * (1 - B / n)
    chi2 = float(((counts - expected) ** 2).sum() / var)
    assert abs(chi2 - (n - 1)) / math.sqrt(2 * (n - 1)) < 5
    assert numerics.minibatch_indices(n, None) is None and numerics.minibatch_indices(n, n) is None


def test_minibatch_indices_follow_the_global_seed():
    torch.manual_seed(3)
    a = numerics.minibatch_indices(10_000, 50)
    torch.manual_seed(3)
    b = numerics.minibatch_indices(10_000, 50)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- the ELBO


def _data(n=600, K=3, seed=0):
    fam = BayesianGMM(K, 10.0)
    return fam, fam.simulate(n, seed=seed)[0]


@pytest.mark.parametrize("name", ["mean-field", "collapsed", "auto-normal"])
def test_minibatch_elbo_is_unbiased_for_the_full_data_elbo(name):
    # the same guide (its initial parameters): the mean of many N/B-scaled minibatch estimates
    # equals the full-data ELBO within 4 standard errors of that mean (CLT; fails w.p. ~6e-5)
    fam, x = _data()
    spec = guides.for_family(fam)[name]
    loss = TraceEnum_ELBO(max_plate_nesting=1, num_particles=20, vectorize_particles=True)
    with isolated(0), torch.no_grad():
        guide = spec.build(fam, x, seed=0)
        full = [-loss.loss(fam.model, guide, x) for _ in range(40)]
        mini = [-loss.loss(fam.model, guide, x, subsample_size=60) for _ in range(300)]
    se = math.hypot(statistics.stdev(mini) / math.sqrt(len(mini)),
                    statistics.stdev(full) / math.sqrt(len(full)))
    assert abs(statistics.mean(mini) - statistics.mean(full)) < 4 * se, (name, se)


def test_a_minibatch_step_moves_only_the_batch_rows(monkeypatch):
    fam, x = _data(n=5000)
    drawn = []
    real = gg.minibatch_indices

    def recording(n, size, device=None, generator=None):
        idx = real(n, size, device, generator)
        drawn.append(idx)
        return idx

    monkeypatch.setattr(gg, "minibatch_indices", recording)
    spec = guides.for_family(fam)["mean-field"]
    s = svi.Settings(num_steps=10, subsample_size=100, num_particles=1, lr=0.05)
    with isolated(0):
        guide = spec.build(fam, x, seed=0)
        step = PyroStep(fam.model, guide, (x,), {"subsample_size": 100}, make_loss(s, True, 1), s)
        step()  # creates the params and the optimizer's state
        before = pyro.param(gg.LOGITS).detach().clone()
        drawn.clear()
        step()
        after = pyro.param(gg.LOGITS).detach()
        assert isinstance(step.optimizer, LazyClippedAdam)
        state = step.optimizer.state[pyro.param(gg.LOGITS).unconstrained()]
    (batch,) = drawn
    changed = (after != before).any(1).nonzero().flatten()
    assert set(changed.tolist()) <= set(batch.tolist())
    assert len(changed) >= 90  # every batch row has a gradient (a few may round to no change)
    rest = torch.ones(x.shape[0], dtype=torch.bool)
    rest[batch] = False
    assert torch.equal(after[rest], before[rest])
    assert set(state["row_step"].nonzero().flatten().tolist()) >= set(changed.tolist())
    assert float(state["row_step"].max()) <= 2


def test_researcher_fits_minibatch_svi_then_reuses_the_fit():
    # a user's run: minibatches with the default guide; the fit is kept and evaluated again
    fam, x = _data(n=400, K=2, seed=4)
    fit = inference.fit("svi", fam, x, seed=0, guide="mean-field", subsample_size=50,
                        num_steps=60, eval_particles=20, num_posterior_samples=0)
    assert set(fit.posterior) >= {gg.LOC, gg.SCALE, gg.LOGITS}
    assert fit.posterior[gg.LOGITS].shape == (400, 2)
    est = fit.elbo_estimate(x)
    assert math.isfinite(est.value) and est.value <= fam.log_evidence(x).value + 4 * est.se
    with pytest.raises(TypeError, match="unknown option"):
        inference.fit("svi", fam, x, guide="mean-field", subsample_sise=50)


# ----------------------------------------------------------------------------- the optimizer


def test_lazy_adam_equals_clipped_adam_on_dense_gradients():
    torch.manual_seed(0)
    a = torch.randn(7, 3, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    opt_a = LazyClippedAdam([a], lr=0.1, clip_norm=0.5, lrd=0.9)
    opt_b = ClippedAdam([b], lr=0.1, clip_norm=0.5, lrd=0.9)
    for t in range(6):
        g = torch.randn(7, 3) * (t + 1)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lazy_adam_sparse_rows_follow_per_row_adam_and_survive_a_checkpoint():
    # reference: numpy Adam on each row, counting only the steps whose batch held the row
    rng = np.random.default_rng(0)
    n, K, lr, lrd, clip, b1, b2, eps = 10, 3, 0.05, 0.95, 1.0, 0.9, 0.999, 1e-8
    w = torch.zeros(n, K, dtype=torch.float64, requires_grad=True)
    opt = LazyClippedAdam([w], lr=lr, clip_norm=clip, lrd=lrd)
    ref = np.zeros((n, K))
    m, v, t = np.zeros((n, K)), np.zeros((n, K)), np.zeros(n)
    rate = lr
    for step in range(8):
        rows = rng.choice(n, size=4, replace=True)  # duplicates are summed
        g = rng.normal(size=(4, K)) * 2
        out = torch.nn.functional.embedding(torch.tensor(rows), w, sparse=True)
        (out * torch.tensor(g)).sum().backward()
        if step == 4:  # save and reload the optimizer's state mid-run
            state = opt.state_dict()
            opt = LazyClippedAdam([w], lr=lr, clip_norm=clip, lrd=lrd)
            opt.load_state_dict(state)
        opt.step()
        w.grad = None
        rate *= lrd
        gsum = np.zeros((n, K))
        np.add.at(gsum, rows, g)
        for r in np.unique(rows):
            gr = np.clip(gsum[r], -clip, clip)
            t[r] += 1
            m[r] = b1 * m[r] + (1 - b1) * gr
            v[r] = b2 * v[r] + (1 - b2) * gr * gr
            step_size = rate * math.sqrt(1 - b2 ** t[r]) / (1 - b1 ** t[r])
            ref[r] -= step_size * m[r] / (np.sqrt(v[r]) + eps)
    np.testing.assert_allclose(w.detach().numpy(), ref, rtol=1e-10, atol=1e-12)
