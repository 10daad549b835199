"""Factor analysis / PPCA: engines, swappable guides and the exact decomposition of the gaps.

    python -m elbolab.experiments.fa_gaps [--n 300 --dim 8 --latent-dim 2 --model fa --quick]

Rows of summary.csv (every ELBO in nats summed over the data, with the exact log evidence at the
row's own parameters): exact EM (bound "log-likelihood"), CAVI over a mean-field q with the
parameters fixed at the EM fit, SVI with each guide with the parameters fixed at the EM fit
(``params = fixed-em``) and learning parameters and guide jointly (``params = learned``).
gaps.csv: per guide trained with fixed parameters, the Cremer et al. (2018) decomposition against
its matching local family (diagonal guides -> mean-field, full-covariance -> full-rank), per data
point, measured by Monte Carlo (with SEs) and in closed form, next to the analytic approximation
gap 1/2 (sum_j log L_jj - log det L) (mean-field) or 0 (full-rank).
imputation.csv: RMSE on held-out entries of a test split: exact conditional Gaussian, importance
resampling (prior and encoder proposals), EM on data with gaps, column means.

Bayesian FA (``elbolab.models.fa.bayes``, model column "bayes-fa"; FA noise even with ``--model ppca``):
variational Bayes q(W, mu) q(tau) q(Z) by CAVI (engine "cavi", guide "vb", bound "elbo", the
closed-form ELBO) and NUTS with z integrated out (engine "mcmc", guide "nuts", bound "none";
leave mcmc out of ``--engines`` to skip it). Their log_evidence is NaN: the Bayesian evidence
has no closed form and differs from the FA ML log-likelihood of the other rows. NUTS diagnostics
(R-hat, bulk/tail ESS on the rotation-invariant C = W W^T + Psi, mu and the log-likelihood;
divergences) go to run.json and summary.csv (``diag_*``), its draws to mcmc.nc. posterior.csv:
posterior mean/sd of each upper-triangle entry of C under NUTS and VB, the EM estimate and, for
simulated data, the truth.

Diagnostics: summary.csv adds each variational fit's PSIS k-hat (``khat`` over all latents,
``khat_max_point`` / ``khat_frac_points_above`` per data point; Yao et al. 2018), gaps.csv the
k-hat / ESS of q's and q*'s weights and ``flagged`` / ``flags``; reference.csv compares C under
VB, EM, learned-parameter SVI and the truth with NUTS (mean error, sd ratio, 1-Wasserstein), and
each fixed-parameter guide's q(z | x) with the exact p(z | x); NUTS adds mcmc_diagnostics.csv and
trace/rank plots; elbo_traces.png separates bounds from EM's log-likelihood.
"""

from __future__ import annotations

import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from elbolab import (
    guides,  # noqa: E402
    inference,  # noqa: E402
)
from elbolab.experiments.core import common, plots  # noqa: E402
from elbolab.experiments.fa_bayes_impute import (
    free_parameters,
    imputation_table,
    plot_imputation,
    posterior_table,
    print_bayes,
    run_bayes,
)
from elbolab.experiments.fa_data import check_scale, load_data, split  # noqa: E402
from elbolab.experiments.fa_settings import (  # noqa: E402, F401  (the settings, re-exported)
    DEFAULT_GUIDES,
    ENGINES,
    FIELD_FLAGS,
    STUDY_GUIDES,
    Settings,
    check,
    parse,
)
from elbolab.inference import (
    arviz_io,
    mcmc,
    svi,  # noqa: E402
)
from elbolab.inference.closed_form import em
from elbolab.inference.evaluation import diagnostics, gaps
from elbolab.inference.evaluation.reference import (
    FLAG_COLUMNS,
    REFERENCE_COLUMNS,
    flag_reference,
    guide_draws,
    local_reference_table,
    reference_table,
)
from elbolab.models.fa.model import FactorAnalysis, FAParams  # noqa: E402

