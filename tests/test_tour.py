"""The tour's settings: every study's flags parse, its VAEs train to early stopping (a VAE
stopped at a step cap is an untrained network whose every number misleads) and its NUTS references
have the draws to converge (an unconverged reference makes every comparison against it
provisional; issue 17)."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from elbolab.experiments import tour, vae_gaps
from elbolab.inference import mcmc

VAE_FLAGS = tour.STUDIES["vae_gaps"]

# Measured, not computed by the code under test: ESS per draw of every quantity a tour reference
# is diagnosed on (bulk, then folded: R-hat is the larger of the rank-normalized and the folded
# split R-hat), from 4 chains x 2000-3000 draws at the tour's settings and warmup on seed 1, the
# hardest of seeds 0-2 for all three (FA: on seed 1's data the second factor is weak and its
# loading L_11 > 0 reaches down to ~0.02; none below 0.43 on seeds 0 and 2). Per image for the
# VAE (z's 8 coordinates).
NUTS_EFFICIENCY = {
    "gmm_engines": [0.51, 0.53, 0.53, 0.54, 0.59, 0.70, 0.71, 0.73],
    "fa_gaps": [
        0.17, 0.23, 0.24, 0.27, 0.28, 0.32, 0.32, 0.33, 0.33, 0.33, 0.34, 0.34, 0.34, 0.35, 0.36,
        0.36, 0.37, 0.38, 0.39, 0.39, 0.39, 0.42, 0.42, 0.44, 0.45, 0.48, 0.50, 0.50, 0.51, 0.51,
        0.51, 0.52, 0.52, 0.52, 0.53, 0.53, 0.53, 0.53, 0.53, 0.53, 0.56, 0.56, 0.56, 0.57, 0.57,
        0.58, 0.58, 0.59, 0.60, 0.61, 0.61, 0.63, 0.67, 0.69, 0.69, 1.02,
    ],
    "vae_gaps": [0.51, 0.55, 0.55, 0.55, 0.58, 0.61, 0.62, 0.64, 0.80, 0.82, 0.84, 0.87, 0.88,
                 0.94, 0.98, 1.22],
}
#: the smallest bulk or tail ESS per draw in those runs, and the warmup they were made with
NUTS_ESS_MIN = {"gmm_engines": 0.50, "fa_gaps": 0.17, "vae_gaps": 0.42}
NUTS_WARMUP = {"gmm_engines": 200, "fa_gaps": 140, "vae_gaps": 300}


def rhat_false_alarm(efficiency, chains: int, draws: int, rhat_max: float = 1.01) -> float:
    """P(the largest split R-hat > ``rhat_max``) for chains that have all converged: with 2 x
    ``chains`` half-chains of n = draws / 2, R-hat^2 = 1 - 1/n + X / (e n), X ~ chi2(M - 1) / (M
    - 1) the spread of M half-chain means, e a quantity's ESS per draw; quantities independent."""
    e, m = np.asarray(efficiency), 2 * chains
    n = draws / 2
    threshold = e * (1 + (rhat_max**2 - 1) * n)
    return float(1 - np.prod(stats.chi2.cdf(threshold * (m - 1), m - 1)))


def test_the_rhat_noise_model_says_the_old_tour_settings_were_unreliable():
    """The model behind the next test, against what was seen: at the tour's old settings every
    reference came out unconverged on seed 0 (GMM 2 x 300 draws: R-hat 1.012, 1 of seeds 0-2
    failed; FA 2 x 300: 1.012; VAE 2 x 60: 1.03-1.06); 300 draws failed in about half of 200
    resamplings of GMM chains, 1000 in a third of FA's on seed 1 (the model: 0.38)."""
    assert rhat_false_alarm(NUTS_EFFICIENCY["gmm_engines"], 2, 300) > 0.2
    assert rhat_false_alarm(NUTS_EFFICIENCY["fa_gaps"], 2, 300) > 0.9
    assert 0.2 < rhat_false_alarm(NUTS_EFFICIENCY["fa_gaps"], 2, 1000) < 0.6
    assert rhat_false_alarm(NUTS_EFFICIENCY["vae_gaps"], 2, 60) > 0.9
    # more draws, fewer false alarms; for the same draws in all, 2 long chains beat 4 short ones
    assert rhat_false_alarm([0.5] * 8, 2, 2000) < rhat_false_alarm([0.5] * 8, 2, 1000)
    assert rhat_false_alarm([0.5] * 8, 4, 500) > rhat_false_alarm([0.5] * 8, 2, 1000)


@pytest.mark.parametrize("study", sorted(NUTS_EFFICIENCY))
def test_the_tours_nuts_reference_has_the_draws_to_converge(study):
    """Each tour reference passes :func:`elbolab.inference.mcmc.nuts.convergence` (R-hat <= 1.01, bulk and
    tail ESS >= 100 per chain) but by chance in at most ~2% of runs on its hardest seed, with
    half again the ESS it needs; fewer draws (or more VAE points: 8 more quantities each) fail."""
    args = importlib.import_module(f"elbolab.experiments.{study}").parse(
        [*tour.STUDIES[study], "--out", "unused"])
    rule = mcmc.Settings()
    chains, draws = args.nuts_chains, args.nuts_samples
    assert chains >= 2, "R-hat needs two chains"
    assert args.nuts_warmup >= NUTS_WARMUP[study], "the efficiencies were measured at this warmup"
    assert NUTS_ESS_MIN[study] * draws >= 1.5 * rule.ess_per_chain
    efficiency = NUTS_EFFICIENCY[study] * getattr(args, "nuts_points", 1)
    assert rhat_false_alarm(efficiency, chains, draws, rule.rhat_max) <= 0.02


