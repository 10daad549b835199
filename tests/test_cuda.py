"""Every engine on CUDA tensors (skipped without a GPU; `make test-cuda`).

Without a GPU the float64 tests stand in: a tensor created without the input's device or dtype
shows up there as a float32 result."""

import pytest
import torch

from elbolab import inference
from elbolab.inference import mcmc, svi
from elbolab.inference.closed_form import cavi, em
from elbolab.models.gmm.model import BayesianGMM

pytestmark = pytest.mark.cuda


@pytest.fixture
def x_cuda():
    fam = BayesianGMM(K=2, prior_var=10.0)
    x, _ = fam.simulate(40, seed=0, device=torch.device("cuda"), dtype=torch.float32)
    return fam, x


@pytest.mark.parametrize(
    ("engine", "settings", "opts"),
    [
        ("em", em.Settings(max_iter=50), {}),
        ("cavi", cavi.Settings(max_iter=50), {}),
        ("svi", svi.Settings(num_steps=20, eval_particles=20), {"guide": "mean-field"}),
        ("svi", svi.Settings(num_steps=20, eval_particles=20), {"guide": "collapsed"}),
        ("mcmc", mcmc.Settings(num_samples=20, warmup=20, num_chains=1), {}),
    ],
)
def test_gmm_engines_on_cuda(x_cuda, engine, settings, opts):
    fam, x = x_cuda
    res = inference.fit(engine, fam, x, settings, seed=0, **opts)
    assert res.device.startswith("cuda")
    for v in res.posterior.values():
        if isinstance(v, torch.Tensor):
            assert v.device.type == "cuda"


def test_gmm_evidence_on_cuda(x_cuda):
    fam, x = x_cuda
    ev_gpu = fam.log_evidence(x)
    ev_cpu = fam.log_evidence(x.cpu())
    assert ev_gpu.value == pytest.approx(ev_cpu.value, abs=1e-3)


def test_small_data_on_cuda_says_the_cpu_is_usually_faster(x_cuda):
    fam, x = x_cuda
    res = inference.fit("mcmc", fam, x, mcmc.Settings(num_samples=10, warmup=10, num_chains=1),
                        seed=0)
    assert "the CPU is usually faster" in res.message and res.device.startswith("cuda")


@pytest.mark.parametrize("study", ["gmm_engines", "fa_gaps", "vae_gaps"])
def test_every_study_runs_on_cuda(tmp_path, study):
    import importlib
    import json

    mod = importlib.import_module(f"elbolab.experiments.{study}")
    out = tmp_path / study
    assert mod.main(["--quick", "--no-progress", "--device", "cuda", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["device"].startswith("cuda")
