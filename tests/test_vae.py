"""The VAE family, the digits loaders, the flow and semi-amortized guides.

Oracles: scikit-learn's FactorAnalysis (log-likelihood of a linear-Gaussian model), closed-form
Gaussian posteriors, numpy/scipy re-implementations of the decoder likelihoods, numerical
integration of flow densities and autograd Jacobians.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from scipy.special import expit, log_expit
from scipy.stats import norm
from sklearn.datasets import load_digits as sk_load_digits
from sklearn.decomposition import FactorAnalysis as SkFA

from elbolab import guides
from elbolab.guides.amortized import (
    build_mlp,
    encoder_from_config,
    load_encoder,
    save_encoder,
    supports_direct,
)
from elbolab.guides.flow import LocalFlowGuide, PointwiseCoupling, build_flow
from elbolab.guides.semi_amortized import build_semi_amortized
from elbolab.inference.evaluation.evidence import iwae, iwae_from_log_joint
from elbolab.inference.impute import pseudo_gibbs_impute
from elbolab.inference.runtime import isolated
from elbolab.inference.svi.train_vae import direct_capable, train_vae, training_outcome
from elbolab.models.capabilities import (
    ClosedFormEM,
    ExactEvidence,
    ExactLocalPosterior,
    LocalDensities,
    McmcModel,
    PointwiseLogLikelihood,
    PosteriorInvariants,
    PyroFamily,
    Simulator,
)
from elbolab.models.data import images as digits
from elbolab.models.fa.model import FactorAnalysis, FAParams
from elbolab.models.vae.model import VAE


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def fa_fit():
    """Data from a 2-factor model in 6 dims and scikit-learn's FA fit of it (float64)."""
    rng = np.random.default_rng(0)
    n, d, k = 200, 6, 2
    W = rng.normal(size=(d, k))
    X = rng.normal(size=(n, k)) @ W.T + rng.normal(size=d) + rng.normal(size=(n, d)) * np.sqrt(
        rng.uniform(0.5, 1.0, size=d))
    sk = SkFA(k, tol=1e-6, max_iter=5000, random_state=0).fit(X)
    return X, sk


def fa_vae(sk, dtype=torch.float64):
    vae = VAE(sk.components_.shape[1], sk.components_.shape[0], hidden=(), likelihood="gaussian",
              var_floor=1e-6)
    params = FAParams(torch.tensor(sk.components_.T), torch.tensor(sk.mean_),
                      torch.tensor(sk.noise_variance_))
    vae.to(torch.empty(0, dtype=dtype))  # float64 weights first, then copy the parameters
    vae.load_factor_analysis(params)
    return vae


def numpy_posterior(sk, X):
    """z | x ~ N(S W^T Psi^-1 (x - mu), S), S = (I + W^T Psi^-1 W)^-1 (Bishop PRML 12.66)."""
    W, psi, mu = sk.components_.T, sk.noise_variance_, sk.mean_
    S = np.linalg.inv(np.eye(W.shape[1]) + W.T @ (W / psi[:, None]))
    return (X - mu) @ (W / psi[:, None]) @ S, S


# ----------------------------------------------------------------------------- FA reduction
def test_linear_gaussian_vae_is_factor_analysis(fa_fit):
    X, sk = fa_fit
    vae = fa_vae(sk)
    x = torch.tensor(X)
    oracle = torch.tensor(sk.score_samples(X))
    mean, cov = numpy_posterior(sk, X)
    post = dist.MultivariateNormal(torch.tensor(mean), torch.tensor(cov))
    z = post.sample((7,))
    # log p(x) = log p(x, z) - log p(z | x) for EVERY z when the posterior is exact
    lp = vae.log_joint(x, z) - post.log_prob(z)
    assert lp.dtype == torch.float64
    torch.testing.assert_close(lp, oracle.expand(7, -1), atol=1e-8, rtol=0)
    # IWAE with the exact posterior as proposal: every weight equals p(x), zero spread
    est = iwae_from_log_joint(vae.log_joint, post, x, num_samples=16)
    torch.testing.assert_close(est.pointwise, oracle, atol=1e-8, rtol=0)
    assert float(est.details["pointwise_se"].max()) < 1e-6
    # the same through the Pyro model (traced site log-probs), with a Pyro guide
    def exact_guide(x, subsample_size=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.MultivariateNormal(torch.tensor(mean), torch.tensor(cov)))

    est = iwae(vae.model, exact_guide, x, num_samples=8)
    torch.testing.assert_close(est.pointwise, oracle, atol=1e-8, rtol=0)


