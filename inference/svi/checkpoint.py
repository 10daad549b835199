"""Parameter snapshots and checkpoints of a Pyro param store (tensors only, never pickles).

A checkpoint holds the unconstrained parameters, the optimizer's state, the step, the ELBO trace,
the random states (torch CPU and CUDA, as uint8 tensors) and the loop's own state (held-out ELBO
trace and best parameters of early stopping), so a run resumed from it continues exactly where
the interrupted one was: on CPU, bit for bit. One exception: the record that undoes the last
update (kept in memory only) is not saved, so a non-finite loss on the very first step after
resuming keeps the parameters it was computed at (the message says so). It is written to a
temporary file and renamed into place, and loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from torch.distributions import transform_to


def snapshot_params() -> dict[str, torch.Tensor]:
    """Copies of the unconstrained tensors in the current param store."""
    return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}


class ParamCheck:
    """Names and constraint checks of the current param store's tensors, for the guarded update
    (:meth:`elbolab.inference.svi.sparse_adam.LazyClippedAdam.guarded_step`): ``valid(u, rows)`` says whether
    the constrained value of the unconstrained tensor ``u`` (its ``rows`` only, when given) is
    finite and inside its constraint (e.g. a positive scale exp(u) that underflowed to 0 after a
    huge step is not). Real-valued tensors pass (their finiteness is checked by the optimizer)."""

    def __init__(self):
        self._known: dict[int, tuple[str, object]] = {}
        self._real: set[int] = set()

    def refresh(self) -> None:
        self._real = set()
        store = pyro.get_param_store()
        kinds = store.get_state()["constraints"]
        self._known = {id(u): (name, kinds.get(name, constraints.real))
                       for name, u in store.named_parameters()}

    def name(self, u: torch.Tensor) -> str:
        if id(u) not in self._known:
            self.refresh()
        return self._known.get(id(u), ("<a tensor outside the param store>", None))[0]

    def valid(self, u: torch.Tensor, rows: torch.Tensor | None = None) -> bool:
        if id(u) in self._real:
            return True
        if id(u) not in self._known:
            self.refresh()
        c = self._known.get(id(u), (None, constraints.real))[1]
        if c is None or c is constraints.real or c is constraints.real_vector:
            self._real.add(id(u))
            return True
        with torch.no_grad():
            v = transform_to(c)(u if rows is None else u[rows])
            return bool(torch.isfinite(v).all()) and bool(c.check(v).all())

    def refusal(self, refused: list[torch.Tensor], grads_finite: bool) -> str:
        names = sorted({self.name(u) for u in refused})
        what = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        return (f"the gradient of {what} was non-finite" if not grads_finite else
                f"the update made {what} non-finite or left its constraint")


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
