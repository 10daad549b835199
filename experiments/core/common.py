"""What every experiment script shares: settings and flags (``elbolab.experiments.core.study``), the run's
folder (``elbolab.experiments.core.rundir``), run.json, the command-line error boundary, tables and plots."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from elbolab.experiments.core import rundir, study  # noqa: E402
from elbolab.experiments.core.entry import entry, whole_message  # noqa: E402, F401
from elbolab.experiments.core.study import CliError  # noqa: E402
from elbolab.inference import arviz_io  # noqa: E402
from elbolab.inference.evaluation.psis import reason as error_line  # noqa: E402
from elbolab.inference.evaluation.reference import component_names  # noqa: E402
from elbolab.inference.runtime import resolve_device, validate_seed  # noqa: E402

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


def settings(cls, argv, prog: str, description: str):
    """The study's settings (``cls``, a :class:`StudySettings`) from defaults, ``--quick``,
    ``--config`` and flags; with ``--resume``, the interrupted run's saved settings."""
    s, explicit = study.resolve(cls, argv, prog, description)
    if s.resume is None:
        return s
    if s.config is not None:
        raise CliError("--resume: cannot be combined with --config (a resumed run keeps the "
                       "settings it was started with)")
    tmp, saved = rundir.find_resume(s.resume, prog)
    resumed = study.from_saved(cls, saved, explicit)
    if resumed.out is None or rundir.incomplete_path(Path(resumed.out)) != tmp:
        raise CliError(f"--resume: {str(tmp)!r} was moved from where its run wrote it "
                       f"({resumed.out}{rundir.SUFFIX}); move it back to resume")
    resumed.resume = tmp
    return resumed


def setup(args, name: str, writes: bool = True) -> tuple[torch.device, torch.dtype]:
    """Check the settings every study has and ``--out`` (creating nothing; not checked when this
    process ``writes`` nothing, e.g. a distributed rank other than 0); set the torch threads;
    return (device, dtype). The run's folder is made by :func:`open_run`."""
    try:
        validate_seed(args.seed)
    except ValueError:
        raise args.error("seed", f"must be an integer in [0, 2**63 - 1], got {args.seed}") from None
    args.at_least("checkpoint_every", 0)
    if args.threads is not None:
        args.at_least("threads", 1)
    if args.out is None:
        args.out = Path("runs") / name
    if writes:
        rundir.check_out(Path(args.out), overwrite=args.overwrite,
                         resuming=args.resume is not None)
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise CliError(f"--{exc}") from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return device, getattr(torch, args.dtype)


def data_error(exc: Exception) -> CliError:
    """A data loader's ValueError/OSError as the ``--data`` error (one line that keeps the cause
    after a trailing ':', :func:`error_line`)."""
    text = error_line(exc)
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"cannot read {str(exc.filename)!r} ({exc.strerror})"
    if text.startswith("--data"):
        return CliError(text)
    if text.startswith("data:"):
        return CliError(f"--{text}")
    return CliError(f"--data: {text}")


def field_error(args, exc: Exception, flags: dict[str, str]) -> CliError:
    """An error raised by a family or an engine's settings (``"field: text"``) as a CLI error
    naming the flag (``flags``: field -> setting name): ``--prior-var: prior_var: ...``."""
    text = error_line(exc)
    name = text.split(":", 1)[0].strip()
    if name in flags:
        return CliError(f"{args.flag(flags[name])}: {text}")
    return CliError(text)


def process_rank(devices: int = 1) -> int:
    """This process's global rank in a distributed launch of ``devices`` processes per node, from
    the environment the launchers set: RANK (torchrun), else NODE_RANK * devices + LOCAL_RANK
    (Lightning's launcher, also inside an interactive SLURM job), else SLURM_PROCID (srun); 0 when
    not launched so."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if "LOCAL_RANK" in env:
        return int(env.get("NODE_RANK", "0")) * devices + int(env["LOCAL_RANK"])
    if "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"])
    return int(env.get("NODE_RANK", "0")) * devices


def local_rank() -> int:
    """This process's rank on its node (LOCAL_RANK, else SLURM_LOCALID; 0 when not launched)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))


def open_run(args, name: str) -> Path:
    """Create the run's working folder ``<out>.incomplete`` (reopened with ``--resume``) after
    every check has passed; return it. :func:`finish` renames it to ``--out``."""
    folder = rundir.open_run(Path(args.out), name, args.values(), resume=args.resume is not None)
    return folder.path


def checkpointing(args, label: str) -> tuple[dict, Path | None]:
    """(SVI settings for checkpoints of the fit ``label``, checkpoint to resume from or None)."""
    folder = rundir.current()
    if not args.checkpoint_every or folder is None:
        return {}, None
    path = folder.checkpoint(label)
    return ({"checkpoint": path, "checkpoint_every": args.checkpoint_every},
            path if path.is_file() else None)


