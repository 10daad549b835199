"""Parameter snapshots and checkpoints of a Pyro param store (tensors only, never pickles).

A checkpoint holds the unconstrained parameters, the optimizer's state, the step, the ELBO trace and
the random states (torch CPU and CUDA, as uint8 tensors), so a run resumed from it continues
exactly where the interrupted one was. It is written to a temporary file and renamed into place,
and loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import pyro
import torch
from pyro import poutine


def snapshot_params() -> dict[str, torch.Tensor]:
    """Copies of the unconstrained tensors in the current param store."""
    return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}


def all_finite(snapshot: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in snapshot.values())


def restore_params(snapshot: dict[str, torch.Tensor]) -> None:
    """Copy a snapshot back, in place (modules keep sharing the same tensors)."""
    store = dict(pyro.get_param_store().named_parameters())
    with torch.no_grad():
        for k, v in snapshot.items():
            if k in store:
                store[k].copy_(v)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(path: Path | str, step: int, trace: list[float], optimizer=None) -> Path:
    """Write a resumable checkpoint (see the module docstring) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "params": snapshot_params(),
        "step": torch.tensor(step),
        "trace": torch.tensor(trace, dtype=torch.float64),
        "rng": rng_state(),
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: Path | str) -> dict:
    """The checkpoint's tensors, loaded with ``weights_only=True`` on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no checkpoint file at {path}")
    return torch.load(path, weights_only=True, map_location="cpu")


def load_checkpoint(path: Path | str, model, guide, *args, **kwargs) -> dict:
    """Create the params by tracing guide and model once, then copy the checkpoint in place."""
    payload = read_checkpoint(path)
    with torch.no_grad():
        gtr = poutine.trace(guide).get_trace(*args, **kwargs)
        poutine.trace(poutine.replay(model, trace=gtr)).get_trace(*args, **kwargs)
    store = dict(pyro.get_param_store().named_parameters())
    missing = [k for k in payload["params"] if k not in store]
    if missing:
        raise KeyError(f"checkpoint: parameters {missing} are not created by this model/guide")
    restore_params({k: v.to(store[k].device) for k, v in payload["params"].items()})
    return payload
