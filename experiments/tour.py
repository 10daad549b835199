"""The tour: the three studies at small settings on built-in data, ending in one report.

    elbolab tour [--out runs/tour] [--quick] [--seed 0] [--device auto] [--overwrite]

Runs ``gmm_engines`` (the Bayesian GMM under EM, CAVI, SVI and NUTS against the exact evidence),
``fa_gaps`` (factor analysis: every guide and the exact decomposition of the inference gap) and
``vae_gaps`` (the VAE on scikit-learn's digits: IWAE/AIS evidence and the Cremer et al. gaps), each
through its own ``main(argv)`` with the explicit settings of ``STUDIES`` (``--quick``: each study's
own smoke settings instead), then writes ``report.html`` (self-contained, offline) and
``report.md`` beside the study folders. A study's console output goes to its ``log.txt``; the
terminal gets one line per study and the report's path.

The tour is written into a temporary folder beside ``--out`` and renamed into place only when
every study and the report are done: an interrupted or failed tour leaves nothing behind, and an
``--out`` that already holds something is refused unless ``--overwrite`` is given (then it is
replaced whole). The settings are smaller than each study's defaults (fewer points and chains),
except that the VAEs train to early stopping as in the study, so that their numbers and figures
are those of trained networks, and that each NUTS reference gets the draws it needs to converge
(R-hat <= 1.01 and ESS >= 100 per chain) on seeds 0-2: the tour takes about 115 s of CPU (one
core per study; about 2 minutes of wall time on 2 cores shared with other work). A network that
stops at its step cap is named on the tour's line for its study.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import socket
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from elbolab.experiments.core import common, rundir
from elbolab.experiments.core.study import CliError
from elbolab.experiments.report import build as report
from elbolab.inference.runtime import resolve_device

# Explicit settings per study (flags of its own parser); --seed/--device/--out are added.
STUDIES = {
    # NUTS: enough draws that each reference passes mcmc.convergence (R-hat <= 1.01, bulk and
    # tail ESS >= 100 per chain) reliably, not by luck. With 2 chains of N draws a well-mixed
    # chain still has split R-hat - 1 ~ chi2_3 noise / (efficiency x N), and the maximum over
    # every diagnosed quantity (bulk and folded) is what is tested: 300 draws failed 1.01 in
    # about half of the runs. The draws below put that false alarm at ~1% on seeds 0-2 (from
    # the draws' measured efficiencies; tests/test_tour.py keeps them). Two chains, not more:
    # for the same draws, fewer and longer chains give R-hat less noise and less warmup.
    "gmm_engines": [
        "--n", "100", "--K", "3", "--dim", "1", "--restarts", "3", "--svi-steps", "500",
        "--nuts-samples", "800", "--nuts-warmup", "200", "--nuts-chains", "2",
        "--eval-particles", "1000",
    ],
    # FA's NUTS needs the most draws: on seed 1's data the second factor is weak, its loading
    # L_11 (> 0, sampled as log L_11) reaches down to ~0.02, and the ESS of some entries of C =
    # W W^T + Psi drops to 0.17-0.3 of the draws (no lower than 0.43 on seeds 0 and 2): 1000
    # draws fail there about 1 time in 3, 2000 about 1 in 50-100
    "fa_gaps": [
        "--n", "200", "--dim", "6", "--latent-dim", "2", "--svi-steps", "800",
        "--eval-particles", "200", "--impute-particles", "500", "--nuts-samples", "2000",
        "--nuts-warmup", "140", "--nuts-chains", "2",
    ],
    # the VAEs train to early stopping (the study's caps, --svi-epochs and --capacity-epochs
    # 1000, are never reached): a 128-unit network at 3x the study's learning rate early-stops
    # in ~4000 steps (~15 s of CPU for both encoders) within ~0.3 nats/image of the study's
    # log p(x); tests/test_tour.py checks it (slow). NUTS over one test image's z (8
    # coordinates; ~5 ms per draw): 60 draws after 60 warmup steps was R-hat 1.03-1.06 with
    # tail ESS ~60; 800 after 300 is R-hat ~1.005
    "vae_gaps": [
        "--hidden", "128", "--svi-lr", "3e-3", "--gap-points", "20", "--qstar-steps", "300",
        "--iwae-particles", "500", "--eval-particles", "200", "--ais-steps", "60",
        "--ais-chains", "4", "--capacities", "16,64", "--sa-steps", "0,5,20",
        "--nuts-points", "1", "--nuts-samples", "800", "--nuts-warmup", "300",
        "--nuts-chains", "2", "--impute-points", "50", "--impute-particles", "200",
        "--gibbs-steps", "10", "--num-flows", "2",
    ],
}


class TourError(Exception):
    """A study of the tour failed; the message says which and how."""


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="elbolab tour", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/tour"), help="tour folder (default runs/tour)")
    p.add_argument("--quick", action="store_true", help="each study's smoke settings (seconds each)")
    p.add_argument("--seed", type=int, default=0, help="random seed of every study (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder whole")
    args = p.parse_args(argv)
    if args.seed < 0:
        raise ValueError(f"--seed: must be >= 0, got {args.seed}")
    try:
        resolve_device(args.device)
    except ValueError as exc:
        raise ValueError(f"--{exc}") from exc
    rundir.check_out(args.out, overwrite=args.overwrite)
    for name, settings in STUDIES.items():  # every study's settings checked before any work
        flags = [*(["--quick"] if args.quick else settings), "--out", str(args.out / name)]
        try:
            importlib.import_module(f"elbolab.experiments.{name}").parse(flags)
        except CliError as exc:
            raise ValueError(f"{name}: {exc}") from None
    args.argv = list(argv)
    return args


@contextmanager
def staged(out: Path, overwrite: bool = False):
    """Yield a fresh working folder ``<out>.incomplete``; on success rename it to ``out``
    (replacing an old ``out`` whole), on any error or interrupt delete it. ``out`` is checked as
    a study's ``--out`` is (a finished run there is refused unless ``overwrite``)."""
    out = Path(out)
    rundir.check_out(out, overwrite=overwrite)
    tmp = rundir.incomplete_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / rundir.LOCK).write_text(f"{os.getpid()} {socket.gethostname()}\n")
        yield tmp
        (tmp / rundir.LOCK).unlink()
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _output_to(path: Path):
    """Send everything written to file descriptors 1 and 2 (Python, logging, C) to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_study(name: str, argv: list[str], folder: Path, shown: list[str] | None = None
              ) -> tuple[float, float]:
    """Run one study's ``main(argv)`` with its output in ``folder/log.txt``; return its (wall,
    CPU) seconds: CPU time over all threads, the machine-load-free measure of its cost.
    ``shown``: the flags the study records as its command (``--out`` where the folder will end
    up, not the working folder)."""
    module = importlib.import_module(f"elbolab.experiments.{name}")
    log = folder.parent / f".{name}.log"
    start, cpu = time.perf_counter(), time.process_time()
    failure = None
    saved_argv = sys.argv
    sys.argv = ["elbolab", "run", name, *(shown or argv)]  # what the study records as its command
    with _output_to(log):
        print(f"$ {' '.join(sys.argv)}", flush=True)
        try:
            code = module.main(argv) or 0
        except SystemExit as exc:
            code = exc.code if str(exc) in ("", str(exc.code)) else f"{exc.code} ({exc})"
        except Exception:  # a failing study is reported with its traceback, in its log
            traceback.print_exc()
            code = "an exception"
        finally:
            sys.argv = saved_argv
        if code not in (0, None):
            failure = code
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if failure is not None:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise TourError(f"{name} failed ({failure}); the end of its output:\n{tail}")
    folder.mkdir(exist_ok=True)  # (a study that wrote nothing still gets its log)
    log.rename(folder / "log.txt")
    return seconds, cpu


def capped_note(summary: pd.DataFrame) -> str:
    """'; WARNING: ... stopped at the step cap' for the rows of a summary whose training ran all
    its steps without early stopping or converging (``training_end``), else ''."""
    if "training_end" not in summary:
        return ""
    capped = summary[summary["training_end"] == "step-cap"]
    if capped.empty:
        return ""
    names = capped.get("train_encoder", capped.get("guide", capped.index.to_series()))
    return (f"; WARNING: {', '.join(map(str, names))} stopped at the step cap, not by early "
            "stopping (undertrained)")


def run(args) -> Path:
    """Run the tour into ``args.out``; return the report's path."""
    started, cpu_started = time.perf_counter(), time.process_time()
    print(f"elbolab tour{' --quick' if args.quick else ''}: {', '.join(STUDIES)} -> {args.out}")
    studies = {}
    with staged(args.out, args.overwrite) as tmp:
        for i, (name, settings) in enumerate(STUDIES.items(), 1):
            flags = [*(["--quick"] if args.quick else settings), "--seed", str(args.seed),
                     "--device", args.device, "--no-progress", "--out"]
            print(f"  [{i}/{len(STUDIES)}] {name:12s}", end=" ", flush=True)
            seconds, cpu = run_study(name, [*flags, str(tmp / name)], tmp / name,
                                shown=[*flags, str(args.out / name)])
            summary = tmp / name / "summary.csv"
            line = (report.headline(pd.read_csv(summary)) + capped_note(pd.read_csv(summary))
                    if summary.exists() else "no summary.csv")
            print(f"{seconds:6.1f} s ({cpu:5.1f} s CPU)  {line}", flush=True)
            studies[name] = {"argv": [*flags, name], "seconds": round(seconds, 2),
                             "cpu_seconds": round(cpu, 2)}
        meta = {
            "study": "tour",
            "command": " ".join(["elbolab tour", *args.argv]),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "settings": {"quick": args.quick, "seed": args.seed, "device": args.device},
            "seed": args.seed,
            "device": str(resolve_device(args.device)),
            "studies": studies,
            "wall_seconds": round(time.perf_counter() - started, 2),
            "cpu_seconds": round(time.process_time() - cpu_started, 2),
            "machine": common.machine(resolve_device(args.device)),
            "git": common.git_commit(),
            "versions": common.versions(),
        }
        (tmp / "run.json").write_text(json.dumps(meta, indent=2))
        report.build(tmp, name=args.out.name)
    print(f"done in {meta['wall_seconds']:.0f} s ({meta['cpu_seconds']:.0f} s CPU). "
          f"Report: {args.out / 'report.html'} (and report.md)")
    return args.out / "report.html"


def main(argv=None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
    except (ValueError, CliError) as exc:
        print(f"elbolab tour: {exc}", file=sys.stderr)
        return 2
    try:
        run(args)
    except TourError as exc:
        print(f"\nelbolab tour: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
