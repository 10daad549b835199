"""The engines and the shared evaluator, on a conjugate toy model with closed-form answers."""

import math

import pytest
import torch

from elbolab import guides, inference
from elbolab.inference import mcmc, svi
from elbolab.inference.elbo import estimate_elbo
from elbolab.inference.runtime import isolated
from elbolab.inference.svi.checkpoint import load_checkpoint
from elbolab.models import MissingCapability
from tests.toy import NormalMean


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    return (1.5 + torch.randn(30, generator=g)).double()


def test_exact_guide_elbo_is_log_evidence_with_zero_variance(data):
    fam = NormalMean()
    guide = guides.for_family(fam)["exact"].build(fam, data)
    with isolated(0):
        est = estimate_elbo(fam.model, guide, data, num_particles=200, batch_size=50)
    # ELBO of the exact posterior equals log p(x) in every sample: zero spread.
    assert est.value == pytest.approx(fam.log_evidence(data).value, abs=1e-9)
    assert est.se < 1e-9


def test_svi_recovers_posterior_and_evidence(data):
    fam = NormalMean()
    res = svi.fit(
        fam,
        data,
        svi.Settings(num_steps=1500, lr=0.05, lr_decay=0.01, num_particles=4, eval_particles=2000),
        seed=0,
    )
    m, v = fam.posterior(data)
    assert res.posterior["loc"].item() == pytest.approx(m.item(), abs=0.03)
    assert res.posterior["scale"].item() == pytest.approx(math.sqrt(v), rel=0.1)
    logz = fam.log_evidence(data).value
    # The family contains the posterior, so the gap is KL(q || p) ~ 0 (a few 1e-3 for the SGD
    # optimum); the bound holds up to 3 standard errors.
    assert res.elbo <= logz + 3 * res.elbo_se
    assert logz - res.elbo < 0.02
    assert res.dtype == "float64" and res.posterior["loc"].dtype == torch.float64
    assert res.bound == "elbo"


def test_svi_is_deterministic_and_leaks_no_params(data):
    fam = NormalMean()
    s = svi.Settings(num_steps=50, eval_particles=10, num_posterior_samples=0)
    a = svi.fit(fam, data, s, seed=3)
    b = svi.fit(fam, data, s, seed=3)
    assert a.trace == b.trace
    import pyro

    assert "loc" not in pyro.get_param_store()


def test_svi_divergence_stops_with_reason_and_keeps_last_good_state(data):
    fam = NormalMean()
    bad = data.clone()
    res_ok = svi.fit(fam, data, svi.Settings(num_steps=5, eval_particles=10), seed=0)
    assert res_ok.message.startswith("ran")

    calls = {"n": 0}

    def exploding_guide(x, subsample_size=None):
        import pyro
        import pyro.distributions as dist

        calls["n"] += 1
        loc = pyro.param("loc", x.new_tensor(0.0))
        # call 1 creates the params before the first step; calls 2..21 are steps 1..20
        scale = x.new_tensor(float("nan") if calls["n"] > 21 else 1.0)
        pyro.sample("theta", dist.Normal(loc, scale))

    from elbolab.inference.runtime import isolated as iso

    with iso(0):
        run = svi.run_svi(fam.model, exploding_guide, (bad,), svi.Settings(num_steps=100))
        import pyro

        loc = pyro.param("loc").item()
    assert "loss became nan" in run.message
    # the loss at the parameters of step 20 was NaN: step 20's update is undone
    assert run.steps == 19 and len(run.trace) == 19 and math.isfinite(loc)
    assert "kept the parameters of step 19" in run.message and run.diverged


def test_checkpoint_roundtrip_weights_only(tmp_path, data):
    fam = NormalMean()
    path = tmp_path / "ck.pt"
    s = svi.Settings(num_steps=40, checkpoint=path, checkpoint_every=20, eval_particles=10)
    res = svi.fit(fam, data, s, seed=0)
    payload = torch.load(path, weights_only=True)
    assert int(payload["step"]) == 40
    guide = guides.for_family(fam)["normal"].build(fam, data)
    with isolated(1):
        load_checkpoint(path, fam.model, guide, data)
        import pyro

        assert pyro.param("loc").item() == pytest.approx(res.posterior["loc"].item())


def test_mcmc_matches_exact_posterior(data):
    fam = NormalMean()
    res = mcmc.fit(fam, data, mcmc.Settings(num_samples=300, warmup=200, num_chains=2), seed=0)
    m, v = fam.posterior(data)
    draws = res.samples["theta"]
    assert draws.shape == (2, 300)
    ess = res.diagnostics["ess_bulk_min"]
    # posterior mean within 4 Monte Carlo standard errors sd / sqrt(ESS)
    assert abs(draws.mean().item() - m.item()) < 4 * math.sqrt(v / ess)
    assert res.diagnostics["r_hat_max"] < 1.05
    idata = res.to_inference_data()
    assert "log_likelihood" in idata.groups() and idata.log_likelihood["x"].shape == (2, 300, 30)


def test_missing_capability_names_engine_and_family(data):
    with pytest.raises(
        MissingCapability, match="EM needs the ClosedFormEM capability; the normal-mean family"
    ):
        inference.fit("em", NormalMean(), data)
    with pytest.raises(MissingCapability, match="CAVI needs the ClosedFormCAVI capability; the normal-mean family"):
        inference.fit("cavi", NormalMean(), data)
    with pytest.raises(ValueError, match="engine: must be one of"):
        inference.fit("vi", NormalMean(), data)


def test_settings_validation_names_field():
    with pytest.raises(ValueError, match="lr"):
        svi.Settings(lr=0)
    with pytest.raises(ValueError, match="num_chains"):
        mcmc.Settings(num_chains=0)
    with pytest.raises(ValueError, match="patience"):
        svi.Settings(patience=3)


def test_result_row_and_inference_data(data):
    fam = NormalMean()
    res = svi.fit(
        fam, data, svi.Settings(num_steps=20, eval_particles=10, num_posterior_samples=7), seed=0
    )
    row = res.to_row(fam.log_evidence(data))
    assert row["gap"] == pytest.approx(row["log_evidence"] - row["elbo"])
    assert row["elbo_per_datum"] == pytest.approx(row["elbo"] / 30)
    idata = res.to_inference_data()
    assert idata.posterior["theta"].shape == (1, 7)


def test_nuts_falls_back_from_jit_for_models_with_trainable_weights():
    import pyro
    import pyro.distributions as dist

    net = torch.nn.Linear(1, 1).double()

    def model(x):
        pyro.module("net", net)
        z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(net(z).squeeze(-1), 1.0), obs=x)

    x = torch.zeros(5, dtype=torch.float64)
    s = mcmc.Settings(num_samples=5, warmup=5, num_chains=1, jit=True)
    with pytest.warns(UserWarning, match="running without JIT"):
        run = mcmc.run_nuts(model, (x,), s, seed=0)
    assert run.samples["z"].shape == (1, 5, 1)
