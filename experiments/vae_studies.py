"""The later stages of :mod:`elbolab.experiments.vae_gaps`: the encoder-capacity sweep, the semi-amortized
guide, the NUTS reference over z, imputation of missing pixels, and the figures.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from elbolab import guides
from elbolab.experiments.core import common, plots
from elbolab.inference import mcmc
from elbolab.inference.evaluation.pointwise import pointwise_elbo
from elbolab.inference.evaluation.reference import (
    component_names,
    flag_reference,
    guide_draws,
    reference_flag,
    reference_table,
)
from elbolab.inference.impute import importance_impute, pseudo_gibbs_impute, rmse
from elbolab.inference.runtime import Timer, isolated
from elbolab.inference.svi.train_vae import train_vae

#: the held-out ELBO of early stopping is evaluated every this many epochs
EVAL_EVERY_EPOCHS = 5


def capacity_sweep(vae, x_fit, x_gap, qstars, args, cfg, seed, x_val=None):
    """New FFG encoders of several widths, decoder fixed, each trained until the held-out ELBO
    on ``x_val`` stops improving (``--patience``); amortization gap vs q*_FFG."""
    terms = qstars["ffg", "train", "ffg"]
    l_star, l_star_se = terms.values["elbo_q_star"], terms.se["elbo_q_star"]
    n = x_gap.shape[0]
    rows, results = [], []
    for i, h in enumerate(cfg["capacities"]):
        ck, resume = common.checkpointing(args, f"capacity-{i}-{h}")
        res = train_vae(vae, x_fit, guide="mlp",
                        guide_options={"hidden": (h,), "name": f"encoder_cap{h}"},
                        epochs=cfg["capacity_epochs"], batch_size=args.batch_size, lr=args.svi_lr,
                        val_data=x_val, patience=args.patience if x_val is not None else 0,
                        eval_every_epochs=min(EVAL_EVERY_EPOCHS, cfg["capacity_epochs"]),
                        eval_particles=min(cfg["eval_particles"], 100), seed=seed,
                        learn_model_params=False, checkpoint=ck.get("checkpoint"),
                        checkpoint_every=ck.get("checkpoint_every", 0), resume=resume)
        res.guide = f"ffg-{h}"  # an FFG encoder of h hidden units (the study's name: ffg)
        enc = res.state.guide
        with isolated(seed):
            est = pointwise_elbo(vae.model, enc, x_gap, num_particles=cfg["eval_particles"])
        gap = l_star - est.value
        rows.append({"encoder_hidden": h, "elbo_amortized": float(est.value.mean()),
                     "elbo_q_star": float(l_star.mean()),
                     "amortization_gap": float(gap.mean()),
                     "amortization_gap_se": float((est.se.pow(2) + l_star_se.pow(2)).sum().sqrt())
                     / n,
                     "encoder_params": sum(p.numel() for p in enc.parameters()), "n": n,
                     "split": "train", "unit": "nats per image"})
        results.append((res, h))
    return pd.DataFrame(rows), results


def semi_amortized(model, subsets, qstars, elbo_q, cfg, seed):
    """L[q_K] for the trained FFG encoder refined by K steps; share of L[q*] - L[q] recovered."""
    vae, enc = model
    spec = guides.for_family(vae)["semi-amortized"]
    rows = []
    for split, x in subsets.items():
        l_star = qstars["ffg", split, "ffg"].values["elbo_q_star"].mean()
        l_q = elbo_q["ffg", split][0].mean()
        for k in cfg["sa_steps"]:
            guide = spec.build(vae, x, encoder=enc, steps=k)
            with isolated(seed), Timer(x.device) as t:
                est = pointwise_elbo(vae.model, guide, x, num_particles=cfg["eval_particles"])
            value = float(est.value.mean())
            rows.append({"split": split, "steps": k, "elbo": value,
                         "elbo_se": float(est.se.pow(2).sum().sqrt()) / x.shape[0],
                         "elbo_q_star": float(l_star), "elbo_amortized": float(l_q),
                         "gap_recovered_fraction": (value - float(l_q)) / float(l_star - l_q)
                         if float(l_star - l_q) > 0 else math.nan,
                         "seconds": t.seconds, "n": x.shape[0], "unit": "nats per image"})
    return pd.DataFrame(rows)


def mcmc_reference(model, x_test, qstars, args, cfg, seed):
    """NUTS over z (decoder fixed) on a few test images, against q*_FFG and the encoder q.
    Unless NUTS converged by :func:`elbolab.inference.mcmc.nuts.convergence` (``nuts_converged``), every
    number against it carries ``ref_flag`` (mcmc.csv, reference.csv)."""
    vae, enc = model
    m = min(cfg["nuts_points"], x_test.shape[0])
    x = x_test[:m]
    s = mcmc.Settings(num_samples=cfg["nuts_samples"], warmup=cfg["nuts_warmup"],
                      num_chains=cfg["nuts_chains"], max_tree_depth=cfg["nuts_depth"],
                      jit=cfg["nuts_jit"], progress=args.progress)
    with isolated(seed):
        run = mcmc.run_nuts(vae.mcmc_model, (x,), s, seed, max_plate_nesting=1)
    z = run.samples["z"].detach()  # (chain, draw, m, k)
    diag = mcmc.invariant_diagnostics({"z": z})
    converged, why = mcmc.convergence(diag, s)  # the rule of mcmc.fit: flag what uses it
    flat = z.reshape(-1, m, z.shape[-1]).double()
    mean, sd = flat.mean(0), flat.std(0)
    qstar = qstars["ffg", "test", "ffg"].q_star
    with torch.no_grad():
        loc_s, tril_s = qstar.moments(x_test)
        loc_q, tril_q = enc.moments(x)
    rows = []
    for name, loc, sdq in (("q*_FFG", loc_s[:m], tril_s[:m].diagonal(dim1=-2, dim2=-1)),
                           ("q (encoder)", loc_q, tril_q.diagonal(dim1=-2, dim2=-1))):
        loc, sdq = loc.detach().double().cpu(), sdq.detach().double().cpu()
        z_err = ((loc - mean.cpu()) / sd.cpu()).abs()
        ratio = sdq / sd.cpu()
        # KL(N(m_q, s_q^2) || N(m_mcmc, s_mcmc^2)) per dimension, summed: a Gaussian summary
        kl = (torch.log(sd.cpu() / sdq) + (sdq**2 + (loc - mean.cpu()) ** 2) / (2 * sd.cpu()**2)
              - 0.5).sum(-1)
        rows.append({"approximation": name, "points": m,
                     "mean_abs_standardized_error": float(z_err.mean()),
                     "max_abs_standardized_error": float(z_err.max()),
                     "sd_ratio_mean": float(ratio.mean()), "sd_ratio_min": float(ratio.min()),
                     "gaussian_kl_to_nuts_per_point": float(kl.mean()),
                     "nuts_r_hat_max": diag.get("r_hat_max", math.nan),
                     "nuts_ess_bulk_min": diag.get("ess_bulk_min", math.nan),
                     "nuts_divergences": int(sum(run.divergences)),
                     "nuts_draws": int(flat.shape[0]), "nuts_converged": converged,
                     "ref_flag": reference_flag("mcmc/nuts", why) if not converged else ""})
    df = pd.DataFrame(rows)
    common.print_table(df, list(df.columns[:7]), "NUTS reference (ffg decoder fixed)")
    # reference.csv: every z_ij marginal of q*_FFG, q*_Flow and q against NUTS's
    S = int(flat.shape[0])
    draws = {"mcmc/nuts": flat.reshape(S, -1)}
    for name, guide, xs in (("q*_FFG", qstar, x_test), ("q (encoder)", enc, x),
                            ("q*_Flow", qstars.get(("ffg", "test", "flow")), x_test)):
        if guide is None:
            continue
        guide = getattr(guide, "q_star", guide)
        with isolated(seed):
            zq = guide_draws(guide, xs, num_samples=S, seed=seed)["z"][:, :m]
        draws[name] = zq.reshape(S, -1)
    names = component_names("z", (m, z.shape[-1]))
    return df, flag_reference(reference_table(draws, "mcmc/nuts", names), converged, why), z


def masks(x, image_shape, seed):
    """'top-half' (first half of the image rows missing) and 'random-50' (i.i.d., p = 0.5)."""
    n, d = x.shape
    out = {}
    h = image_shape[0] if len(image_shape) >= 2 else 1
    if h >= 2:
        img = torch.zeros(image_shape, dtype=torch.bool)
        img[: h // 2] = True
        out["top-half"] = img.reshape(1, -1).expand(n, d).to(x.device)
    g = torch.Generator().manual_seed(seed + 7)
    out["random-50"] = (torch.rand(n, d, generator=g) < 0.5).to(x.device)
    return out


def imputation(model, data, x_fit, args, cfg, seed):
    """RMSE on the missing pixels of test images, against the truth."""
    from elbolab.models.fa.model import fit_em
    from elbolab.models.fa.model import impute as fa_impute

    vae, enc = model
    x = data.x_test[: cfg["impute_points"]]
    fa_params, _ = fit_em(x_fit.double(), args.latent_dim, max_iter=500, tol=1e-6, seed=seed)
    rows = []
    for mname, mask in masks(x, data.image_shape, seed).items():
        x_nan = torch.where(mask, torch.full((), math.nan, dtype=x.dtype, device=x.device), x)
        filled = {}
        with isolated(seed):
            imp = importance_impute(vae, x_nan, proposal=enc,
                                    num_particles=cfg["impute_particles"], seed=seed)
        filled["importance (encoder proposal)"] = imp.mean
        with isolated(seed):
            imp_p = importance_impute(vae, x_nan, proposal="prior",
                                      num_particles=cfg["impute_particles"], seed=seed)
        filled["importance (prior proposal)"] = imp_p.mean
        filled["pseudo-Gibbs"] = pseudo_gibbs_impute(
            vae, enc, x_nan, steps=cfg["gibbs_steps"], burn_in=cfg["gibbs_steps"] // 5,
            fill=x_fit.mean(0), seed=seed)
        # baselines: training pixel means, and the exact conditional under an FA fit
        train_mean = x_fit.mean(0).expand_as(x)
        filled["pixel mean (train)"] = torch.where(mask, train_mean, x)
        fa_fill, _ = fa_impute(x_nan.double(), fa_params)
        filled["factor analysis (exact conditional)"] = fa_fill.to(x.dtype)
        for method, value in filled.items():
            row = {"mask": mname, "method": method, "rmse": rmse(value, x, mask),
                   "n_missing": int(mask.sum()), "n_images": x.shape[0]}
            if data.binary:
                p = value[mask].clamp(0, 1)
                row["error_rate"] = float(((p >= 0.5).to(x.dtype) != x[mask]).to(x.dtype).mean())
            if method.startswith("importance (encoder"):
                row["min_ess"] = float(imp.ess.min())
            rows.append(row)
    return pd.DataFrame(rows)


def _grid(images, shape, ncol):
    images = images.detach().cpu().reshape(-1, *shape[-2:]) if len(shape) >= 2 else \
        images.detach().cpu().reshape(-1, 1, shape[-1])
    n, h, w = images.shape
    nrow = math.ceil(n / ncol)
    canvas = np.full((nrow * (h + 1) + 1, ncol * (w + 1) + 1), 0.25)  # grey separators
    for i in range(n):
        r, c = divmod(i, ncol)
        canvas[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = \
            images[i].numpy()
    return canvas


def figures(models, results, data, gap_df, out, seed):
    vae, enc = models["ffg"]
    shape = data.image_shape
    g = torch.Generator().manual_seed(seed)
    ref = data.x_test
    with torch.no_grad():
        z = torch.randn(64, vae.latent_dim, generator=g).to(ref)
        samples = vae.mean(z)
        x = data.x_test[:16]
        recon = vae.mean(enc.moments(x)[0])
        loc, _ = enc.moments(data.x_test)
    for name, img, title in (("samples.png", _grid(samples, shape, 8),
                              "prior samples (decoder means), ffg model"),
                             ("reconstructions.png",
                              _grid(torch.stack([x, recon], 1).reshape(-1, x.shape[1]), shape, 8),
                              "test images (left) and reconstructions (right)")):
        fig, ax = plt.subplots(figsize=(6, 6 * img.shape[0] / img.shape[1] + 0.5))
        ax.imshow(img, cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    # latent map: encoder means, projected on their first two principal axes when k > 2
    mu = loc.double().cpu()
    if mu.shape[1] > 2:
        c = mu - mu.mean(0)
        _, _, vt = torch.linalg.svd(c, full_matrices=False)
        mu, label = c @ vt[:2].T, "PCA of encoder means"
    else:
        label = "encoder means"
    fig, ax = plt.subplots(figsize=(6, 5))
    colours = data.y_test if data.y_test is not None else np.zeros(mu.shape[0])
    sc = ax.scatter(mu[:, 0], mu[:, 1], c=colours, cmap="tab10", s=8)
    if data.y_test is not None:
        fig.colorbar(sc, ax=ax, label="digit")
    ax.set_title(f"2-D latent map of test images ({label})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "latent_map.png", dpi=110)
    plt.close(fig)
    # gaps: stacked approximation + amortization = inference gap
    fig, ax = plt.subplots(figsize=(10, 4.4))
    labels = [f"{r.train_encoder}-trained\n{r.split}\nq* = {r.eval_family}"
              for r in gap_df.itertuples()]
    pos = np.arange(len(gap_df))
    ax.bar(pos, gap_df["approximation_gap"], label="approximation gap",
           yerr=gap_df["approximation_gap_se"], capsize=2)
    ax.bar(pos, gap_df["amortization_gap"], bottom=gap_df["approximation_gap"],
           label="amortization gap", yerr=gap_df["amortization_gap_se"], capsize=2)
    ax.set_xticks(pos, labels, fontsize=9)
    ax.set_ylabel("nats per image")
    ax.set_title("inference gap = approximation + amortization (log p(x): larger of AIS, IWAE)",
                 fontsize=11)
    plots.legend_below(ax).set_bbox_to_anchor((0.5, -0.25))
    fig.savefig(out / "gaps.png", dpi=plots.DPI, bbox_inches="tight")
    plt.close(fig)
    # ELBO curves: training (moving average) and held-out
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, res in zip(models, results):
        tr = np.asarray(res.trace) / res.n_data
        w = max(1, min(25, len(tr) // 10))
        if len(tr):  # a run that diverged at its first steps kept no step of its trace
            smooth = np.convolve(tr, np.ones(w) / w, mode="valid")
            ax.plot(np.arange(len(smooth)) + w - 1, smooth, label=f"{kind} train (minibatch)")
        val = res.state.run.val_trace
        if val:
            ax.plot(*zip(*val), "o--", ms=3, label=f"{kind} held-out")
    ax.set_xlabel("SVI step")
    ax.set_ylabel("ELBO per image (nats)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=plots.LEGEND_FONTSIZE)
    fig.tight_layout()
    fig.savefig(out / "elbo_curves.png", dpi=plots.DPI)
    plt.close(fig)
