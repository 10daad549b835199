"""The posteriordb table: every port through NUTS and SVI, each compared with posteriordb's reference.

    python -m examples.posteriordb.table --out runs/posteriordb      # from the repository root
    python examples/posteriordb/table.py --out runs/posteriordb      # the same

For each posterior (``--models``; by default every port but ``garch11`` and ``arma11``, whose
per-time-step Python recursions make NUTS take many minutes on a few cores: name them to run them)
it runs elbolab's NUTS (2 chains) and SVI with each guide of ``--guides`` (by name, with the
engine's defaults: the start is each autoguide's own), and writes per (model, method):

- ``max_mean_err_sd``: the worst |mean - ref_mean| / ref_sd over the reference's components
  (Stan's quantities: derived ones such as eight schools' ``theta`` are computed from the draws);
- ``max_sd_err``: the worst |sd / ref_sd - 1| over the same components (and which component);
- ``elbo`` and ``elbo_se`` (SVI; empty for NUTS);
- ``max_rhat`` and ``min_ess`` (NUTS, ArviZ's rank-normalized R-hat and bulk ESS over the same
  components) and NUTS's divergences;
- ``seconds``: wall time of the fit.

Output (whole or nothing: written to a temporary folder next to ``--out``, then renamed):
``table.csv``, ``table.md`` and ``run.json`` (settings, seed, versions of torch and pyro,
elbolab's git commit, the posteriordb commit of the references, the machine, the date).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if __package__ in (None, ""):  # run as a file: make ``examples`` importable
    sys.path.insert(0, str(ROOT))

import arviz as az  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

from elbolab import inference  # noqa: E402

REFS = ROOT / "tests" / "data" / "posteriordb"


def _theta(d):  # eight schools' transformed parameter theta = theta_trans * tau + mu
    return {"theta": d["theta_trans"] * d["tau"][..., None] + d["mu"][..., None]}


def _beta1(d):  # garch11: beta1 = (1 - alpha1) * beta1_share
    return {"beta1": (1 - d["alpha1"]) * d["beta1_share"]}


def _mu_sorted(d):  # low_dim_gauss_mix: Stan's ordered[2] mu is the sorted pair
    return {"mu": np.sort(d["mu_unordered"], axis=-1)}


#: module -> (posterior, the Stan quantities the program leaves derived)
POSTERIORS = {
    "eight_schools_noncentered": ("eight_schools-eight_schools_noncentered", _theta),
    "kidscore_momiq": ("kidiq-kidscore_momiq", None),
    "logmesquite": ("mesquite-logmesquite", None),
    "arK": ("arK-arK", None),
    "low_dim_gauss_mix": ("low_dim_gauss_mix-low_dim_gauss_mix", _mu_sorted),
    "arma11": ("arma-arma11", None),
    "garch11": ("garch-garch11", _beta1),
}
SLOW = ("arma11", "garch11")
FIELDS = ["model", "method", "max_mean_err_sd", "worst_mean", "max_sd_err", "worst_sd",
          "elbo", "elbo_se", "max_rhat", "min_ess", "divergences", "seconds", "note"]


def draws_of(module: str, samples: dict) -> dict[str, np.ndarray]:
    d = {k: v.detach().double().cpu().numpy() for k, v in samples.items()}
    derive = POSTERIORS[module][1]
    return {**d, **(derive(d) if derive else {})}


def component(draws: dict[str, np.ndarray], name: str) -> np.ndarray:
    """Stan's ``beta[2]`` is the Pyro site ``beta`` at index 1; draws are (chain, draw, ...)."""
    site, _, index = name.partition("[")
    return draws[site][..., int(index[:-1]) - 1] if index else draws[site]


def errors(draws: dict[str, np.ndarray], ref: dict) -> dict:
    mean_err, sd_err = {}, {}
    for name, r in ref["parameters"].items():
        x = component(draws, name)
        mean_err[name] = abs(float(x.mean()) - r["mean"]) / r["sd"]
        sd_err[name] = abs(float(x.std(ddof=1)) / r["sd"] - 1)
    wm, ws = max(mean_err, key=mean_err.get), max(sd_err, key=sd_err.get)
    return {"max_mean_err_sd": mean_err[wm], "worst_mean": wm,
            "max_sd_err": sd_err[ws], "worst_sd": ws}


def nuts_row(module, mod, data, ref, args) -> dict:
    t0 = time.perf_counter()
    fit = inference.fit("mcmc", mod.model, data, seed=args.seed, num_samples=args.samples,
                        warmup=args.warmup, num_chains=2)
    seconds = time.perf_counter() - t0
    draws = draws_of(module, fit.posterior_samples())
    comps = [component(draws, n) for n in ref["parameters"]]
    return {**errors(draws, ref), "max_rhat": max(float(az.rhat(x)) for x in comps),
            "min_ess": min(float(az.ess(x)) for x in comps),
            "divergences": fit.diagnostics.get("divergences"), "seconds": seconds}


