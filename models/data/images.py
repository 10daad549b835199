"""Image data (for the VAE): scikit-learn's bundled digits (no network) and the user's own arrays.

* :func:`load_digits` -- the 1797 8x8 images of ``sklearn.datasets.load_digits``, intensities
  0..16 scaled to [0, 1]. ``binarize=True`` applies a FIXED threshold: a pixel is 1 iff its
  intensity is >= 8/16 (deterministic, so the Bernoulli data are the same on every machine and
  seed). The train/test split is a seeded permutation (``numpy.random.default_rng(seed)``).
* :func:`load_images` -- a ``.npy``/``.npz``/CSV file (via :func:`elbolab.models.data.arrays.load_array`)
  of any shape ``(n, ...)``, flattened to ``(n, D)``; values in [0, 255] are divided by 255;
  values in [0, 1] are kept; anything else is min-max scaled (global min and max, reported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from elbolab.models.data.arrays import load_array
from elbolab.models.validate import integer, probability

#: the fixed binarization threshold for digits (intensity >= 8 of 16)
THRESHOLD = 0.5
#: names of an .npz's label array
LABEL_KEYS = ("y", "labels", "targets")


@dataclass
class ImageData:
    """Flattened images ``x`` (n, D) in [0, 1], optional labels, the image shape, a split."""

    x_train: torch.Tensor
    x_test: torch.Tensor
    y_train: np.ndarray | None
    y_test: np.ndarray | None
    image_shape: tuple[int, ...]
    binary: bool
    info: dict = field(default_factory=dict)

    @property
    def data_dim(self) -> int:
        return int(self.x_train.shape[1])


def binarize(x, threshold: float = THRESHOLD):
    """1 where ``x >= threshold`` else 0 (same type, device and dtype as ``x``)."""
    probability(threshold, "threshold", open_left=True)
    if isinstance(x, torch.Tensor):
        return (x >= threshold).to(x.dtype)
    x = np.asarray(x)
    return (x >= threshold).astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64)


def split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation split: (train indices, test indices); test gets round(n * frac) rows."""
    probability(test_fraction, "test_fraction")
    integer(seed, "seed", minimum=0)
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    if test_fraction > 0 and n_test == 0:
        n_test = 1
    if n - n_test < 1:
        raise ValueError(f"test_fraction: leaves no training rows out of {n}")
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _pack(x: np.ndarray, y, image_shape, binary, test_fraction, seed, device, dtype, info):
    train, test = split(x.shape[0], test_fraction, seed)
    t = torch.as_tensor(x, dtype=dtype, device=device)
    return ImageData(
        x_train=t[torch.as_tensor(train, device=device)],
        x_test=t[torch.as_tensor(test, device=device)],
        y_train=None if y is None else y[train],
        y_test=None if y is None else y[test],
        image_shape=tuple(image_shape),
        binary=binary,
        info={**info, "n_train": len(train), "n_test": len(test), "test_fraction": test_fraction,
              "split_seed": seed},
    )


def load_digits(*, binarize: bool = True, test_fraction: float = 0.2, seed: int = 0,
                device=None, dtype: torch.dtype = torch.float32) -> ImageData:
    """scikit-learn's 8x8 digits in [0, 1] (fixed binarization at 8/16 when ``binarize``)."""
    from sklearn.datasets import load_digits as _load

    raw = _load()
    x = raw.data.astype(np.float64) / 16.0
    if binarize:
        x = (x >= THRESHOLD).astype(np.float64)
    info = {"source": "sklearn.datasets.load_digits", "scale": "intensity / 16",
            "binarization": f"x >= {THRESHOLD}" if binarize else "none"}
    return _pack(x, raw.target.astype(np.int64), (8, 8), binarize, test_fraction, seed, device,
                 dtype, info)


def load_images(path: str | Path, *, binarize: bool = False, threshold: float = THRESHOLD,
                test_fraction: float = 0.2, seed: int = 0, device=None,
                dtype: torch.dtype = torch.float32, labels: bool = True) -> ImageData:
    """A user's array file (``.npy``, ``.npz``, CSV) of shape (n, ...) as flattened images.

    For ``.npz`` the one array other than the labels holds the images (or the one named ``x`` or
    ``data``; see :func:`elbolab.models.data.arrays.load_array`); an array named ``y``, ``labels`` or
    ``targets`` (length n) is read as labels when ``labels``. The image shape is ``shape[1:]``
    for arrays of rank >= 3, else a square side when D is a perfect square, else (1, D).
    """
    probability(threshold, "threshold", open_left=True)
    probability(test_fraction, "test_fraction")
    integer(seed, "seed", minimum=0)
    arr = np.asarray(load_array(path, name="data", exclude=LABEL_KEYS), dtype=np.float64)
    if arr.ndim < 2:
        raise ValueError(f"data: expected an array of shape (n, ...), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"data: {str(path)!r} holds {bad} NaN/inf entries")
    n = arr.shape[0]
    if arr.ndim >= 3:
        image_shape = arr.shape[1:]
    else:
        d = arr.shape[1]
        side = math.isqrt(d)
        image_shape = (side, side) if side * side == d else (1, d)
    x = arr.reshape(n, -1)
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0 and hi <= 1:
        scale = "kept (already in [0, 1])"
    elif lo >= 0 and hi <= 255:
        x, scale = x / 255.0, "divided by 255"
    else:
        big = max(abs(lo), abs(hi))  # divide first: hi - lo may overflow (values near 1e308)
        span = hi / big - lo / big
        x = (x / big - lo / big) / span if span > 0 else np.zeros_like(x)
        scale = f"min-max scaled from [{lo:g}, {hi:g}]"
    if binarize:
        x = (x >= threshold).astype(np.float64)
    y = _labels(path, n) if labels else None
    info = {"source": str(path), "scale": scale,
            "binarization": f"x >= {threshold}" if binarize else "none"}
    return _pack(x, y, image_shape, binarize, test_fraction, seed, device, dtype, info)


def _labels(path, n: int):
    p = Path(path)
    if p.suffix.lower() != ".npz":
        return None
    with np.load(p, allow_pickle=False) as z:
        for key in LABEL_KEYS:
            if key in z.files and z[key].shape == (n,):
                return z[key].astype(np.int64)
    return None


__all__ = ["THRESHOLD", "ImageData", "binarize", "load_digits", "load_images", "split"]