def test_as_factor_analysis_round_trip_and_fa_log_joint(fa_fit):
    X, sk = fa_fit
    vae = fa_vae(sk)
    params = vae.as_factor_analysis()
    torch.testing.assert_close(params.W, torch.tensor(sk.components_.T), atol=1e-10, rtol=0)
    torch.testing.assert_close(params.psi, torch.tensor(sk.noise_variance_), atol=1e-10, rtol=0)
    fa = FactorAnalysis(2, params=params)
    x = torch.tensor(X)
    torch.testing.assert_close(fa.log_evidence_pointwise(x), torch.tensor(sk.score_samples(X)),
                               atol=1e-8, rtol=0)
    z = torch.randn(3, X.shape[0], 2, dtype=torch.float64)
    torch.testing.assert_close(vae.log_joint(x, z), fa.log_joint(x, z), atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="^decoder:"):
        VAE(6, 2, hidden=(8,), likelihood="gaussian").as_factor_analysis()
    with pytest.raises(ValueError, match="^psi:"):
        VAE(6, 2, hidden=(), likelihood="gaussian", var_floor=0.5).load_factor_analysis(params)


# ----------------------------------------------------------------------------- likelihoods
def _numpy_decoder(vae, z):
    sd = {k: v.double().numpy() for k, v in vae.state_dict().items()}
    h = np.maximum(z @ sd["body.0.weight"].T + sd["body.0.bias"], 0)
    return h, h @ sd["out.weight"].T + sd["out.bias"], sd


def test_bernoulli_likelihood_matches_numpy():
    vae = VAE(10, 3, hidden=(7,), likelihood="bernoulli", seed=1)
    g = np.random.default_rng(1)
    x = (g.random((5, 10)) < 0.4).astype(np.float64)
    z = g.normal(size=(4, 5, 3))
    _, logits, _ = _numpy_decoder(vae, z)
    ll = (x * log_expit(logits) + (1 - x) * log_expit(-logits)).sum(-1)
    prior = norm.logpdf(z).sum(-1)
    got = vae.log_joint(torch.tensor(x), torch.tensor(z))
    np.testing.assert_allclose(got.detach().numpy(), ll + prior, atol=1e-10)
    # the Pyro model's traced log-probs agree with log_joint (site x and site z)
    xt, zt = torch.tensor(x), torch.tensor(z[0])
    tr = poutine.trace(poutine.condition(vae.model, data={"z": zt})).get_trace(xt)
    tr.compute_log_prob()
    total = tr.nodes["x"]["log_prob"] + tr.nodes["z"]["log_prob"]
    np.testing.assert_allclose(total.detach().numpy(), ll[0] + prior[0], atol=1e-10)


def test_gaussian_per_point_variance_matches_scipy_and_floor():
    vae = VAE(6, 2, hidden=(5,), likelihood="gaussian", variance="point", var_floor=0.01, seed=2)
    with torch.no_grad():
        vae.decoder.var_head.weight.normal_()
        vae.decoder.var_head.bias.normal_()
    g = np.random.default_rng(2)
    x, z = g.normal(size=(4, 6)), g.normal(size=(4, 2))
    h, mean, sd = _numpy_decoder(vae, z)
    raw = h @ sd["var_head.weight"].T + sd["var_head.bias"]
    var = 0.01 + np.logaddexp(0, raw)
    want = norm.logpdf(x, mean, np.sqrt(var)).sum(-1)
    got = vae.log_likelihood(torch.tensor(x), torch.tensor(z))
    np.testing.assert_allclose(got.detach().numpy(), want, atol=1e-10)
    # floor: variances never go below it, so log p(x | z) <= -D/2 log(2 pi floor)
    with torch.no_grad():
        vae.decoder.var_head.bias.fill_(-1e4)
        vae.decoder.var_head.weight.zero_()
    _, v = vae.decode(torch.tensor(z))
    assert torch.all(v == 0.01)
    best = vae.log_likelihood(vae.mean(torch.tensor(z)), torch.tensor(z))
    torch.testing.assert_close(best, torch.full((4,), -3 * math.log(2 * math.pi * 0.01),
                                                dtype=torch.float64))
    assert vae.settings()["var_floor"] == 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_follows_data(dtype):
    vae = VAE(8, 2, hidden=(4,), likelihood="gaussian")
    x = torch.randn(5, 8, dtype=dtype)
    tr = poutine.trace(vae.model).get_trace(x)
    assert tr.nodes["z"]["value"].dtype == dtype
    assert vae.log_joint(x, torch.randn(3, 5, 2, dtype=dtype)).dtype == dtype
    assert vae.simulate(4, dtype=dtype).dtype == dtype