def svi_row(module, mod, data, ref, guide, args) -> dict:
    t0 = time.perf_counter()
    fit = inference.fit("svi", mod.model, data, guide=guide, num_steps=args.steps, lr=args.lr,
                        seed=args.seed)
    seconds = time.perf_counter() - t0
    draws = draws_of(module, fit.posterior_samples(args.draws))
    note = "" if fit.converged else "not converged"
    if fit.diagnostics.get("diverged"):
        note = "diverged"
    return {**errors(draws, ref), "elbo": fit.elbo, "elbo_se": fit.elbo_se, "seconds": seconds,
            "note": note}


def fmt(v, digits=3) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.1f}"
    return str(v)


def markdown(rows: list[dict]) -> str:
    head = ["model", "method", "max mean err (sd)", "max sd err", "ELBO (SE)", "max R-hat",
            "min ESS", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        elbo = "" if r.get("elbo") in (None, "") else f"{r['elbo']:.1f} ({r['elbo_se']:.2f})"
        mean = f"{r['max_mean_err_sd']:.2f} ({r['worst_mean']})"
        sd = f"{r['max_sd_err']:.2f} ({r['worst_sd']})"
        if r.get("note"):
            sd += f"; {r['note']}"
        rhat = "" if r.get("max_rhat") in (None, "") else f"{r['max_rhat']:.3f}"
        ess = "" if r.get("min_ess") in (None, "") else f"{r['min_ess']:.0f}"
        if r.get("divergences"):
            ess += f" ({r['divergences']} divergent)"
        lines.append(f"| {r['model']} | {r['method']} | {mean} | {sd} | {elbo} | {rhat} | {ess} "
                     f"| {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "elbolab",
                                "inference", "guides", "models", "examples/posteriordb"],
                               capture_output=True, text=True).stdout.strip()
        return out + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/posteriordb")
    p.add_argument("--models", nargs="+", choices=list(POSTERIORS),
                   default=[m for m in POSTERIORS if m not in SLOW])
    p.add_argument("--guides", nargs="+", default=["auto-normal", "auto-mvn"])
    p.add_argument("--samples", type=int, default=500, help="NUTS draws per chain")
    p.add_argument("--warmup", type=int, default=500, help="NUTS warmup per chain")
    p.add_argument("--steps", type=int, default=2500, help="SVI steps")
    p.add_argument("--lr", type=float, default=0.02, help="SVI learning rate (Adam)")
    p.add_argument("--draws", type=int, default=2000, help="SVI posterior draws")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="a line about the machine, kept in run.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    rows, refs = [], {}
    for module in args.models:
        mod = importlib.import_module(f"examples.posteriordb.{module}")
        ref = json.loads((REFS / f"{POSTERIORS[module][0]}.json").read_text())
        refs[module] = {k: ref[k] for k in ("posterior", "commit", "draws_path", "model_path")}
        data = mod.data()
        for method in ["nuts", *args.guides]:
            row = (nuts_row(module, mod, data, ref, args) if method == "nuts"
                   else svi_row(module, mod, data, ref, method, args))
            row = {"model": module, "method": method, **row}
            rows.append(row)
            print(f"{module:26s} {method:12s} mean err {row['max_mean_err_sd']:8.3f} sd "
                  f"({row['worst_mean']})  sd err {row['max_sd_err']:7.3f} ({row['worst_sd']})"
                  f"  {row['seconds']:6.1f} s", flush=True)
    commits = sorted({r["commit"] for r in refs.values()})
    meta = {
        "command": "python -m examples.posteriordb.table " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "settings": {"nuts": {"num_samples": args.samples, "warmup": args.warmup,
                              "num_chains": 2},
                     "svi": {"guides": args.guides, "num_steps": args.steps, "lr": args.lr,
                             "posterior_draws": args.draws},
                     "seed": args.seed, "models": args.models,
                     "not_run": [m for m in POSTERIORS if m not in args.models]},
        "versions": {"torch": torch.__version__, "pyro": pyro.__version__,
                     "arviz": az.__version__, "python": platform.python_version(),
                     "elbolab_commit": git_commit()},
        "posteriordb": {"source": "https://github.com/stan-dev/posteriordb",
                        "commit": commits[0] if len(commits) == 1 else commits,
                        "references": refs},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "note": args.note},
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "columns": FIELDS,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with open(tmp / "table.csv", "w", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            w.writeheader()
            for r in rows:
                w.writerow({k: fmt(r.get(k), 6) for k in FIELDS})
        (tmp / "table.md").write_text(markdown(rows))
        (tmp / "run.json").write_text(json.dumps(meta, indent=1) + "\n")
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old.{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out}/table.csv, table.md, run.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
