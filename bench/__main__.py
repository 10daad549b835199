"""``python -m bench`` (``make bench``): every workload of issue 11 in one table, and the scaling
figure.

Workloads (each module checks that both sides reach the same answer before it times them, times
them in interleaved repeats and reports medians with [min, max] and the 1-minute load average):
FA EM against scikit-learn (``bench.fa_em``), GMM CAVI against scikit-learn's
BayesianGaussianMixture (``bench.gmm_cavi``), NUTS against NumPyro cold and warm
(``bench.nuts_gmm``, skipped with a line when NumPyro is not installed), the VAE's default
training path against an independent plain PyTorch loop (``bench.vae_default``), SVI minibatch
step time against n for every GMM guide (``bench.svi_minibatch``), plain Pyro programs (a logistic
regression and the noncentered eight schools) through ``inference.fit`` against Pyro's own
``SVI`` loop (goal <= 1.2x its time per step) and ``MCMC(NUTS)`` (goal <= 1.1x its time)
(``bench.program``, issue 19 item 9); then time per iteration against n for every engine
(``bench.scaling``, a log-log plot).

Torch and BLAS run on one thread on both sides (the fastest setting on a shared 2-core machine;
elbolab's closed-form engines pick one thread themselves). Writes ``table.md``, ``rows.json``,
``scaling.csv`` and ``scaling.png`` to ``--out`` (default ``runs/bench``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from bench.common import details, load_average, skipped_row, table

WORKLOADS = ("fa", "cavi", "nuts", "vae", "svi", "program", "scaling")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch "
            f"{torch.__version__} ({torch.get_num_threads()} thread), load average at start "
            f"{load_average():.1f}")


def run(only, quick: bool, out: Path) -> list:
    from threadpoolctl import threadpool_limits

    rows = []
    rep = 2 if quick else 3
    with threadpool_limits(limits=1):
        if "fa" in only:
            from bench import fa_em

            rows.append(fa_em.run(repeat=rep if quick else 5))
        if "cavi" in only:
            from bench import gmm_cavi

            rows += gmm_cavi.run(n=20_000 if quick else 100_000, repeat=rep)
        if "nuts" in only:
            from bench import nuts_gmm

            kw = dict(warmup=200 if quick else 500, draws=300 if quick else 1000, repeat=rep)
            rows += nuts_gmm.run(**kw)  # one chain
            rows += nuts_gmm.run(**kw, chains=4)  # all chains in one call per iteration vs NumPyro vectorized
            # a larger model beside it: a posterior with local modes, both sides started at
            # the k-means centres (from uniform starts chains sit in different modes)
            rows += nuts_gmm.run(**kw, n=5000, K=4, d=2, start="kmeans")
            rows += nuts_gmm.run(**kw, n=5000, K=4, d=2, chains=4, start="kmeans")
            rows += nuts_gmm.run(**kw, chains=4, device="cuda")  # or a line saying why not
        if "vae" in only:
            from bench import vae_default

            rows += vae_default.run(epochs=10 if quick else 50, repeat=rep)
        if "svi" in only:
            from bench import svi_minibatch

            sizes = (1000, 100_000) if quick else (1000, 10_000, 100_000, 1_000_000)
            rows += svi_minibatch.run(sizes, repeat=rep, steps=20 if quick else 40)
        if "program" in only:
            from bench import program

            rows += program.run(steps=300 if quick else 1000, warmup=200 if quick else 500,
                                draws=200 if quick else 500, repeat=rep)
        if "scaling" in only:
            from bench import scaling

            sizes = [1000, 10_000] if quick else [1000, 10_000, 100_000, 1_000_000]
            med = scaling.measure(sizes, repeat=1 if quick else 2)
            csv_path, png = scaling.write(med, out)
            print(f"scaling figure: {png} (data {csv_path})")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(WORKLOADS),
                   help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    p.add_argument("--out", default="runs/bench")
    a = p.parse_args(argv)
    only = [w.strip() for w in a.only.split(",") if w.strip()]
    bad = sorted(set(only) - set(WORKLOADS))
    if bad:
        p.error(f"--only: unknown workload(s) {bad}; choose from {', '.join(WORKLOADS)}")
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    header = f"elbolab benchmarks on {machine()}"
    t0 = time.perf_counter()
    print(header, flush=True)
    try:
        rows = run(only, a.quick, out)
    except KeyboardInterrupt:  # pragma: no cover - interactive
        rows = [skipped_row("all", "-", "interrupted")]
    text = (f"{header}\n\n{table(rows)}\n\n{details(rows)}\n\n"
            f"(ran {time.perf_counter() - t0:.0f} s; load average at the end "
            f"{load_average():.1f})")
    print("\n" + text)
    (out / "table.md").write_text(text + "\n")
    (out / "rows.json").write_text(json.dumps(
        [{**dataclasses.asdict(r), "met": r.met} for r in rows], indent=1,
        default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else str(v)))
    print(f"wrote {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
