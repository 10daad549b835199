"""Boundary checks: every public entry point validates its inputs here, naming the field.

Also the memory guard: :func:`check_size` refuses, before any work, a computation whose estimated
working set exceeds :func:`memory_budget`, naming the setting that makes it large
(:class:`TooLarge`, a ``ValueError``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from elbolab.models.numerics import one_thread

#: devices whose tensors hold no values (shapes only): data there is refused, naming the device
NO_VALUES_DEVICES = ("meta",)


def as_data(
    x,
    name: str = "data",
    *,
    ndim: int | Sequence[int] = 2,
    min_rows: int = 1,
    allow_nan: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Turn ``x`` into a floating tensor and check it.

    Keeps the device and floating dtype of a tensor input (float64 in, float64 out); numpy and
    lists become tensors on ``device`` (default: CPU) with ``dtype`` (default: the array's float
    dtype, float32 for integer input). Raises ``ValueError``/``TypeError`` naming ``name``.
    """
    if x is None:
        raise ValueError(f"{name}: got None, expected an array of shape (n, d)")
    if isinstance(x, torch.Tensor):
        t = x
        if t.is_complex():
            raise TypeError(f"{name}: complex values are not supported (dtype {t.dtype}); "
                            "pass the real and imaginary parts as separate columns")
        if dtype is not None or not t.is_floating_point():
            t = t.to(dtype or torch.get_default_dtype())
        if device is not None:
            t = t.to(device)
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # pragma: no cover - exotic inputs
            raise TypeError(f"{name}: cannot be read as an array ({exc})") from exc
        if np.iscomplexobj(arr):
            raise TypeError(f"{name}: complex values are not supported (dtype {arr.dtype}); "
                            "pass the real and imaginary parts as separate columns")
        if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
            raise TypeError(f"{name}: expected numeric values, got dtype {arr.dtype}")
        if dtype is None:
            dtype = torch.float64 if arr.dtype == np.float64 else torch.get_default_dtype()
        t = torch.as_tensor(arr, dtype=dtype, device=device)
    if t.device.type in NO_VALUES_DEVICES:
        raise ValueError(f"{name}: a tensor on the {t.device.type!r} device holds no values "
                         "(shapes only); nothing can be computed on it: move the data to 'cpu' "
                         "or 'cuda'")
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if t.dim() not in allowed:
        raise ValueError(
            f"{name}: expected {' or '.join(map(str, allowed))} dimensions, got shape {tuple(t.shape)}"
        )
    if t.dim() >= 1 and t.shape[0] < min_rows:
        raise ValueError(
            f"{name}: expected at least {min_rows} row(s), got {t.shape[0]} (empty data)"
        )
    if t.numel() == 0:
        raise ValueError(f"{name}: is empty (shape {tuple(t.shape)})")
    with one_thread(t):  # one pass, on one thread (memory-bound; no barriers on a busy machine)
        if not allow_nan and bool(torch.isfinite(t.sum())):  # a finite sum has no NaN or inf
            return t
    if not allow_nan and torch.isnan(t).any():
        raise ValueError(f"{name}: contains NaN at {int(torch.isnan(t).sum())} entries")
    if torch.isinf(t).any():
        raise ValueError(f"{name}: contains inf at {int(torch.isinf(t).sum())} entries")
    return t


def positive(value, name: str, *, allow_inf: bool = False) -> float:
    """A finite number > 0."""
    v = _number(value, name)
    if not v > 0 or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name}: must be a positive finite number, got {value!r}")
    return v


def non_negative(value, name: str) -> float:
    v = _number(value, name)
    if not v >= 0 or math.isinf(v):
        raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
    return v


#: the largest seed: every seed ends in ``torch.Generator.manual_seed`` / numpy's generators
MAX_SEED = 2**63 - 1


