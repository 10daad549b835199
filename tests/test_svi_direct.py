"""The torch-native SVI step against Pyro's Trace_ELBO and the closed-form FA evidence."""

import pyro
import pytest
import torch

from elbolab import guides
from elbolab.guides.amortized import supports_direct
from elbolab.inference import svi
from elbolab.inference.runtime import isolated
from elbolab.inference.svi.steps import make_loss
from elbolab.models.fa.model import FactorAnalysis
from elbolab.models.vae.model import VAE


@pytest.fixture
def fa_data():
    fam = FactorAnalysis(2, dim=5)
    x, truth = fam.simulate(200, seed=0, dtype=torch.float64)
    return FactorAnalysis(2, params=truth), x


def test_direct_loss_estimates_the_same_elbo_as_trace_elbo(fa_data):
    fam, x = fa_data
    s = svi.Settings(subsample_size=50, lr=1e-12)  # a step that (almost) does not move
    with isolated(0):
        guide = guides.make("linear-diag", fam, x)
        step = svi.direct_step(fam, guide, x, s)
        direct = torch.tensor([step()[0] for _ in range(400)])
        pyro_loss = make_loss(s, False, 1)
        ref = torch.tensor([pyro_loss.loss(fam.model, guide, x, subsample_size=50)
                            for _ in range(400)])
    # two unbiased estimates of the same -ELBO: means agree within 4 combined standard errors
    se = (direct.var() / 400 + ref.var() / 400).sqrt()
    assert abs(direct.mean() - ref.mean()) < 4 * se


def test_direct_training_reaches_the_exact_evidence(fa_data):
    fam, x = fa_data
    s = svi.Settings(num_steps=1500, lr=0.02, lr_decay=0.05, direct=True, subsample_size=100,
                     eval_particles=400, num_posterior_samples=0)
    res = svi.fit(fam, x, s, seed=0, guide="linear-full")
    logz = fam.log_evidence(x).value
    # a linear full-covariance encoder contains the exact posterior of FA: gap -> 0
    assert res.elbo <= logz + 3 * res.elbo_se
    assert (logz - res.elbo) / x.shape[0] < 0.01
    assert res.dtype == "float64"


def test_direct_refuses_what_it_cannot_do(fa_data):
    fam, x = fa_data

    def plain_guide(x, subsample_size=None):
        pass

    with isolated(0), pytest.raises(ValueError, match="direct: the guide has no distribution"):
        svi.direct_step(fam, plain_guide, x, svi.Settings())


def _keeping_grads(step, params):
    """``step`` as a loss function whose gradients stay readable after it returns (the step
    clears them after its update; a spy on the optimizer copies them just before)."""
    real, seen = step.optimizer.guarded_step, {}

    def spy(*args, **kwargs):
        seen["grads"] = [None if p.grad is None else p.grad.clone() for p in params]
        return real(*args, **kwargs)

    step.optimizer.guarded_step = spy

    def call():
        value, refused = step()
        assert not refused
        for p, g in zip(params, seen["grads"]):
            p.grad = g
        return value

    return call


def _loss_and_grads(step, params, reps):
    """(reps,) losses and (reps, P) flattened gradients of ``reps`` calls of ``step``."""
    losses, grads = [], []
    for _ in range(reps):
        for p in params:
            p.grad = None
        losses.append(float(step()))
        grads.append(torch.cat([torch.zeros_like(p).reshape(-1) if p.grad is None
                                else p.grad.reshape(-1) for p in params]))
    return torch.tensor(losses, dtype=torch.float64), torch.stack(grads).double()


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_direct_step_on_the_vae_has_the_loss_and_gradients_of_trace_elbo(likelihood):
    """Same estimator: the expected loss and the expected gradient of every parameter (decoder
    and encoder) agree between the direct step and Pyro's Trace_ELBO (minibatch of 10 of 40)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 6, generator=g, dtype=torch.float64)
    if likelihood == "bernoulli":
        x = (x < 0.4).to(torch.float64)
    vae = VAE(6, 2, hidden=(5,), likelihood=likelihood, seed=1)
    # a step that does not move (lr 1e-12) and does not clip the gradients it reports
    s = svi.Settings(subsample_size=10, lr=1e-12, lr_decay=1.0, clip_norm=None, num_particles=1)
    reps = 600
    with isolated(0):
        guide = guides.make("mlp", vae, x, hidden=(4,))
        assert supports_direct(guide)
        step = svi.direct_step(vae, guide, x, s)
        params = [p for _, p in pyro.get_param_store().named_parameters()]
        assert len(params) == len(list(vae.decoder.parameters())) + len(list(guide.parameters()))
        direct, g_direct = _loss_and_grads(_keeping_grads(step, params), params, reps)
        elbo = make_loss(s, False, 1)
        ref, g_ref = _loss_and_grads(
            lambda: elbo.loss_and_grads(vae.model, guide, x, subsample_size=10), params, reps)
    # two independent samples of each statistic: difference of means over its standard error
    diff = torch.cat([(direct.mean() - ref.mean()).reshape(1), g_direct.mean(0) - g_ref.mean(0)])
    var = torch.cat([(direct.var() + ref.var()).reshape(1), g_direct.var(0) + g_ref.var(0)])
    se = (var / reps).sqrt()
    assert torch.all(se > 0)
    # Bonferroni over the 1 + P statistics: P(max |z| > 5.3) < 1e-7 * (1 + P) < 1e-4 under H0
    z = diff / se
    assert z.abs().max() < 5.3, (z.abs().max(), z.shape)
    # not trivially equal: the gradients are far from zero (so the test has power)
    assert (g_ref.mean(0).abs() / se[1:]).max() > 10