def test_subsampling_scales_by_n_over_b():
    vae = VAE(4, 2, hidden=(3,), likelihood="gaussian")
    x = torch.randn(20, 4)
    tr = poutine.trace(vae.model).get_trace(x, subsample_size=5)
    assert tr.nodes["x"]["value"].shape == (5, 4)
    assert tr.nodes["x"]["scale"] == pytest.approx(4.0)
    assert tr.nodes["z"]["scale"] == pytest.approx(4.0)


def test_simulate_matches_decoder_mean():
    vae = VAE(5, 2, hidden=(6,), likelihood="bernoulli", seed=3)
    x = vae.simulate(20000, seed=1)
    assert set(torch.unique(x).tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(x, vae.simulate(20000, seed=1))
    g = np.random.default_rng(5)
    _, logits, _ = _numpy_decoder(vae, g.normal(size=(200000, 2)))
    want = expit(logits).mean(0)
    # per pixel: sd of a mean of 20000 Bernoullis <= 0.5 / sqrt(20000) = 0.0035 (the numpy
    # reference adds 0.5/sqrt(2e5) = 0.0011); 5 sd -> 0.019
    np.testing.assert_allclose(x.mean(0).numpy(), want, atol=0.019)


@pytest.mark.parametrize("kwargs, field", [
    ({"latent_dim": 0}, "latent_dim"), ({"likelihood": "poisson"}, "likelihood"),
    ({"hidden": (0,)}, "hidden"), ({"var_floor": 0.0}, "var_floor"),
    ({"variance": "pixel"}, "variance"), ({"activation": "gelu"}, "activation"),
])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=f"^{field}:"):
        VAE(4, **{"latent_dim": 2, **kwargs})


def test_check_data_rejects_bad_input():
    vae = VAE(4, 2)
    with pytest.raises(ValueError, match="^data:.*4 columns"):
        vae.check_data(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="^data:.*0/1"):
        vae.check_data(torch.full((3, 4), 0.5))
    with pytest.raises(ValueError, match="^data:.*NaN"):
        vae.check_data(torch.tensor([[0.0, 1.0, float("nan"), 0.0]]))


def test_save_load_round_trip(tmp_path):
    vae = VAE(6, 2, hidden=(5, 4), likelihood="gaussian", variance="point", seed=4)
    path = vae.save(tmp_path / "vae.pt")
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"settings", "decoder"}
    back = VAE.load(path)
    x, z = torch.randn(3, 6), torch.randn(2, 3, 2)
    assert torch.equal(back.log_joint(x, z), vae.log_joint(x, z))
    assert back.settings() == vae.settings()


def test_training_improves_and_checkpoints(tmp_path):
    truth = VAE(12, 2, hidden=(16,), seed=7)
    with torch.no_grad():
        for p in truth.decoder.parameters():
            p.mul_(3)  # a decoder with strong latent structure
    x = truth.simulate(240, seed=0, dtype=torch.float32)
    vae = VAE(12, 2, hidden=(16,), seed=0)
    ckpt = tmp_path / "ckpt.pt"
    res = train_vae(vae, x[:200], guide="mlp", guide_options={"hidden": (16,)}, epochs=40,
                    batch_size=50, lr=0.01, val_data=x[200:], patience=100, checkpoint=ckpt,
                    checkpoint_every_epochs=10, eval_particles=50, seed=0)
    t = res.trace
    assert np.mean(t[-20:]) > np.mean(t[:20]) + 0.3 * 200  # > 0.3 nats/datum better
    # independent-pixel Bernoulli fit (the best decoder that ignores z, with KL = 0): the VAE's
    # ELBO reaches it (measured -6.59 vs -6.57 nats/datum after these 160 steps)
    p = x[:200].mean(0).clamp(1e-6, 1 - 1e-6)
    indep = float((x[:200] * p.log() + (1 - x[:200]) * (1 - p).log()).sum())
    assert res.elbo > indep - 0.15 * 200
    payload = torch.load(ckpt, weights_only=True)
    assert any(k.startswith("decoder$$$") for k in payload["params"])
    assert int(payload["step"]) == 160
    # ELBO <= IWAE_S bound (both for the trained decoder and encoder); 4 standard errors
    guide = res.state.guide
    with isolated(0):
        est = iwae(vae.model, guide, x[:200], num_samples=500)
    assert res.elbo <= est.value + 4 * math.hypot(res.elbo_se, est.se)
    assert res.n_data == 200 and res.bound == "elbo"


def _overfit_data():
    """40 training and 100 held-out points from a decoder with strong latent structure."""
    truth = VAE(12, 2, hidden=(16,), seed=7)
    with torch.no_grad():
        for p in truth.decoder.parameters():
            p.mul_(3)
    x = truth.simulate(140, seed=0, dtype=torch.float32)
    return x[:40], x[40:]