GAP_COLUMNS = [
    "guide", "amortized", "local_family", "n", "log_evidence", "log_evidence_se",
    "elbo_q_star", "elbo_q_star_se", "elbo_amortized", "elbo_amortized_se",
    "approximation_gap", "approximation_gap_se", "amortization_gap", "amortization_gap_se",
    "inference_gap", "inference_gap_se", "closed_form_approximation_gap",
    "approximation_gap_exact", "amortization_gap_exact", "inference_gap_exact",
    "q_star_optimizer", "q_star_converged", "num_particles", "unit",
    "khat_amortized", "khat_q_star", "ess_amortized", "flagged", "flags",
]


def params_of(result, kind, d) -> FAParams:
    p = result.model_params() or result.posterior
    psi = p["sigma2"].reshape(1).expand(d) if kind == "ppca" else p["psi"]
    return FAParams(p["W"].detach(), p["mu"].detach(), psi.detach().clone())


def closed_form_gap(fixed: FactorAnalysis, x, local_family: str = "mean-field") -> float:
    """Approximation gap of the best member of ``local_family`` in nats per data point (FA's
    exact posterior covariance is shared by all points): :func:`gaps.gaussian_approximation_gap`."""
    _, cov = fixed.exact_posterior(x[:1].double().cpu())
    return float(gaps.gaussian_approximation_gap(cov, local_family))


def run_engines(args, x, kind, progress):
    k, d = args.latent_dim, x.shape[1]
    results, evidences, params = [], [], {}
    # EM proper, not the eigen iteration: the ML loadings are defined up to a rotation, and the
    # eigen iteration returns the one that makes the posterior covariance diagonal (so a mean-field
    # q would be exact and its gap trivially 0); EM from a random start returns a generic one.
    em_res = inference.fit("em", FactorAnalysis(k, kind=kind, em_method="em"), x,
                           em.Settings(max_iter=args.em_iter, tol=1e-10), seed=args.seed)
    p_em = params_of(em_res, kind, d)
    fixed = FactorAnalysis(k, kind=kind, params=p_em)
    ev_em = fixed.log_evidence(x)
    results.append(em_res)
    evidences.append(ev_em)
    params["em"] = p_em
    if "cavi" in args.engine_list:
        cavi_res = inference.fit("cavi", fixed, x, em.Settings(max_iter=args.em_iter, tol=1e-12),
                                 seed=args.seed)
        results.append(cavi_res)
        evidences.append(ev_em)
    trained = {}
    for mode, names in (("fixed-em", args.guide_list), ("learned", args.joint_list)):
        for name in names:
            if mode == "learned" and name == "exact":
                continue  # the exact posterior needs fixed parameters
            family = fixed if mode == "fixed-em" else FactorAnalysis(k, kind=kind)
            opts = {"hidden": args.hidden_sizes} if name == "mlp" else {}
            steps = 1 if (mode == "fixed-em" and name == "exact") else args.svi_steps
            s = svi.Settings(num_steps=steps, lr=args.svi_lr, lr_decay=0.05, num_particles=4,
                             eval_particles=args.eval_particles, eval_batch=100,
                             learn_model_params=mode == "learned", num_posterior_samples=0,
                             progress=progress, **common.svi_threads(args))
            ck, resume = common.checkpointing(args, f"svi-{mode}-{name}")
            r = svi.fit(family, x, s.replace(**ck) if ck else s, seed=args.seed,
                        guide=guides.spec(name), guide_options=opts, resume=resume)
            r.settings["params"] = mode
            if mode == "learned":
                p = params_of(r, kind, d)
                params[f"svi_{name}"] = p
                evidences.append(FactorAnalysis(k, kind=kind, params=p).log_evidence(x))
            else:
                trained[name] = r.state.guide
                evidences.append(ev_em)
            results.append(r)
    return results, evidences, params, fixed, trained


