"""The headline experiment: the Bayesian GMM under every engine, against the exact evidence.

    python -m elbolab.experiments.gmm_engines [--n 100 --K 3 --dim 1 --prior-var 10 --seed 0 --quick]

Rows: exact EM (MAP; its objective log p(x, mu) is no bound), CAVI (closed-form ELBO, checked
against the shared Monte Carlo evaluator), SVI with the CAVI family (same bound, so its optimum
matches CAVI's), SVI collapsed over c with three guides over mu (a tighter bound), and NUTS on the
model with c summed out in closed form (``mcmc_model``; the posterior reference when n is too large
for the exact moments). Every ELBO is in nats with all constants; ``gap`` is
log p(x) - ELBO; log K! is printed beside it, because a unimodal q over mu sits on one of K! label
modes and cannot beat log p(x) - log K! when they are separated.

Diagnostics: summary.csv adds the PSIS k-hat of each variational fit (``khat``, joint over mu and
any sampled c; > 0.7: q is not reliable for importance-weighted estimates; Yao et al. 2018);
reference.csv compares every engine's sorted means with the reference posterior (exact draws
when n is small, else NUTS: mean error, sd ratio, 1-Wasserstein distance), and posterior.csv
carries the same columns; NUTS writes mcmc_diagnostics.csv (R-hat, bulk/tail ESS per quantity),
mcmc_trace.png and mcmc_rank.png; elbo_traces.png draws the bounds beside log p(x), and EM's MAP
objective on its own panel.

Defaults (n = 100, K = 3) take ~20 s of CPU on one thread; ``--quick`` (n <= 30, tiny settings,
rough numbers) takes a few seconds and is what the smoke test runs.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import pandas as pd
import torch

from elbolab import guides, inference
from elbolab.experiments.core import common, plots
from elbolab.experiments.core.study import StudySettings, list_engines_guides, setting
from elbolab.guides.gmm import guide_specs, mean_field_guide_from
from elbolab.inference import arviz_io, mcmc, svi
from elbolab.inference.closed_form import em
from elbolab.inference.elbo import estimate_elbo
from elbolab.inference.evaluation import diagnostics
from elbolab.inference.evaluation.reference import (
    REFERENCE_COLUMNS,
    component_names,
    flag_reference,
    reference_table,
)
from elbolab.inference.runtime import isolated
from elbolab.models.data import load_array
from elbolab.models.gmm.evidence import exact_posterior_draws
from elbolab.models.gmm.model import MAX_ASSIGNMENTS, BayesianGMM, sorted_means
from elbolab.models.validate import TooLarge, check_size

SVI_GUIDES = ("mean-field", "collapsed", "auto-normal", "auto-mvn")
ENGINES = ("em", "cavi", "svi", "mcmc")


@dataclass
class Settings(StudySettings):
    """The study's settings (flags, ``--config`` keys); ``--quick`` defaults: a few seconds."""

    engines: str = setting(",".join(ENGINES), f"engines, comma list of {', '.join(ENGINES)}",
                           comma_list=True)
    guides: str = setting(",".join(SVI_GUIDES), "SVI guides, comma list of "
                          + ", ".join(guide_specs()), comma_list=True)
    threads: int | None = setting(1, "torch CPU threads (small models run faster on one)",
                                  kind=int)
    n: int = setting(100, "number of simulated points", quick=30)
    K: int = setting(3, "number of components")
    dim: int = setting(1, "data dimension d of simulated data")
    prior_var: float = setting(10.0, "prior variance s2 of the means")
    restarts: int = setting(5, "EM/CAVI random restarts", quick=2)
    svi_steps: int = setting(500, "SVI steps per fit", quick=60)
    svi_lr: float = setting(0.2, "initial Adam learning rate")
    svi_lr_decay: float = setting(
        0.005, "total decay of the learning rate over the run (0.2 -> 0.001 by default)")
    svi_particles: int = setting(4, "particles per SVI gradient")
    nuts_samples: int = setting(500, "NUTS draws per chain", quick=40)
    nuts_warmup: int = setting(300, "NUTS warmup steps per chain", quick=40)
    nuts_chains: int = setting(4, "NUTS chains", quick=2)
    nuts_depth: int = setting(8, "NUTS max tree depth")
    nuts_jit: bool = setting(True, "NUTS with the compiled potential (compiling costs more than "
                             "100 tiny NUTS steps)", quick=False, negatable=True)
    eval_particles: int = setting(2000, "particles per ELBO estimate", quick=200)