def test_early_stopping_keeps_the_best_weights_and_says_how_training_ended():
    # a wide network on 40 points with a large step: the held-out ELBO peaks early (overfitting)
    x_fit, x_val = _overfit_data()
    kw = dict(guide="mlp", guide_options={"hidden": (64,)}, batch_size=40, lr=0.02,
              val_data=x_val, eval_every_epochs=5, patience=4, eval_particles=20, seed=0)
    vae = VAE(12, 2, hidden=(64,), seed=0)
    res = train_vae(vae, x_fit, epochs=400, **kw)
    out = training_outcome(res)
    best_step, best_val = max(res.state.run.val_trace, key=lambda sv: sv[1])
    assert out["training_end"] == "early-stopped" and res.converged
    assert out["training_steps"] == best_step + 4 * 5 < 400  # patience 4 evaluations, 5 steps each
    assert out["best_val_step"] == best_step and out["best_val_elbo_per_datum"] == best_val
    assert f"early-stopped at step {out['training_steps']}" in out["training_note"]
    # the kept weights are those of the best evaluation: the same run capped at that step
    # (same draws up to there) ends with them
    again = VAE(12, 2, hidden=(64,), seed=0)
    capped = train_vae(again, x_fit, epochs=best_step, **kw)
    assert training_outcome(capped)["training_end"] == "step-cap"
    for a, b in zip(vae.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    enc, enc2 = res.state.guide.state_dict(), capped.state.guide.state_dict()
    assert all(torch.equal(enc[k], enc2[k]) for k in enc)


def test_training_at_the_cap_reports_the_measured_slope():
    x_fit, _ = _overfit_data()
    res = train_vae(VAE(12, 2, hidden=(16,), seed=0), x_fit, guide="mlp", epochs=60,
                    batch_size=40, lr=0.01, eval_particles=10, window=30, seed=0)
    out = training_outcome(res)
    assert out["training_end"] == "step-cap" and out["training_steps"] == 60
    # the slope is the engine's least-squares slope of the last window, recomputed here
    y = np.asarray(res.trace[-30:]) / 40
    t = np.arange(30)
    assert out["train_slope_per_window"] == pytest.approx(np.polyfit(t, y, 1)[0] * 30, rel=1e-9)
    assert "reached the cap of 60 steps" in out["training_note"] and "per 30 steps" in \
        out["training_note"]
    assert out["best_val_step"] == -1 and math.isnan(out["best_val_elbo_per_datum"])


@pytest.mark.parametrize("name, options", [
    ("mlp", {"hidden": (7, 3), "activation": "tanh"}), ("linear-full", {"init_scale": 0.5}),
    ("flow", {"hidden": (4,), "flow": "coupling", "num_flows": 2}),
])
def test_saved_encoder_records_its_constructor_arguments(tmp_path, name, options):
    vae = VAE(6, 3, hidden=(5,), likelihood="gaussian")
    x = torch.randn(7, 6, dtype=torch.float64)
    torch.manual_seed(0)
    enc = guides.make(name, vae, x, **options)
    _perturb(enc, 0.1, 3)
    path = save_encoder(tmp_path / "enc" / "encoder.pt", enc)
    # plain tensors and values: loadable with weights_only=True, nothing else in the file
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"format", "config", "state_dict"}
    assert payload["config"]["type"] == type(enc).__name__
    back = load_encoder(path)  # no hidden sizes to guess; float64 kept
    assert type(back) is type(enc) and back.config == enc.config
    sd, sd_back = enc.state_dict(), back.state_dict()
    assert all(torch.equal(sd[k], sd_back[k]) and sd_back[k].dtype == torch.float64 for k in sd)
    z = torch.randn(5, 7, 3, dtype=torch.float64)
    assert torch.equal(back.distribution(x).log_prob(z), enc.distribution(x).log_prob(z))
    f32 = load_encoder(path, like=torch.empty(0))  # or on the device/dtype of ``like``
    assert next(f32.parameters()).dtype == torch.float32


def test_save_encoder_refuses_what_it_cannot_rebuild(tmp_path):
    vae = VAE(6, 2, hidden=(5,))
    x = (torch.rand(5, 6) < 0.5).float()
    sa = guides.make("semi-amortized", vae, x)
    with pytest.raises(TypeError, match="^guide:.*base_encoder"):
        save_encoder(tmp_path / "e.pt", sa)
    save_encoder(tmp_path / "e.pt", sa.base_encoder)  # the encoder inside it saves
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="^path:.*not an encoder"):
        load_encoder(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="^path:"):
        load_encoder(tmp_path / "missing.pt")


