"""A run killed with SIGKILL mid-training and resumed from its checkpoint ends bit for bit where
an uninterrupted run with the same seed ends (CPU): the final parameters, the ELBO trace, the
held-out trace of early stopping and the reported ELBO. Once through the Python API (``svi.fit``
in a subprocess that is killed) and once through a study's command line (--checkpoint-every,
then --resume)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from elbolab.experiments import gmm_engines
from elbolab.experiments.core import rundir
from elbolab.inference import svi
from elbolab.inference.svi.checkpoint import read_checkpoint
from elbolab.models.fa.model import FactorAnalysis

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

#: the fit both runs make: an MLP encoder and FA parameters learned jointly on minibatches, with
#: a held-out ELBO every 10 steps (early stopping's state and draws must survive the resume)
FIT = """
import sys, torch
from inference import svi
from elbolab.models.fa.model import FactorAnalysis

torch.set_num_threads(1)
fam = FactorAnalysis(2, dim=5)
x, _ = fam.simulate(80, seed=4)
settings = svi.Settings(num_steps=int(sys.argv[2]), lr=0.03, subsample_size=20,
                        val_data=x[60:], eval_every=10, patience=1000, eval_particles=20,
                        num_posterior_samples=0, checkpoint=sys.argv[1], checkpoint_every=5)
res = svi.fit(fam, x[:60], settings, seed=11, guide="mlp")
"""
STEPS = 400


def _fit(path: Path, resume: Path | None = None):
    """The same fit in this process (one thread, as in the subprocess)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fam = FactorAnalysis(2, dim=5)
        x, _ = fam.simulate(80, seed=4)
        s = svi.Settings(num_steps=STEPS, lr=0.03, subsample_size=20, val_data=x[60:],
                         eval_every=10, patience=1000, eval_particles=20,
                         num_posterior_samples=0, checkpoint=path, checkpoint_every=5)
        return svi.fit(fam, x[:60], s, seed=11, guide="mlp", resume=resume)
    finally:
        torch.set_num_threads(threads)


def _kill_after_first_checkpoint(cmd, watch, *, cwd=ROOT, timeout=300.0) -> int:
    """Start ``cmd``; SIGKILL it as soon as a file matching ``watch()`` exists. Returns the
    return code (-9 when killed)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    t0 = time.monotonic()
    try:
        while proc.poll() is None and not watch():
            if time.monotonic() - t0 > timeout:
                raise AssertionError("no checkpoint appeared")
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode


def test_api_fit_killed_and_resumed_matches_uninterrupted(tmp_path):
    ck = tmp_path / "fit.pt"
    code = _kill_after_first_checkpoint([sys.executable, "-c", FIT, str(ck), str(STEPS)],
                                        ck.exists)
    assert code == -signal.SIGKILL, "the fit ended before it could be killed"
    step = int(read_checkpoint(ck)["step"])
    assert 0 < step < STEPS
    resumed = _fit(tmp_path / "resumed.pt", resume=ck)
    whole = _fit(tmp_path / "whole.pt")
    assert len(whole.trace) == len(resumed.trace) == STEPS
    assert whole.trace == resumed.trace  # floats, compared exactly
    assert whole.state.run.val_trace == resumed.state.run.val_trace
    assert set(whole.state.params) == set(resumed.state.params)
    for k, v in whole.state.params.items():
        assert torch.equal(v, resumed.state.params[k]), k
    assert (whole.elbo, whole.elbo_se) == (resumed.elbo, resumed.elbo_se)


def test_resume_validates_the_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        _fit(tmp_path / "a.pt", resume=tmp_path / "missing.pt")


GMM = ["--quick", "--no-progress", "--engines", "svi", "--guides", "collapsed",
       "--svi-steps", "120", "--checkpoint-every", "5"]


def test_study_killed_and_resumed_from_the_command_line(tmp_path):
    out = tmp_path / "gmm"
    tmp = rundir.incomplete_path(out)
    cmd = [sys.executable, "-m", "elbolab.experiments.gmm_engines", *GMM, "--out", str(out)]
    code = _kill_after_first_checkpoint(
        cmd, lambda: (tmp / "checkpoints" / "svi-collapsed.pt").exists())
    assert code == -signal.SIGKILL
    assert not out.exists() and tmp.is_dir()  # nothing that looks finished
    assert not (tmp / "run.json").exists()
    # the same flags without --resume are refused: the interrupted run is not thrown away
    with pytest.raises(SystemExit):
        gmm_engines.main([*GMM, "--out", str(out)])
    # a flag that would change the run is refused too
    with pytest.raises(SystemExit, match="--svi-steps"):
        gmm_engines.main(["--resume", str(out), "--svi-steps", "100"])
    assert gmm_engines.main(["--resume", str(tmp), "--no-progress"]) == 0
    assert out.is_dir() and not tmp.exists()
    assert gmm_engines.main([*GMM, "--out", str(tmp_path / "whole")]) == 0
    a, b = _read(out), _read(tmp_path / "whole")
    assert a["run"]["resumed"] and not b["run"]["resumed"]
    cols = [c for c in a["summary"].columns if c != "seconds"]
    pd.testing.assert_frame_equal(a["summary"][cols], b["summary"][cols], check_exact=True)
    pd.testing.assert_frame_equal(a["posterior"], b["posterior"], check_exact=True)
    # the projected gain is a function of the last 200 ELBO values of the trace
    assert a["run"]["diagnostics"] == b["run"]["diagnostics"]
    assert a["run"]["files"] == sorted(p.name for p in out.iterdir())
    assert "checkpoints" not in a["run"]["files"]


def _read(out: Path) -> dict:
    run = json.loads((out / "run.json").read_text())
    for d in run["diagnostics"].values():
        d.pop("seconds", None)
    return {"summary": pd.read_csv(out / "summary.csv"),
            "posterior": pd.read_csv(out / "posterior.csv"), "run": run}
