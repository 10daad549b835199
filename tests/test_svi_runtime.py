"""How the SVI engine runs, not what it computes: CPU threads and the progress bar.

The README's ``elbolab.inference.fit("svi", family, x, seed=0, guide="collapsed")`` ran 13x slower than
the same guide inside the gmm_engines study because the study sets torch to one thread and the
API left torch at every core: each step's exp/log/max on a few thousand float64 elements then
waits at an OpenMP barrier (ms per op on a busy machine, against us on one thread). These tests
pin the path the API takes (one thread inside the steps, the caller's count restored, the same
Pyro loss and validation as the study) without timing anything.
"""

from __future__ import annotations

import io
import sys

import pyro
import pyro.distributions
import pyro.infer.util
import pyro.poutine.util
import pytest
import torch

from elbolab import guides, inference
from elbolab.inference import runtime, svi
from elbolab.inference.svi import steps as svi_steps
from elbolab.models.fa.model import FactorAnalysis
from elbolab.models.gmm.model import BayesianGMM

STEPS = 7


@pytest.fixture
def two_threads():
    """torch at two CPU threads for the test (a user's default on a multi-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def record_steps(monkeypatch):
    """Every Pyro step the engine takes: torch's thread count, Pyro's validation flag, and the
    loss object, as seen inside the step."""
    seen = []
    step = svi_steps.PyroStep.__call__

    def spy(self):
        validate = (pyro.infer.util.is_validation_enabled(),
                    pyro.poutine.util.is_validation_enabled(),
                    pyro.distributions.is_validation_enabled())
        seen.append({"threads": torch.get_num_threads(), "validate": validate, "loss": self.loss})
        return step(self)

    monkeypatch.setattr(svi_steps.PyroStep, "__call__", spy)
    return seen


def _gmm(n=40):
    family = BayesianGMM(K=3, prior_var=10.0)
    x, _ = family.simulate(n, seed=0)
    return family, x


def test_api_default_runs_the_steps_on_one_thread_and_restores_the_callers(two_threads,
                                                                             record_steps):
    family, x = _gmm()
    res = inference.fit("svi", family, x, seed=0, guide="collapsed", num_steps=STEPS,
                        eval_particles=4, num_posterior_samples=0)
    assert len(record_steps) == STEPS
    assert {s["threads"] for s in record_steps} == {1}
    assert torch.get_num_threads() == 2  # the caller's setting is back
    assert res.settings["threads"] == 1


def test_api_default_takes_the_studys_step(two_threads, record_steps):
    """Same loss class, particles, vectorization and validation as the gmm_engines study's SVI
    settings (which set lr, decay and particles explicitly), and one thread as its --threads 1."""
    family, x = _gmm()
    inference.fit("svi", family, x, seed=0, guide="collapsed", num_steps=2, eval_particles=4,
                  num_posterior_samples=0)
    study = svi.Settings(num_steps=2, lr=0.2, lr_decay=0.005, num_particles=4, eval_particles=4,
                         eval_batch=200, num_posterior_samples=0, progress=False)
    with runtime.cpu_threads(1):
        inference.fit("svi", family, x, study, seed=0, guide="collapsed")
    api, ref = record_steps[0], record_steps[-1]
    assert type(api["loss"]) is type(ref["loss"]) is pyro.infer.TraceEnum_ELBO
    assert api["loss"].num_particles == ref["loss"].num_particles == 4
    assert api["loss"].vectorize_particles and ref["loss"].vectorize_particles
    assert api["validate"] == ref["validate"] == (False, False, False)
    assert api["threads"] == ref["threads"] == 1


def test_threads_none_leaves_torch_alone_and_an_explicit_count_is_used(two_threads, record_steps):
    family, x = _gmm()
    inference.fit("svi", family, x, seed=0, guide="collapsed", num_steps=2, eval_particles=4,
                  num_posterior_samples=0, threads=None)
    assert {s["threads"] for s in record_steps} == {2}
    torch.set_num_threads(1)
    record_steps.clear()
    inference.fit("svi", family, x, seed=0, guide="collapsed", num_steps=2, eval_particles=4,
                  num_posterior_samples=0, threads=2)
    assert {s["threads"] for s in record_steps} == {2}
    assert torch.get_num_threads() == 1


def test_direct_step_runs_on_one_thread_too(two_threads, monkeypatch):
    seen = []
    make = svi_steps.direct_step

    def spy_make(*args, **kwargs):
        step = make(*args, **kwargs)

        def spy():
            seen.append(torch.get_num_threads())
            return step()

        spy.optimizer, spy.keep_state = step.optimizer, step.keep_state
        return spy

    from elbolab.inference.svi import engine

    monkeypatch.setattr(engine, "direct_step", spy_make)
    fam = FactorAnalysis(2, dim=5)
    x, _ = fam.simulate(50, seed=0)
    inference.fit("svi", fam, x, seed=0, guide="linear-diag", num_steps=3, direct=True,
                  eval_particles=4, num_posterior_samples=0)
    assert seen == [1, 1, 1]


@pytest.mark.parametrize("bad, error", [(0, ValueError), ("1", TypeError), (1.5, TypeError)])
def test_threads_is_checked(bad, error):
    with pytest.raises(error, match="threads"):
        svi.Settings(threads=bad)


def test_runtime_options_survive_replace_and_flat():
    s = svi.Settings(threads=3, progress=False).replace(lr=0.1)
    assert (s.threads, s.progress, s.optimizer.lr) == (3, False, 0.1)
    assert s.replace(threads=None).threads is None
    assert {"threads", "progress", "validate"} <= set(s.flat())
    assert svi.Settings().progress is None and svi.Settings().threads == 1


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


@pytest.mark.parametrize("tty", [True, False])
def test_progress_default_shows_a_delayed_bar_on_a_terminal_only(tty, monkeypatch):
    family, x = _gmm()
    bars = []
    from elbolab.inference.svi import loop

    real = loop.tqdm

    def spy(*args, **kwargs):
        bars.append(kwargs)
        return real(*args, **{**kwargs, "disable": True})

    monkeypatch.setattr(loop, "tqdm", spy)
    monkeypatch.setattr(sys, "stderr", _Stream(tty))
    inference.fit("svi", family, x, seed=0, guide="collapsed", num_steps=2, eval_particles=4,
                  num_posterior_samples=0)
    assert len(bars) == 1
    assert bars[0]["disable"] is (not tty)
    assert bars[0]["delay"] >= 1.0  # a short fit prints nothing
    assert runtime.show_progress(None) is tty
    assert runtime.show_progress(False) is False and runtime.show_progress(True) is True


def test_the_bare_loop_run_svi_runs_on_the_settings_threads(two_threads, record_steps):
    """``run_svi`` (per-point q* in elbolab.inference.evaluation.gaps) without ``fit`` around it."""
    fam = FactorAnalysis(2, dim=5)
    x, _ = fam.simulate(50, seed=0)
    with runtime.isolated(0):
        guide = guides.make("linear-diag", fam, x)
        svi.run_svi(fam.model, guide, (x,), svi.Settings(num_steps=3))
    assert [s["threads"] for s in record_steps] == [1, 1, 1]
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("tty", [True, False])
def test_nuts_shows_pyros_bar_on_a_terminal_only_by_default(tty, monkeypatch):
    """As NumPyro's MCMC does for a person watching; never in a pipe, a log or a test."""
    from elbolab.inference.mcmc import chains
    from elbolab.inference.mcmc import nuts as mcmc

    family, x = _gmm()
    seen = []
    real = chains.MCMC

    def spy(*args, **kwargs):
        seen.append(kwargs["disable_progbar"])
        return real(*args, **{**kwargs, "disable_progbar": True})

    bars = []
    real_bar = mcmc.tqdm

    def spy_bar(*args, **kwargs):
        bars.append(kwargs["disable"])
        return real_bar(*args, **{**kwargs, "disable": True})

    monkeypatch.setattr(chains, "MCMC", spy)
    monkeypatch.setattr(mcmc, "tqdm", spy_bar)
    monkeypatch.setattr(sys, "stderr", _Stream(tty))
    inference.fit("mcmc", family, x, seed=0, num_samples=5, warmup=5, num_chains=1, kernel="pyro")
    assert seen == [not tty]
    inference.fit("mcmc", family, x, seed=0, num_samples=5, warmup=5, num_chains=2)  # batched
    assert bars == [not tty]
    with pytest.raises(TypeError, match="^progress"):
        mcmc.Settings(progress="yes")


@pytest.mark.parametrize("flag, expected", [([], 1), (["--threads", "2"], 2)])
def test_a_studys_threads_flag_reaches_its_svi_fits(flag, expected, record_steps, tmp_path):
    """--threads is not silently replaced by the engine's one-thread default."""
    from elbolab.experiments import gmm_engines

    argv = ["--quick", "--no-progress", "--engines", "svi", "--guides", "collapsed",
            "--svi-steps", "3", "--eval-particles", "4", "--out", str(tmp_path / "g"), *flag]
    assert gmm_engines.main(argv) == 0
    assert record_steps and {s["threads"] for s in record_steps} == {expected}
