"""The vae_gaps experiment end to end with --quick settings (structure and identities only: the
numbers of a 2-epoch run say nothing about VAEs)."""

import contextlib
import io
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from elbolab.experiments import vae_gaps
from elbolab.experiments.core import common
from elbolab.guides.amortized import load_encoder
from elbolab.models.vae.model import VAE


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae_gaps")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert vae_gaps.main(["--quick", "--no-progress", "--out", str(out), "--seed", "1"]) == 0
    out.with_name(out.name + ".console.txt").write_text(printed.getvalue())
    return out


def test_a_training_stopped_at_its_cap_is_said(quick_run):
    # --quick trains 2 epochs (capacity encoders 1): every network stops at its cap, and the
    # study says so on the console and in run.json, not only in a column of summary.csv
    s = pd.read_csv(quick_run / "summary.csv")
    assert (s["training_end"] == "step-cap").all()
    capped = json.loads((quick_run / "run.json").read_text())["training_capped"]
    assert [c.split()[0] for c in capped] == list(s["train_encoder"])
    console = quick_run.with_name(quick_run.name + ".console.txt").read_text()
    assert "WARNING: training reached its epoch cap before early stopping: ffg (step" in console


def test_writes_every_output(quick_run):
    for name in ("summary.csv", "gaps.csv", "capacity.csv", "semi_amortized.csv", "mcmc.csv",
                 "imputation.csv", "run.json", "vae_ffg.pt", "vae_flow.pt", "encoder_ffg.pt",
                 "encoder_flow.pt", "samples.png", "reconstructions.png", "latent_map.png",
                 "gaps.png", "elbo_curves.png"):
        assert (quick_run / name).stat().st_size > 0, name
    run = json.loads((quick_run / "run.json").read_text())
    assert run["seed"] == 1 and run["likelihood"] == "bernoulli"
    assert run["versions"]["pyro"]


def test_gaps_table_is_the_cremer_layout_and_adds_up(quick_run):
    df = pd.read_csv(quick_run / "gaps.csv")
    assert list(df.columns) == vae_gaps.GAP_COLUMNS
    assert len(df) == 8  # {ffg, flow}-trained x {ffg, flow} q* x {train, test}
    assert set(df["train_encoder"]) == {"ffg", "flow"} == set(df["eval_family"])
    assert set(df["split"]) == {"train", "test"}
    # k-hats are NaN when not estimated (--quick draws fewer than the 25 PSIS needs)
    num = df.select_dtypes("number").drop(columns=["khat_amortized", "khat_q_star"])
    assert np.isfinite(num.to_numpy()).all()
    np.testing.assert_allclose(df["inference_gap"],
                               df["approximation_gap"] + df["amortization_gap"], atol=1e-9)
    np.testing.assert_allclose(df["inference_gap"], df["log_evidence"] - df["elbo_amortized"],
                               atol=1e-9)
    # the amortized ELBO of one trained model and split does not depend on the q* family
    # (same encoder, same seed)
    for _, g in df.groupby(["train_encoder", "split"]):
        assert g["elbo_amortized"].nunique() == 1 and g["log_evidence"].nunique() == 1
    assert (df[[c for c in df.columns if c.endswith("_se")]] >= 0).all().all()


def test_summary_and_side_tables(quick_run):
    s = pd.read_csv(quick_run / "summary.csv")
    assert list(s.columns[: len(common.SUMMARY_COLUMNS)]) == common.SUMMARY_COLUMNS
    assert set(s["bound"]) == {"elbo"}
    top = s[s["train_encoder"].isin(["ffg", "flow"])]
    assert len(top) == 2 and (top["log_evidence_method"] == "iwae").all()
    cap = pd.read_csv(quick_run / "capacity.csv")
    assert list(cap["encoder_hidden"]) == [4, 16]
    sa = pd.read_csv(quick_run / "semi_amortized.csv")
    assert set(sa["steps"]) == {0, 3}
    mc = pd.read_csv(quick_run / "mcmc.csv")
    assert set(mc["approximation"]) == {"q*_FFG", "q (encoder)"}
    imp = pd.read_csv(quick_run / "imputation.csv")
    assert set(imp["mask"]) == {"top-half", "random-50"}
    assert {"pseudo-Gibbs", "pixel mean (train)", "factor analysis (exact conditional)"} <= set(
        imp["method"])
    assert ((imp["rmse"] >= 0) & (imp["rmse"] <= 1)).all()


def test_saved_networks_reload(quick_run):
    vae = VAE.load(quick_run / "vae_ffg.pt")
    assert vae.likelihood == "bernoulli" and vae.hidden == (16,)
    raw = torch.load(quick_run / "encoder_flow.pt", weights_only=True)  # tensors + plain values
    assert all(isinstance(v, torch.Tensor) for v in raw["state_dict"].values())
    enc = load_encoder(quick_run / "encoder_flow.pt")  # rebuilt from its saved config
    assert enc.config["hidden"] == [16] and enc.config["flow"] == "iaf"
    assert enc.distribution(torch.zeros(2, 64)).batch_shape == (2,)
    z = torch.zeros(1, vae.latent_dim)
    assert math.isfinite(float(vae.log_joint(torch.zeros(1, 64), z).detach()))


def test_user_array_with_gaussian_likelihood(tmp_path):
    g = np.random.default_rng(0)
    np.save(tmp_path / "imgs.npy", g.integers(0, 256, size=(60, 4, 4)).astype(np.uint8))
    out = tmp_path / "out"
    argv = ["--quick", "--no-progress", "--out", str(out), "--data", str(tmp_path / "imgs.npy"),
            "--likelihood", "gaussian", "--latent-dim", "2", "--dtype", "float64"]
    assert vae_gaps.main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["image_shape"] == [4, 4] and run["variance_floor"] == 1e-3
    assert VAE.load(out / "vae_flow.pt").settings()["variance"] == "feature"
    assert "error_rate" not in pd.read_csv(out / "imputation.csv").columns


def test_bad_flags_name_the_flag(tmp_path):
    with pytest.raises(SystemExit, match="--data"):
        vae_gaps.main(["--quick", "--out", str(tmp_path), "--data", str(tmp_path / "no.npy")])
    with pytest.raises(SystemExit, match="--latent-dim"):
        vae_gaps.main(["--quick", "--out", str(tmp_path), "--latent-dim", "1"])


def test_runaway_learning_rate_is_flagged_and_the_study_goes_on(tmp_path):
    """Issue 21: --svi-lr 1e6 ended in "a cannot be empty"; now the networks stop at the step
    that ran away, keep their last good weights, and the rows say they diverged."""
    g = np.random.default_rng(0)
    np.save(tmp_path / "imgs.npy", g.integers(0, 256, size=(60, 4, 4)).astype(np.uint8))
    out = tmp_path / "out"
    argv = ["--quick", "--no-progress", "--out", str(out), "--data", str(tmp_path / "imgs.npy"),
            "--likelihood", "gaussian", "--latent-dim", "2", "--svi-lr", "1e6"]
    assert vae_gaps.main(argv) == 0
    s = pd.read_csv(out / "summary.csv")
    trained = s[s.guide.isin(["ffg", "flow"])]
    assert len(trained) == 2 and trained.diag_diverged.astype(bool).all()
    assert (trained.training_end == "diverged").all()
    assert np.isfinite(trained.elbo).all() and (trained.elbo_per_datum.abs() < 1e6).all()
