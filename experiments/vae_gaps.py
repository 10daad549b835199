"""VAE on digits: IWAE/AIS evidence, the Cremer et al. (2018) gap study, generation and imputation.

    python -m experiments.vae_gaps [--latent-dim 8 --hidden 256 --likelihood bernoulli
                                    --epochs 1000 --iwae-samples 5000 --ais-steps 300 --quick]

Two VAEs (same decoder architecture and initialization) are trained by SVI, one with the
amortized diagonal-Gaussian ("FFG") encoder ``mlp`` and one with the flow encoder ``flow`` (IAF),
each until its ELBO on a held-out tenth of the training images has not improved for
``--patience`` evaluations (every 5 epochs; best weights kept; ``--epochs`` is only a cap);
summary.csv says how each network's training ended (``training_end``, ``training_note``).
For each, on ``--gap-points`` training and test images (Cremer, Li & Duvenaud 2018, Table 2):
log p(x) as the larger of two stochastic lower bounds, AIS (from the encoder's Gaussian, HMC
transitions) and IWAE (``--iwae-samples``), both kept (``gaps.tightest_evidence``), L[q*_Flow] (per-point flow, ``local-flow``), L[q*_FFG] (per-point diagonal Gaussian,
``mean-field``), L[q] (the encoder), and approximation = log p - L[q*], amortization = L[q*] - L[q]
and inference = log p - L[q] gaps, all per data point (nats) with Monte Carlo SEs, the PSIS
k-hat / ESS of q's and q*'s weights, and flags (a gap below zero by > 3 SE, a k-hat > 0.7).
summary.csv adds each trained pair's PSIS k-hat on the gap-study training images.

Also: an encoder-capacity sweep (new FFG encoders of several widths trained with the FFG decoder
fixed: amortization gap against the same q*_FFG), the semi-amortized guide (K SVI steps per
point from the trained encoder: share of the amortization gap recovered), NUTS over z with the
decoder fixed on a few test images (posterior means/sds, R-hat, ESS against q* and q), samples,
reconstructions, a 2-D latent map, and imputation of missing pixels (importance resampling,
pseudo-Gibbs, pixel means, exact factor-analysis imputation).

Outputs in --out: summary.csv, gaps.csv, capacity.csv, semi_amortized.csv, mcmc.csv,
reference.csv (each z_ij marginal of q*_FFG, q*_Flow and q against NUTS: mean error, sd ratio,
W1), mcmc_diagnostics.csv / mcmc_trace.png / mcmc_rank.png (NUTS per coordinate), imputation.csv, run.json, vae_ffg.pt / vae_flow.pt (decoder state_dicts + settings),
encoder_ffg.pt / encoder_flow.pt (encoder config + state_dict: ``guides.amortized.load_encoder``),
samples.png, reconstructions.png, latent_map.png, gaps.png, elbo_curves.png. Pyro validation is
off unless --validate (speed).
"""

from __future__ import annotations

import math
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer.util import is_validation_enabled  # noqa: E402

import guides  # noqa: E402
from experiments import common, plots  # noqa: E402
from experiments.vae_settings import (  # noqa: E402, F401  (the settings, re-exported)
    ENGINES,
    LABELS,
    TRAINABLE,
    Settings,
    check_data,
    parse,
    resolve,
)
from guides.amortized import save_encoder  # noqa: E402
from inference import diagnostics, gaps, mcmc  # noqa: E402
from inference.ais import AisSettings, ais  # noqa: E402
from inference.evidence import iwae_from_log_joint  # noqa: E402
from inference.impute import importance_impute, pseudo_gibbs_impute, rmse  # noqa: E402
from inference.pointwise import pointwise_elbo  # noqa: E402
from inference.reference import guide_draws, reference_table  # noqa: E402
from inference.runtime import Timer, isolated, synchronize  # noqa: E402
from inference.train_vae import train_vae, training_outcome  # noqa: E402
from models.data import images  # noqa: E402
from models.vae import VAE  # noqa: E402

