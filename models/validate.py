"""Boundary checks: every public entry point validates its inputs here, naming the field."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


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
        if dtype is not None or not t.is_floating_point():
            t = t.to(dtype or torch.get_default_dtype())
        if device is not None:
            t = t.to(device)
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # pragma: no cover - exotic inputs
            raise TypeError(f"{name}: cannot be read as an array ({exc})") from exc
        if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
            raise TypeError(f"{name}: expected numeric values, got dtype {arr.dtype}")
        if dtype is None:
            dtype = torch.float64 if arr.dtype == np.float64 else torch.get_default_dtype()
        t = torch.as_tensor(arr, dtype=dtype, device=device)
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


def integer(value, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """An integer in [minimum, maximum]."""
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


def _number(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name}: must be a scalar, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name}: must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name}: is NaN")
    return v
