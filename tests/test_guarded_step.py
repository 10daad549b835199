"""The SVI engine's guarded update: a step that would break a parameter is undone exactly, at the
cost of what the step touches, and a run reports which parameter broke."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.optim.clipped_adam import ClippedAdam

from elbolab.inference import svi
from elbolab.inference.runtime import isolated
from elbolab.inference.svi.sparse_adam import LazyClippedAdam


def _state(opt, params):
    """Every tensor and number the optimizer holds, copied."""
    out = {"lr": [g["lr"] for g in opt.param_groups]}
    for i, p in enumerate(params):
        out[f"p{i}"] = p.detach().clone()
        for k, v in opt.state.get(p, {}).items():
            out[f"p{i}.{k}"] = v.clone() if torch.is_tensor(v) else v
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _grads(dense, rows_param, rows, scale=1.0):
    dense.grad = torch.randn_like(dense) * scale
    out = torch.nn.functional.embedding(rows, rows_param, sparse=True)
    (out * torch.randn(out.shape, dtype=out.dtype)).sum().backward()


def test_a_nan_gradient_is_refused_and_changes_nothing():
    torch.manual_seed(0)
    dense = torch.randn(4, 3, requires_grad=True)
    local = torch.randn(1000, 2, dtype=torch.float64, requires_grad=True)
    opt = LazyClippedAdam([dense, local], lr=0.1, clip_norm=10.0, lrd=0.99)
    for _ in range(3):
        _grads(dense, local, torch.randint(1000, (50,)))
        assert opt.guarded_step(keep_state=True) == ([], True)
        dense.grad = local.grad = None
    before = _state(opt, [dense, local])
    _grads(dense, local, torch.randint(1000, (50,)))
    local.grad = torch.sparse_coo_tensor(local.grad._indices(), local.grad._values().clone(),
                                         local.shape, check_invariants=True)
    local.grad._values()[3, 1] = math.nan
    refused, grads_finite = opt.guarded_step(keep_state=True)
    assert [id(p) for p in refused] == [id(local)] and not grads_finite
    _same(_state(opt, [dense, local]), before)  # the dense parameter's update was undone too


def test_an_update_that_breaks_a_constraint_is_undone():
    torch.manual_seed(1)
    u = torch.zeros(5, requires_grad=True)  # e.g. log of a positive scale
    opt = LazyClippedAdam([u], lr=1e3, clip_norm=math.inf, lrd=1.0)
    u.grad = torch.ones(5)
    before = _state(opt, [u])
    refused, grads_finite = opt.guarded_step(lambda p, rows: bool((p.exp() > 0).all()),
                                             keep_state=True)
    assert refused and grads_finite  # exp(-1000) underflows to 0: outside (0, inf)
    _same(_state(opt, [u]), before)


def test_the_accepted_update_is_clipped_adams_for_mixed_dtypes():
    torch.manual_seed(2)
    a = [torch.randn(3, 2, requires_grad=True), torch.randn(4, dtype=torch.float64,
                                                          requires_grad=True)]
    b = [p.detach().clone().requires_grad_(True) for p in a]
    opt_a = LazyClippedAdam(a, lr=0.05, clip_norm=0.7, lrd=0.9)
    opt_b = ClippedAdam(b, lr=0.05, clip_norm=0.7, lrd=0.9)
    for t in range(5):
        for pa, pb in zip(a, b):
            g = torch.randn_like(pa) * (t + 1)
            pa.grad, pb.grad = g.clone(), g.clone()
        assert opt_a.guarded_step() == ([], True)
        opt_b.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_a_run_names_the_parameter_an_update_broke():
    """A user's model whose positive scale is pushed out of range by a huge rate: the run stops
    at that step, names the parameter, and keeps the previous (valid) value."""
    x = torch.randn(40, dtype=torch.float64) * 3

    def model(x):
        s = pyro.param("noise", x.new_tensor(1.0), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(0.0, s), obs=x)

    def guide(x):
        pass

    with isolated(0):
        run = svi.run_svi(model, guide, (x,), svi.Settings(num_steps=50, lr=800.0))
        noise = float(pyro.param("noise").detach())
    assert run.diverged and "the update made noise non-finite" in run.message, run.message
    assert "kept the parameters of step" in run.message
    assert math.isfinite(noise) and noise > 0


def test_a_run_that_diverges_keeps_parameters_whose_elbo_is_finite():
    """lr = 300 on a user's model (tests/toy.py): the first steps give finite but absurd losses,
    then NaN. The kept parameters are the last at which the loss was finite, so the reported ELBO
    is too."""
    from elbolab import inference
    from tests.toy import NoisyLocal

    g = torch.Generator().manual_seed(0)
    x = (1.5 + torch.randn(200, 1, generator=g) * 1.25).double()
    res = inference.fit("svi", NoisyLocal(), x, guide="mean-field", lr=300.0,
                        num_steps=200, eval_particles=50, num_posterior_samples=0, seed=0)
    assert res.diagnostics["diverged"] and "kept the parameters of step" in res.message
    assert math.isfinite(res.elbo) and math.isfinite(res.elbo_estimate(x).value)
    assert len(res.trace) == res.diagnostics["steps"]


def test_skip_mode_undoes_moments_of_a_callers_own_step_too():
    """run_svi with a caller's direct step and skip_nonfinite: one step with a finite loss but a
    NaN gradient is skipped and leaves no NaN in Adam's moments (the engine turns the step's
    keep_state on), so later steps keep learning."""
    from elbolab import guides
    from elbolab.models.vae.model import VAE

    x = (torch.rand(40, 6, generator=torch.Generator().manual_seed(0)) < 0.4).float()
    vae = VAE(6, 2, hidden=(5,), seed=1)
    real, calls = vae.log_joint, {"n": 0}

    def nan_gradient_once(xb, z):
        calls["n"] += 1
        out = real(xb, z)
        if calls["n"] == 3:  # sqrt at 0: value 0, gradient inf * 0 = NaN
            w = next(vae.decoder.parameters())
            out = out + 0 * torch.sqrt(w - w.detach()).sum()
        return out

    vae.log_joint = nan_gradient_once
    s = svi.Settings(num_steps=8, subsample_size=10, num_particles=1, skip_nonfinite=True)
    with isolated(0):
        guide = guides.make("mlp", vae, x, hidden=(4,))
        step = svi.direct_step(vae, guide, x, s)
        run = svi.run_svi(vae.model, guide, (x,), s, step_fn=step)
        moments = [t for st in step.optimizer.state.values() for t in st.values()
                   if torch.is_tensor(t)]
    assert run.skipped == 1 and len(run.trace) == 7 and moments
    assert all(bool(torch.isfinite(t).all()) for t in moments)


def test_a_runaway_loss_stops_the_run_and_keeps_the_state_before_it():
    """Issue 21: a learning rate of 1e6 throws an amortized guide's weights to 1e7 and the loss
    to 1e20 while it stays finite; the loop refuses the step that ran away, undoes the update
    that produced it and says so, and the ELBO reported is that of the kept state."""
    from elbolab.models.fa.model import FactorAnalysis

    fam = FactorAnalysis(2, dim=5)
    x, truth = fam.simulate(48, seed=0, dtype=torch.float64)
    fixed = FactorAnalysis(2, params=truth)
    exact = fixed.log_evidence(x).value
    s = svi.Settings(num_steps=30, lr=1e6, num_particles=4, eval_particles=50,
                     learn_model_params=False, num_posterior_samples=0)
    res = svi.fit(fixed, x, s, guide="linear-full")
    assert res.diagnostics["diverged"] and "ran away" in res.message, res.message
    assert math.isfinite(res.elbo) and res.elbo < exact and abs(res.elbo) < 1e3 * abs(exact)
    for v in res.state.guide.state_dict().values():
        assert float(v.abs().max()) < 1e3  # the kept weights are not the runaway ones


def test_an_elbo_that_ran_away_after_the_last_step_is_not_reported():
    """One step at a huge rate: no later step sees the update that broke the fit, so the final
    evaluation catches it (the loop's runaway rule): diverged, the ELBO NaN, never -1e28."""
    import math

    from elbolab import inference
    from elbolab.models.data.images import load_digits
    from elbolab.models.vae import VAE

    d = load_digits()
    x = d.x_train[:200]
    fit = inference.fit("svi", VAE(d.data_dim, 4), x, guide="mlp", num_steps=1, lr=1e6,
                        eval_particles=10, num_posterior_samples=0, seed=0)
    assert fit.diagnostics["diverged"] and not fit.converged
    assert math.isnan(fit.elbo) and "ran away" in fit.message