def integer(value, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """An integer in [minimum, maximum]; a value named ``seed`` is also at most :data:`MAX_SEED`."""
    if maximum is None and name == "seed":
        maximum = MAX_SEED
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise TypeError(f"{name}: must be an integer, got {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        hi = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{name}: must be >= {minimum}{hi}, got {value}")
    return value


def boolean(value, name: str) -> bool:
    """True or False (numpy's bool too); anything else, e.g. the string "false", is an error."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name}: must be True or False, got {value!r}")
    return bool(value)


def probability(value, name: str, *, open_left: bool = False, open_right: bool = True) -> float:
    v = _number(value, name)
    lo_ok = v > 0 if open_left else v >= 0
    hi_ok = v < 1 if open_right else v <= 1
    if not (lo_ok and hi_ok):
        raise ValueError(
            f"{name}: must lie in {'(' if open_left else '['}0, 1{')' if open_right else ']'}, got {value!r}"
        )
    return v


def choice(value, name: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name}: must be one of {list(options)}, got {value!r}")
    return value


class TooLarge(ValueError):
    """A computation refused up front: its estimated memory exceeds :func:`memory_budget`."""


#: fraction of the free memory one computation may plan to use
MEMORY_FRACTION = 0.5


def memory_budget(device: torch.device | str | None = None) -> tuple[int, str]:
    """(bytes, where the figure comes from) that one computation may use on ``device``.

    ``ELBOLAB_MEMORY_BUDGET`` (bytes) overrides; else :data:`MEMORY_FRACTION` of the free memory:
    ``torch.cuda.mem_get_info`` on a CUDA device, ``MemAvailable`` of ``/proc/meminfo`` (or the
    physical memory) on the CPU.
    """
    env = os.environ.get("ELBOLAB_MEMORY_BUDGET")
    if env:
        try:
            return int(float(env)), "ELBOLAB_MEMORY_BUDGET"
        except ValueError as exc:
            raise ValueError(f"ELBOLAB_MEMORY_BUDGET: must be a number of bytes, got {env!r}") from exc
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(MEMORY_FRACTION * free), f"{MEMORY_FRACTION:g} of the free GPU memory"
    free = _available_ram()
    return int(MEMORY_FRACTION * free), f"{MEMORY_FRACTION:g} of the available RAM"


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 8 * 2**30


def check_size(elements: float, name: str, what: str, *, itemsize: int = 8,
               device: torch.device | str | None = None) -> float:
    """Refuse (:class:`TooLarge`, naming ``name``) a computation whose working set of about
    ``elements`` numbers of ``itemsize`` bytes exceeds :func:`memory_budget`; else return the
    estimated bytes. Call it before any work, with the setting that drives the size as ``name``."""
    need = float(elements) * itemsize
    budget, source = memory_budget(device)
    if not need <= budget:
        raise TooLarge(
            f"{name}: {what} needs about {_gib(need)} ({float(elements):.3g} numbers), more than "
            f"the {_gib(budget)} budget ({source}); lower {name}"
        )
    return need


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def _number(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name}: must be a scalar, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name}: must be a number, got {value!r}")
    try:
        v = float(value)
    except OverflowError as exc:  # an int beyond float range
        raise ValueError(f"{name}: {value!r} is too large") from exc
    if math.isnan(v):
        raise ValueError(f"{name}: is NaN")
    return v


def float_tensor_fields(obj, names) -> None:
    """Turn ``obj``'s attributes ``names`` into floating tensors in place (float64 from non-tensor
    input), or raise naming the field: not floating, or NaN/inf."""
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(v, dtype=torch.float64)
            setattr(obj, name, v)
        if not v.is_floating_point():
            raise TypeError(f"{name}: must be a floating tensor, got {v.dtype}")
        if not torch.isfinite(v).all():
            raise ValueError(f"{name}: contains NaN or inf")


def factor_dim(dim, latent_dim: int, params_dim: int | None = None) -> int | None:
    """The data dimension of a factor model: ``dim`` (or the parameters'), >= 2 and > latent_dim;
    errors name the field."""
    if params_dim is not None:
        if dim is not None and int(dim) != params_dim:
            raise ValueError(f"dim: {dim} does not match params (d = {params_dim})")
        dim = params_dim
    if dim is None:
        return None
    dim = integer(dim, "dim", minimum=2)
    if latent_dim >= dim:
        raise ValueError(f"latent_dim: must be < dim ({dim}), got {latent_dim}")
    return dim
