"""Every call into ArviZ, in one place: conversion to InferenceData, MCMC diagnostics, PSIS, plots
and netCDF.

The suite pins ``arviz<1`` (0.x). ArviZ 1.x (arviz-base, arviz-stats, arviz-plots) needs
Python >= 3.12; supporting it is this module and its tests (``tests/test_arviz_io.py``).

Draws are numpy arrays shaped ``(chain, draw, *shape)``; a statistic comes back shaped
``shape`` (a 0-d array for a scalar quantity). The diagnostics are those of Vehtari, Gelman,
Simpson, Carpenter & Bürkner (2021): rank-normalized split R-hat, bulk and tail ESS, and the
MCSE of the mean; k-hat is Pareto-smoothed importance sampling's (Vehtari et al. 2024).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

STATISTICS = ("r_hat", "ess_bulk", "ess_tail", "mcse_mean")


def _az():
    import arviz  # imported on first use: it takes about a second

    return arviz


@contextmanager
def _numpy_path():
    """ArviZ 0.23 computes with Numba kernels whenever Numba can be imported (it can: the compiled
    NUTS kernel needs it), and under NumPy >= 2.4 some of them return 1-element arrays where
    scalars are meant (``az.mcse(x, method="sd")`` raises TypeError). Every statistic here is
    computed on ArviZ's NumPy path; the caller's setting (``az.Numba.numba_flag``) is restored."""
    numba = _az().Numba
    flag = numba.numba_flag
    numba.numba_flag = False
    try:
        yield
    finally:
        numba.numba_flag = flag


def version() -> str:
    return _az().__version__


def _dataset(draws) -> object:
    a = np.asarray(draws, dtype=np.float64)
    if a.ndim < 2:
        raise ValueError(f"draws: expected (chain, draw, ...), got shape {a.shape}")
    return _az().convert_to_dataset({"v": a})


def rhat(draws) -> np.ndarray:
    """Rank-normalized split R-hat of each component of ``draws`` (chain, draw, ...)."""
    with _numpy_path():
        return np.asarray(_az().rhat(_dataset(draws))["v"].values, dtype=np.float64)


def ess(draws, method: str = "bulk") -> np.ndarray:
    """Bulk (``method="bulk"``) or tail (``"tail"``) effective sample size of each component."""
    if method not in ("bulk", "tail"):
        raise ValueError(f"method: must be 'bulk' or 'tail', got {method!r}")
    with _numpy_path():
        return np.asarray(_az().ess(_dataset(draws), method=method)["v"].values, dtype=np.float64)


def mcse_mean(draws) -> np.ndarray:
    """Monte Carlo standard error of the mean of each component."""
    with _numpy_path():
        return np.asarray(_az().mcse(_dataset(draws), method="mean")["v"].values,
                          dtype=np.float64)


def mcse_sd(draws) -> np.ndarray:
    """Monte Carlo standard error of the standard deviation of each component."""
    with _numpy_path():
        return np.asarray(_az().mcse(_dataset(draws), method="sd")["v"].values, dtype=np.float64)


def chain_statistics(draws) -> dict[str, np.ndarray]:
    """All of :data:`STATISTICS` for ``draws`` (R-hat of one chain is that of its two halves)."""
    a = np.asarray(draws, dtype=np.float64)
    return {"r_hat": rhat(a), "ess_bulk": ess(a, "bulk"), "ess_tail": ess(a, "tail"),
            "mcse_mean": mcse_mean(a)}


def pareto_khat(log_weights) -> np.ndarray:
    """PSIS k-hat of each row of ``log_weights`` (rows, draws), with relative efficiency 1."""
    lw = np.asarray(log_weights, dtype=np.float64)
    with _numpy_path():
        return np.asarray(_az().psislw(lw, reff=1.0)[1], dtype=np.float64)


def inference_data(posterior: dict, log_likelihood: dict | None = None,
                   sample_stats: dict | None = None, attrs: dict | None = None,
                   dims: dict | None = None):
    """An ``InferenceData`` from numpy arrays shaped (chain, draw, ...), by group; ``dims``
    names a variable's leading dims after (chain, draw) (e.g. its plates)."""
    return _az().from_dict(posterior=posterior, log_likelihood=log_likelihood,
                           sample_stats=sample_stats, attrs=attrs, dims=dims or None)


def write_netcdf(idata, path) -> Path:
    """Write ``idata`` to ``path`` (netCDF4); returns the path."""
    path = Path(path)
    idata.to_netcdf(str(path))
    return path


def read_netcdf(path):
    """The ``InferenceData`` saved at ``path``."""
    return _az().from_netcdf(str(path))


def plot_trace(series: dict, figsize):
    """Trace plots (density and draws per chain) of ``series`` (name -> (chain, draw)); the figure."""
    axes = _az().plot_trace(inference_data(series), compact=False, figsize=figsize)
    return np.ravel(axes)[0].figure


def plot_rank(series: dict, figsize):
    """Rank plots of ``series`` (name -> (chain, draw)); the figure."""
    axes = _az().plot_rank(inference_data(series), figsize=figsize)
    return np.ravel(axes)[0].figure