def test_decoder_saved_in_float64_loads_bit_for_bit(tmp_path):
    vae = VAE(6, 2, hidden=(5,), likelihood="gaussian", seed=2)
    vae.to(torch.empty(0, dtype=torch.float64))
    _perturb(vae.decoder, 0.1, 1)
    back = VAE.load(vae.save(tmp_path / "vae.pt"))
    assert back.settings() == vae.settings()
    for k, v in vae.state_dict().items():
        assert torch.equal(back.state_dict()[k], v) and back.state_dict()[k].dtype == torch.float64


def test_semi_amortized_by_name_builds_a_documented_encoder_and_trains():
    from elbolab import inference
    from elbolab.guides.semi_amortized import DEFAULT_ENCODER

    x_fit, _ = _overfit_data()
    vae = VAE(12, 2, hidden=(16,), seed=0)
    guide = guides.for_family(vae)["semi-amortized"].build(vae, x_fit)
    assert guide.encoder_grad == "straight-through"
    assert guide.base_encoder.config["hidden"] == list(DEFAULT_ENCODER["hidden"]) == [64]
    wide = guides.make("semi-amortized", vae, x_fit, encoder_options={"hidden": (8, 8)})
    assert wide.base_encoder.config["hidden"] == [8, 8]
    with pytest.raises(ValueError, match="^encoder_grad:"):
        guides.make("semi-amortized", vae, x_fit, encoder_grad="none")
    with pytest.raises(TypeError, match="^encoder_options:"):
        guides.make("semi-amortized", vae, x_fit, encoder=guide.base_encoder,
                    encoder_options={"hidden": (3,)})
    res = inference.fit("svi", vae, x_fit, seed=0, guide="semi-amortized", num_steps=150,
                        lr=0.01, eval_particles=50, guide_options={"steps": 2})
    start = inference.fit("svi", vae, x_fit, seed=0, guide="semi-amortized", num_steps=1,
                          lr=0.01, eval_particles=50, guide_options={"steps": 2})
    assert res.guide == "semi-amortized" and res.bound == "elbo"
    assert res.elbo > start.elbo + 4 * math.hypot(res.elbo_se, start.elbo_se)
    assert any(k.startswith("guide_semi-amortized$$$encoder.") for k in res.posterior)
    # the fitted pair evaluates again: ELBO <= IWAE within the Monte Carlo errors
    w = res.iwae(x_fit, num_samples=200)
    assert res.elbo <= w.value + 4 * math.hypot(res.elbo_se, w.se)


# ----------------------------------------------------------------------------- contract
def test_capabilities_and_guides_come_from_the_contract():
    vae = VAE(6, 2, hidden=(5,))
    for c in (PyroFamily, LocalDensities, Simulator, McmcModel, PosteriorInvariants,
              PointwiseLogLikelihood):
        assert isinstance(vae, c), c.__name__
    for c in (ExactLocalPosterior, ExactEvidence, ClosedFormEM):
        assert not isinstance(vae, c), c.__name__
    assert not hasattr(vae, "guides") and not hasattr(vae, "default_guide")
    assert vae.mcmc_init(torch.zeros(3, 6)) is None
    specs = guides.for_family(vae)
    assert "exact" not in specs and {"mlp", "flow", "local-flow", "semi-amortized"} <= set(specs)
    assert guides.default_for(vae) == "mlp"


def test_mcmc_model_has_the_model_density_with_constant_weights():
    vae = VAE(6, 2, hidden=(5,), likelihood="gaussian", seed=3)
    x, z = torch.randn(4, 6), torch.randn(4, 2)
    logp = []
    for fn in (vae.model, vae.mcmc_model):
        tr = poutine.trace(poutine.condition(fn, data={"z": z})).get_trace(x)
        tr.compute_log_prob()
        logp.append(tr.nodes["x"]["log_prob"] + tr.nodes["z"]["log_prob"])
    torch.testing.assert_close(logp[0], logp[1])
    assert logp[0].requires_grad and not logp[1].requires_grad
    # z is diagnosed as is, with the total log likelihood of each draw
    draws = {"z": torch.randn(2, 3, 4, 2)}
    inv = vae.posterior_invariants(draws, x)
    assert torch.equal(inv["z"], draws["z"]) and inv["log_lik"].shape == (2, 3)


@pytest.mark.parametrize("name, options", [
    ("mlp", {"hidden": (5, 3), "activation": "tanh"}), ("linear-full", {}),
    ("linear-diag", {"init_scale": 0.5}), ("flow", {"hidden": (4,), "flow": "coupling"}),
])
def test_encoder_rebuilds_from_its_config(name, options):
    vae = VAE(6, 3, hidden=(5,), likelihood="gaussian")
    x = torch.randn(7, 6, dtype=torch.float64)
    torch.manual_seed(0)
    enc = guides.make(name, vae, x, **options)
    _perturb(enc, 0.1, 3)
    config = enc.config
    assert config["data_dim"] == 6 and config["latent_dim"] == 3
    # plain values only (saved next to the weights with torch.save, loaded weights_only)
    assert all(isinstance(v, str | int | float | bool | list | type(None))
               for v in config.values())
    back = encoder_from_config(config, like=x)
    back.load_state_dict(enc.state_dict())
    assert type(back) is type(enc) and back.config == config
    z = torch.randn(5, 7, 3, dtype=torch.float64)
    torch.testing.assert_close(back.distribution(x).log_prob(z), enc.distribution(x).log_prob(z))
    with pytest.raises(ValueError, match="^config:"):
        encoder_from_config({**config, "type": "Nope"}, like=x)


