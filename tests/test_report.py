"""Reports, the tour and run comparison, checked on small run folders made here.

The browser tests open the HTML in headless Chromium (Debian's ``chromium``; ``make
install-chromium`` installs it where apt and root are available, or set ``CHROMIUM``) and read the
rendered page: a probe script, added to a copy of the report, writes what the page shows (tables,
each image's natural size, every resource fetched) into the DOM, which ``--dump-dom`` returns.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from elbolab.experiments import cli, compare, tour
from elbolab.experiments.core import common
from elbolab.experiments.report import build as report
from elbolab.experiments.report import findings, formatting, readme_tables, tables
from elbolab.inference import mcmc  # noqa: E402
from elbolab.inference.evaluation.reference import flag_reference, reference_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _png(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot(np.cumsum(rng.normal(size=50)))
    fig.savefig(path, dpi=60)
    plt.close(fig)
    return path


def _study(folder: Path, study: str, *, seed=0, device="cpu", shift=0.0, rows=None) -> Path:
    folder.mkdir(parents=True)
    rows = rows or [
        dict(model="gmm", engine="em", guide="map", bound="log-joint-map", n=100, elbo=-261.13,
             elbo_se=0.0, gap=math.nan, converged=True),
        dict(model="gmm", engine="cavi", guide="mean-field", bound="elbo", n=100,
             elbo=-263.58712345, elbo_se=0.0, gap=1.821, converged=True),
        dict(model="gmm", engine="svi", guide="collapsed", bound="elbo-collapsed", n=100,
             elbo=-263.561, elbo_se=0.0012, gap=1.796, converged=False),
        dict(model="gmm", engine="mcmc", guide="nuts", bound="none", n=100, elbo=math.nan,
             elbo_se=math.nan, gap=math.nan, converged=True, diag_r_hat_max=1.0041,
             diag_ess_bulk_min=1096.2, diag_divergences=0),
    ]
    df = pd.DataFrame(rows)
    df["elbo"] += shift * df["n"]
    df["elbo_per_datum"] = df["elbo"] / df["n"]
    df["log_evidence"], df["log_evidence_method"] = -261.765, "quadrature"
    df["gap_per_datum"] = df["gap"] / df["n"]
    df["seed"], df["device"], df["dtype"] = seed, device, "float64"
    df["diag_unused"] = math.nan  # empty in every row: left out of the report
    df.to_csv(folder / "summary.csv", index=False)
    pd.DataFrame({"quantity": [f"mu[{i}]" for i in range(100)], "mean": np.arange(100.0)}).to_csv(
        folder / "posterior.csv", index=False)
    _png(folder / "elbo_traces.png", 0)
    _png(folder / "posterior_marginals.png", 1)
    (folder / "mcmc.nc").write_bytes(b"\0" * 2048)
    (folder / "log.txt").write_text("log p(x) = -261.7650 nats <by quadrature>\n")
    meta = {"study": study, "command": f"elbolab run {study} --seed {seed}", "seed": seed,
            "device": device, "dtype": "float64", "created": "2025-01-01T00:00:00+00:00",
            "machine": {"cpu": "Test CPU 9000", "cpu_count": 2, "gpu": None},
            "git": {"commit": COMMIT, "dirty": False}, "versions": {"torch": "2.x"}}
    (folder / "run.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def fake_tour(tmp_path) -> Path:
    root = tmp_path / "tour"
    _study(root / "gmm_engines", "gmm_engines")
    _study(root / "fa_gaps", "fa_gaps")
    (root / "run.json").write_text(json.dumps({
        "study": "tour", "command": "elbolab tour", "seed": 0,
        "studies": {"gmm_engines": {"seconds": 20.5}, "fa_gaps": {"seconds": 40.0}},
        "machine": {"cpu": "Test CPU 9000"}, "git": {"commit": COMMIT, "dirty": True}}))
    return root


# ---------------------------------------------------------------------------- the files


def test_html_is_one_offline_file_with_every_figure_inline(fake_tour):
    html_path, md_path = report.build(fake_tour)
    text = html_path.read_text()
    assert "<script" not in text and "<link" not in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text)
    sources = re.findall(r'<img src="([^"]+)"', text)
    pngs = sorted(fake_tour.rglob("*.png"))
    assert len(sources) == len(pngs) == 4
    inline = {base64.b64decode(s.split(",", 1)[1]) for s in sources}
    assert inline == {p.read_bytes() for p in pngs}  # each figure's own bytes, none re-encoded
    # the CSV's value with 7 significant digits; NaN as a dash; the overview names each study
    assert "-263.5871" in text and "—" in text
    assert "gmm_engines" in text and "fa_gaps" in text and "20.5" in text
    assert "&lt;by quadrature&gt;" in text  # the log is escaped, not markup


def test_tables_state_constants_once_drop_empty_columns_and_say_when_cut(fake_tour):
    report.build(fake_tour)
    text = (fake_tour / "report.html").read_text()
    assert "diag_unused" not in text
    assert "in every row: " in text and "device = cpu" in text
    assert f"first {tables.MAX_ROWS} of 100 rows" in text
    md = (fake_tour / "report.md").read_text()
    assert f"(first {tables.MAX_ROWS} of 100 rows)" in md
    assert "| fit | bound | elbo | elbo_se | gap_per_datum |" in md  # the short summary
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (fake_tour / link).is_file(), link  # figures by relative path beside report.md
    assert f"commit** {COMMIT[:12]} (uncommitted changes)" in md


def test_report_command_rebuilds_and_names_a_bad_folder(fake_tour, tmp_path, capsys):
    (fake_tour / "report.html").write_text("stale")
    _study(fake_tour / "vae_gaps.incomplete", "vae_gaps")  # an unfinished run: not reported
    assert cli.main(["report", str(fake_tour)]) == 0
    text = (fake_tour / "report.html").read_text()
    assert "gmm_engines" in text and "vae_gaps" not in text
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["report", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 3 and "RUN_DIR" in err[0] and "empty" in err[0]


# ---------------------------------------------------------------------------- findings

N = 100
HAND_MADE = [  # log p(x) = -261.5 nats by quadrature; gaps written by hand (nats, totals)
    dict(model="gmm", engine="em", guide="map", bound="log-joint-map", elbo=-261.13, elbo_se=0.0,
         gap=math.nan, converged=True, iterations=6),
    dict(model="gmm", engine="cavi", guide="mean-field", bound="elbo", elbo=-263.0, elbo_se=0.0,
         gap=1.5, converged=True, iterations=7),
    dict(model="gmm", engine="svi", guide="collapsed", bound="elbo-collapsed", elbo=-262.0,
         elbo_se=0.01, gap=0.5, converged=False, iterations=500, diag_steps=500,
         diag_projected_gain_per_datum=0.003, diag_projected_gain_se=0.0005, diag_diverged=False),
    dict(model="gmm", engine="svi", guide="mean-field", bound="elbo", elbo=-265.0, elbo_se=0.02,
         gap=3.5, converged=False, iterations=80, diag_steps=80, diag_diverged=True),
    dict(model="gmm", engine="mcmc", guide="nuts", bound="none", elbo=math.nan, elbo_se=math.nan,
         gap=math.nan, converged=False, diag_r_hat_max=1.058, diag_ess_bulk_min=97.0,
         diag_ess_tail_min=150.0, diag_divergences=0),
]


def _hand_made(rows=HAND_MADE) -> dict[str, pd.DataFrame]:
    s = pd.DataFrame(rows)
    s["n"], s["log_evidence"], s["log_evidence_method"] = N, -261.5, "quadrature"
    s["log_evidence_se"] = 9.8e-11  # a quadrature's rounding noise: not printed as "± 9.8e-11"
    s["gap_per_datum"] = s["gap"] / N
    diag = pd.DataFrame({"quantity": ["mu_sorted[0,0]"], "r_hat": [1.058], "ess_bulk": [97.0],
                         "ess_tail": [150.0], "chains": [2], "draws": [60]})
    ref = pd.DataFrame({"method": ["cavi/mean-field", "svi/collapsed"],
                        "quantity": ["mu_sorted[0,0]", "mu_sorted[0,0]"],
                        "mean_error_in_ref_sd": [0.25, -1.5], "reference": "mcmc/nuts"})
    return {"summary.csv": s, "mcmc_diagnostics.csv": diag, "reference.csv": ref}


def test_findings_name_the_tightest_bound_and_by_how_much():
    said = findings.study_findings(_hand_made())
    text = "\n".join(said)
    assert "log p(x) = -261.5 nats (-2.615 per data point, n = 100), by quadrature." in text
    # svi/collapsed: 0.5 nats = 0.005/datum below; cavi next at 0.015: 0.01/datum looser, far
    # beyond 2 SE (sqrt(0.01^2 + 0^2) / 100 = 1e-4 per datum)
    assert ("Tightest bound: svi/collapsed (elbo-collapsed), ELBO -262 nats, 0.5 nats below "
            "log p(x) (0.005 per data point); 0.01 nats per data point tighter than the next, "
            "cavi/mean-field (0.015).") in text
    assert "Loosest: svi/mean-field (elbo), 0.035 nats per data point below log p(x)." in text
    # three fits stopped short, each with its reason; EM's objective is no bound: not ranked
    assert "3 of 5 fits did not converge" in text
    assert "svi/collapsed: 500-step cap, still gaining 0.003 ± 0.0005 nats/datum per window" in text
    assert "svi/mean-field: diverged" in text
    assert "mcmc/nuts: R-hat 1.058 > 1.01; bulk ESS 97 < 200" in text  # 100 per chain x 2
    assert "em/map" not in text
    # the reference: NOT converged by R-hat 1.058 > 1.01 and bulk ESS 97 < 200, so provisional
    ref = next(s for s in said if s.startswith("Reference mcmc/nuts"))
    assert "NOT converged" in ref and "R-hat 1.058 (need <= 1.01)" in ref
    assert "ESS bulk/tail 97/150 (need >= 200)" in ref and "provisional" in ref
    assert ("Largest posterior-mean error against mcmc/nuts: svi/collapsed on mu_sorted[0,0], "
            "1.5 of its sds (provisional") in text


def test_findings_say_when_bounds_are_not_distinguishable_and_the_reference_converged():
    rows = [dict(r) for r in HAND_MADE]
    rows[1].update(elbo=-262.01, gap=0.51, elbo_se=0.3)  # 0.0001/datum from svi/collapsed
    rows[4].update(converged=True, diag_r_hat_max=1.004, diag_ess_bulk_min=1096.0,
                   diag_ess_tail_min=800.0)
    tables = _hand_made(rows)
    tables["mcmc_diagnostics.csv"]["chains"] = 4
    text = "\n".join(findings.study_findings(tables))
    # 2 SE = 2 sqrt(0.01^2 + 0.3^2) / 100 = 0.006 per datum > the 0.0001 between them
    assert "not distinguishable at 2 standard errors (0.006 per data point) from the next, " \
           "cavi/mean-field (0.0051)" in text
    assert "Reference mcmc/nuts: converged (R-hat 1.004 <= 1.01, bulk/tail ESS 1096/800 >= 400" in text
    assert "provisional" not in text


def test_duplicate_looking_fits_get_their_parameters_in_the_label():
    s = pd.DataFrame({"model": ["fa", "fa", "fa", "bayes-fa"], "engine": ["svi", "svi", "em", "cavi"],
                      "guide": ["mlp", "mlp", "exact-posterior", "vb"],
                      "params": ["fixed-em", "learned", "em", "posterior"]})
    assert findings.fit_labels(s) == ["svi/mlp [fixed-em]", "svi/mlp [learned]",
                                      "em/exact-posterior [em]", "bayes-fa: cavi/vb [posterior]"]


def test_rounding_noise_prints_as_zero_and_real_small_values_do_not():
    df = pd.DataFrame({"gap": [-4.547e-13, 17.9, 4445.3], "gap_per_datum": [1.776e-15, 0.373, 92.6],
                       "se": [4.65e-7, 4.65e-7, 4.65e-7], "seconds": [1e-5, 0.2, 1000.0]})
    tol = findings.noise_tolerance(df)
    shown = {c: [formatting.fmt(v, tol[c]) for v in df[c]] for c in df}
    assert shown["gap"] == ["0", "17.9", "4445.3"]
    assert shown["gap_per_datum"] == ["0", "0.373", "92.6"]
    assert shown["se"] == ["4.65e-07"] * 3  # a real SE, however small, stays
    assert shown["seconds"][0] == "1e-05"  # 1e-8 of its column: above the 1e-9 tolerance
    only_noise = pd.DataFrame({"x": [3e-15, -2e-15], "y": [375.0, 380.0]})
    tol = findings.noise_tolerance(only_noise)  # a column of noise only: the table's scale
    assert [formatting.fmt(v, tol["x"]) for v in only_noise["x"]] == ["0", "0"]


def test_an_unconverged_reference_is_flagged_in_its_tables_and_the_report(tmp_path):
    # NUTS with R-hat 1.058 and bulk ESS 97 over 2 chains, as in the tour's VAE reference
    ok, why = mcmc.convergence({"r_hat_max": 1.058, "ess_bulk_min": 97.0, "ess_tail_min": 60.0},
                               mcmc.Settings(num_chains=2))
    assert not ok and "R-hat 1.058 (need <= 1.01)" in why and "need >= 200" in why
    assert mcmc.convergence({"r_hat_max": 1.009, "ess_bulk_min": 410.0, "ess_tail_min": 400.0},
                            mcmc.Settings(num_chains=4)) == (True, "")
    assert not mcmc.convergence({"r_hat_max": 1.012, "ess_bulk_min": 5e3, "ess_tail_min": 5e3},
                                mcmc.Settings(num_chains=4))[0]  # FA's 1.012 fails R-hat < 1.01
    ref = reference_table({"mcmc/nuts": np.random.default_rng(0).normal(size=(120, 2)),
                           "svi/collapsed": np.zeros((1, 2))}, "mcmc/nuts", ["z[0,0]", "z[0,1]"])
    ref = flag_reference(ref, ok, why)
    assert (~ref.ref_converged).all() and ref.ref_flag.str.startswith("provisional: ").all()
    assert flag_reference(ref, True).ref_flag.eq("").all()
    tables = _hand_made()
    summary = common.flag_summary(tables["summary.csv"],
                                  [f"{e}/{g}" for e, g in zip(tables["summary.csv"].engine,
                                                               tables["summary.csv"].guide)], ref)
    flags = dict(zip(summary.engine + "/" + summary.guide, summary.reference_flag))
    assert flags["svi/collapsed"].startswith("provisional: reference mcmc/nuts NOT converged")
    assert flags["mcmc/nuts"].startswith("this fit is the reference")
    assert flags["cavi/mean-field"] == ""  # not compared in this reference table
    # the study folder: the summary marks the rows, the text says provisional
    folder = _study(tmp_path / "gmm_engines", "gmm_engines", rows=[dict(r, n=N) for r in HAND_MADE])
    s = pd.read_csv(folder / "summary.csv")
    s["reference_flag"] = summary["reference_flag"].to_numpy()
    s.to_csv(folder / "summary.csv", index=False)
    ref.to_csv(folder / "reference.csv", index=False)
    tables["mcmc_diagnostics.csv"].to_csv(folder / "mcmc_diagnostics.csv", index=False)
    html_path, md_path = report.build(folder)
    page = html_path.read_text()
    assert "Reference mcmc/nuts: NOT converged" in page
    assert "is provisional, and is marked so there (column ref_flag)" in page
    assert page.count("<td>provisional</td>") == 2  # svi/collapsed and NUTS itself
    md = md_path.read_text()
    assert "provisional: reference mcmc/nuts NOT converged (R-hat 1.058" in md


def test_a_few_em_iterations_are_not_on_a_log_axis_and_legends_are_readable():
    from types import SimpleNamespace

    from elbolab.experiments.core import plots

    def fit(engine, guide, bound, steps):
        return SimpleNamespace(engine=engine, guide=guide, bound=bound, model="gmm", n_data=10,
                               settings={}, trace=list(-100 + 10 * np.log1p(np.arange(steps))))

    fig = plots.bounds_figure([fit("svi", "mean-field", "elbo", 500),
                               fit("em", "map", "log-joint-map", 6)], log_evidence=-900.0)
    bounds_ax, em_ax = fig.axes[:2]
    assert bounds_ax.get_xscale() == "log" and em_ax.get_xscale() == "linear"
    assert all(t.get_fontsize() >= 8 for ax in (bounds_ax, em_ax) for t in ax.get_legend().get_texts())
    assert fig.get_size_inches()[0] * plots.DPI <= 1180  # shown at its size on the page
    plt.close(fig)


# ---------------------------------------------------------------------------- compare


def test_compare_merges_runs_with_their_provenance(tmp_path, capsys):
    a = _study(tmp_path / "cpu" / "gmm_engines", "gmm_engines", seed=0, device="cpu")
    b = _study(tmp_path / "cuda" / "gmm_engines", "gmm_engines", seed=0, device="cuda", shift=0.003)
    out = tmp_path / "cmp"
    assert cli.main(["compare", str(a), str(b), "--out", str(out)]) == 0
    table = pd.read_csv(out / "comparison.csv")
    assert list(table.columns[:7]) == compare.RUN_COLUMNS
    assert set(table["run"]) == {"cpu/gmm_engines", "cuda/gmm_engines"}
    assert set(table["device"]) == {"cpu", "cuda"} and set(table["commit"]) == {COMMIT[:12]}
    w = pd.read_csv(out / "comparison_wide.csv")
    ok = w["max_difference"].notna()
    assert ok.sum() == 3 and np.allclose(w.loc[ok, "max_difference"], 0.003)
    img = plt.imread(out / "comparison.png")
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert (out / "report.html").is_file() and "largest ELBO/datum difference" in capsys.readouterr().out


def test_compare_tells_repeated_fits_apart_and_refuses_to_overwrite(tmp_path, capsys):
    rows = [dict(model="fa", engine="svi", guide="mlp", bound="elbo", n=10, elbo=-80.0,
                 elbo_se=0.1, gap=1.0, converged=True, params=p) for p in ("fixed-em", "learned")]
    a = _study(tmp_path / "a", "fa_gaps", rows=rows)
    labels = pd.read_csv(a / "summary.csv").pipe(compare.fit_labels)
    assert labels == ["svi/mlp (elbo), params=fixed-em", "svi/mlp (elbo), params=learned"]
    out = tmp_path / "cmp"
    assert compare.main([str(a), "--out", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    assert compare.main([str(a), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    assert compare.main([str(a), str(tmp_path / "a"), "--out", str(tmp_path / "c2")]) == 2
    assert not (tmp_path / "c2").exists()


# ---------------------------------------------------------------------------- README tables

README = """# x
prose stays
<!-- readme-table: gmm_engines -->
old table
<!-- /readme-table -->
more prose
"""


def test_readme_table_is_written_from_the_run_with_its_provenance(tmp_path):
    run = _study(tmp_path / "runs" / "gmm_engines", "gmm_engines")
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert cli.main(["report", "--readme", str(readme), str(run)]) == 0
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# x\nprose stays\n") and "more prose" in text
    assert "| cavi | mean-field | elbo | -263.587 | 1.821 | True |" in text
    assert "| svi | collapsed | elbo-collapsed | -263.561 ± 0.001 | 1.796 | False |" in text
    assert f"commit {COMMIT[:12]}" in text and "machine: Test CPU 9000" in text
    assert "| em | map | log-joint-map | -261.130 | — | True |" in text
    assert "| mcmc | nuts | none | — | — | True | R-hat 1.004, bulk ESS 1096, 0 divergences |" in text


def test_tables_go_to_every_page_that_marks_them_and_none_is_written_on_an_error(tmp_path, capsys):
    run = _study(tmp_path / "runs" / "gmm_engines", "gmm_engines")
    readme, page, other = tmp_path / "README.md", tmp_path / "gmm.md", tmp_path / "other.md"
    readme.write_text(README)
    page.write_text("# the study\n" + README)
    other.write_text("no marker here\n")
    argv = ["report", "--readme", str(readme), "--readme", str(page), "--readme", str(other)]
    assert cli.main([*argv, str(run)]) == 0
    for f in (readme, page):
        assert "| cavi | mean-field | elbo | -263.587 | 1.821 | True |" in f.read_text()
    assert other.read_text() == "no marker here\n"
    # a study with no block in any page: an error naming it, and no page is touched
    fa = _study(tmp_path / "runs" / "fa_gaps", "fa_gaps")
    pd.DataFrame({"guide": ["mlp"], "approximation_gap": [0.1], "approximation_gap_se": [0.01],
                  "closed_form_approximation_gap": [0.1], "amortization_gap": [0.2],
                  "amortization_gap_se": [0.01]}).to_csv(fa / "gaps.csv", index=False)
    readme.write_text(README)
    assert cli.main([*argv, str(run), str(fa)]) == 2
    assert "readme-table: fa_gaps" in capsys.readouterr().err
    assert readme.read_text() == README


def test_readme_errors_name_the_missing_marker_or_column(tmp_path, capsys):
    run = _study(tmp_path / "fa_gaps", "fa_gaps")  # fa_gaps' table comes from gaps.csv
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert cli.main(["report", "--readme", str(readme), str(run)]) == 2
    assert "gaps.csv" in capsys.readouterr().err
    pd.DataFrame({"guide": ["mlp"]}).to_csv(run / "gaps.csv", index=False)
    assert cli.main(["report", "--readme", str(readme), str(run)]) == 2
    assert "approximation_gap" in capsys.readouterr().err
    with pytest.raises(ValueError, match="readme-table: vae_gaps"):
        readme_tables.update(README, {"vae_gaps": "t"})
    assert readme.read_text() == README


# ---------------------------------------------------------------------------- the tour


def test_tour_refuses_a_used_folder_before_any_work(tmp_path, capsys):
    out = tmp_path / "t"
    out.mkdir()
    (out / "run.json").write_text("{}")
    assert cli.main(["tour", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["tour", "--out", str(tmp_path / "u"), "--seed", "-1"]) == 2
    assert "--seed" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()


def test_bad_study_settings_are_refused_before_any_study_runs(tmp_path, monkeypatch, capsys):
    # a researcher's typo in the tour's settings: the study's own message, nothing run or written
    monkeypatch.setattr(tour, "STUDIES", {"gmm_engines": [], "fa_gaps": ["--stpes", "10"]})
    monkeypatch.setattr(tour, "run_study", lambda *a, **k: pytest.fail("a study ran"))
    assert tour.main(["--out", str(tmp_path / "t"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 3 and err[0].startswith("elbolab tour: fa_gaps: ") and "--stpes" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_a_study_failing_midway_leaves_no_tour_folder(tmp_path, monkeypatch, capsys):
    # the first study completes, the second stops on its data file: the tour keeps nothing
    missing = tmp_path / "no_such.csv"
    monkeypatch.setattr(tour, "STUDIES", {"gmm_engines": ["--quick", "--engines", "em,cavi"],
                                          "fa_gaps": ["--quick", "--data", str(missing)]})
    out = tmp_path / "runs" / "t"
    assert tour.main(["--out", str(out), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "fa_gaps failed" in err and "no_such.csv" in err
    assert not out.exists() and list((tmp_path / "runs").iterdir()) == []


def test_an_interrupted_tour_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(name, argv, folder, shown=None):
        folder.mkdir()
        (folder / "summary.csv").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(tour, "run_study", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tour.main(["--out", str(tmp_path / "t"), "--device", "cpu"])
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def quick_tour(tmp_path_factory) -> tuple[Path, str]:
    """(folder, terminal output) of one ``elbolab tour --quick``, shared by the slow tests."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("quick") / "tour"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["tour", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    return out, printed.getvalue()


