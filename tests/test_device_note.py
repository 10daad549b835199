"""The note a result carries when small data ran on CUDA (no GPU needed: the rule is checked on
stand-ins with a CUDA device and a size)."""

from types import SimpleNamespace

import torch

from elbolab import inference
from elbolab.inference.runtime import SMALL_FOR_CUDA, device_note
from tests.toy import NormalMean


def _data(device: str, numel: int):
    return SimpleNamespace(device=torch.device(device), numel=lambda: numel)


def test_small_cuda_data_get_a_note_naming_the_cpu_and_the_reason():
    note = device_note("mcmc", _data("cuda", 500))
    assert "CPU is usually faster" in note and "500 elements" in note and "U-turn" in note
    assert "reads the loss back" in device_note("svi", _data("cuda:1", 10))


def test_no_note_on_the_cpu_for_large_data_or_closed_form_engines():
    assert device_note("mcmc", _data("cpu", 10)) == ""
    assert device_note("svi", _data("cuda", SMALL_FOR_CUDA)) == ""
    assert device_note("em", _data("cuda", 10)) == ""


def test_a_cpu_fit_carries_no_note():
    x = torch.randn(20, dtype=torch.float64)
    res = inference.fit("svi", NormalMean(), x, seed=0, num_steps=5, eval_particles=10)
    assert "note:" not in res.message
