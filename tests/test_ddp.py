"""Distributed data-parallel SVI (inference/ddp.py) on 2 CPU processes (gloo backend).

The reference is the same steps computed in one process (:func:`elbolab.inference.svi.ddp.fit_single`: each
step's shard losses averaged before one backward pass, the shards seeded as the ranks seed them).
DDP must give identical parameters on both ranks, equal to the reference up to the order of the
floating-point sums of the all-reduce, and log the all-reduced ELBO (the mean of the ranks'
shard estimates), not rank 0's own.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("lightning", reason="distributed SVI needs lightning (pip install 'elbolab[ddp]')")

from elbolab.inference.runtime import isolated  # noqa: E402
from elbolab.inference.svi import ddp  # noqa: E402
from elbolab.inference.svi.engine import resolve_guide  # noqa: E402
from elbolab.inference.svi.settings import Settings  # noqa: E402
from elbolab.models.vae.model import VAE  # noqa: E402

OPTS = dict(num_steps=4, subsample_size=16, lr=1e-2, num_particles=1)


def _data():
    x = (torch.rand(96, 12, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    return VAE(12, 2, (8,), seed=0), x


def test_two_gloo_processes_match_one_process_and_stay_identical():
    vae, x = _data()
    before = copy.deepcopy(vae.decoder.state_dict())
    run = ddp.fit_ddp(vae, x, guide="mlp", devices=2, accelerator="cpu", seed=1, **OPTS)
    ref = ddp.fit_single(vae, x, guide="mlp", world_size=2, seed=1, **OPTS)
    assert run.world_size == 2 and len(run.trace) == OPTS["num_steps"]
    assert run.rank_spread == 0.0  # all-reduced gradients: the ranks never differ
    assert set(run.params) == set(ref.params)
    for k in ref.params:
        torch.testing.assert_close(run.params[k], ref.params[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(run.trace), torch.tensor(ref.trace), rtol=1e-5, atol=0)
    # the caller's family is not trained in place
    for k, v in vae.decoder.state_dict().items():
        assert torch.equal(v, before[k])


def test_logged_elbo_is_the_mean_of_the_shards_not_rank_zeros():
    # step 0 by hand: the two shard estimates of the first global batch, seeded as the ranks are
    vae, x = _data()
    settings = Settings(**OPTS)
    with isolated(1):
        pair = ddp._Pair(copy.deepcopy(vae), x, resolve_guide(vae, "mlp"), None, settings, 1)
        idx = ddp.global_batch(x.shape[0], OPTS["subsample_size"], 1, 0)
        shard = []
        for r in range(2):
            torch.manual_seed(ddp._step_seed(1, 0, r))
            shard.append(-float(pair.shard_loss(idx[r::2]).detach()))
    ref = ddp.fit_single(vae, x, guide="mlp", world_size=2, seed=1, **OPTS)
    assert ref.trace[0] == pytest.approx(sum(shard) / 2, rel=1e-6)
    assert abs(shard[0] - shard[1]) > 1.0  # so "rank 0's own" would be told apart
    # each shard is an unbiased estimate scaled by n / (B / W): of the order of the full ELBO
    assert all(v < 0 for v in shard)


def test_bad_requests_name_the_setting_before_starting_processes():
    vae, x = _data()
    with pytest.raises(ValueError, match="^subsample_size"):
        ddp.fit_ddp(vae, x, guide="mlp", devices=2, num_steps=2, subsample_size=15)
    with pytest.raises(ValueError, match="^subsample_size"):
        ddp.fit_ddp(vae, x, guide="mlp", devices=2, num_steps=2)
    with pytest.raises(TypeError, match="unknown option"):
        ddp.fit_ddp(vae, x, guide="mlp", devices=2, num_step=2, subsample_size=16)
    with pytest.raises(ValueError, match="^strategy"):
        ddp.fit_ddp(vae, x, guide="mlp", strategy="horovod", num_steps=2, subsample_size=16)


def test_fit_with_a_strategy_trains_distributed_and_evaluates_the_pair_here():
    """The user's path: ``elbolab.inference.fit("svi", ..., strategy="ddp_spawn", devices=2)`` returns a
    FitResult holding the one-process reference's parameters, with its ELBO evaluated on them."""
    from elbolab import inference

    vae, x = _data()
    res = inference.fit("svi", vae, x, guide="mlp", strategy="ddp_spawn", devices=2,
                        accelerator="cpu", seed=1, eval_particles=200, num_posterior_samples=0,
                        **OPTS)
    ref = ddp.fit_single(vae, x, guide="mlp", world_size=2, seed=1, **OPTS)
    for k in ref.params:
        torch.testing.assert_close(res.state.params[k], ref.params[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(res.trace), torch.tensor(ref.trace), rtol=1e-5,
                               atol=0)
    assert "on 2 processes" in res.message and not res.converged
    again = res.elbo_estimate(x, num_particles=200)  # the kept pair is the trained one
    assert abs(again.value - res.elbo) < 4 * (again.se**2 + res.elbo_se**2) ** 0.5


def test_settings_a_distributed_run_cannot_honour_are_errors_naming_them():
    from elbolab import inference

    vae, x = _data()
    base = dict(guide="mlp", strategy="ddp_spawn", devices=2, **OPTS)
    for bad, value in (("tol", 0.1), ("direct", True), ("skip_nonfinite", True),
                       ("learn_model_params", False)):
        with pytest.raises(ValueError, match=f"^{bad}: not available with strategy"):
            inference.fit("svi", vae, x, **{**base, bad: value})
    with pytest.raises(ValueError, match="^subsample_size"):
        inference.fit("svi", vae, x, **{**base, "subsample_size": 15})
    with pytest.raises(ValueError, match="^devices: more than one process"):
        inference.fit("svi", vae, x, guide="mlp", devices=2, **OPTS)
    with pytest.raises(ValueError, match="^strategy"):
        inference.fit("svi", vae, x, **{**base, "strategy": "horovod"})
    with pytest.raises(ValueError, match="^accelerator: applies to a distributed strategy"):
        inference.fit("svi", vae, x, guide="mlp", accelerator="gpu", **OPTS)
    from elbolab.inference.svi.train_vae import train_vae

    with pytest.raises(ValueError, match="^val_data"):
        train_vae(vae, x, epochs=1, batch_size=16, strategy="ddp_spawn", devices=2, val_data=x)


def test_a_users_model_with_a_composed_guide_trains_on_spawned_processes():
    """A model from a user's module (tests/toy.py) with the composed mean-field guide (closures,
    rebuilt by name in each process) equals the one-process reference."""
    from elbolab import inference
    from tests.toy import NoisyLocal

    x = 1.5 + torch.randn(48, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    opts = dict(num_steps=4, subsample_size=16, lr=1e-2, num_particles=1)
    res = inference.fit("svi", NoisyLocal(), x, guide="mean-field", strategy="ddp_spawn",
                        devices=2, accelerator="cpu", seed=2, eval_particles=20,
                        num_posterior_samples=0, **opts)
    ref = ddp.fit_single(NoisyLocal(), x, guide="mean-field", world_size=2, seed=2, **opts)
    for k in ref.params:
        torch.testing.assert_close(res.state.params[k], ref.params[k], rtol=1e-6, atol=1e-8)


def test_what_cannot_reach_spawned_processes_is_named_before_they_start():
    from elbolab import inference
    from tests.toy import NoisyLocal

    class InATest(NoisyLocal):  # defined in a function: a spawned process cannot import it
        pass

    x = torch.randn(32, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="^family: strategy='ddp_spawn' sends it"):
        inference.fit("svi", InATest(), x, guide="mean-field", strategy="ddp_spawn",
                      devices=2, num_steps=2, subsample_size=16)
    with pytest.raises(ValueError, match="^num_nodes: several nodes need strategy='ddp'"):
        inference.fit("svi", InATest(), x, guide="mean-field", strategy="ddp_spawn",
                      devices=2, num_nodes=2, num_steps=2, subsample_size=16)


def test_a_distributed_run_whose_elbo_became_non_finite_is_reported_diverged(monkeypatch):
    from elbolab import inference

    vae, x = _data()
    ref = ddp.fit_single(vae, x, guide="mlp", world_size=2, seed=1, **OPTS)
    ref.trace[2] = float("nan")
    monkeypatch.setattr(ddp, "fit_ddp", lambda *args, **kwargs: ref)  # no processes needed
    res = inference.fit("svi", vae, x, guide="mlp", strategy="ddp_spawn", devices=2, seed=1,
                        eval_particles=20, num_posterior_samples=0, **OPTS)
    assert res.diagnostics["diverged"] and not res.converged
    assert "all-reduced ELBO of step 3 of 4" in res.message


def test_a_run_destroys_the_group_it_created_and_leaves_the_environment_as_it_was(monkeypatch, tmp_path):
    """A rank that exits with its gloo group alive can die with SIGABRT while the interpreter
    is finalized (pytorch/pytorch#190489): the group a run creates is destroyed when it ends.
    One process under strategy='ddp' (the group lives in this process, so it can be checked);
    Lightning's MASTER_PORT and rank variables do not outlive the fit, so the next run picks a
    free port of its own."""
    import os

    import torch.distributed as dist

    monkeypatch.delenv("MASTER_PORT", raising=False)
    before = dict(os.environ)
    vae, x = _data()
    run = ddp.fit_ddp(vae, x, guide="mlp", devices=1, strategy="ddp", accelerator="cpu",
                      seed=1, **OPTS)
    assert run.world_size == 1 and len(run.trace) == OPTS["num_steps"]
    assert not dist.is_initialized()
    assert dict(os.environ) == before
    # a group the caller created is the caller's: used, and left alone
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        ddp.fit_ddp(vae, x, guide="mlp", devices=1, strategy="ddp", accelerator="cpu", seed=1,
                    **OPTS)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
