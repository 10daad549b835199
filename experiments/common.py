"""What every experiment script shares: flags, output folder, run.json, tables and plots."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from inference.runtime import resolve_device  # noqa: E402

SUMMARY_COLUMNS = [
    "model",
    "engine",
    "guide",
    "bound",
    "n",
    "elbo",
    "elbo_se",
    "elbo_per_datum",
    "log_evidence",
    "log_evidence_se",
    "log_evidence_method",
    "gap",
    "gap_per_datum",
    "seconds",
    "device",
    "dtype",
    "seed",
    "converged",
]


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/<name>)")
    p.add_argument("--data", type=Path, default=None, help="CSV (header row) or .npy/.npz file")
    p.add_argument("--quick", action="store_true", help="tiny settings, for smoke tests")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (small models run faster on one)",
    )
    return p


def setup(args, name: str) -> tuple[Path, torch.device, torch.dtype]:
    """Check the common flags, create the output folder; return (out, device, dtype)."""
    if args.seed < 0:
        raise SystemExit("--seed: must be >= 0")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads: must be >= 1")
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out is not None else Path("runs") / name
    out.mkdir(parents=True, exist_ok=True)
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise SystemExit(f"--{exc}") from exc
    return out, device, getattr(torch, args.dtype)


def versions() -> dict:
    import arviz
    import numpy
    import pyro

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "arviz": arviz.__version__,
        "numpy": numpy.__version__,
        "pandas": pd.__version__,
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }


def write_run_json(out: Path, args, device, extra: dict | None = None) -> Path:
    payload = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seed": args.seed,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "versions": versions(),
        **(extra or {}),
    }
    path = out / "run.json"
    path.write_text(json.dumps(payload, indent=2, default=_json_default))
    return path


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


def summary_frame(results, log_evidence=None) -> pd.DataFrame:
    """One row per FitResult, standard columns first."""
    df = pd.DataFrame([r.to_row(log_evidence) for r in results])
    cols = [c for c in SUMMARY_COLUMNS if c in df.columns]
    return df[cols + [c for c in df.columns if c not in cols]]


def _fmt(v: float) -> str:
    """Enough digits to see nats-level differences in totals of hundreds (-263.587, 0.00152)."""
    return f"{v:.7g}" if abs(v) >= 1 else f"{v:.4g}"


def print_table(df: pd.DataFrame, columns=None, title: str | None = None) -> None:
    cols = columns or [
        c
        for c in df.columns
        if c in SUMMARY_COLUMNS and c not in ("model", "device", "dtype", "seed", "n")
    ]
    with pd.option_context(
        "display.width", 200, "display.max_columns", 30, "display.float_format", _fmt
    ):
        if title:
            print(f"\n{title}")
        print(df[cols].to_string(index=False))


def plot_traces(results, path: Path, title: str = "objective traces") -> Path:
    """ELBO/objective trace of each engine, one panel, per data point."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        if r.trace:
            ax.plot(
                range(1, len(r.trace) + 1),
                [v / r.n_data for v in r.trace],
                label=f"{r.engine}/{r.guide} ({r.bound})",
            )
    ax.set_xscale("log")
    ax.set_xlabel("iteration (log scale)")
    ax.set_ylabel("objective per data point (nats)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def posterior_summary(draws: dict[str, torch.Tensor], engine: str) -> pd.DataFrame:
    """Mean and sd of each scalar component of ``draws`` (name -> (..., *shape) with the
    draw dims leading and already flattened to one), one row per component."""
    rows = []
    for name, d in draws.items():
        flat = d.reshape(d.shape[0], -1).double().cpu()
        mean, sd = (
            flat.mean(0),
            flat.std(0) if flat.shape[0] > 1 else torch.full_like(flat[0], math.nan),
        )
        for j in range(flat.shape[1]):
            rows.append(
                {
                    "engine": engine,
                    "quantity": f"{name}[{j}]",
                    "mean": float(mean[j]),
                    "sd": float(sd[j]),
                }
            )
    return pd.DataFrame(rows)


def plot_marginals(draws_by_engine: dict, reference: str, path: Path, title: str) -> Path:
    """Histogram of each component per engine, over the reference's (``reference`` key)."""
    ref = draws_by_engine[reference].reshape(draws_by_engine[reference].shape[0], -1).cpu()
    m = ref.shape[1]
    fig, axes = plt.subplots(1, m, figsize=(4 * m, 3.2), squeeze=False)
    for j, ax in enumerate(axes[0]):
        lo, hi = float(ref[:, j].min()), float(ref[:, j].max())
        pad = 0.25 * (hi - lo + 1e-9)
        bins = torch.linspace(lo - pad, hi + pad, 40).numpy()
        ax.hist(
            ref[:, j].numpy(),
            bins=bins,
            density=True,
            color="0.8",
            label=f"{reference} (reference)",
        )
        for name, d in draws_by_engine.items():
            if name == reference:
                continue
            d = d.reshape(d.shape[0], -1).cpu()
            inside = ((d[:, j] >= bins[0]) & (d[:, j] <= bins[-1])).any()
            if d.shape[0] > 1 and inside:
                ax.hist(d[:, j].numpy(), bins=bins, density=True, histtype="step", label=name)
            else:
                ax.axvline(float(d[0, j]), ls="--", lw=1, label=f"{name} (point)")
        ax.set_title(f"component {j}")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
