"""Check each posteriordb port with plain Pyro NUTS (no elbolab) against posteriordb's reference.

    python examples/posteriordb/verify_with_pyro.py [module ...] [--samples 1000 --warmup 1000]

Runs ``pyro.infer.MCMC(NUTS(model))`` (two chains, one after the other, fixed seeds) and prints,
per component, the error of the posterior mean and sd against the summary in
``tests/data/posteriordb/<posterior>.json``, each with its allowance:

- mean: 4 * sqrt(mcse_mean^2 + ref_sd^2 / ref_ess): the Monte Carlo errors of both estimates
  (the run's from ArviZ's ``mcse``, the reference's from its own bulk ESS), 4 standard errors.
- sd: 4 * sqrt(mcse_sd^2 + ref_sd^2 / (2 * ref_ess)): the same for the sd (the reference sd's
  standard error is about sd / sqrt(2 ESS) for a near-normal margin).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import arviz as az
import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS

HERE = Path(__file__).resolve().parent
REFS = HERE.parent.parent / "tests" / "data" / "posteriordb"

#: module -> posterior name
POSTERIORS = {
    "eight_schools_noncentered": "eight_schools-eight_schools_noncentered",
    "kidscore_momiq": "kidiq-kidscore_momiq",
    "logmesquite": "mesquite-logmesquite",
    "arK": "arK-arK",
    "arma11": "arma-arma11",
    "garch11": "garch-garch11",
    "low_dim_gauss_mix": "low_dim_gauss_mix-low_dim_gauss_mix",
}


def load(module: str):
    spec = importlib.util.spec_from_file_location(module, HERE / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def component(draws: dict[str, np.ndarray], name: str) -> np.ndarray:
    """Stan's ``beta[2]`` is the Pyro site ``beta`` at index 1; draws are (chain, draw, *shape)."""
    site, _, index = name.partition("[")
    value = draws[site]
    return value[..., int(index[:-1]) - 1] if index else value


def deterministic_sites(model, draws: dict[str, np.ndarray], data: dict) -> dict:
    """The program's ``pyro.deterministic`` sites (which ``MCMC.get_samples`` leaves out) at
    each draw, by replaying the program on the draws."""
    trace = pyro.poutine.trace(model).get_trace(**data)
    names = [n for n, s in trace.nodes.items()
             if s["type"] == "sample" and s["infer"].get("_deterministic")]
    if not names:
        return {}
    shape = next(iter(draws.values())).shape[:2]
    flat = {k: torch.as_tensor(v).reshape(-1, *v.shape[2:]) for k, v in draws.items()}
    out = pyro.infer.Predictive(model, flat, return_sites=names)(**data)
    return {k: v.reshape(*shape, *trace.nodes[k]["value"].shape).numpy() for k, v in out.items()}


def compare(draws: dict[str, np.ndarray], ref: dict) -> list[dict]:
    rows = []
    for name, r in ref["parameters"].items():
        x = component(draws, name)
        mean, sd = float(x.mean()), float(x.std(ddof=1))
        mcse_mean = float(az.mcse(x, method="mean"))
        mcse_sd = float(az.mcse(x, method="sd"))
        tol_mean = 4 * math.sqrt(mcse_mean**2 + r["sd"] ** 2 / r["ess_bulk"])
        tol_sd = 4 * math.sqrt(mcse_sd**2 + r["sd"] ** 2 / (2 * r["ess_bulk"]))
        rows.append({
            "name": name, "mean": mean, "ref_mean": r["mean"], "tol_mean": tol_mean,
            "sd": sd, "ref_sd": r["sd"], "tol_sd": tol_sd,
            "ess": float(az.ess(x)),
            "ok": abs(mean - r["mean"]) <= tol_mean and abs(sd - r["sd"]) <= tol_sd,
        })
    return rows


def run(module: str, samples: int, warmup: int, chains: int = 2) -> tuple[list[dict], float]:
    mod = load(module)
    data = mod.data()
    t0 = time.perf_counter()
    per_chain = []
    for chain in range(chains):
        pyro.set_rng_seed(chain)
        pyro.clear_param_store()
        mcmc = MCMC(NUTS(mod.model), num_samples=samples, warmup_steps=warmup,
                    disable_progbar=True)
        mcmc.run(**data)
        per_chain.append({k: v.detach().numpy() for k, v in mcmc.get_samples().items()})
    seconds = time.perf_counter() - t0
    draws = {k: np.stack([c[k] for c in per_chain]) for k in per_chain[0]}
    draws.update(deterministic_sites(mod.model, draws, data))
    ref = json.loads((REFS / f"{POSTERIORS[module]}.json").read_text())
    return compare(draws, ref), seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("modules", nargs="*", default=list(POSTERIORS))
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=1000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    failed = 0
    for module in args.modules:
        rows, seconds = run(module, args.samples, args.warmup)
        print(f"== {POSTERIORS[module]} ({seconds:.1f} s, plain Pyro NUTS, 2 chains x "
              f"{args.samples} draws after {args.warmup} warmup)")
        for r in rows:
            print(f"  {r['name']:10s} mean {r['mean']:+.4f} ref {r['ref_mean']:+.4f} "
                  f"|err| {abs(r['mean'] - r['ref_mean']):.4f} tol {r['tol_mean']:.4f}   "
                  f"sd {r['sd']:.4f} ref {r['ref_sd']:.4f} |err| {abs(r['sd'] - r['ref_sd']):.4f}"
                  f" tol {r['tol_sd']:.4f}  ess {r['ess']:.0f}  {'ok' if r['ok'] else 'FAIL'}")
            failed += not r["ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