def summary_table(results, evidences, ev_em):
    rows = []
    for r, ev in zip(results, evidences):
        row = r.to_row(ev)
        row["params"] = r.settings.get("params", "fixed-em" if r.engine == "cavi" else "em")
        row["log_lik_below_em"] = ev_em.value - ev.value if ev is not None else float("nan")
        if ev is None:
            row["log_evidence_method"] = "intractable (Bayesian evidence)"
        rows.append(row)
    df = pd.DataFrame(rows)
    cols = [c for c in common.SUMMARY_COLUMNS if c in df.columns]
    return df[cols + [c for c in df.columns if c not in cols]]


def gap_table(args, fixed, x, trained):
    rows, points = [], []
    cf_gap = {local: closed_form_gap(fixed, x, local) for local in ("mean-field", "full-rank")}
    qs = gaps.QStarSettings(steps=2000 if args.qstar_optimizer == "auto"
                            else max(args.svi_steps, 200))
    for name, guide in trained.items():
        local = gaps.matching_local_family(guide)  # diagonal -> mean-field, full -> full-rank
        common_kw = dict(optimizer=args.qstar_optimizer, settings=qs, seed=args.seed)
        mc = gaps.decompose_gaps(fixed, x, guide, local, estimator="mc",
                                 num_particles=args.eval_particles, particle_batch=250, **common_kw)
        exact = gaps.decompose_gaps(fixed, x, guide, local, estimator="closed-form", **common_kw)
        m, e = gaps.summary_row(mc), gaps.summary_row(exact)
        row = {"guide": name, "amortized": guide.amortized, "local_family": local,
               "n": x.shape[0], "unit": "nats per data point",
               "closed_form_approximation_gap": cf_gap[local],
               "q_star_optimizer": mc.attrs["optimizer"],
               "q_star_converged": mc.attrs["q_star_converged"],
               "num_particles": args.eval_particles}
        for q in gaps.QUANTITIES:
            row[q], row[f"{q}_se"] = m[q], m[f"{q}_se"]
        for q in ("approximation_gap", "amortization_gap", "inference_gap"):
            row[f"{q}_exact"] = e[q]
        # PSIS k-hat (largest over points) and IS ESS (smallest) of q's weights; flags of both
        row.update(khat_amortized=m["khat_amortized"], khat_q_star=m["khat_q_star"],
                   ess_amortized=m["ess_amortized"], flagged=m["flagged"] or e["flagged"],
                   flags="; ".join(f for f in (m["flags"], e["flags"]) if f) or "none")
        rows.append(row)
        pts = mc[mc.scope == "point"].assign(guide=name, local_family=local)
        points.append(pts)
    return (pd.DataFrame(rows, columns=GAP_COLUMNS),
            pd.concat(points, ignore_index=True) if points else pd.DataFrame())


def reference_frame(args, x, fixed, bayes_fam, vb, nuts, params, truth, trained):
    """reference.csv. C = W W^T + Psi (upper triangle; rotation-invariant) under VB (draws from
    q), EM, SVI with learned parameters and the truth (point estimates) against NUTS on the
    Bayesian FA; and each guide trained with EM's parameters fixed against the exact p(z | x)
    (:func:`elbolab.inference.evaluation.reference.local_reference_table`)."""
    frames = []
    if nuts is not None:
        S = args.eval_particles
        draws = {"mcmc/nuts": nuts.samples["cov"].flatten(0, 1)}
        if vb is not None:
            q = diagnostics.cavi_guide(vb, bayes_fam, x)
            z = guide_draws(q, x, num_samples=S, max_plate_nesting=bayes_fam.max_plate_nesting,
                            seed=args.seed)
            inv = bayes_fam.posterior_invariants({k: v.unsqueeze(0) for k, v in z.items()}, x)
            draws["cavi/vb"] = inv["cov"][0]
        d = x.shape[1]
        iu = torch.triu_indices(d, d)
        points = {"em": params["em"], **({"truth": truth} if truth is not None else {})}
        points.update({f"svi/{k[4:]} [learned]": p for k, p in params.items()
                       if k.startswith("svi_")})
        for name, p in points.items():
            draws[name] = p.covariance()[iu[0], iu[1]][None]
        # against NUTS: provisional (ref_flag on every row) unless NUTS converged
        ok, why = mcmc.convergence(nuts.diagnostics, mcmc.Settings(**{
            k: nuts.settings[k] for k in ("rhat_max", "ess_per_chain", "num_chains")}))
        frames.append(flag_reference(reference_table(draws, "mcmc/nuts", cov_names(d)), ok,
                                     why).assign(aggregate=""))
    if trained:  # against the exact p(z | x)
        frames.append(flag_reference(local_reference_table(
            fixed, x, trained, num_samples=args.eval_particles, seed=args.seed), True))
    return (pd.concat(frames, ignore_index=True) if frames
            else pd.DataFrame(columns=[*REFERENCE_COLUMNS, "aggregate", *FLAG_COLUMNS]))


