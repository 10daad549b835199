"""FA maximum likelihood: our EM on the d x d sufficient statistics vs scikit-learn.

``python -m bench.fa_em [--n 20000 --dim 50 --k 5 --repeat 3 --seed 0]`` (float64, CPU).

scikit-learn's ``FactorAnalysis`` runs with its defaults (tol=1e-2, randomized SVD); its final
log-likelihood (``score(X) * n``, total nats) is the target. Ours runs until it reaches that value
(or converges), timed from the raw data (the O(n d^2) covariance pass included). Both final
log-likelihoods are recomputed exactly with ``FactorAnalysis.log_evidence`` and printed. The
``svd`` row is scikit-learn's own iteration (Barber 21.2.33) on the covariance, in torch.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from models.fa import FactorAnalysis, fit_em


def _best_time(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.fa_em", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--dim", type=int, default=50)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-iter", type=int, default=100000)
    p.add_argument("--threads", type=int, default=0,
                   help="limit torch and numpy/BLAS to this many threads (0: leave as is)")
    args = p.parse_args(argv)
    if args.threads > 0:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        with threadpool_limits(limits=args.threads):
            return _run(args)
    return _run(args)


def _run(args) -> dict:
    from sklearn.decomposition import FactorAnalysis as SkFA

    fam = FactorAnalysis(args.k, dim=args.dim)
    x, _ = fam.simulate(args.n, seed=args.seed, dtype=torch.float64)
    xn = x.numpy()

    t_sk, sk = _best_time(lambda: SkFA(args.k, random_state=args.seed).fit(xn), args.repeat)
    ll_sk = float(sk.score(xn)) * args.n
    rows = [("sklearn FactorAnalysis", t_sk, ll_sk, sk.n_iter_)]
    for method in ("em", "svd"):

        def run(method=method):
            return fit_em(x, args.k, method=method, max_iter=args.max_iter, tol=0.0, target=ll_sk,
                          seed=args.seed)

        t, (params, trace) = _best_time(run, args.repeat)
        ll = fam.log_evidence(x, params).value
        rows.append((f"torch {method} on covariance", t, ll, len(trace)))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"FA maximum likelihood, n={args.n} d={args.dim} k={args.k}, float64 CPU, "
          f"best of {args.repeat}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cores, load average {load:.1f}")
    print(f"{'method':28s} {'seconds':>10s} {'log-lik (nats)':>18s} {'iters':>7s} {'speed-up':>9s}")
    for name, t, ll, it in rows:
        print(f"{name:28s} {t:10.4f} {ll:18.4f} {it:7d} {t_sk / t:8.1f}x")
    return {name: {"seconds": t, "loglik": ll, "iterations": it} for name, t, ll, it in rows}


if __name__ == "__main__":
    main()
