"""VAE on digits: IWAE/AIS evidence, the Cremer et al. (2018) gap study, generation and imputation.

    python -m elbolab.experiments.vae_gaps [--latent-dim 8 --hidden 256 --likelihood bernoulli
                                    --svi-epochs 1000 --iwae-particles 5000 --ais-steps 300
                                    --quick]

Two VAEs (same decoder architecture and initialization) are trained by SVI, one with the
amortized diagonal-Gaussian ("FFG") encoder ``mlp`` and one with the flow encoder ``flow`` (IAF),
each until its ELBO on a held-out tenth of the training images has not improved for
``--patience`` evaluations (every 5 epochs; best weights kept; ``--svi-epochs`` is only a cap);
summary.csv says how each network's training ended (``training_end``, ``training_note``).
For each, on ``--gap-points`` training and test images (Cremer, Li & Duvenaud 2018, Table 2):
log p(x) as the larger of two stochastic lower bounds, AIS (from the encoder's Gaussian, HMC
transitions) and IWAE (``--iwae-particles``), both kept (``gaps.tightest_evidence``), L[q*_Flow] (per-point flow, ``local-flow``), L[q*_FFG] (per-point diagonal Gaussian,
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
encoder_ffg.pt / encoder_flow.pt (encoder config + state_dict: ``elbolab.guides.amortized.load_encoder``),
samples.png, reconstructions.png, latent_map.png, gaps.png, elbo_curves.png. Pyro validation is
off unless --validate (speed).
"""

from __future__ import annotations

import sys
import time

import matplotlib

matplotlib.use("Agg")
import pandas as pd  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer.util import is_validation_enabled  # noqa: E402

from elbolab import guides  # noqa: E402
from elbolab.experiments.core import common, plots  # noqa: E402
from elbolab.experiments.vae_settings import (  # noqa: E402, F401  (the settings, re-exported)
    ENGINES,
    LABELS,
    TRAINABLE,
    Settings,
    check_data,
    parse,
    resolve,
)
from elbolab.experiments.vae_studies import (
    EVAL_EVERY_EPOCHS,
    capacity_sweep,
    figures,
    imputation,
    mcmc_reference,
    semi_amortized,
)
from elbolab.guides.amortized import save_encoder  # noqa: E402
from elbolab.inference.evaluation import diagnostics, gaps  # noqa: E402
from elbolab.inference.evaluation.ais import AisSettings, ais  # noqa: E402
from elbolab.inference.evaluation.evidence import iwae_from_log_joint  # noqa: E402
from elbolab.inference.runtime import isolated, synchronize  # noqa: E402
from elbolab.inference.svi.train_vae import train_vae, training_outcome  # noqa: E402
from elbolab.models.data import images  # noqa: E402
from elbolab.models.vae.model import VAE  # noqa: E402

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
    distributed = {}
    if args.strategy != "none":
        distributed = dict(strategy=args.strategy, devices=args.devices,
                           num_nodes=args.num_nodes)
    res = train_vae(vae, x_fit, guide=guide, guide_options=opts, epochs=cfg["svi_epochs"],
                    batch_size=args.batch_size, lr=args.svi_lr,
                    val_data=None if distributed else x_val,
                    eval_every_epochs=min(EVAL_EVERY_EPOCHS, cfg["svi_epochs"]),
                    patience=args.patience, eval_particles=min(cfg["eval_particles"], 100),
                    seed=seed, progress=args.progress, checkpoint=ck.get("checkpoint"),
                    checkpoint_every=ck.get("checkpoint_every", 0), resume=resume,
                    **distributed)
    if res is None:  # a distributed process other than global rank 0
        return vae, None, None
    res.guide = kind  # ffg / flow: the one name of each encoder in every table and figure
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
    w = iwae_from_log_joint(vae.log_joint, qz, x, num_samples=cfg["iwae_particles"], seed=seed)
    return a, w


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    """The command line: exit status 2 with one line naming the flag on a bad setting."""
    return common.entry("vae_gaps", _main, sys.argv[1:] if argv is None else argv)