def cov_names(d: int) -> list[str]:
    """``C[i,j]``, the upper triangle of C = W W^T + Psi in the order of ``torch.triu_indices``
    (NUTS's flattened ``cov``): one name for the entry in every table and figure."""
    iu = torch.triu_indices(d, d)
    return [f"C[{i},{j}]" for i, j in iu.T.tolist()]


def reference_methods(results) -> list[str | None]:
    """Each fit's method label in reference.csv (None for a fit it does not compare)."""
    out = []
    for r in results:
        params = r.settings.get("params") if isinstance(r.settings, dict) else None
        if r.engine == "em":
            out.append("em")
        elif r.engine == "mcmc" or (r.engine == "cavi" and params == "posterior"):
            out.append(f"{r.engine}/{r.guide}")
        elif r.engine == "svi" and params == "learned":
            out.append(f"svi/{r.guide} [learned]")
        elif r.engine == "svi":
            out.append(r.guide)  # q(z | x) against the exact p(z | x)
        else:
            out.append(None)
    return out


def print_reference(reference):
    """Per method: the worst |mean error| (in reference sds), sd ratio range and largest W1."""
    rows = []
    for (method, ref), g in reference.groupby(["method", "reference"], sort=False):
        rows.append({"method": method, "reference": ref, "quantities": len(g),
                     "max_abs_mean_error_in_ref_sd": g.mean_error_in_ref_sd.abs().max(),
                     "sd_ratio_min": g.sd_ratio.min(), "sd_ratio_max": g.sd_ratio.max(),
                     "w1_in_ref_sd_max": g.w1_in_ref_sd.max()})
    df = pd.DataFrame(rows)
    common.print_table(df, list(df.columns), title="posteriors against the reference "
                                                   "(reference.csv, summarized per method)")


def plot_gaps(table, path):
    fig, ax = plt.subplots(figsize=(8, 4.2))
    xs = np.arange(len(table))
    a, b = table["approximation_gap"].to_numpy(), table["amortization_gap"].to_numpy()
    ax.bar(xs, a, 0.6, yerr=table["approximation_gap_se"], label="approximation gap")
    ax.bar(xs, b, 0.6, bottom=a, yerr=table["amortization_gap_se"], label="amortization gap")
    ax.scatter(xs, table["closed_form_approximation_gap"], color="k", marker="_", s=400, zorder=3,
               label="closed-form approximation gap")
    ax.set_xticks(xs, [f"{g}\n(F = {f})" for g, f in zip(table.guide, table.local_family)],
                  fontsize=9)
    ax.set_ylabel("nats per data point")
    ax.set_title("inference gap = approximation + amortization (Monte Carlo, ±1 SE)", fontsize=11)
    plots.legend_below(ax).set_bbox_to_anchor((0.5, -0.2))
    fig.savefig(path, dpi=plots.DPI, bbox_inches="tight")
    plt.close(fig)


