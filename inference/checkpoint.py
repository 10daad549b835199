"""Parameter snapshots and checkpoints of a Pyro param store (tensors only, never pickles).

A checkpoint holds the unconstrained parameters, the optimizer's state, the step, the ELBO trace,
the random states (torch CPU and CUDA, as uint8 tensors) and the loop's own state (held-out ELBO
trace and best parameters of early stopping, the last good snapshot), so a run resumed from it
continues exactly where the interrupted one was: on CPU, bit for bit. It is written to a temporary
file and renamed into place, and loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints


def snapshot_params() -> dict[str, torch.Tensor]:
    """Copies of the unconstrained tensors in the current param store."""
    return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}


def all_finite(snapshot: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in snapshot.values())


def invalid_params() -> list[str]:
    """Names of the params in the current store whose value is unusable: a non-finite
    unconstrained tensor, or a constrained value that is non-finite or outside its constraint
    (e.g. a positive scale exp(u) that underflowed to 0 after a huge step)."""
    store = pyro.get_param_store()
    bad, kinds = [], None
    for name, u in store.named_parameters():
        if not bool(torch.isfinite(u).all()):
            bad.append(name)
            continue
        if kinds is None:
            kinds = store.get_state()["constraints"]
        c = kinds.get(name)
        if c is None or c is constraints.real or c is constraints.real_vector:
            continue
        with torch.no_grad():
            v = store[name]
            ok = bool(torch.isfinite(v).all()) and bool(c.check(v).all())
        if not ok:
            bad.append(name)
    return bad


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


def save_checkpoint(path: Path | str, step: int, trace: list[float], optimizer=None,
                    extra: dict | None = None) -> Path:
    """Write a resumable checkpoint (see the module docstring) atomically; ``extra``: more
    tensors (or dicts of tensors) of the loop's state, e.g. early stopping's."""
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
    payload.update(extra or {})
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