def test_direct_step_is_chosen_from_the_built_guide():
    vae = VAE(6, 2, hidden=(5,))
    x = (torch.rand(10, 6) < 0.5).float()

    def plain(x, subsample_size=None):
        pass

    state = torch.random.get_rng_state()
    for name in guides.for_family(vae):
        options = {"encoder_grad": "full"} if name == "semi-amortized" else {}
        assert direct_capable(vae, x, name, options), name
    assert torch.equal(torch.random.get_rng_state(), state)  # probe builds leave the RNG alone
    assert not supports_direct(plain) and not direct_capable(vae, x, plain)


# ----------------------------------------------------------------------------- imputation
def test_pseudo_gibbs_with_the_exact_posterior_gives_the_gaussian_conditional(fa_fit):
    """With q(z | x) = p(z | x) pseudo-Gibbs is a Gibbs sampler of p(z, x_mis | x_obs); its
    average of E[x_mis | z] converges to E[x_mis | x_obs] of N(mu, W W^T + Psi)."""
    X, sk = fa_fit
    vae = fa_vae(sk)
    W, psi, mu = sk.components_.T, sk.noise_variance_, sk.mean_
    rows = X[:3]
    mask = np.zeros(rows.shape, dtype=bool)
    mask[0, [1, 4]] = mask[1, [0, 2, 5]] = mask[2, 3] = True
    cov = W @ W.T + np.diag(psi)
    want = rows.copy()
    for i in range(3):
        m, o = mask[i], ~mask[i]
        want[i, m] = mu[m] + cov[np.ix_(m, o)] @ np.linalg.solve(cov[np.ix_(o, o)],
                                                                 rows[i, o] - mu[o])

    class Exact:
        def distribution(self, x):
            mean, S = numpy_posterior(sk, x.numpy())
            return dist.MultivariateNormal(torch.tensor(mean), torch.tensor(S))

    # 400 independent chains per row (copies), 60 sweeps, the first 20 discarded
    copies = 400
    x = torch.tensor(np.repeat(rows, copies, axis=0))
    m = torch.tensor(np.repeat(mask, copies, axis=0))
    x_nan = torch.where(m, torch.tensor(math.nan, dtype=torch.float64), x)
    out = pseudo_gibbs_impute(vae, Exact(), x_nan, steps=60, burn_in=20, seed=0)
    assert torch.equal(out[~m], x[~m])  # observed entries kept
    per_chain = out.reshape(3, copies, -1)
    est, se = per_chain.mean(1), per_chain.std(1) / math.sqrt(copies)
    for i in range(3):
        z = (est[i, mask[i]] - torch.tensor(want[i, mask[i]])) / se[i, mask[i]]
        # chains are independent: a 5-sd bound on each of the 6 imputed entries
        assert z.abs().max() < 5, (i, z)
    # the same seed gives the same imputation
    torch.testing.assert_close(
        pseudo_gibbs_impute(vae, Exact(), x_nan[:5], steps=4, burn_in=1, seed=2),
        pseudo_gibbs_impute(vae, Exact(), x_nan[:5], steps=4, burn_in=1, seed=2))


# ----------------------------------------------------------------------------- digits data
def test_digits_fixed_binarization_and_seeded_split():
    d = digits.load_digits(seed=3)
    raw = sk_load_digits()
    assert d.image_shape == (8, 8) and d.data_dim == 64
    assert d.x_train.shape[0] + d.x_test.shape[0] == 1797
    assert d.x_test.shape[0] == round(0.2 * 1797)
    train, test = digits.split(1797, 0.2, 3)
    assert not set(train) & set(test)
    want = (raw.data >= 8).astype(np.float32)
    np.testing.assert_array_equal(d.x_train.numpy(), want[train])
    np.testing.assert_array_equal(d.y_test, raw.target[test])
    again = digits.load_digits(seed=3)
    assert torch.equal(again.x_test, d.x_test)
    other = digits.load_digits(seed=4)
    assert not torch.equal(other.x_test, d.x_test)
    grey = digits.load_digits(binarize=False, seed=3)
    np.testing.assert_allclose(grey.x_train.numpy(), raw.data[train] / 16, atol=1e-7)