def save_params(path, params: dict, truth, trained):
    """Flat dict of tensors (torch.load(path, weights_only=True)): '<fit>.W', '<fit>.mu',
    '<fit>.psi' for fit in em, em_missing, truth, svi_<guide>; 'guide.<name>.<param>' for the
    guides trained with fixed parameters (their state_dicts)."""
    flat = {}
    for key, p in {**params, **({"truth": truth} if truth is not None else {})}.items():
        for k, v in p.as_dict().items():
            flat[f"{key}.{k}"] = v.detach().cpu().clone()
    for name, g in trained.items():
        for k, v in g.state_dict().items():
            flat[f"guide.{name}.{k}"] = v.detach().cpu().clone()
    torch.save(flat, path)
    return sorted(flat)


def run(args) -> dict:
    t0 = time.perf_counter()
    device, dtype = common.setup(args, "fa_gaps")
    progress = args.progress and not args.quick
    x_all, truth, data_info = load_data(args, device, dtype)
    check_scale(args, x_all)
    x, x_test = split(x_all, args.test_frac, args.seed)
    kind = args.model
    try:
        FactorAnalysis(args.latent_dim, kind=kind).check_data(x)
    except (TypeError, ValueError) as exc:
        raise common.data_error(exc) from None
    out = common.open_run(args, "fa_gaps")
    print(f"{kind.upper()}: n={x.shape[0]} train + {x_test.shape[0]} test, d={x.shape[1]}, "
          f"k={args.latent_dim}, device={device}, dtype={dtype}")

    results, evidences, params, fixed, trained = run_engines(args, x, kind, progress)
    for r in results:  # the figures' labels name the parameters as summary.csv's params does
        r.settings.setdefault("params", "fixed-em" if r.engine == "cavi" else "em")
    bayes_fam, vb, nuts = run_bayes(args, x, progress)
    bayes = [r for r in (vb, nuts) if r is not None]
    results += bayes
    evidences += [None] * len(bayes)
    summary = summary_table(results, evidences, evidences[0])
    psis = diagnostics.psis_frame(  # PSIS k-hat of each variational fit (q rebuilt for CAVI/VB)
        results, x, family_of=lambda r: bayes_fam if r.model == bayes_fam.name else fixed,
        num_samples=args.eval_particles, seed=args.seed)
    summary = pd.concat([summary, psis], axis=1)

    gap_df, gap_points = gap_table(args, fixed, x, trained)
    if trained:  # guides trained with the EM parameters fixed (svi in --engines)
        gap_df.to_csv(out / "gaps.csv", index=False)
        gap_points.to_csv(out / "gaps_points.csv", index=False)

    imp_df, mask, filled, p_gaps = imputation_table(args, x, x_test, kind, params["em"], truth,
                                                    trained)
    imp_df.to_csv(out / "imputation.csv", index=False)
    params["em_missing"] = p_gaps
    keys = save_params(out / "params.pt", params, truth, trained)
    post_df = posterior_table(x, vb, nuts, params["em"], truth)
    post_df.to_csv(out / "posterior.csv", index=False)
    reference = reference_frame(args, x, fixed, bayes_fam, vb, nuts, params, truth, trained)
    reference.to_csv(out / "reference.csv", index=False)
    summary = common.flag_summary(summary, reference_methods(results), reference)
    summary.to_csv(out / "summary.csv", index=False)
    if nuts is not None:
        arviz_io.write_netcdf(nuts.to_inference_data(), out / "mcmc.nc")
        plots.mcmc_outputs(nuts.samples, out, ["cov", "mu", "log_lik"],
                           labels={"cov": cov_names(x.shape[1])})
    n, d, k = x.shape[0], x.shape[1], args.latent_dim
    ml_pd = evidences[0].per_datum
    n_free = free_parameters(d, k)
    bic_pd = ml_pd - 0.5 * n_free * np.log(n) / n

    plots.plot_bounds(results, out / "elbo_traces.png", f"{kind.upper()}: objective per datum",
                      evidences[0], f"log p(x | EM's parameters) = {evidences[0].per_datum:.5g}")
    if trained:
        plot_gaps(gap_df, out / "gaps.png")
    plot_imputation(x_test, mask, filled, out / "imputation_scatter.png")
    final = common.finish(out, args, device, {
        "engines": args.engine_list, "guides": args.guide_list, "joint_guides": args.joint_list,
        "data": data_info, "n_train": x.shape[0], "n_test": x_test.shape[0],
        "log_evidence_em": vars(evidences[0]) | {"details": {}},
        "closed_form_mean_field_gap_per_datum": closed_form_gap(fixed, x),
        "params_file": {"path": "params.pt", "keys": keys,
                        "load": "torch.load(path, weights_only=True)"},
        "messages": {f"{r.engine}/{r.guide}/{r.settings.get('params', '')}": r.message
                     for r in results},
        "bayes_fa": {
            "priors": {k_: bayes[0].settings[k_] for k_ in ("alpha", "a0", "b0", "mu_scale")}
            if bayes else None,
            "vb": None if vb is None else {
                "bound": vb.bound, "elbo": vb.elbo, "elbo_per_datum": vb.elbo_per_datum,
                "converged": vb.converged, "iterations": len(vb.trace), "message": vb.message},
            "nuts": None if nuts is None else {
                **nuts.diagnostics, "converged": nuts.converged,
                "converged_rule": f"r_hat <= {nuts.settings['rhat_max']} and bulk/tail ESS >= "
                                  f"{nuts.settings['ess_per_chain']} per chain",
                "diagnosed_on": "C = W W^T + Psi (upper triangle), mu, log-likelihood",
                "chains": args.nuts_chains, "samples": args.nuts_samples,
                "warmup": args.nuts_warmup, "max_tree_depth": args.nuts_depth,
                "seconds": nuts.seconds, "file": "mcmc.nc"},
            "ml_log_lik_per_datum": ml_pd,
            "bic_log_evidence_per_datum": bic_pd,
            "free_parameters": n_free,
            "note": "the Bayesian evidence (bounded below by the VB ELBO) is not the ML "
                    "log-likelihood; it is lower by an Occam factor (~ p/2 log n, BIC)",
        },
        "seconds": time.perf_counter() - t0,
    })

    common.print_table(summary, ["engine", "guide", "params", "bound", "elbo_per_datum", "elbo_se",
                                 "log_evidence", "gap_per_datum", "khat", "khat_max_point",
                                 "seconds", "converged"],
                       title=f"{kind.upper()} engines (nats; gap = log p(x) - ELBO, row's params)")
    if trained:
        common.print_table(gap_df, ["guide", "local_family", "approximation_gap",
                                    "approximation_gap_se", "closed_form_approximation_gap",
                                    "amortization_gap", "amortization_gap_se", "inference_gap"],
                           title="gap decomposition (nats per data point, Monte Carlo ± SE)")
    if len(reference):
        print_reference(reference)
    common.print_table(imp_df, ["method", "rmse", "n_missing", "seconds"],
                       title="imputation of held-out entries (RMSE)")
    if bayes:
        print_bayes(summary, ml_pd, bic_pd, n_free, post_df, nuts)
    print(f"\nwrote {', '.join(sorted(p.name for p in final.iterdir()))} to {final}/ "
          f"in {time.perf_counter() - t0:.1f} s")
    return {"summary": summary, "gaps": gap_df, "imputation": imp_df, "out": final}


def main(argv=None) -> int:
    """The command line: exit status 2 with one line naming the flag on a bad setting; torch's
    thread count is restored afterwards."""
    argv = sys.argv[1:] if argv is None else argv
    return common.entry("fa_gaps", lambda a: run(parse(a)) and 0, argv)


if __name__ == "__main__":
    raise SystemExit(main())