ENCODERS = {"ffg": "mlp", "flow": "flow"}
FAMILIES = {"ffg": "mean-field", "flow": "local-flow"}
GAP_COLUMNS = [
    "train_encoder", "eval_family", "split", "n", "log_evidence", "log_evidence_se",
    "log_evidence_method", "iwae", "iwae_se", "elbo_q_star", "elbo_q_star_se", "elbo_amortized",
    "elbo_amortized_se", "approximation_gap", "approximation_gap_se", "amortization_gap",
    "amortization_gap_se", "inference_gap", "inference_gap_se", "q_star_converged",
    "q_star_steps", "unit", "ais", "ais_se", "khat_amortized", "khat_q_star", "ess_amortized",
    "log_evidence_ess", "flagged", "flags",
]
#: the held-out ELBO of early stopping is evaluated every this many epochs
EVAL_EVERY_EPOCHS = 5


def load(args, device, dtype, seed) -> images.ImageData:
    binary = args.likelihood == "bernoulli"
    if args.data is None:
        return images.load_digits(binarize=binary, seed=seed, device=device, dtype=dtype)
    try:
        return images.load_images(args.data, binarize=binary, seed=seed, device=device,
                                  dtype=dtype)
    except (ValueError, OSError) as exc:
        raise common.data_error(exc) from None


# ----------------------------------------------------------------------------- training
def train(kind, data, x_fit, x_val, args, cfg, seed):
    hidden = cfg["hidden"]
    vae = VAE(data.data_dim, args.latent_dim, hidden, likelihood=args.likelihood,
              var_floor=args.var_floor, seed=seed, module_name=f"decoder_{kind}")
    guide = ENCODERS.get(kind, kind)
    opts = {"name": f"encoder_{kind}"}
    if guide in ("mlp", "flow"):
        opts["hidden"] = hidden
    if kind == "flow":
        opts.update(flow=args.flow, num_flows=cfg["num_flows"])
    ck, resume = common.checkpointing(args, f"train-{kind}")
    res = train_vae(vae, x_fit, guide=guide, guide_options=opts, epochs=cfg["epochs"],
                    batch_size=args.batch_size, lr=args.lr, val_data=x_val,
                    eval_every_epochs=min(EVAL_EVERY_EPOCHS, cfg["epochs"]),
                    patience=args.patience, eval_particles=min(cfg["elbo_samples"], 100),
                    seed=seed, progress=not args.no_progress, checkpoint=ck.get("checkpoint"),
                    checkpoint_every=ck.get("checkpoint_every", 0), resume=resume)
    res.guide = f"{guide}" + (f"-{args.flow}" if kind == "flow" else "")
    return vae, res.state.guide, res


def gaussian_proposal(encoder, x):
    """The encoder's q(z | x) as a Gaussian (the flow's moment-matched one), for AIS."""
    with torch.no_grad():
        loc, tril = encoder.moments(x)
    if encoder.diagonal:
        return torch.distributions.Independent(
            torch.distributions.Normal(loc, tril.diagonal(dim1=-2, dim2=-1)), 1)
    return torch.distributions.MultivariateNormal(loc, scale_tril=tril)


