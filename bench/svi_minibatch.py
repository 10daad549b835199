"""SVI minibatch step time on the Bayesian GMM against n, for every GMM guide.

``python -m bench.svi_minibatch [--sizes 1e3,1e4,1e5,1e6 --batch 500 --steps 40 --repeat 3]``

For each guide of ``elbolab.guides.for_family(BayesianGMM)`` and each n, the engine's loop
(:func:`elbolab.inference.svi.loop.run_svi`: Pyro's ELBO, the optimizer, the loop's per-step checks) runs
``--steps`` minibatch steps of ``--batch`` points on data simulated from the model (K = 3, d = 1,
float64) after a few warm-up steps; the figure is seconds per step. The step alone (the guide,
the model, the ELBO's gradient and the guarded update, without the loop's bookkeeping) is timed
too. Sizes are interleaved (every size once per round).

Goal: the largest n costs at most 1.5x the smallest (a step touches only the batch's rows).

Agreement: on the smallest n, the minibatch ELBO estimate of the engine's first step (N/B-scaled,
Pyro's plate) is an unbiased estimate of the full-data ELBO: the mean of 400 minibatch
estimates of the initial guide lies within 4 standard errors of the full-data value.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from bench.common import Row, agree, load_average

GOAL = 1.5


def _setup(fam, x, guide_name, batch, steps, seed):
    """(engine loop runner, bare step) for one guide on data x, inside the current param store."""
    from elbolab import guides
    from elbolab.inference import svi
    from elbolab.inference.svi.steps import PyroStep, make_loss

    spec = guides.for_family(fam)[guide_name]
    guide = spec.build(fam, x)
    enum = spec.collapsed or spec.enumerated
    s = svi.Settings(num_steps=steps, subsample_size=batch, num_particles=1, lr=0.01)
    step = PyroStep(fam.model, guide, (x,), {"subsample_size": batch}, make_loss(s, enum, 1), s)

    def loop():
        svi.run_svi(fam.model, guide, (x,), s, collapsed=enum, max_plate_nesting=1)

    return loop, step


def measure(sizes, guide_names, batch=500, steps=40, repeat=3, seed=0, K=3):
    """{guide: {n: (loop seconds/step list, bare step seconds/step list)}} and the data."""
    from elbolab.inference.runtime import isolated
    from elbolab.models.gmm.model import BayesianGMM

    fam = BayesianGMM(K, 10.0)
    x_all, _ = fam.simulate(max(sizes), seed=seed)
    out = {g: {n: ([], []) for n in sizes} for g in guide_names}
    for r in range(repeat):
        for g in guide_names:
            for n in (sizes if r % 2 == 0 else sizes[::-1]):
                x = x_all[:n].contiguous()
                with isolated(seed + r):
                    loop, step = _setup(fam, x, g, batch, steps, seed)
                    for _ in range(3):
                        step()  # warm-up: creates the params, the optimizer state
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        step()
                    bare = (time.perf_counter() - t0) / steps
                with isolated(seed + r):
                    loop, step = _setup(fam, x, g, batch, 3, seed)
                    loop()  # warm-up
                    loop, _ = _setup(fam, x, g, batch, steps, seed)
                    t0 = time.perf_counter()
                    loop()
                    whole = (time.perf_counter() - t0) / steps
                out[g][n][0].append(whole)
                out[g][n][1].append(bare)
    return out


def unbiased_check(seed=0, n=1000, batch=100, draws=400, K=3):
    """Mean of minibatch ELBO estimates of the initial mean-field guide vs the full-data ELBO."""
    from pyro.infer import TraceEnum_ELBO

    from elbolab import guides
    from elbolab.inference.runtime import isolated
    from elbolab.models.gmm.model import BayesianGMM

    fam = BayesianGMM(K, 10.0)
    x, _ = fam.simulate(n, seed=seed)
    loss = TraceEnum_ELBO(max_plate_nesting=1, num_particles=50, vectorize_particles=True)
    with isolated(seed), torch.no_grad():
        guide = guides.for_family(fam)["mean-field"].build(fam, x)
        full = -statistics.mean(loss.loss(fam.model, guide, x) for _ in range(20))
        mini = [-loss.loss(fam.model, guide, x, subsample_size=batch) for _ in range(draws)]
    se = statistics.stdev(mini) / math.sqrt(draws)
    return agree("mean of minibatch ELBOs vs full-data ELBO (4 se)", statistics.mean(mini),
                 full, 4 * se)


def run(sizes=(1000, 10_000, 100_000, 1_000_000), batch=500, steps=40, repeat=3, seed=0,
        verbose=True) -> list[Row]:
    from elbolab import guides
    from elbolab.models.gmm.model import BayesianGMM

    names = list(guides.for_family(BayesianGMM(3, 10.0)))
    check = unbiased_check(seed)
    load0 = load_average()
    data = measure(list(sizes), names, batch, steps, repeat, seed)
    load = (load0 + load_average()) / 2
    rows = []
    lo, hi = min(sizes), max(sizes)
    for g in names:
        med = {n: statistics.median(v[0]) for n, v in data[g].items()}
        bare = {n: statistics.median(v[1]) for n, v in data[g].items()}
        ratio = med[hi] / med[lo]
        per_n = ", ".join(f"{n:.0e}: {med[n] * 1e3:.1f}" for n in sizes)
        if verbose:
            print(f"  {g:12s} engine loop ms/step {per_n}; bare step "
                  + ", ".join(f"{n:.0e}: {bare[n] * 1e3:.1f}" for n in sizes))
        rows.append(Row(
            f"SVI minibatch step (batch {batch}) on the GMM, guide {g}, n={lo:.0e}..{hi:.0e}",
            f"{med[hi] * 1e3:.1f} ms at n={hi:.0e} (min {min(data[g][hi][0]) * 1e3:.1f}, max "
            f"{max(data[g][hi][0]) * 1e3:.1f})",
            f"itself at n={lo:.0e}: {med[lo] * 1e3:.1f} ms",
            ratio, f"<= {GOAL:g}x from n={lo:.0e} to {hi:.0e}", GOAL, load, [check],
            lower_is_better=True,
            note=f"ms/step by n {per_n}; the step without the loop's bookkeeping: "
                 f"{bare[lo] * 1e3:.1f} -> {bare[hi] * 1e3:.1f} ms "
                 f"({bare[hi] / bare[lo]:.2f}x)"))
    return rows


def main(argv=None) -> list[Row]:
    p = argparse.ArgumentParser(prog="python -m bench.svi_minibatch",
                                description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1e3,1e4,1e5,1e6")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    sizes = tuple(int(float(s)) for s in a.sizes.split(","))
    rows = run(sizes, a.batch, a.steps, a.repeat, a.seed)
    from bench.common import details, table

    print(table(rows))
    print(details(rows))
    return rows


if __name__ == "__main__":
    main()