def versions() -> dict:
    import numpy
    import pyro

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "arviz": arviz_io.version(),
        "numpy": numpy.__version__,
        "pandas": pd.__version__,
        "matplotlib": matplotlib.__version__,
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }


def machine(device: torch.device) -> dict:
    """CPU model, core count, torch threads, and the GPU model when the run used one."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": gpu, "hostname": platform.node()}


def git_commit() -> dict:
    """The project's git commit (and whether the tree had uncommitted changes), or "unknown"."""
    root = Path(__file__).resolve().parents[1]

    def git(*cmd):
        r = subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True,
                           timeout=10, check=True)
        return r.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit or "unknown", "dirty": dirty}


def svi_threads(args) -> dict:
    """``--threads`` for the SVI engine's settings when given (the engine otherwise runs on its
    own default of one thread, whatever torch's count)."""
    return {} if args.threads is None else {"threads": args.threads}


def finish(out: Path, args, device, extra: dict | None = None) -> Path:
    """Write run.json (settings and where each came from, seed, device, dtype, machine, git
    commit, library versions, ``extra``, the list of files) and rename the run's folder into
    place as ``--out``. Returns the final folder."""
    folder = rundir.current()
    if folder is None or folder.path != Path(out):
        raise RuntimeError("finish: no open run folder (call common.open_run first)")

    def write(path: Path, files: list[str]) -> None:
        payload = {
            "study": folder.study,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "settings": args.values(),
            "setting_sources": dict(args.sources),
            "config_file": None if args.config is None else str(args.config),
            "resumed": folder.resumed,
            "seed": args.seed,
            "device": str(device),
            "dtype": args.dtype,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "machine": machine(device),
            "git": git_commit(),
            "versions": versions(),
            **folder.timings(),
            **(extra or {}),
            "files": files,
        }
        text = json.dumps(_strict(payload), indent=2, default=_json_default, allow_nan=False)
        path.write_text(text)

    rundir.finish(folder, write)
    return folder.out


def _strict(o):
    """NaN and infinities as null (strict JSON, readable by any parser), recursively."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _strict(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_strict(v) for v in o]
    if isinstance(o, torch.Tensor):
        return _strict(o.tolist())
    if type(o).__module__ == "numpy" and hasattr(o, "tolist"):  # numpy scalars and arrays
        return _strict(o.tolist())
    return o


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


def flag_summary(summary: pd.DataFrame, methods, reference: pd.DataFrame) -> pd.DataFrame:
    """``summary`` with a ``reference_flag`` column: on each row whose posterior reference.csv
    compares with an unconverged reference (``methods``: each row's method label there, or
    None), that table's ``ref_flag`` (:func:`elbolab.inference.evaluation.reference.flag_reference`); on the row
    that is that reference, that it is one and did not converge; empty elsewhere."""
    summary = summary.copy()
    flags = [""] * len(summary)
    if len(reference) and "ref_flag" in reference:
        bad = reference[reference["ref_flag"].fillna("").astype(str) != ""]
        flag_of = dict(zip(bad["method"], bad["ref_flag"]))
        ref_flag = dict(zip(bad["reference"], bad["ref_flag"]))
        for i, method in enumerate(methods):
            if method in ref_flag:
                flags[i] = f"this fit is the reference of reference.csv; {ref_flag[method]}"
            elif method in flag_of:
                flags[i] = flag_of[method]
    summary["reference_flag"] = flags
    return summary


def posterior_summary(draws: dict[str, torch.Tensor], engine: str) -> pd.DataFrame:
    """Mean and sd of each scalar component of ``draws`` (name -> (S, *shape): the draws
    flattened to one leading dimension), one row per component, named ``name[i,j]`` as in
    :func:`elbolab.inference.evaluation.reference.component_names` (the MCMC diagnostics' spelling)."""
    rows = []
    for name, d in draws.items():
        flat = d.reshape(d.shape[0], -1).double().cpu()
        mean, sd = (
            flat.mean(0),
            flat.std(0) if flat.shape[0] > 1 else torch.full_like(flat[0], math.nan),
        )
        names = component_names(name, d.shape[1:])
        for j in range(flat.shape[1]):
            rows.append(
                {
                    "engine": engine,
                    "quantity": names[j],
                    "mean": float(mean[j]),
                    "sd": float(sd[j]),
                }
            )
    return pd.DataFrame(rows)


def plot_marginals(draws_by_engine: dict, reference: str, path: Path, title: str,
                   names=None) -> Path:
    """Histogram of each component per engine, over the reference's (``reference`` key);
    ``names``: the components' names (the tables' spelling), one per panel."""
    ref = draws_by_engine[reference].reshape(draws_by_engine[reference].shape[0], -1).cpu()
    m = ref.shape[1]
    names = list(names) if names is not None else [f"component {j}" for j in range(m)]
    fig, axes = plt.subplots(1, m, figsize=(min(3.8 * m, 11.5), 3.4), squeeze=False)
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
        ax.set_title(names[j], fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(4, len(labels)), frameon=False)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
