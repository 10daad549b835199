"""The headline experiment: the Bayesian GMM under every engine, against the exact evidence.

    python -m experiments.gmm_engines [--n 100 --K 3 --dim 1 --prior-var 10 --seed 0 --quick]

Rows: exact EM (MAP; its objective log p(x, mu) is no bound), CAVI (closed-form ELBO, checked
against the shared Monte Carlo evaluator), SVI with the CAVI family (same bound, so its optimum
matches CAVI's), SVI collapsed over c with three guides over mu (a tighter bound), and NUTS on the
model with c summed out in closed form (``mcmc_model``; the posterior reference when n is too large
for the exact moments). Every ELBO is in nats with all constants; ``gap`` is
log p(x) - ELBO; log K! is printed beside it, because a unimodal q over mu sits on one of K! label
modes and cannot beat log p(x) - log K! when they are separated.

Defaults (n = 100, K = 3) take ~20 s of CPU on one thread; ``--quick`` (n <= 30, tiny settings,
rough numbers) takes a few seconds and is what the smoke test runs.
"""

from __future__ import annotations

import math
import sys

import pandas as pd
import torch

import inference
from experiments import common
from guides.gmm import mean_field_guide_from
from inference import em, mcmc, svi
from inference.elbo import estimate_elbo
from inference.runtime import isolated
from models.data import load_array
from models.gmm import MAX_ASSIGNMENTS, BayesianGMM, sorted_means

SVI_GUIDES = ("mean-field", "collapsed", "auto-normal", "auto-mvn")


def parse(argv):
    p = common.base_parser("gmm_engines", __doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100, help="number of simulated points (default 100)")
    p.add_argument("--K", type=int, default=3, help="number of components (default 3)")
    p.add_argument("--dim", type=int, default=1, help="data dimension d (default 1)")
    p.add_argument("--prior-var", type=float, default=10.0, help="prior variance s2 of the means")
    p.add_argument("--restarts", type=int, default=5, help="EM/CAVI random restarts")
    p.add_argument("--svi-steps", type=int, default=500)
    p.add_argument("--svi-lr", type=float, default=0.2, help="initial Adam learning rate")
    p.add_argument(
        "--svi-lr-decay",
        type=float,
        default=0.005,
        help="total decay of the learning rate over the run (0.2 -> 0.001 by default)",
    )
    p.add_argument("--svi-particles", type=int, default=4, help="particles per SVI gradient")
    p.add_argument("--nuts-samples", type=int, default=500, help="NUTS draws per chain")
    p.add_argument("--nuts-warmup", type=int, default=300)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--no-jit", action="store_true", help="NUTS without the compiled potential")
    p.add_argument("--eval-particles", type=int, default=2000, help="particles per ELBO estimate")
    p.set_defaults(threads=1)
    args = p.parse_args(argv)
    if args.quick:  # a smoke run: every engine and file, seconds not minutes, rough numbers
        args.n = min(args.n, 30)
        args.svi_steps, args.nuts_samples, args.nuts_warmup = 60, 40, 40
        args.chains, args.eval_particles, args.restarts = 2, 200, 2
        args.no_jit = True  # compiling the potential costs more than 100 tiny NUTS steps
    return args


def load_data(args, family, device, dtype):
    """Simulated data (``--n``, ``--seed``) or the file given by ``--data``."""
    if args.data is None:
        try:
            x, truth = family.simulate(args.n, seed=args.seed, device=device, dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"gmm_engines: --{exc}") from exc
        return x, {"true_means": sorted_means(truth["mu"]).tolist()}
    try:
        arr = load_array(args.data, name="--data")
        x = family.check_data(torch.as_tensor(arr, dtype=dtype, device=device))
    except (OSError, TypeError, ValueError) as exc:
        raise SystemExit(f"gmm_engines: {exc}") from exc
    return x, {"data_file": str(args.data)}


def engine_settings(args, progress: bool):
    """(EM/CAVI, SVI, NUTS) settings from the flags; bad values raise naming the field.

    SVI: the mean-field guide's q(c_i) logits must travel ~20 units from their start for points
    whose cluster changes, so a high initial rate (0.2) decayed to 0.001 reaches CAVI's optimum
    within ~0.01 nats in 500 steps; the collapsed guides converge in ~100.
    """
    ascent = em.Settings(max_iter=1000, tol=1e-10, n_init=args.restarts, progress=False)
    s = svi.Settings(
        num_steps=args.svi_steps,
        lr=args.svi_lr,
        lr_decay=args.svi_lr_decay,
        num_particles=args.svi_particles,
        eval_particles=args.eval_particles,
        eval_batch=200,
        progress=progress,
    )
    m = mcmc.Settings(
        num_samples=args.nuts_samples,
        warmup=args.nuts_warmup,
        num_chains=args.chains,
        jit=not args.no_jit,
        progress=progress,
    )
    return ascent, s, m


