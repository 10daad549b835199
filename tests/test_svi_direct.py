"""The torch-native SVI step against Pyro's Trace_ELBO and the closed-form FA evidence."""

import pytest
import torch

import guides
from inference import svi
from inference.runtime import isolated
from models.fa import FactorAnalysis


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
        direct = torch.tensor([step() for _ in range(400)])
        pyro_loss = svi.make_loss(s, False, 1)
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