def _main(argv) -> int:
    args = parse(argv)
    cfg = resolve(args)
    # under a launcher every process runs this command; only global rank 0 writes the study
    rank = common.process_rank(args.devices) if args.strategy == "ddp" else 0
    device, dtype = common.setup(args, "vae_gaps", writes=rank == 0)
    if args.strategy == "ddp" and device.type == "cuda":  # one GPU per process on the node
        device = torch.device("cuda", common.local_rank())
    data = load(args, device, dtype, args.seed)
    check_data(args, data)
    if rank != 0:
        return _train_only(args, cfg, data, rank)
    out = common.open_run(args, "vae_gaps")
    validation = is_validation_enabled()
    pyro.enable_validation(bool(args.validate))
    try:
        return _run(args, cfg, out, device, dtype, data)
    finally:
        pyro.enable_validation(validation)


def _fit_split(data, seed, device):
    """(training images, held-out images for early stopping) carved from the training set."""
    fit_idx, val_idx = images.split(data.x_train.shape[0], 0.1, seed)
    return (data.x_train[torch.as_tensor(fit_idx, device=device)],
            data.x_train[torch.as_tensor(val_idx, device=device)])


def _train_only(args, cfg, data, rank: int) -> int:
    """A distributed process other than global rank 0: take part in every training of the
    study, write nothing (rank 0 runs the rest and writes the study)."""
    x_fit, x_val = _fit_split(data, args.seed, data.x_train.device)
    for kind in cfg["kinds"]:
        train(kind, data, x_fit, x_val, args, cfg, args.seed)
    print(f"vae_gaps: process {rank} done training; rank 0 writes the study")
    return 0


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
    x_fit, x_val = _fit_split(data, seed, device)
    print(f"data: {data.info['source']} train {tuple(data.x_train.shape)} (fit {len(x_fit)}, "
          f"validation {len(x_val)}) test {tuple(data.x_test.shape)}; {args.likelihood}")

    models, results = {}, []
    for kind in cfg["kinds"]:
        vae, enc, res = train(kind, data, x_fit, x_val, args, cfg, seed)
        if res is None:
            raise common.CliError(
                "--strategy: Lightning made this process a rank other than 0, but the launcher's "
                "environment (RANK, LOCAL_RANK, NODE_RANK, SLURM_PROCID) said 0; unset stray "
                "rank variables or launch with torchrun")
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
                        num_particles=cfg["eval_particles"], seed=seed)
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
        s = max(2, min(cfg["iwae_particles"], 500))
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
    capped = [f"{row['train_encoder']} (step {row['training_steps']})" for row in summary
              if row["training_end"] == "step-cap"]
    if capped:  # an undertrained network: every number of the study is of it
        print(f"WARNING: training reached its epoch cap before early stopping: "
              f"{', '.join(capped)} (--svi-epochs {cfg['svi_epochs']}, --capacity-epochs "
              f"{cfg['capacity_epochs']}); those networks are undertrained")
    lap("summary_iwae_and_capacity")
    summary_df = pd.DataFrame(summary)
    cols = [c for c in common.SUMMARY_COLUMNS if c in summary_df.columns]
    summary_df = summary_df[cols + [c for c in summary_df.columns if c not in cols]]
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
    # the ffg encoder's q is "q (encoder)" in reference.csv: its row carries any flag
    summary_df = common.flag_summary(
        summary_df, ["q (encoder)" if k == "ffg" else None for k in summary_df.train_encoder],
        ref_df if "mcmc" in cfg["engines"] else pd.DataFrame())
    summary_df.to_csv(out / "summary.csv", index=False)

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
        "seconds": clock[0] - t_start, "stage_seconds": stages, "training_capped": capped,
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
    row = diagnostics.psis_row(result, x, num_samples=cfg["eval_particles"], seed=seed)
    row["psis_note"] = f"on {x.shape[0]} training images" + (
        f"; {row['psis_note']}" if row["psis_note"] else "")
    return row


# ----------------------------------------------------------------------------- capacity


# ----------------------------------------------------------------------------- semi-amortized


# ----------------------------------------------------------------------------- MCMC


# ----------------------------------------------------------------------------- imputation


# ----------------------------------------------------------------------------- figures


if __name__ == "__main__":
    raise SystemExit(main())