def test_every_studys_tour_settings_parse():
    for name, flags in tour.STUDIES.items():
        module = __import__(f"elbolab.experiments.{name}", fromlist=["parse"])
        module.parse([*flags, "--out", "unused"])  # raises (a CliError) on a bad or old flag


def test_the_tours_vae_is_capped_no_lower_than_the_study():
    """The study's caps (--svi-epochs, --capacity-epochs) are where its defaults early-stop
    (README: FFG at step 3410 of 1000 x 11); the tour must not cap its VAEs below them, nor turn
    early stopping off. (The tour's old caps, 15 and 8 epochs, stopped every network at 165 and
    88 steps, untrained.) The slow test below trains them."""
    s, default = vae_gaps.parse(VAE_FLAGS), vae_gaps.Settings()
    assert s.svi_epochs >= default.svi_epochs and s.capacity_epochs >= default.capacity_epochs
    assert s.patience >= 1 and s.strategy == "none"


def test_the_tour_line_says_when_a_training_hit_its_cap():
    summary = pd.DataFrame({"train_encoder": ["ffg", "flow", "capacity-16"],
                            "training_end": ["step-cap", "early-stopped", "step-cap"]})
    note = tour.capped_note(summary)
    assert "WARNING" in note and "ffg, capacity-16" in note and "flow" not in note
    assert tour.capped_note(summary.assign(training_end="early-stopped")) == ""
    assert tour.capped_note(pd.DataFrame({"engine": ["em"]})) == ""


@pytest.mark.slow
def test_the_tours_vae_trains_to_early_stopping_near_the_studys_evidence(tmp_path):
    """vae_gaps at the tour's settings (~45 s of CPU): every network (FFG, flow, capacity
    encoders) early-stopped; log p(x) of the FFG model on its training images within 1 nat/image
    of the full study's -16.72 (README); its reconstructions are the input digits: a 1-nearest-
    neighbour classifier on the training images labels >= 80% of the test reconstructions
    correctly (the inputs themselves: ~94%; the untrained tour VAE's grey blobs: 37%)."""
    out = tmp_path / "vae"
    argv = [*VAE_FLAGS, "--seed", "0", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert vae_gaps.main(argv) == 0
    s = pd.read_csv(out / "summary.csv")
    assert (s.training_end == "early-stopped").all(), s[["train_encoder", "training_note"]]
    assert json.loads((out / "run.json").read_text())["training_capped"] == []
    g = pd.read_csv(out / "gaps.csv")
    ffg = g[(g.train_encoder == "ffg") & (g.split == "train")].log_evidence.iloc[0]
    assert ffg > -16.72 - 1.0, ffg
    cap = pd.read_csv(out / "capacity.csv").set_index("encoder_hidden").amortization_gap
    assert cap[64] < 1.0 and cap[16] < 1.5, cap  # untrained: 1.39, 2.36
    nuts = pd.read_csv(out / "mcmc.csv")  # the NUTS reference converged (seed 0: R-hat 1.003)
    assert nuts.nuts_converged.all() and (nuts.nuts_r_hat_max <= 1.01).all(), nuts.iloc[0]
    flags = pd.read_csv(out / "reference.csv").ref_flag.fillna("").astype(str)
    assert not flags.str.len().any(), flags

    from elbolab.guides.amortized import load_encoder
    from elbolab.models.data import images
    from elbolab.models.vae.model import VAE

    data = images.load_digits(binarize=True, seed=0)
    vae = VAE.load(out / "vae_ffg.pt")
    enc = load_encoder(out / "encoder_ffg.pt", like=data.x_test)
    with torch.no_grad():
        recon = vae.mean(enc.moments(data.x_test)[0]).double()
    nearest = torch.cdist(recon, data.x_train.double()).argmin(1).numpy()
    assert np.mean(data.y_train[nearest] == data.y_test) >= 0.8


@pytest.mark.slow
@pytest.mark.parametrize("study, engines, seed", [
    ("gmm_engines", "mcmc", 0), ("gmm_engines", "mcmc", 1),
    ("fa_gaps", "em,mcmc", 0), ("fa_gaps", "em,mcmc", 1),
])
def test_the_tours_nuts_reference_converges(tmp_path, study, engines, seed):
    """GMM and FA at the tour's settings (NUTS and what it needs only; the data depend on the seed
    alone): the reference converged and nothing against it is flagged. ~10 s of CPU for GMM, ~40
    s for FA; seed 1 is the hardest of seeds 0-2 (the old settings, 300 draws, gave R-hat 1.012
    on seed 0 for both)."""
    out = tmp_path / study
    argv = [*tour.STUDIES[study], "--engines", engines, "--seed", str(seed), "--device", "cpu",
            "--no-progress", "--out", str(out)]
    assert importlib.import_module(f"elbolab.experiments.{study}").main(argv) == 0
    row = pd.read_csv(out / "summary.csv").query("engine == 'mcmc'").iloc[0]
    chains = tour_flag(study, "--nuts-chains")
    assert row.converged, row
    assert row.diag_r_hat_max <= 1.01 and row.diag_ess_bulk_min >= 100 * chains, row
    assert row.diag_ess_tail_min >= 100 * chains, row
    reference = pd.read_csv(out / "reference.csv")
    assert not reference.ref_flag.fillna("").astype(str).str.len().any(), reference.ref_flag


def tour_flag(study: str, flag: str) -> int:
    flags = tour.STUDIES[study]
    return int(flags[flags.index(flag) + 1])