def test_load_images_any_shape(tmp_path):
    g = np.random.default_rng(0)
    imgs = g.integers(0, 256, size=(30, 5, 5)).astype(np.uint8)
    np.savez(tmp_path / "imgs.npz", images=imgs, y=np.arange(30))
    d = digits.load_images(tmp_path / "imgs.npz", test_fraction=0.1, seed=0)
    assert d.image_shape == (5, 5) and d.data_dim == 25
    assert d.x_train.shape == (27, 25)
    train, _ = digits.split(30, 0.1, 0)
    np.testing.assert_allclose(d.x_train.numpy(), imgs.reshape(30, -1)[train] / 255, atol=1e-6)
    np.testing.assert_array_equal(d.y_train, train)
    np.save(tmp_path / "flat.npy", g.random((10, 9)))
    d2 = digits.load_images(tmp_path / "flat.npy", binarize=True)
    assert d2.image_shape == (3, 3) and d2.binary
    assert set(torch.unique(d2.x_train).tolist()) <= {0.0, 1.0}
    np.save(tmp_path / "vec.npy", np.arange(5.0))
    with pytest.raises(ValueError, match="^data:"):
        digits.load_images(tmp_path / "vec.npy")
    bad = g.random((4, 4))
    bad[0, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match="^data:.*NaN"):
        digits.load_images(tmp_path / "nan.npy")