def evidence(vae, encoder, x, cfg, seed):
    """(AIS estimate, IWAE estimate) per point for the trained pair."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # a flow's moments are sampled: seed them
        torch.manual_seed(seed)
        q = gaussian_proposal(encoder, x)
    a = ais(vae.log_joint, q, x, AisSettings(num_steps=cfg["ais_steps"],
                                             num_chains=cfg["ais_chains"]), seed=seed)
    with torch.no_grad():
        qz = encoder.distribution(x)
    w = iwae_from_log_joint(vae.log_joint, qz, x, num_samples=cfg["iwae_samples"], seed=seed)
    return a, w


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    """The command line: exit status 2 with one line naming the flag on a bad setting."""
    return common.entry("vae_gaps", _main, sys.argv[1:] if argv is None else argv)


def _main(argv) -> int:
    args = parse(argv)
    cfg = resolve(args)
    device, dtype = common.setup(args, "vae_gaps")
    data = load(args, device, dtype, args.seed)
    check_data(args, data)
    out = common.open_run(args, "vae_gaps")
    validation = is_validation_enabled()
    pyro.enable_validation(bool(args.validate))
    try:
        return _run(args, cfg, out, device, dtype, data)
    finally:
        pyro.enable_validation(validation)


def _run(args, cfg, out, device, dtype, data) -> int:
    seed = args.seed
    t_start = time.perf_counter()
    stages, clock = {}, [t_start]

    def lap(name):
        synchronize(device)  # CUDA work queued in the stage is counted in it
        now = time.perf_counter()
        stages[name] = round(now - clock[0], 2)
        clock[0] = now
    # a validation split for early stopping, carved from the training images
    fit_idx, val_idx = images.split(data.x_train.shape[0], 0.1, seed)
    x_fit = data.x_train[torch.as_tensor(fit_idx, device=device)]
    x_val = data.x_train[torch.as_tensor(val_idx, device=device)]
    print(f"data: {data.info['source']} train {tuple(data.x_train.shape)} (fit {len(fit_idx)}, "
          f"validation {len(val_idx)}) test {tuple(data.x_test.shape)}; {args.likelihood}")

    models, results = {}, []
    for kind in cfg["kinds"]:
        vae, enc, res = train(kind, data, x_fit, x_val, args, cfg, seed)
        models[kind] = (vae, enc)
        results.append(res)
        print(f"trained {kind}: ELBO {res.elbo_per_datum:.3f} nats/image "
              f"({res.seconds:.1f}s; {training_outcome(res)['training_note']})")
        vae.save(out / f"vae_{kind}.pt")
        save_encoder(out / f"encoder_{kind}.pt", enc)  # config + state_dict

    lap("training")
    # -- gap subsets
    g = torch.Generator().manual_seed(seed)
    subsets = {}
    for split, x in (("train", x_fit), ("test", data.x_test)):
        m = min(cfg["gap_points"], x.shape[0])
        idx = torch.randperm(x.shape[0], generator=g)[:m].sort().values
        subsets[split] = x[idx.to(device)]

    # -- evidence, gaps
    gap_rows, evid, qstars, elbo_q = [], {}, {}, {}
    for kind, (vae, enc) in models.items():
        for split, x in subsets.items():
            a, w = evidence(vae, enc, x, cfg, seed)
            evid[kind, split] = (a, w)
            best = gaps.tightest_evidence(a, w)  # both are lower bounds: the larger is tighter
            for fam_kind, fam in FAMILIES.items():
                spec = guides.for_family(vae)[fam]
                with isolated(seed):
                    terms = gaps.gap_terms(
                        vae, x, enc, spec, log_evidence=best,
                        settings=gaps.QStarSettings(steps=cfg["qstar_steps"]),
                        num_particles=cfg["elbo_samples"], seed=seed)
                qstars[kind, split, fam_kind] = terms
                elbo_q[kind, split] = (terms.values["elbo_amortized"], terms.se["elbo_amortized"])
                gap_rows.append(_gap_row(kind, fam_kind, split, terms, best, a, w))
            print(f"gaps {kind}-trained / {split}: log p(x) {best.per_datum:.3f} "
                  f"({best.method}; AIS {a.per_datum:.3f}, IWAE {w.per_datum:.3f})")
    lap("evidence_and_gaps")
    gap_df = pd.DataFrame(gap_rows)[GAP_COLUMNS]
    gap_df.to_csv(out / "gaps.csv", index=False)
    common.print_table(gap_df, ["train_encoder", "eval_family", "split", "log_evidence",
                                "elbo_q_star", "elbo_amortized", "approximation_gap",
                                "amortization_gap", "inference_gap"],
                       "gaps (nats per image; Cremer et al. 2018 Table 2 layout)")

    # -- summary rows (full training data; log evidence by IWAE on the same data)
    summary = []
    for kind, res in zip(models, results):
        vae, enc = models[kind]
        with torch.no_grad():
            q = enc.distribution(x_fit)
        s = max(2, min(cfg["iwae_samples"], 500))
        est = iwae_from_log_joint(vae.log_joint, q, x_fit, num_samples=s, seed=seed)
        row = res.to_row(est)
        row.update(train_encoder=kind, evidence_note=f"IWAE S={s} (a lower bound)",
                   **training_outcome(res), **psis_on(res, subsets["train"], cfg, seed))
        summary.append(row)

    cap_df, cap_results = capacity_sweep(models["ffg"][0], x_fit, subsets["train"], qstars,
                                         args, cfg, seed, x_val=x_val)
    for r, h in cap_results:
        row = r.to_row()
        row.update(train_encoder=f"capacity-{h}", evidence_note="decoder fixed (ffg)",
                   **training_outcome(r), **psis_on(r, subsets["train"], cfg, seed))
        summary.append(row)
    lap("summary_iwae_and_capacity")
    summary_df = pd.DataFrame(summary)
    cols = [c for c in common.SUMMARY_COLUMNS if c in summary_df.columns]
    summary_df = summary_df[cols + [c for c in summary_df.columns if c not in cols]]
    summary_df.to_csv(out / "summary.csv", index=False)
    cap_df.to_csv(out / "capacity.csv", index=False)
    common.print_table(cap_df, list(cap_df.columns[:6]), "encoder capacity (ffg decoder fixed)")

    sa_df = semi_amortized(models["ffg"], subsets, qstars, elbo_q, cfg, seed)
    sa_df.to_csv(out / "semi_amortized.csv", index=False)
    lap("semi_amortized")
    common.print_table(sa_df, ["split", "steps", "elbo", "gap_recovered_fraction"],
                       "semi-amortized refinement (ffg model)")

    if "mcmc" in cfg["engines"]:
        mc_df, ref_df, z_nuts = mcmc_reference(models["ffg"], subsets["test"], qstars, args, cfg,
                                               seed)
        mc_df.to_csv(out / "mcmc.csv", index=False)
        ref_df.to_csv(out / "reference.csv", index=False)
        plots.mcmc_outputs({"z": z_nuts}, out, ["z"])
        lap("mcmc")

    imp_df = imputation(models["ffg"], data, x_fit, args, cfg, seed)
    imp_df.to_csv(out / "imputation.csv", index=False)
    lap("imputation")
    common.print_table(imp_df, ["mask", "method", "rmse", "n_missing"], "imputation (test)")

    figures(models, results, data, gap_df, out, seed)
    lap("figures")
    final = common.finish(out, args, device, {
        "resolved": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        "data": data.info, "image_shape": list(data.image_shape),
        "likelihood": args.likelihood, "variance_floor": args.var_floor,
        "bounds": {"log_evidence": "the larger of AIS and IWAE (both stochastic lower bounds)",
                   "iwae": "IWAE lower bound", "ais": "AIS lower bound",
                   "elbo": "ELBO (Monte Carlo)"},
        "seconds": clock[0] - t_start, "stage_seconds": stages,
    })
    print(f"wrote {', '.join(sorted(p.name for p in final.iterdir()))} to {final}/ in "
          f"{time.perf_counter() - t_start:.1f}s")
    return 0


def _gap_row(kind, fam_kind, split, terms, best, a, w):
    """One gaps.csv row (nats per image): log p(x) is the larger of the AIS and IWAE lower
    bounds (``gaps.tightest_evidence``), both kept; diagnostics and flags from the mean row."""
    v, s = terms.values, terms.se
    n = v["log_evidence"].shape[0]
    note = (f"{best.method} (larger of ais: {a.details['num_steps']} steps x "
            f"{a.details['num_chains']} chains, and iwae: {w.details['num_samples']} samples)")
    mean = gaps.summary_row(terms.frame())
    row = {"train_encoder": kind, "eval_family": fam_kind, "split": split, "n": n,
           "log_evidence_method": note,
           "iwae": w.per_datum, "iwae_se": w.se / n, "ais": a.per_datum, "ais_se": a.se / n,
           "q_star_converged": terms.run.converged, "q_star_steps": terms.run.steps,
           "unit": "nats per image",
           **{k: mean[k] for k in ("khat_amortized", "khat_q_star", "ess_amortized",
                                   "log_evidence_ess", "flagged")},
           "flags": mean["flags"] or "none"}
    for q in gaps.QUANTITIES:
        row[q] = float(v[q].double().mean())
        row[f"{q}_se"] = float(s[q].double().pow(2).sum().sqrt()) / n
    return row


def psis_on(result, x, cfg, seed) -> dict:
    """PSIS k-hat of a trained pair's weights on the gap-study training images (columns)."""
    row = diagnostics.psis_row(result, x, num_samples=cfg["elbo_samples"], seed=seed)
    row["psis_note"] = f"on {x.shape[0]} training images" + (
        f"; {row['psis_note']}" if row["psis_note"] else "")
    return row