def run(args) -> dict:
    out, device, dtype = common.setup(args, "gmm_engines")
    progress = not (args.no_progress or args.quick)
    try:  # bad flags fail here, naming the field, before any work
        family = BayesianGMM(
            K=args.K, prior_var=args.prior_var, dim=args.dim if args.data is None else None
        )
        ascent, s, m = engine_settings(args, progress)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"gmm_engines: {exc}") from exc
    x, data_info = load_data(args, family, device, dtype)
    n = x.shape[0]
    print(f"Bayesian GMM: n={n}, d={x.shape[1]}, K={args.K}, s2={args.prior_var}, device={device}")

    evidence = family.log_evidence(x)
    print(
        f"log p(x) = {evidence.value:.4f} nats ({evidence.per_datum:.5f}/datum) by {evidence.method}"
        + (f" ± {evidence.se:.4f}" if evidence.se else "")
    )

    results = [
        inference.fit("em", family, x, ascent, seed=args.seed),
        inference.fit("cavi", family, x, ascent, seed=args.seed),
    ]
    cavi_res = results[-1]
    with isolated(args.seed):  # c sampled too: a plain Monte Carlo check of eq. 9
        check = estimate_elbo(
            family.model,
            mean_field_guide_from(cavi_res.state, enumerate_c=False),
            x,
            num_particles=args.eval_particles,
            batch_size=200,
        )
    cavi_res.diagnostics["elbo_mc"] = check.value
    cavi_res.diagnostics["elbo_mc_se"] = check.se

    for name in SVI_GUIDES:
        results.append(inference.fit("svi", family, x, s, seed=args.seed, guide=name))
    nuts = inference.fit("mcmc", family, x, m, seed=args.seed)
    results.append(nuts)

    summary = common.summary_frame(results, evidence)
    summary["log_K_factorial"] = family.label_symmetry_term()
    summary.to_csv(out / "summary.csv", index=False)

    posterior, draws = posterior_table(family, x, results, args)
    posterior.to_csv(out / "posterior.csv", index=False)
    nuts.to_inference_data().to_netcdf(out / "mcmc.nc")
    common.plot_traces(results, out / "elbo_traces.png", "GMM: objective per data point")
    common.plot_marginals(
        draws, "mcmc/nuts", out / "posterior_marginals.png", "posterior of the sorted means"
    )
    common.write_run_json(
        out,
        args,
        device,
        {
            "log_evidence": vars(evidence),
            "data": data_info,
            "n": n,
            "cavi_elbo_closed_form": cavi_res.elbo,
            "cavi_elbo_mc": [check.value, check.se],
            "diagnostics": {f"{r.engine}/{r.guide}": r.diagnostics for r in results},
            "messages": {f"{r.engine}/{r.guide}": r.message for r in results},
        },
    )

    common.print_table(
        summary,
        [
            "engine",
            "guide",
            "bound",
            "elbo",
            "elbo_se",
            "elbo_per_datum",
            "log_evidence",
            "gap",
            "log_K_factorial",
            "seconds",
            "converged",
        ],
        title="GMM engines (nats; gap = log p(x) - ELBO)",
    )
    print(
        f"\nCAVI closed-form ELBO {cavi_res.elbo:.4f} vs Monte Carlo {check.value:.4f} ± {check.se:.4f}"
    )
    print(
        f"NUTS: R-hat max {nuts.diagnostics.get('r_hat_max', math.nan):.3f}, "
        f"ESS bulk min {nuts.diagnostics.get('ess_bulk_min', math.nan):.0f}, "
        f"divergences {nuts.diagnostics['divergences']} (on sorted means and log likelihood)"
    )
    print(f"\nwrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}/")
    return {"summary": summary, "posterior": posterior, "out": out, "results": results}


def posterior_table(family, x, results, args):
    """Posterior mean/sd of the sorted means per engine, next to the reference."""
    frames, draws = [], {}
    for r in results:
        label = f"{r.engine}/{r.guide}"
        if r.engine == "em":
            d = r.posterior["mu_sorted"][None]
        elif r.engine == "cavi":
            g = torch.Generator().manual_seed(args.seed)
            eps = torch.randn((1000, *r.posterior["m"].shape), generator=g, dtype=torch.float64)
            d = sorted_means(
                r.posterior["m"] + eps.to(r.posterior["m"]) * r.posterior["s2"].sqrt()[:, None]
            )
        elif "mu_sorted" in r.samples:
            d = r.samples["mu_sorted"].flatten(0, 1)
        elif "mu" in r.samples:
            d = sorted_means(r.samples["mu"].flatten(0, 1))
        else:
            continue
        draws[label] = d
        frames.append(common.posterior_summary({"mu_sorted": d}, label))
    n = x.shape[0]
    if args.K ** max(n - 1, 0) <= MAX_ASSIGNMENTS:
        exact = family.exact_invariant_moments(x, seed=args.seed)["mu_sorted"]
        ref = pd.DataFrame(
            {
                "engine": "exact",
                "quantity": [f"mu_sorted[{j}]" for j in range(exact.mean.numel())],
                "mean": exact.mean.flatten().tolist(),
                "sd": exact.sd.flatten().tolist(),
            }
        )
        ref_name = "exact"
    else:
        ref = frames[-1].copy()
        ref_name = "mcmc/nuts"
    table = pd.concat(
        [ref.assign(engine=ref_name) if ref_name == "exact" else pd.DataFrame(), *frames]
    )
    refmap = ref.set_index("quantity")
    table["reference"] = ref_name
    table["ref_mean"] = table["quantity"].map(refmap["mean"])
    table["ref_sd"] = table["quantity"].map(refmap["sd"])
    return table.reset_index(drop=True), draws


def main(argv=None) -> int:
    run(parse(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
