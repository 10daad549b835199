"""Time per iteration against n for every engine on the Bayesian GMM (K = 3, d = 1, float64), on a
log-log plot: full-batch engines (EM, CAVI, full-batch SVI, NUTS) grow linearly in n, minibatch
SVI (batch 500) stays flat.

``python -m bench.scaling [--sizes 1e3,1e4,1e5,1e6 --out runs/bench]`` writes ``scaling.csv`` and
``scaling.png``. Each point is the median of ``--repeat`` runs, sizes interleaved; per iteration
means: an EM/CAVI sweep with its objective (the fit's start included, over 20 sweeps), an SVI
step (the engine's loop, the guide's construction excluded), a NUTS iteration
(warm-up and sampling together, 30 + 30 iterations, compilation excluded by a first short run).
NUTS stops at ``--nuts-max`` (default 1e5: a run at 1e6 takes minutes here).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

SVI_BATCH = 500


def _per_iteration(fn, iterations) -> float:
    """Seconds per iteration of ``fn``, which returns how many it ran, or (that, its own
    seconds) when it times only its loop (not a set-up such as building a guide)."""
    t0 = time.perf_counter()
    done = fn()
    seconds = time.perf_counter() - t0
    if isinstance(done, tuple):
        done, seconds = done
    return seconds / max(done or iterations, 1)


def engines(x, fam, seed=0):
    """name -> callable running a few iterations on x, returning how many it ran."""
    from elbolab import inference
    from elbolab.inference import svi
    from elbolab.inference.runtime import isolated

    def closed(engine, iters=20):
        def go():
            r = inference.fit(engine, fam, x, seed=seed, max_iter=iters, tol=0.0)
            return len(r.trace) - 1
        return go

    def svi_steps(guide, batch, steps):
        from elbolab import guides

        def go():
            spec = guides.for_family(fam)[guide]
            s = svi.Settings(num_steps=steps, subsample_size=batch, num_particles=1)
            with isolated(seed):
                g = spec.build(fam, x)  # k-means++ seeding, O(n): not part of a step
                t0 = time.perf_counter()
                svi.run_svi(fam.model, g, (x,), s, collapsed=True, max_plate_nesting=1)
                return steps, time.perf_counter() - t0
        return go

    def nuts(iters=30):
        def go():
            inference.fit("mcmc", fam, x, seed=seed, warmup=iters, num_samples=iters,
                          num_chains=1)
            return 2 * iters
        return go

    out = {"EM (GMM MAP)": closed("em"), "CAVI": closed("cavi"),
           "SVI full batch (collapsed)": svi_steps("collapsed", None, 5),
           "NUTS": nuts()}
    for g in ("mean-field", "collapsed", "auto-normal", "auto-mvn"):
        out[f"SVI minibatch {SVI_BATCH} ({g})"] = svi_steps(g, SVI_BATCH, 30)
    return out


def measure(sizes, repeat=2, seed=0, nuts_max=100_000):
    from elbolab.models.gmm.model import BayesianGMM

    fam = BayesianGMM(3, 10.0)
    x_all, _ = fam.simulate(max(sizes), seed=seed)
    times: dict[str, dict[int, list[float]]] = {}
    for n in sizes[:1]:  # warm-up: compile NUTS, allocate
        for fn in engines(x_all[:n].contiguous(), fam, seed).values():
            fn()
    for r in range(repeat):
        for n in (sizes if r % 2 == 0 else sizes[::-1]):
            x = x_all[:n].contiguous()
            for name, fn in engines(x, fam, seed).items():
                if name == "NUTS" and n > nuts_max:
                    continue
                times.setdefault(name, {}).setdefault(n, []).append(_per_iteration(fn, 1))
    return {k: {n: statistics.median(v) for n, v in d.items()} for k, d in times.items()}


def write(med: dict, out: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    csv_path, png = out / "scaling.csv", out / "scaling.png"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["engine", "n", "seconds_per_iteration"])
        for k, d in med.items():
            for n, s in sorted(d.items()):
                w.writerow([k, n, f"{s:.6g}"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, d in med.items():
        ns = sorted(d)
        style = "--" if k.startswith("SVI minibatch") else "-"
        ax.loglog(ns, [d[n] * 1e3 for n in ns], style, marker="o", label=k)
    ax.set_xlabel("n (data points)")
    ax.set_ylabel("ms per iteration")
    ax.set_title("Bayesian GMM (K=3, d=1): time per iteration vs n")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return csv_path, png


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1e3,1e4,1e5,1e6")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--nuts-max", type=float, default=1e5)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    sizes = [int(float(s)) for s in a.sizes.split(",")]
    med = measure(sizes, a.repeat, a.seed, int(a.nuts_max))
    paths = write(med, Path(a.out))
    for k, d in med.items():
        print(f"  {k:34s} " + "  ".join(f"{n:.0e}: {s * 1e3:8.2f} ms" for n, s in sorted(d.items())))
    print(f"wrote {paths[0]} and {paths[1]}")
    return med


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