# ----------------------------------------------------------------------------- capacity
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
                        epochs=cfg["capacity_epochs"], batch_size=args.batch_size, lr=args.lr,
                        val_data=x_val, patience=args.patience if x_val is not None else 0,
                        eval_every_epochs=min(EVAL_EVERY_EPOCHS, cfg["capacity_epochs"]),
                        eval_particles=min(cfg["elbo_samples"], 100), seed=seed,
                        learn_model_params=False, checkpoint=ck.get("checkpoint"),
                        checkpoint_every=ck.get("checkpoint_every", 0), resume=resume)
        res.guide = f"mlp-{h}"
        enc = res.state.guide
        with isolated(seed):
            est = pointwise_elbo(vae.model, enc, x_gap, num_particles=cfg["elbo_samples"])
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


# ----------------------------------------------------------------------------- semi-amortized
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
                est = pointwise_elbo(vae.model, guide, x, num_particles=cfg["elbo_samples"])
            value = float(est.value.mean())
            rows.append({"split": split, "steps": k, "elbo": value,
                         "elbo_se": float(est.se.pow(2).sum().sqrt()) / x.shape[0],
                         "elbo_q_star": float(l_star), "elbo_amortized": float(l_q),
                         "gap_recovered_fraction": (value - float(l_q)) / float(l_star - l_q)
                         if float(l_star - l_q) > 0 else math.nan,
                         "seconds": t.seconds, "n": x.shape[0], "unit": "nats per image"})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- MCMC
