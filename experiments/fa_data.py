"""The factor-analysis study's data (:mod:`elbolab.experiments.fa_gaps`): simulated or read
from ``--data``, checked for units its SVI fits can reach, and split into train and test rows."""

from __future__ import annotations

import torch

from elbolab.experiments.core import common
from elbolab.models.data import load_array
from elbolab.models.fa.model import FactorAnalysis


def load_data(args, device, dtype):
    """(x, truth or None, info). User data: rows with NaN are dropped (reported)."""
    if args.data is None:
        fam = FactorAnalysis(args.latent_dim, kind=args.model, dim=args.dim)
        x, truth = fam.simulate(args.n, seed=args.seed, device=device, dtype=dtype)
        return x, truth, {"simulated": True}
    try:
        raw = load_array(args.data, name="--data")
    except (OSError, ValueError) as exc:
        raise common.data_error(exc) from None
    if raw.ndim != 2:
        raise common.CliError(f"--data: expected a 2-D array (n, d), got shape {raw.shape}")
    if raw.dtype.kind not in "biuf":
        raise common.CliError(f"--data: expected real numbers, got dtype {raw.dtype}")
    arr = torch.as_tensor(raw, dtype=dtype, device=device)
    keep = ~torch.isnan(arr).any(1)
    x = arr[keep]
    if x.shape[0] < 10:
        raise common.CliError(f"--data: only {x.shape[0]} complete rows (the study needs 10)")
    if args.latent_dim >= x.shape[1]:
        raise args.error("latent_dim", f"must be < the number of data columns ({x.shape[1]}), "
                         f"got {args.latent_dim}")
    return x, None, {"data_file": str(args.data), "rows_with_nan_dropped": int((~keep).sum())}


#: largest column root mean square of user data the SVI rows handle (they start at unit scale)
MAX_DATA_SCALE = 1e3


def check_scale(args, x) -> None:
    """Refuse, before any work, user data in units the SVI fits and guides cannot reach from
    their unit-scale start (EM, CAVI and NUTS handle any scale): a one-line ``--data`` error
    saying what to do."""
    if "svi" not in args.engine_list:
        return
    rms = float(x.double().square().mean(0).sqrt().max())
    if rms > MAX_DATA_SCALE:
        raise common.CliError(
            f"--data: columns of size up to {rms:.3g} (root mean square); the study's SVI fits "
            f"and guides start at unit scale and do not reach data in these units (up to "
            f"{MAX_DATA_SCALE:.0e} works): standardize the columns (subtract each column's mean, "
            "divide by its standard deviation) and rerun, or leave svi out of --engines")


def split(x, frac, seed):
    g = torch.Generator().manual_seed(seed + 101)
    perm = torch.randperm(x.shape[0], generator=g).to(x.device)
    n_test = max(2, int(round(frac * x.shape[0])))
    return x[perm[n_test:]], x[perm[:n_test]]


__all__ = ["MAX_DATA_SCALE", "check_scale", "load_data", "split"]
