"""Devices, seeds, isolated Pyro state, CPU threads, progress bars and honest timers."""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Iterator

import numpy as np
import pyro
import torch

from elbolab.models.numerics import one_thread  # noqa: F401  (re-exported)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device")
    if not (spec == "cpu" or spec.startswith("cuda")):
        raise ValueError(f"device: must be one of auto, cpu, cuda[:N], got {spec!r}")
    return torch.device(spec)


MAX_SEED = 2**63 - 1


def validate_seed(seed) -> int:
    """``seed`` as an int in [0, 2**63 - 1], or an error naming it."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed: must be an integer in [0, 2**63 - 1], got {seed!r}")
    return int(seed)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy, torch and Pyro; return a CPU generator for explicit draws."""
    seed = validate_seed(seed)
    random.seed(seed)
    # NumPy's legacy generator takes 32-bit seeds: a larger one as its two 32-bit halves (Pyro's
    # set_rng_seed, which this does the work of, refuses seeds >= 2**32)
    np.random.seed(seed if seed < 2**32 else [seed % 2**32, seed >> 32])  # noqa: NPY002
    torch.manual_seed(seed)  # the CPU's and every CUDA device's
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def isolated(seed: int | None = None) -> Iterator[pyro.poutine.runtime._PYRO_PARAM_STORE.__class__]:
    """A fresh Pyro param store for the block (restored afterwards); seeds when given.

    No global state leaks between fits or into the caller: each engine run happens inside one of
    these, and the caller's random states (python, numpy's legacy generator, torch CPU and CUDA)
    are restored on exit.
    """
    store = pyro.get_param_store()
    saved = _random_states()
    try:
        if seed is not None:
            seed_everything(seed)
        with store.scope():
            store.clear()
            yield store
    finally:
        _set_random_states(saved)


def _random_states() -> tuple:
    cuda = (torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda  # noqa: NPY002


def _set_random_states(saved: tuple) -> None:
    py, npy, cpu, cuda = saved
    random.setstate(py)
    np.random.set_state(npy)  # noqa: NPY002
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


#: data elements below which a CUDA run of a step-by-step engine is usually slower than the CPU
SMALL_FOR_CUDA = 100_000

_WHY_SMALL = {
    "mcmc": "NUTS takes thousands of leapfrog steps of a few small kernels each, and every U-turn "
            "check and acceptance reads a number back to the host",
    "svi": "each SVI step is a few small kernels, and the loop reads the loss back to the host "
           "every step",
}


def device_note(engine: str, x: torch.Tensor) -> str:
    """A sentence for a result whose data are on CUDA but small enough (fewer than
    :data:`SMALL_FOR_CUDA` elements) that the CPU is usually faster for ``engine``'s many small,
    host-synchronized steps; ``""`` otherwise. The run is not moved: the note says so instead."""
    if x.device.type != "cuda" or x.numel() >= SMALL_FOR_CUDA or engine not in _WHY_SMALL:
        return ""
    return (f"note: ran on {x.device} as asked, but the data are small ({x.numel()} elements < "
            f"{SMALL_FOR_CUDA}); {_WHY_SMALL[engine]}, so the CPU is usually faster here "
            f"(device='cpu' / --device cpu)")


def synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall-clock timer that synchronizes CUDA before reading the clock."""

    def __init__(self, device=None):
        self.device = device
        self.seconds = 0.0

    def __enter__(self):
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0
        return False


@contextlib.contextmanager
def cpu_threads(threads: int | None, x: torch.Tensor | None = None):
    """Run the block on ``threads`` torch CPU threads (restored afterwards); ``None``, or data
    ``x`` that are not on the CPU, leave torch's setting alone.

    An engine of many small steps (SVI, NUTS, EM sweeps) runs fastest on one thread: each op on
    a few thousand elements that torch splits over its OpenMP threads (exp and log of float64
    through MKL's VML split far below torch's grain size) waits at a barrier for every thread,
    microseconds on an idle machine but milliseconds per op when the other cores are busy.
    """
    n = torch.get_num_threads()
    if threads is None or threads == n or (x is not None and x.device.type != "cpu"):
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(n)


#: seconds a run must last before its progress bar appears (short fits print nothing)
PROGRESS_DELAY = 2.0


def interactive() -> bool:
    """True when a person is likely watching: stderr is a terminal, or a Jupyter kernel runs."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # a replaced or closed stream
        pass
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


def show_progress(progress: bool | None) -> bool:
    """A ``progress`` setting resolved: ``None`` (the default) shows a bar when
    :func:`interactive`, True and False force it on or off."""
    return interactive() if progress is None else bool(progress)


def like(x: torch.Tensor) -> dict:
    """``dict(device=..., dtype=...)`` of ``x``, for creating tensors that follow the data."""
    return {"device": x.device, "dtype": x.dtype}