def parse(argv) -> Settings:
    """Settings from defaults, --quick, --config and flags, checked before any work."""
    args = common.settings(Settings, argv, "gmm_engines", __doc__.splitlines()[0])
    check(args)
    return args


def check(args: Settings) -> None:
    """Every check the flags allow on their own, naming the flag (data-dependent ones follow in
    :func:`run`, still before any work)."""
    if args.data is None:
        args.at_least("n", 1)
        args.at_least("dim", 1)
    args.at_least("K", 1)
    for name in ("restarts", "svi_steps", "svi_particles", "nuts_samples", "nuts_chains",
                 "nuts_depth"):
        args.at_least(name, 1)
    args.at_least("nuts_warmup", 0)
    args.at_least("eval_particles", 2)
    args.finite_positive("svi_lr")
    args.finite_positive("svi_lr_decay")


#: most point-component evaluations a run may ask for (about ten minutes on one CPU core)
MAX_WORK = 2e11


def check_work(args: Settings, n: int, d: int, engines, svi_guides: list) -> None:
    """Refuse settings whose work cannot finish in reasonable time or memory, before any work:
    every engine costs about n K d per sweep, step or gradient (EM/CAVI: up to 1000 sweeps per
    restart; SVI: steps x particles per guide plus the evaluation; NUTS: up to 2^5 gradients per
    draw), and every variational fit is evaluated with ``--eval-particles`` draws of q (its ELBO,
    CAVI's Monte Carlo check, PSIS), 200 at a time, each holding n K (d + 1) numbers; a guide
    that sums the assignments out holds K copies of the K d means per particle. ``svi_guides``:
    the GuideSpecs SVI runs."""
    per = n * args.K * d
    sweeps = 2 * 1000 * args.restarts * (("em" in engines) + ("cavi" in engines)) / 2
    steps = len(svi_guides) * args.svi_steps * args.svi_particles
    evals = args.eval_particles * (2 * ("cavi" in engines) + 2 * len(svi_guides))
    grads = ("mcmc" in engines) * args.nuts_chains * (args.nuts_samples + args.nuts_warmup) * 32
    work = per * (sweeps + steps + grads) + n * args.K * (d + 1) * evals
    if work > MAX_WORK:
        raise common.CliError(
            f"--K: n K d = {per:.3g} point-component terms per sweep, {work:.2g} in all, is more "
            f"than this study runs in reasonable time ({MAX_WORK:.0g}); use fewer components, "
            "points, steps or engines")
    batch = min(200, args.eval_particles)
    sizes = [(4 * batch * n * args.K * (d + 1),
              f"evaluating a variational fit with {batch} draws of q at a time")]
    if any(g.collapsed or g.enumerated for g in svi_guides):
        sizes.append((4 * args.svi_particles * args.K * (args.K * d + n),
                      f"an SVI step of a guide that sums out the K={args.K} assignments"))
    for numbers, what in sizes if ("cavi" in engines or svi_guides) else ():
        try:
            check_size(numbers, "K", f"{what} (n={n}, K={args.K}, d={d})")
        except TooLarge as exc:
            raise common.CliError(f"--{exc}") from None


#: engine-settings field -> study flag, to name the flag in errors raised by the engines
FIELD_FLAGS = {"lr": "svi_lr", "lr_decay": "svi_lr_decay", "num_particles": "svi_particles",
               "num_steps": "svi_steps", "num_samples": "nuts_samples", "warmup": "nuts_warmup",
               "num_chains": "nuts_chains", "max_tree_depth": "nuts_depth", "n_init": "restarts",
               "eval_particles": "eval_particles", "K": "K", "prior_var": "prior_var",
               "dim": "dim", "n": "n"}