@pytest.mark.slow
def test_quick_tour_writes_every_study_and_the_report(quick_tour):
    out, printed = quick_tour
    assert f"Report: {out / 'report.html'}" in printed
    assert all(f"] {name}" in printed for name in tour.STUDIES)
    for name in tour.STUDIES:
        assert (out / name / "summary.csv").is_file() and (out / name / "log.txt").is_file()
    meta = json.loads((out / "run.json").read_text())
    assert set(meta["studies"]) == set(tour.STUDIES) and meta["git"]["commit"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["tour"]  # no working folder left


# ---------------------------------------------------------------------------- in the browser

PROBE = """<script>
window.addEventListener("load", () => {
  const tables = [...document.querySelectorAll("table")].map(t => ({
    rows: t.rows.length, head: [...t.rows[0].cells].map(c => c.textContent),
    width: t.getBoundingClientRect().width,
    page: t.closest("section").getBoundingClientRect().width}));
  const sections = [...document.querySelectorAll("section.run")].map(s => ({
    id: s.id, findings: [...s.querySelectorAll(":scope > ul.findings li")].map(li => li.textContent)}));
  const images = [...document.images].map(i => ({
    alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}));
  const headings = [...document.querySelectorAll("h1,h2,h3")].map(h => h.textContent);
  const fetched = performance.getEntriesByType("resource").map(e => e.name);
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({tables, sections, images, headings, fetched,
                                    title: document.title});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str:
    exe = os.environ.get("CHROMIUM") or next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
        None)
    if exe is None:
        pytest.skip("no Chromium found: install Debian's `chromium` (`make install-chromium` as root "
                    "with apt) or set CHROMIUM=/path/to/chromium")
    try:
        subprocess.run([exe, "--version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"Chromium at {exe} does not start: {exc}")
    return exe


def _browser(exe: str, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", "--virtual-time-budget=15000"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=180)


def rendered(exe: str, html_path: Path, tmp: Path) -> dict:
    """What Chromium shows of ``html_path``: the probe's JSON from the rendered DOM."""
    probe = tmp.resolve() / "probe.html"
    probe.write_text(html_path.read_text().replace("</body>", PROBE + "</body>"))
    done = _browser(exe, "--dump-dom", "--window-size=1200,2000", probe.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found, f"Chromium rendered no probe (exit {done.returncode}): {done.stderr[-800:]}"
    return json.loads(html.unescape(found.group(1)))


def screenshot(exe: str, html_path: Path, png: Path, size=(1200, 1400)) -> Path:
    """A screenshot of the top of the page, stored as a 128-colour PNG (small enough to commit)."""
    from PIL import Image

    raw = png.with_name(png.stem + ".raw.png")
    done = _browser(exe, f"--screenshot={raw}", f"--window-size={size[0]},{size[1]}", html_path.resolve().as_uri())
    assert raw.is_file(), f"no screenshot (exit {done.returncode}): {done.stderr[-800:]}"
    Image.open(raw).convert("RGB").quantize(colors=128).save(png, optimize=True)
    raw.unlink()
    return png


def check_page(page: dict, folder: Path) -> None:
    pngs = list(folder.rglob("*.png"))
    assert len(page["images"]) == len(pngs) > 0
    for img in page["images"]:
        assert img["complete"] and img["width"] > 0 and img["height"] > 0, img
    assert all(url.startswith("data:") for url in page["fetched"]), page["fetched"]
    heads = [t["head"] for t in page["tables"]]
    assert any({"fit", "elbo", "converged"} <= set(h) for h in heads), heads
    assert all(t["rows"] >= 2 for t in page["tables"])
    # no table wider than the page (its section: the body's content box, 1148 px here)
    wide = [(t["head"], round(t["width"]), round(t["page"])) for t in page["tables"]
            if t["width"] > t["page"] + 0.5]
    assert not wide, wide
    # every study's section opens with its findings: the tightest bound and its reference
    studies = {p.parent.name for p in folder.rglob("summary.csv")}
    said = {s["id"]: s["findings"] for s in page["sections"]}
    for study in studies:
        assert said.get(study), (study, said)
        text = " ".join(said[study])
        assert "Tightest bound: " in text, text
        if any((p.parent / "reference.csv").exists() for p in folder.rglob(f"{study}/summary.csv")):
            assert "Reference mcmc/nuts: " in text or "Reference exact" in text, text


def test_report_renders_in_chromium_with_every_table_and_image(fake_tour, tmp_path):
    exe = chromium()
    html_path, _ = report.build(fake_tour)
    page = rendered(exe, html_path, tmp_path)
    check_page(page, fake_tour)
    # overview + per study: summary and posterior tables
    assert len(page["tables"]) == 1 + 2 * 2
    assert {"tour", "gmm_engines", "fa_gaps"} <= set(page["headings"])
    png = screenshot(exe, html_path, tmp_path / "shot.png")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (1200, 1400) and len(im.getcolors(256) or []) > 4  # not blank


@pytest.mark.slow
def test_tour_report_in_chromium_and_the_readme_screenshot(request, tmp_path):
    """A real tour's report renders with every table and image. With ``ELBOLAB_TOUR_DIR`` (e.g.
    runs/demo after ``make demo``; ``make report-screenshot`` does both) its screenshot becomes
    docs/report.png, the one the README shows; without it a ``--quick`` tour is made here and
    its screenshot stays in the test's temporary folder (a smoke run is no picture for the
    README)."""
    exe = chromium()
    folder = Path(os.environ["ELBOLAB_TOUR_DIR"]).resolve() if os.environ.get("ELBOLAB_TOUR_DIR") else None
    if folder is None:
        folder = request.getfixturevalue("quick_tour")[0]
    page = rendered(exe, folder / "report.html", tmp_path)
    check_page(page, folder)
    assert {"gmm_engines", "fa_gaps", "vae_gaps"} <= set(page["headings"])
    target = ROOT / "docs" if os.environ.get("ELBOLAB_TOUR_DIR") else tmp_path
    target.mkdir(exist_ok=True)
    png = screenshot(exe, folder / "report.html", target / "report.png")
    assert png.stat().st_size < 500_000