# ----------------------------------------------------------------------------- flows
def _perturb(module, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _check_change_of_variables(q, draws=2):
    """log q(z) against log N(z_0) - log |det df/dz_0| with the Jacobian of the whole forward
    map by autograd; z is re-created so the transforms' caches miss and the inverses run."""
    base = q.base_dist
    z0 = base.sample((draws,))  # (S, 1, k)

    def f(v):
        y = v.view(1, 1, -1)
        for t in q.transforms:
            y = t(y)
        return y.view(-1)

    for s in range(draws):
        jac = torch.autograd.functional.jacobian(f, z0[s, 0])
        want = base.log_prob(z0[s]) - torch.linalg.slogdet(jac)[1]
        z = f(z0[s, 0]).detach().clone().view(1, 1, -1)
        torch.testing.assert_close(q.log_prob(z).view(-1), want.detach().view(-1), atol=1e-8,
                                   rtol=1e-8)


@pytest.mark.parametrize("flow, conditional", [
    ("iaf", False), ("coupling", False), ("spline", False), ("iaf", True), ("coupling", True),
    ("spline", True),
])
def test_flow_guide_density_is_change_of_variables(flow, conditional):
    vae = VAE(3, 4, hidden=(4,), likelihood="gaussian")
    x = torch.randn(2, 3, dtype=torch.float64)
    torch.manual_seed(0)
    guide = build_flow(vae, x, hidden=(4,), flow=flow, num_flows=2, conditional=conditional,
                       flow_hidden=(8,))
    _perturb(guide, 0.3, 1)
    q = guide.distribution(x, torch.tensor([1]))
    z = q.sample((50,))
    assert z.dtype == torch.float64
    # a non-trivial transform: the density differs from its base Gaussian
    assert not torch.allclose(q.log_prob(z), q.base_dist.log_prob(z), atol=1e-3)
    _check_change_of_variables(q)


def test_pointwise_coupling_inverse_and_jacobian():
    g = torch.Generator().manual_seed(0)
    b, k, h = 3, 5, 4
    cond, out = torch.tensor([3, 0]), torch.tensor([1, 2, 4])
    W1 = torch.randn(b, 2, h, generator=g, dtype=torch.float64)
    W2 = torch.randn(b, h, 6, generator=g, dtype=torch.float64)
    t = PointwiseCoupling(W1, torch.randn(b, h, generator=g, dtype=torch.float64), W2,
                          torch.randn(b, 6, generator=g, dtype=torch.float64), cond, out)
    z = torch.randn(b, k, generator=g, dtype=torch.float64)
    y = t(z)
    torch.testing.assert_close(t._inverse(y), z)
    for i in range(b):  # log |det dy_i / dz_i| by brute-force autograd Jacobian
        def f(zi, i=i):
            zz = z.clone()
            zz[i] = zi
            return t._call(zz)[i]

        jac = torch.autograd.functional.jacobian(f, z[i])
        want = torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(t.log_abs_det_jacobian(z, y)[i], want)


def test_local_flow_starts_at_base_and_is_change_of_variables():
    x = torch.zeros(3, 4, dtype=torch.float64)
    guide = LocalFlowGuide(3, 2, like=x, num_layers=3, hidden=5)
    q = guide.distribution(x)
    z = torch.randn(10, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(q.log_prob(z), dist.Normal(0.0, 1.0).log_prob(z).sum(-1))
    _perturb(guide, 0.5, 2)
    _check_change_of_variables(guide.distribution(x, torch.tensor([2])))
    # points do not share parameters: point 0's density has no gradient on point 1's weights
    lp = guide.distribution(x).log_prob(torch.randn(3, 2, dtype=torch.float64))[0]
    lp.backward()
    for p in guide.parameters():
        assert p.grad is None or torch.all(p.grad[1:] == 0)


# ----------------------------------------------------------------------------- semi-amortized
def test_semi_amortized_refinement_reaches_optimal_mean_field(fa_fit):
    X, sk = fa_fit
    vae = fa_vae(sk)
    x = torch.tensor(X[:20])
    torch.manual_seed(0)
    enc = build_mlp(vae, x, hidden=(4,))  # untrained: far from the posterior
    mean, cov = numpy_posterior(sk, X[:20])
    lam = np.linalg.inv(cov)
    guide = build_semi_amortized(vae, x, encoder=enc, steps=0)
    loc0, tril0 = guide.moments(x)
    loc_e, tril_e = enc.moments(x)
    torch.testing.assert_close(loc0, loc_e)
    assert np.abs(loc0.detach().numpy() - mean).max() > 0.5
    guide = build_semi_amortized(vae, x, encoder=enc, steps=300, inner_lr=0.05,
                                 inner_particles=64, momentum=0.5)
    loc, tril = guide.moments(x)
    # optimal mean-field q*: mean = posterior mean, variance_j = 1 / Lambda_jj (Bishop 10.1.2).
    # Stationary SGD noise: Var(iterate) ~ lr * Var(grad) / (2 curvature (1 - momentum)) with
    # Var(grad_j) ~ Lambda_jj / P and curvature Lambda_jj -> lr / (P (1 - mu)) = 1.6e-3, sd 0.04;
    # tolerance 0.2 ~ 5 sd (the log-scale has curvature 2, a similar spread).
    np.testing.assert_allclose(loc.numpy(), mean, atol=0.2)
    sd = tril.diagonal(dim1=-2, dim2=-1).numpy()
    want = np.broadcast_to(np.log(1 / np.sqrt(np.diag(lam))), sd.shape)
    np.testing.assert_allclose(np.log(sd), want, atol=0.2)


def test_semi_amortized_encoder_gradient_modes():
    vae = VAE(6, 2, hidden=(5,), likelihood="gaussian")
    x = torch.randn(8, 6)
    torch.manual_seed(0)
    enc = build_mlp(vae, x, hidden=(4,))
    frozen = build_semi_amortized(vae, x, encoder=enc, steps=3)
    assert list(frozen.parameters()) == []
    grads = {}
    for mode in ("straight-through", "full"):
        guide = build_semi_amortized(vae, x, encoder=enc, steps=3, encoder_grad=mode)
        enc.zero_grad()
        torch.manual_seed(1)
        loc, logs = guide.refine(x)
        (loc.sum() + logs.sum()).backward()
        grads[mode] = enc.loc_net.weight.grad.clone()
        assert grads[mode].abs().sum() > 0
    # straight-through passes d/d lambda_K unchanged: d(sum loc_K)/d(loc_0) = 1, so its gradient
    # on the loc head is that of sum loc_0; the full gradient differs (through the inner steps)
    enc.zero_grad()
    loc0, _ = enc.moments(x)
    loc0.sum().backward()
    torch.testing.assert_close(grads["straight-through"], enc.loc_net.weight.grad)
    assert not torch.allclose(grads["full"], grads["straight-through"])
    with pytest.raises(ValueError, match="^encoder_grad:"):
        build_semi_amortized(vae, x, encoder=enc, encoder_grad="sometimes")


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
def test_family_guides_and_training_follow_cuda_data():
    dev = torch.device("cuda")
    truth = VAE(12, 2, hidden=(8,), seed=1)
    x = truth.simulate(64, seed=0, device=dev, dtype=torch.float32)
    assert x.is_cuda
    vae = VAE(12, 2, hidden=(8,))
    res = train_vae(vae, x, guide="flow", guide_options={"hidden": (8,)}, epochs=2,
                    batch_size=16, eval_particles=10)
    assert res.device.startswith("cuda") and next(vae.decoder.parameters()).is_cuda
    assert vae.log_joint(x, torch.randn(3, 64, 2, device=dev)).is_cuda
    local = LocalFlowGuide(64, 2, like=x)
    assert local.distribution(x).rsample().is_cuda
    sa = build_semi_amortized(vae, x, encoder=res.state.guide, steps=2)
    assert sa.moments(x)[0].is_cuda