def load_data(args, family, device, dtype):
    """Simulated data (``--n``, ``--seed``) or the file given by ``--data``."""
    if args.data is None:
        try:
            x, truth = family.simulate(args.n, seed=args.seed, device=device, dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise common.field_error(args, exc, FIELD_FLAGS) from None
        return x, {"true_means": sorted_means(truth["mu"]).tolist()}
    try:
        arr = load_array(args.data, name="--data")
    except (OSError, ValueError) as exc:
        raise common.data_error(exc) from None
    try:
        x = family.check_data(torch.as_tensor(arr, dtype=dtype, device=device))
    except (TypeError, ValueError) as exc:
        raise common.data_error(exc) from None
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
        **common.svi_threads(args),
    )
    m = mcmc.Settings(
        num_samples=args.nuts_samples,
        warmup=args.nuts_warmup,
        num_chains=args.nuts_chains,
        max_tree_depth=args.nuts_depth,
        jit=args.nuts_jit,
        progress=progress,
    )
    return ascent, s, m


def run(args) -> dict:
    device, dtype = common.setup(args, "gmm_engines")
    progress = args.progress and not args.quick
    try:  # bad flags fail here, naming the field, before any work
        family = BayesianGMM(
            K=args.K, prior_var=args.prior_var, dim=args.dim if args.data is None else None
        )
        ascent, s, m = engine_settings(args, progress)
    except (TypeError, ValueError) as exc:
        raise common.field_error(args, exc, FIELD_FLAGS) from None
    engines, svi_guides = list_engines_guides(args, ENGINES, guides.for_family(family))
    x, data_info = load_data(args, family, device, dtype)
    n = x.shape[0]
    specs = guides.for_family(family)
    check_work(args, n, x.shape[1], engines, [specs[g] for g in svi_guides])
    out = common.open_run(args, "gmm_engines")
    print(f"Bayesian GMM: n={n}, d={x.shape[1]}, K={args.K}, s2={args.prior_var}, device={device}")

    evidence = family.log_evidence(x)
    print(
        f"log p(x) = {evidence.value:.4f} nats ({evidence.per_datum:.5f}/datum) by {evidence.method}"
        + (f" ± {evidence.se:.4f}" if evidence.se else "")
    )

    results, cavi_res, check, nuts = [], None, None, None
    if "em" in engines:
        results.append(inference.fit("em", family, x, ascent, seed=args.seed))
    if "cavi" in engines:
        cavi_res = inference.fit("cavi", family, x, ascent, seed=args.seed)
        results.append(cavi_res)
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

    for name in svi_guides:
        ck, resume = common.checkpointing(args, f"svi-{name}")
        fit_s = s.replace(**ck) if ck else s
        results.append(
            inference.fit("svi", family, x, fit_s, seed=args.seed, guide=name, resume=resume))
    if "mcmc" in engines:
        nuts = inference.fit("mcmc", family, x, m, seed=args.seed)
        results.append(nuts)

    summary = common.summary_frame(results, evidence)
    summary["log_K_factorial"] = family.label_symmetry_term()
    psis = diagnostics.psis_frame(results, x, family_of=lambda r: family,
                                  num_samples=args.eval_particles, seed=args.seed)
    summary = pd.concat([summary, psis], axis=1)  # PSIS k-hat of each variational fit

    posterior, draws = posterior_table(family, x, results, args)
    reference = reference_frame(family, x, draws, args)
    # NUTS as the reference: every number against it is marked provisional unless it converged
    ok, why = (mcmc.convergence(nuts.diagnostics, m) if nuts is not None else (True, ""))
    uses_nuts = len(reference) > 0 and (reference["reference"] == "mcmc/nuts").all()
    reference = flag_reference(reference, ok or not uses_nuts, why)
    reference.to_csv(out / "reference.csv", index=False)
    summary = common.flag_summary(summary, [f"{r.engine}/{r.guide}" for r in results], reference)
    summary.to_csv(out / "summary.csv", index=False)
    posterior = posterior.merge(
        reference[["method", "quantity", "mean_error", "sd_ratio", "w1", "ref_flag"]].rename(
            columns={"method": "engine"}), on=["engine", "quantity"], how="left")
    posterior.to_csv(out / "posterior.csv", index=False)
    if nuts is not None:
        arviz_io.write_netcdf(nuts.to_inference_data(), out / "mcmc.nc")
        plots.mcmc_outputs(nuts.samples, out, ["mu_sorted", "log_lik_total"])
    plots.plot_bounds(results, out / "elbo_traces.png", "GMM: objective per data point", evidence)
    if nuts is not None:  # the histograms are drawn over the NUTS reference
        common.plot_marginals(
            draws, "mcmc/nuts", out / "posterior_marginals.png", "posterior of the sorted means",
            component_names("mu_sorted", draws["mcmc/nuts"].shape[1:]),
        )
    final = common.finish(
        out,
        args,
        device,
        {
            "log_evidence": vars(evidence),
            "data": data_info,
            "n": n,
            "engines": engines,
            "guides": svi_guides,
            "cavi_elbo_closed_form": None if cavi_res is None else cavi_res.elbo,
            "cavi_elbo_mc": None if check is None else [check.value, check.se],
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
            "khat",
            "seconds",
            "converged",
        ],
        title="GMM engines (nats; gap = log p(x) - ELBO; khat: PSIS, > 0.7 unreliable)",
    )
    if len(reference):
        common.print_table(
            reference, ["method", "quantity", "mean_error", "sd_ratio", "w1"],
            title=f"posterior of the sorted means against the {reference.reference.iloc[0]} "
                  "reference (reference.csv)")
    if check is not None:
        print(f"\nCAVI closed-form ELBO {cavi_res.elbo:.4f} vs Monte Carlo {check.value:.4f} "
              f"± {check.se:.4f}")
    if nuts is not None:
        print(
            f"NUTS: R-hat max {nuts.diagnostics.get('r_hat_max', math.nan):.3f}, "
            f"ESS bulk min {nuts.diagnostics.get('ess_bulk_min', math.nan):.0f}, "
            f"divergences {nuts.diagnostics['divergences']} (on sorted means and log likelihood)"
        )
    print(f"\nwrote {', '.join(sorted(p.name for p in final.iterdir()))} to {final}/")
    return {"summary": summary, "posterior": posterior, "out": final, "results": results}