def mcmc_reference(model, x_test, qstars, args, cfg, seed):
    """NUTS over z (decoder fixed) on a few test images, against q*_FFG and the encoder q."""
    vae, enc = model
    m = min(cfg["mcmc_points"], x_test.shape[0])
    x = x_test[:m]
    s = mcmc.Settings(num_samples=cfg["mcmc_samples"], warmup=cfg["mcmc_samples"],
                      num_chains=cfg["mcmc_chains"], progress=not args.no_progress)
    with isolated(seed):
        run = mcmc.run_nuts(vae.mcmc_model, (x,), s, seed, max_plate_nesting=1)
    z = run.samples["z"].detach()  # (chain, draw, m, k)
    diag = mcmc.invariant_diagnostics({"z": z})
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
                     "nuts_draws": int(flat.shape[0])})
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
    names = [f"z[{i},{j}]" for i in range(m) for j in range(z.shape[-1])]
    return df, reference_table(draws, "mcmc/nuts", names), z


# ----------------------------------------------------------------------------- imputation
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
    from models.fa import fit_em
    from models.fa import impute as fa_impute

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


# ----------------------------------------------------------------------------- figures
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
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r.train_encoder}-trained\n{r.split}, q*={r.eval_family}"
              for r in gap_df.itertuples()]
    pos = np.arange(len(gap_df))
    ax.bar(pos, gap_df["approximation_gap"], label="approximation gap",
           yerr=gap_df["approximation_gap_se"], capsize=2)
    ax.bar(pos, gap_df["amortization_gap"], bottom=gap_df["approximation_gap"],
           label="amortization gap", yerr=gap_df["amortization_gap_se"], capsize=2)
    ax.set_xticks(pos, labels, fontsize=6)
    ax.set_ylabel("nats per image")
    ax.set_title("inference gap = approximation + amortization (log p(x): larger of AIS, IWAE)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gaps.png", dpi=110)
    plt.close(fig)
    # ELBO curves: training (moving average) and held-out
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, res in zip(models, results):
        tr = np.asarray(res.trace) / res.n_data
        w = max(1, min(25, len(tr) // 10))
        smooth = np.convolve(tr, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(len(smooth)) + w - 1, smooth, label=f"{kind} train (minibatch)")
        val = res.state.run.val_trace
        if val:
            ax.plot(*zip(*val), "o--", ms=3, label=f"{kind} held-out")
    ax.set_xlabel("SVI step")
    ax.set_ylabel("ELBO per image (nats)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "elbo_curves.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
