"""The Bayesian FA rows and the imputation study of :mod:`elbolab.experiments.fa_gaps`: VB and NUTS on the
Bayesian FA, the posterior of W W^T + Psi under each, and imputation of held-out entries.
"""

from __future__ import annotations

import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from elbolab import inference
from elbolab.experiments.core import common
from elbolab.inference import arviz_io, mcmc
from elbolab.inference.closed_form import cavi
from elbolab.inference.impute import column_mean_impute, importance_impute, rmse
from elbolab.models.fa.bayes import BayesianFactorAnalysis
from elbolab.models.fa.missing import em_missing, impute
from elbolab.models.fa.model import FactorAnalysis, FAParams

POSTERIOR_COLUMNS = [
    "quantity", "i", "j", "nuts_mean", "nuts_sd", "nuts_mcse", "nuts_ess_bulk", "nuts_r_hat",
    "vb_mean", "vb_sd", "em", "truth",
]



def run_bayes(args, x, progress):
    """Variational Bayes (CAVI, closed-form ELBO; with cavi in ``--engines``) and NUTS (with mcmc,
    in ``--engines``) on the Bayesian FA with its default priors (W_ij ~ N(0, 1),
    mu_i ~ N(0, 10^2), tau_i ~ Gamma(1, 1): weak for data on a unit scale). Returns (family,
    VB result or None, NUTS result or None)."""
    fam = BayesianFactorAnalysis(args.latent_dim)
    vb = nuts = None
    if "cavi" in args.engine_list:
        vb = inference.fit("cavi", fam, x, cavi.Settings(max_iter=args.em_iter, tol=1e-10),
                           seed=args.seed)
        vb.guide = "vb"
        vb.settings["params"] = "posterior"
    if "mcmc" in args.engine_list:
        s = mcmc.Settings(num_samples=args.nuts_samples, warmup=args.nuts_warmup,
                          num_chains=args.nuts_chains, max_tree_depth=args.nuts_depth,
                          jit=args.nuts_jit, progress=progress)
        nuts = inference.fit("mcmc", fam, x, s, seed=args.seed)
        nuts.settings["params"] = "posterior"
        nuts.diagnostics["post_mean_log_lik"] = float(nuts.samples["log_lik"].mean())
    return fam, vb, nuts


def free_parameters(d: int, k: int) -> int:
    """Identified parameters of FA: d k - k (k - 1) / 2 loadings (rotation removed), d means,
    d noise variances."""
    return d * k - k * (k - 1) // 2 + 2 * d