def reference_frame(family, x, draws, args) -> pd.DataFrame:
    """reference.csv: every engine's draws of the sorted means against the reference posterior
    (exact draws from the mixture over assignments when n is small, else NUTS), by
    :func:`elbolab.inference.evaluation.reference.reference_table`; empty when there is neither."""
    draws = dict(draws)
    if args.K ** max(x.shape[0] - 1, 0) <= MAX_ASSIGNMENTS:
        g = torch.Generator().manual_seed(args.seed)
        draws["exact"] = sorted_means(exact_posterior_draws(family, x.double(), 20_000, g))
        ref = "exact"
    elif "mcmc/nuts" in draws:
        ref = "mcmc/nuts"
    else:
        return pd.DataFrame(columns=REFERENCE_COLUMNS)
    flat = {k: v.reshape(v.shape[0], -1) for k, v in draws.items()}
    return reference_table(flat, ref, component_names("mu_sorted", draws[ref].shape[1:]))


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
                "quantity": component_names("mu_sorted", exact.mean.shape),
                "mean": exact.mean.flatten().tolist(),
                "sd": exact.sd.flatten().tolist(),
            }
        )
        ref_name = "exact"
    elif "mcmc/nuts" in draws:
        ref = common.posterior_summary({"mu_sorted": draws["mcmc/nuts"]}, "mcmc/nuts")
        ref_name = "mcmc/nuts"
    else:  # too many points for the exact moments and NUTS not run (--engines): no reference
        ref = pd.DataFrame({"quantity": [], "mean": [], "sd": []})
        ref_name = "none"
    table = pd.concat(
        [ref.assign(engine=ref_name) if ref_name == "exact" else pd.DataFrame(), *frames]
    )
    refmap = ref.set_index("quantity")
    table["reference"] = ref_name
    table["ref_mean"] = table["quantity"].map(refmap["mean"])
    table["ref_sd"] = table["quantity"].map(refmap["sd"])
    return table.reset_index(drop=True), draws


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return common.entry("gmm_engines", lambda a: run(parse(a)) and 0, argv)


if __name__ == "__main__":
    raise SystemExit(main())