def vb_covariance_moments(post: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sd of C = W W^T + diag(1/tau) under q(W~) q(tau) (rows of W~ independent).

    With w_i ~ N(m_i, A_i) independent and 1/tau_i ~ InvGamma(a, b_i):
    i != j: E = m_i^T m_j, Var = m_i^T A_j m_i + m_j^T A_i m_j + tr(A_i A_j);
    i == j: E = |m_i|^2 + tr A_i + b_i/(a-1),
            Var = 2 tr(A_i^2) + 4 m_i^T A_i m_i + b_i^2 / ((a-1)^2 (a-2)).
    """
    M = post["W_loc"]
    k = M.shape[1]
    A = post["Wmu_cov"][:, :k, :k]
    a, b = post["tau_shape"], post["tau_rate"]
    tr_a = torch.diagonal(A, dim1=-2, dim2=-1).sum(-1)
    mean = M @ M.T + torch.diag(tr_a + b / (a - 1))
    q = torch.einsum("ik,jkl,il->ij", M, A, M)  # m_i^T A_j m_i
    var = q + q.T + torch.einsum("ikl,jlk->ij", A, A)
    diag = (2 * torch.einsum("ikl,ilk->i", A, A) + 4 * torch.einsum("ik,ikl,il->i", M, A, M)
            + b**2 / ((a - 1) ** 2 * (a - 2)))
    var = var - torch.diag(torch.diagonal(var)) + torch.diag(diag)
    return mean, var.clamp_min(0).sqrt()


def posterior_table(x, vb, nuts, p_em: FAParams, truth) -> pd.DataFrame:
    """One row per upper-triangle entry C[i, j] of C = W W^T + Psi (rotation-invariant)."""
    d = x.shape[1]
    iu = torch.triu_indices(d, d)
    df = pd.DataFrame({"quantity": [f"C[{i},{j}]" for i, j in iu.T.tolist()],
                       "i": iu[0].numpy(), "j": iu[1].numpy()})
    nan = np.full(len(df), np.nan)
    if nuts is not None:
        c = nuts.samples["cov"].detach().double().cpu()
        df["nuts_mean"] = c.mean((0, 1)).numpy()
        df["nuts_sd"] = c.flatten(0, 1).std(0).numpy()
        stats = arviz_io.chain_statistics(c.numpy())
        df["nuts_mcse"] = stats["mcse_mean"]
        df["nuts_ess_bulk"] = stats["ess_bulk"]
        df["nuts_r_hat"] = stats["r_hat"]
    else:
        for col in ("nuts_mean", "nuts_sd", "nuts_mcse", "nuts_ess_bulk", "nuts_r_hat"):
            df[col] = nan
    if vb is not None:
        vb_mean, vb_sd = vb_covariance_moments(vb.posterior)
        df["vb_mean"] = vb_mean[iu[0], iu[1]].double().cpu().numpy()
        df["vb_sd"] = vb_sd[iu[0], iu[1]].double().cpu().numpy()
    else:
        df["vb_mean"], df["vb_sd"] = nan, nan
    df["em"] = p_em.covariance()[iu[0], iu[1]].double().cpu().numpy()
    df["truth"] = (truth.covariance()[iu[0], iu[1]].double().cpu().numpy()
                   if truth is not None else nan)
    return df[POSTERIOR_COLUMNS]


def imputation_table(args, x_train, x_test, kind, p_em, truth, trained):
    g = torch.Generator().manual_seed(args.seed + 202)
    mask = (torch.rand(x_test.shape, generator=g, dtype=torch.float64) < args.missing_frac)
    mask = mask.to(x_test.device)
    if not mask.any():
        mask[0, 0] = True
    x_nan = x_test.masked_fill(mask, float("nan"))
    fixed = FactorAnalysis(args.latent_dim, kind=kind, params=p_em)
    out, filled = [], {}

    def add(method, values, seconds, **extra):
        filled[method] = values
        out.append({"method": method, "rmse": rmse(values, x_test, mask),
                    "n_missing": int(mask.sum()), "seconds": seconds, **extra})

    t = time.perf_counter()
    add("exact-conditional", impute(x_nan, p_em)[0], time.perf_counter() - t,
        params="em (complete training rows)")
    t = time.perf_counter()
    imp = importance_impute(fixed, x_nan, num_particles=args.impute_particles, seed=args.seed)
    add("importance-prior", imp.mean, time.perf_counter() - t, params="em",
        mean_ess=float(imp.ess.mean()), min_ess=float(imp.ess.min()))
    enc = next((trained[n] for n in ("linear-full", "linear-diag", "mlp") if n in trained), None)
    if enc is not None:
        t = time.perf_counter()
        imp_g = importance_impute(fixed, x_nan, proposal=enc, num_particles=args.impute_particles,
                                  seed=args.seed)
        add(f"importance-{enc.kind}", imp_g.mean, time.perf_counter() - t, params="em",
            mean_ess=float(imp_g.ess.mean()), min_ess=float(imp_g.ess.min()))
    g2 = torch.Generator().manual_seed(args.seed + 303)
    train_mask = (torch.rand(x_train.shape, generator=g2, dtype=torch.float64)
                  < args.missing_frac).to(x_train.device)
    t = time.perf_counter()
    p_gaps, _ = em_missing(x_train.masked_fill(train_mask, float("nan")), args.latent_dim,
                          kind=kind, seed=args.seed, max_iter=args.em_iter, tol=1e-8)
    add("em-missing+exact", impute(x_nan, p_gaps)[0], time.perf_counter() - t,
        params=f"em on training rows with {args.missing_frac:.0%} entries hidden")
    if truth is not None:
        add("exact-conditional-truth", impute(x_nan, truth)[0], 0.0, params="true (oracle)")
    t = time.perf_counter()
    add("column-mean", column_mean_impute(x_nan), time.perf_counter() - t, params="none")
    return pd.DataFrame(out), mask, filled, p_gaps


def print_bayes(summary, ml_pd, bic_pd, n_free, post_df, nuts):
    rows = summary[summary.model == "bayes-fa"].copy()
    rows["ml_log_lik_per_datum"] = ml_pd
    rows["post_log_lik_per_datum"] = rows.get("diag_post_mean_log_lik", np.nan) / rows.n
    cols = ["engine", "guide", "bound", "elbo_per_datum", "ml_log_lik_per_datum",
            "post_log_lik_per_datum", "seconds", "converged"]
    common.print_table(rows, cols, title="Bayesian FA (nats per datum; log evidence intractable)")
    print(f"note: the VB ELBO bounds the Bayesian evidence log int p(x|theta) p(theta) dtheta, "
          f"below the ML log-likelihood by an Occam factor (BIC value with {n_free} free "
          f"parameters: {bic_pd:.4g}); so ELBO < ML log-lik is not an inference gap.")
    if nuts is not None:
        dg = nuts.diagnostics
        print(f"NUTS on C = W W^T + Psi, mu, log-lik: R-hat max {dg.get('r_hat_max', np.nan):.3f}, "
              f"ESS bulk min {dg.get('ess_bulk_min', np.nan):.0f}, tail min "
              f"{dg.get('ess_tail_min', np.nan):.0f}, divergences {dg['divergences']} "
              f"({'converged' if nuts.converged else 'NOT converged'} by R-hat <= "
              f"{nuts.settings['rhat_max']}, ESS >= {nuts.settings['ess_per_chain']}/chain)")
        z = (post_df.vb_mean - post_df.nuts_mean).abs() / post_df.nuts_sd
        ratio = post_df.vb_sd / post_df.nuts_sd
        print(f"posterior of C: max |VB - NUTS| mean = {z.max():.2f} NUTS sd; VB sd / NUTS sd "
              f"median {ratio.median():.2f} (min {ratio.min():.2f})")


def plot_imputation(x_test, mask, filled, path):
    methods = [m for m in ("exact-conditional", "importance-prior", "column-mean") if m in filled]
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 4), squeeze=False)
    truth = x_test[mask].double().cpu().numpy()
    lo, hi = truth.min(), truth.max()
    for ax, m in zip(axes[0], methods):
        ax.scatter(truth, filled[m][mask].double().cpu().numpy(), s=8, alpha=0.6)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("held-out truth")
    axes[0][0].set_ylabel("imputed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
