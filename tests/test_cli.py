"""The studies' command line: --quick sets defaults only, --config files, --engines/--guides,
--help, and every bad flag or file stopping before any work with exit status 2 and at most three
lines naming the flag (no traceback, no folder left behind)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from elbolab.experiments import cli, fa_gaps, gmm_engines, vae_gaps
from elbolab.experiments.core.study import CliError

ROOT = Path(__file__).resolve().parents[1]
STUDIES = {"gmm_engines": gmm_engines, "fa_gaps": fa_gaps, "vae_gaps": vae_gaps}


def fails(capsys, module, argv, flag: str, out: Path | None = None) -> str:
    """Run ``module.main(argv)``; it must stop with exit status 2, print at most three lines on
    stderr naming ``flag`` (no traceback), and leave no output folder. Returns the message."""
    with pytest.raises(SystemExit) as info:
        module.main(argv)
    assert info.value.code == 2, info.value
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 3, err
    assert "Traceback" not in err
    assert flag in err, err
    assert flag in str(info.value)
    if out is not None:
        assert not out.exists(), list(out.iterdir()) if out.is_dir() else out
        assert not out.with_name(out.name + ".incomplete").exists()
    return err


def test_list_names_every_experiment(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("gmm_engines", "fa_gaps", "vae_gaps"):
        assert name in out


def test_unknown_experiment_is_an_error(capsys):
    assert cli.main(["run", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown study 'nope'" in err and "gmm_engines, fa_gaps, vae_gaps, fit" in err


def test_run_without_a_study_lists_the_studies(capsys):
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert "unknown command" not in err and "elbolab run NAME" in err
    for name, text in cli.EXPERIMENTS.items():
        assert name in err and text in err


@pytest.mark.parametrize("argv,hint", [
    (["run", "gmm_engine"], "'elbolab run gmm_engines'"),
    (["run", "vae_gap", "--quick"], "'elbolab run vae_gaps --quick'"),
    (["rnu", "fa_gaps"], "'elbolab run fa_gaps'"),
    (["fa_gap", "--quick"], "'elbolab run fa_gaps --quick'"),  # a study typed as a command
    (["reprot", "runs/x"], "'elbolab report runs/x'"),
    (["lsit"], "'elbolab list'"),
])
def test_a_typo_gets_a_hint_one_can_type(capsys, argv, hint):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"did you mean {hint}?" in err, err
    command = hint.strip("'").split()[1:]  # the hint is a command that works
    assert command[0] in ("list", "run", *cli.COMMANDS)
    assert command[0] != "run" or command[1] in cli.EXPERIMENTS


def test_report_help_is_the_whole_description(capsys):
    from elbolab.experiments.report import build as report

    with pytest.raises(SystemExit) as info:
        cli.main(["report", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for line in report.__doc__.strip().splitlines():  # every line, none cut off or rewrapped
        assert line.strip() in out, line
    assert "--readme" in out


# -- one name per setting: an old flag is an error naming the new one -------------------------
OLD_FLAGS = [  # (study, old flag, new flag), every name issue 17 retired
    ("gmm_engines", "--chains", "--nuts-chains"), ("gmm_engines", "--jit", "--nuts-jit"),
    ("gmm_engines", "--no-jit", "--no-nuts-jit"),
    ("fa_gaps", "--steps", "--svi-steps"), ("fa_gaps", "--lr", "--svi-lr"),
    ("fa_gaps", "--chains", "--nuts-chains"), ("fa_gaps", "--is-particles", "--impute-particles"),
    ("vae_gaps", "--epochs", "--svi-epochs"), ("vae_gaps", "--lr", "--svi-lr"),
    ("vae_gaps", "--mcmc-samples", "--nuts-samples"), ("vae_gaps", "--mcmc-chains", "--nuts-chains"),
    ("vae_gaps", "--mcmc-points", "--nuts-points"), ("vae_gaps", "--elbo-samples", "--eval-particles"),
    ("vae_gaps", "--iwae-samples", "--iwae-particles"),
    ("fit", "--chains", "--nuts-chains"), ("fit", "--jit", "--nuts-jit"),
    ("fit", "--iwae-samples", "--iwae-particles"),
]


@pytest.mark.parametrize("study,old,new", OLD_FLAGS)
def test_an_old_flag_is_an_error_naming_the_new_one(capsys, tmp_path, study, old, new):
    from elbolab.experiments import fit

    module = {**STUDIES, "fit": fit}[study]
    out = tmp_path / "o"
    value = [] if old in ("--jit", "--no-jit") else ["3"]
    err = fails(capsys, module, ["--quick", old, *value, "--out", str(out)], old, out)
    assert f"{old}: renamed {new}" in err
    err = fails(capsys, module, ["--quick", f"{old}=3", "--out", str(out)], old, out)
    assert f"renamed {new}" in err
    field = new.removeprefix("--no-").removeprefix("--").replace("-", "_")
    assert getattr(module.parse(["--quick", new, *value]), field) == (int(value[0]) if value
                                                                     else not new.startswith("--no-"))
    cfg = tmp_path / "old.toml"
    cfg.write_text(f"{old[2:]} = {'true' if not value else 3}\n")
    err = fails(capsys, module, ["--config", str(cfg), "--out", str(out)], "--config", out)
    assert f"renamed {new[2:]!r}" in err and "old.toml" in err


def test_no_nuts_is_gone_engines_says_it(capsys, tmp_path):
    out = tmp_path / "o"
    err = fails(capsys, fa_gaps, ["--quick", "--no-nuts", "--out", str(out)], "--no-nuts", out)
    assert "leave mcmc out of --engines" in err
    assert "mcmc" not in fa_gaps.parse(["--quick", "--engines", "em,cavi,svi"]).engine_list


def test_every_nuts_study_has_the_same_nuts_flags():
    from elbolab.experiments import fit

    for module in (gmm_engines, fa_gaps, vae_gaps, fit):
        names = {f.name for f in dataclasses.fields(module.Settings)}
        assert {"nuts_samples", "nuts_warmup", "nuts_chains", "nuts_depth", "nuts_jit"} <= names
        assert not names & {"chains", "jit", "no_nuts", "steps", "lr", "epochs", "mcmc_samples",
                            "mcmc_chains", "elbo_samples", "iwae_samples", "is_particles"}


def test_a_run_saved_under_old_names_resumes_under_the_new_ones():
    from elbolab.experiments.core.study import from_saved

    saved = fa_gaps.parse(["--quick"]).values()
    for new, old in (("svi_steps", "steps"), ("svi_lr", "lr"), ("nuts_chains", "chains"),
                     ("impute_particles", "is_particles")):
        saved[old] = saved.pop(new)
    del saved["nuts_jit"]
    s = from_saved(fa_gaps.Settings, {**saved, "steps": 77, "no_nuts": True}, {})
    assert (s.svi_steps, s.nuts_chains, s.impute_particles) == (77, 2, 300)
    assert "mcmc" not in s.engine_list and s.nuts_jit is True
    v = vae_gaps.parse(["--quick"]).values()
    v["mcmc_samples"], v["epochs"] = v.pop("nuts_samples"), v.pop("svi_epochs")
    del v["nuts_warmup"]
    r = from_saved(vae_gaps.Settings, {**v, "mcmc_samples": 9}, {})
    assert (r.nuts_samples, r.nuts_warmup, r.svi_epochs) == (9, 9, 2)  # warmup was = draws


# -- --quick sets defaults only -------------------------------------------------------------------
def test_quick_sets_defaults_and_explicit_flags_win():
    s = gmm_engines.parse(["--quick", "--svi-steps", "7", "--n", "100"])
    assert (s.svi_steps, s.n, s.nuts_chains, s.nuts_jit) == (7, 100, 2, False)  # quick
    assert s.sources["svi_steps"] == "command line" and s.sources["nuts_chains"] == "quick"
    assert gmm_engines.parse(["--quick", "--nuts-jit"]).nuts_jit is True
    f = fa_gaps.parse(["--quick", "--svi-steps", "1000", "--dim", "8"])
    assert (f.svi_steps, f.dim, f.n) == (1000, 8, 60)
    v = vae_gaps.resolve(vae_gaps.parse(["--quick", "--svi-epochs", "3", "--hidden", "8,4"]))
    assert (v["svi_epochs"], v["hidden"], v["gap_points"]) == (3, (8, 4), 6)
    d = gmm_engines.parse([])
    assert (d.svi_steps, d.n, d.nuts_chains, d.nuts_jit) == (500, 100, 4, True)


@pytest.mark.parametrize("study,flags,flag", [
    ("gmm_engines", ["--svi-steps", "0"], "--svi-steps"),
    ("gmm_engines", ["--nuts-chains", "0"], "--nuts-chains"),
    ("gmm_engines", ["--nuts-depth", "0"], "--nuts-depth"),
    ("gmm_engines", ["--nuts-samples", "0"], "--nuts-samples"),
    ("gmm_engines", ["--restarts", "0"], "--restarts"),
    ("gmm_engines", ["--eval-particles", "1"], "--eval-particles"),
    ("gmm_engines", ["--nuts-warmup", "-1"], "--nuts-warmup"),
    ("fa_gaps", ["--svi-steps", "0"], "--svi-steps"),
    ("fa_gaps", ["--nuts-chains", "0"], "--nuts-chains"),
    ("fa_gaps", ["--nuts-samples", "0"], "--nuts-samples"),
    ("fa_gaps", ["--eval-particles", "1"], "--eval-particles"),
    ("fa_gaps", ["--nuts-warmup", "-1"], "--nuts-warmup"),
    ("vae_gaps", ["--svi-epochs", "0"], "--svi-epochs"),
    ("vae_gaps", ["--nuts-chains", "0"], "--nuts-chains"),
    ("vae_gaps", ["--nuts-warmup", "-1"], "--nuts-warmup"),
    ("vae_gaps", ["--eval-particles", "1"], "--eval-particles"),
])
def test_explicit_flag_given_with_quick_is_kept_and_rejected(capsys, tmp_path, study, flags, flag):
    out = tmp_path / "run"
    err = fails(capsys, STUDIES[study], ["--quick", *flags, "--out", str(out)], flag, out)
    assert flags[1] in err  # the value the user gave, not the quick default


# -- --config -----------------------------------------------------------------------------------
def test_config_file_between_quick_and_flags(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('svi-steps = 11\nnuts-chains = 3\nguides = ["collapsed", "auto-normal"]\n'
                   'svi_lr = 0.05\nquick = true\n')
    s = gmm_engines.parse(["--config", str(cfg), "--nuts-chains", "5"])
    assert (s.svi_steps, s.nuts_chains, s.svi_lr, s.n) == (11, 5, 0.05, 30)  # n: quick (config)
    assert s.guides == "collapsed,auto-normal"
    assert s.sources["svi_steps"] == "config" and s.sources["nuts_chains"] == "command line"


@pytest.mark.parametrize("text,words", [
    ("svi-step = 3\n", "unknown setting 'svi-step'"),
    ("nuts-chains = 'four'\n", "expected an integer"),
    ("nuts-chains = 2.5\n", "expected an integer"),
    ("device = 'tpu'\n", "must be one of"),
    ("nuts-chains = \n", "not valid TOML"),
    ("[svi]\nsteps = 3\n", "unknown setting 'svi'"),
    ("resume = 'x'\n", "unknown setting 'resume'"),
])
def test_bad_config_files(capsys, tmp_path, text, words):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    err = fails(capsys, gmm_engines, ["--config", str(cfg), "--out", str(tmp_path / "o")],
                "--config", tmp_path / "o")
    assert words in err


def test_config_value_is_validated_naming_the_file(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("svi-steps = 0\n")
    err = fails(capsys, fa_gaps, ["--config", str(cfg), "--quick", "--out", str(tmp_path / "o")],
                "--svi-steps")
    assert "c.toml" in err


def test_missing_config_file(capsys, tmp_path):
    fails(capsys, vae_gaps, ["--config", str(tmp_path / "none.toml")], "--config")


# -- --help lists every setting with its default ------------------------------------------------
@pytest.mark.parametrize("name", list(STUDIES))
def test_help_lists_every_setting_with_its_default(capsys, name):
    with pytest.raises(SystemExit) as info:
        cli.main(["run", name, "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    settings = STUDIES[name].Settings
    for f in dataclasses.fields(settings):
        if f.metadata.get("internal"):
            continue
        flag = "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))
        assert flag in text, flag
    assert text.count("(default:") >= len(
        [f for f in dataclasses.fields(settings) if not f.metadata.get("internal")])
    assert "--config FILE.toml" in text and "--resume RUN_DIR" in text


# -- --engines and --guides -----------------------------------------------------------------------
@pytest.mark.parametrize("study,flags,flag,words", [
    ("gmm_engines", ["--guides", "collapsed,mlp"], "--guides", "collapsed, auto-normal"),
    ("gmm_engines", ["--engines", "em,hmc"], "--engines", "em, cavi, svi, mcmc"),
    ("gmm_engines", ["--engines", "em", "--guides", "collapsed"], "--guides", "leaves out"),
    ("gmm_engines", ["--guides", "collapsed,collapsed"], "--guides", "repeated"),
    ("gmm_engines", ["--engines", ""], "--engines", "empty"),
    ("fa_gaps", ["--guides", "mlp,auto-normal"], "--guides", "linear-full"),
    ("fa_gaps", ["--engines", "svi"], "--engines", "em is needed"),
    ("fa_gaps", ["--joint-guides", "exact"], "--joint-guides", "fixed parameters"),
    ("vae_gaps", ["--guides", "mlp,exact"], "--guides", "mlp, flow, linear-diag, linear-full"),
    ("vae_gaps", ["--engines", "mcmc"], "--engines", "svi is needed"),
    ("vae_gaps", ["--devices", "2"], "--devices", "needs --strategy"),
    ("vae_gaps", ["--strategy", "ddp_spawn", "--devices", "2", "--patience", "3"], "--patience",
     "not available with --strategy"),
    ("vae_gaps", ["--strategy", "ddp", "--devices", "3", "--patience", "0"], "--batch-size",
     "multiple of the 3 processes"),
    ("vae_gaps", ["--strategy", "ddp_spawn", "--num-nodes", "2", "--patience", "0"],
     "--num-nodes", "several nodes need --strategy ddp"),
    ("vae_gaps", ["--strategy", "horovod"], "--strategy", "ddp"),
    ("vae_gaps", ["--strategy", "ddp_spawn", "--devices", "2", "--patience", "0",
                  "--checkpoint-every", "5"], "--checkpoint-every", "not available with"),
])
def test_engines_and_guides_are_checked(capsys, tmp_path, study, flags, flag, words):
    err = fails(capsys, STUDIES[study], ["--quick", *flags, "--out", str(tmp_path / "o")], flag,
                tmp_path / "o")
    assert words in err


def test_engines_and_guides_select_the_rows(tmp_path):
    out = tmp_path / "g"
    argv = ["--quick", "--no-progress", "--engines", "cavi,svi", "--guides", "collapsed",
            "--n", "12", "--svi-steps", "10", "--out", str(out)]
    assert gmm_engines.main(argv) == 0
    import pandas as pd

    s = pd.read_csv(out / "summary.csv")
    assert list(zip(s.engine, s.guide)) == [("cavi", "mean-field"), ("svi", "collapsed")]
    assert not (out / "mcmc.nc").exists()
    f = fa_gaps.parse(["--quick", "--engines", "em,cavi"])
    assert f.engine_list == ["em", "cavi"] and f.guide_list == [] and f.joint_list == []


# -- bad flags, files and data: before any work -------------------------------------------------
@pytest.mark.parametrize("study,flags,flag", [
    ("fa_gaps", ["--svi-lr", "-1"], "--svi-lr"),
    ("fa_gaps", ["--svi-lr", "0"], "--svi-lr"),
    ("fa_gaps", ["--svi-lr", "nan"], "--svi-lr"),
    ("fa_gaps", ["--svi-lr", "inf"], "--svi-lr"),
    ("fa_gaps", ["--hidden", "0"], "--hidden"),
    ("fa_gaps", ["--hidden", "a,b"], "--hidden"),
    ("fa_gaps", ["--missing-frac", "1"], "--missing-frac"),
    ("fa_gaps", ["--latent-dim", "5"], "--latent-dim"),
    ("vae_gaps", ["--svi-lr", "nan"], "--svi-lr"),
    ("vae_gaps", ["--hidden", "0"], "--hidden"),
    ("vae_gaps", ["--latent-dim", "100"], "--latent-dim"),
    ("vae_gaps", ["--latent-dim", "1"], "--latent-dim"),
    ("gmm_engines", ["--svi-lr", "inf"], "--svi-lr"),
    ("gmm_engines", ["--K", "0"], "--K"),
    ("gmm_engines", ["--prior-var", "-1"], "--prior-var"),
    ("gmm_engines", ["--seed", str(2**64)], "--seed"),
    ("gmm_engines", ["--seed", "-1"], "--seed"),
    ("gmm_engines", ["--threads", "0"], "--threads"),
    ("gmm_engines", ["--checkpoint-every", "-1"], "--checkpoint-every"),
    ("gmm_engines", ["--nuts-chains", "two"], "--nuts-chains"),
    ("gmm_engines", ["--svi-step", "3"], "--svi-step"),  # misspelled: no abbreviations
    ("gmm_engines", ["--device", "tpu"], "--device"),
])
def test_bad_flags_stop_before_any_work(capsys, tmp_path, monkeypatch, study, flags, flag):
    module = STUDIES[study]
    monkeypatch.setattr(module.common, "open_run", _no_work)
    fails(capsys, module, ["--quick", *flags, "--out", str(tmp_path / "o")], flag, tmp_path / "o")


def _no_work(*args, **kwargs):
    raise AssertionError("the run started although a check should have stopped it")


def _data_cases(tmp: Path) -> dict[str, Path]:
    cases = {"missing": tmp / "missing.csv", "directory": tmp / "dir.csv"}
    cases["directory"].mkdir()
    (tmp / "text.csv").write_text("a,b\nx,y\nz,w\n")
    (tmp / "header.csv").write_text("a,b,c\n")
    (tmp / "ragged.csv").write_text("a,b\n1,2\n3,4,5\n6\n")
    (tmp / "garbage.npy").write_bytes(b"\x93NUMPY\x01\x00garbage that is not an array")
    (tmp / "noext").write_text("a,b\n1,2\n")
    (tmp / "empty.npy").write_bytes(b"")
    for name in ("text.csv", "header.csv", "ragged.csv", "garbage.npy", "noext", "empty.npy"):
        cases[name] = tmp / name
    return cases


@pytest.mark.parametrize("study", list(STUDIES))
@pytest.mark.parametrize("case", ["missing", "directory", "text.csv", "header.csv", "ragged.csv",
                                  "garbage.npy", "noext", "empty.npy", "unreadable"])
def test_bad_data_files(capsys, tmp_path, monkeypatch, study, case):
    if case == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads files whatever their mode")
        path = tmp_path / "locked.csv"
        path.write_text("a,b\n1,2\n")
        path.chmod(0)
    else:
        path = _data_cases(tmp_path)[case]
    module = STUDIES[study]
    monkeypatch.setattr(module.common, "open_run", _no_work)
    out = tmp_path / "o"
    fails(capsys, module, ["--quick", "--data", str(path), "--out", str(out)], "--data", out)


def test_data_with_too_few_columns_for_the_latent_dimension(capsys, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "imgs.npy", rng.random((60, 2, 2)))  # 4 pixels
    monkeypatch.setattr(vae_gaps, "train_vae", _no_work)
    out = tmp_path / "o"
    fails(capsys, vae_gaps, ["--quick", "--data", str(tmp_path / "imgs.npy"), "--latent-dim", "4",
                             "--likelihood", "gaussian", "--out", str(out)], "--latent-dim", out)
    np.save(tmp_path / "x.npy", rng.normal(size=(40, 3)))
    fails(capsys, fa_gaps, ["--quick", "--data", str(tmp_path / "x.npy"), "--latent-dim", "3",
                            "--out", str(out)], "--latent-dim", out)


@pytest.mark.parametrize("study", list(STUDIES))
@pytest.mark.parametrize("make,words", [
    (lambda t: (t / "f").write_text("x") and t / "f", "not a folder"),
    (lambda t: (t / "f").write_text("x") and t / "f" / "sub", "not a folder"),
    (lambda t: Path("/proc/elbolab/no/such"), "cannot create"),
    (lambda t: Path("."), "names no folder"),
])
def test_bad_out(capsys, tmp_path, study, make, words):
    out = make(tmp_path)
    err = fails(capsys, STUDIES[study], ["--quick", "--out", str(out)], "--out")
    assert words in err
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["f"])


@pytest.mark.parametrize("study", list(STUDIES))
def test_read_only_out(capsys, tmp_path, study):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        fails(capsys, STUDIES[study], ["--quick", "--out", str(ro / "run")], "--out", ro / "run")
    finally:
        ro.chmod(0o755)


def test_errors_at_the_real_command_line(tmp_path):
    """Through the console entry point in a fresh interpreter: exit status 2, <= 3 lines."""
    runs = [
        ["run", "fa_gaps", "--quick", "--svi-lr", "nan", "--out", str(tmp_path / "a")],
        ["run", "gmm_engines", "--K"],
        ["run", "fa_gaps", "--quick", "--steps", "9", "--out", str(tmp_path / "a")],
    ]
    code = "import sys; from elbolab.experiments.cli import main; raise SystemExit(main(sys.argv[1:]))"
    for argv in runs:
        r = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 2, (argv, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert 1 <= len(lines) <= 3 and "Traceback" not in r.stderr, r.stderr
        assert {"fa_gaps": "--svi-lr", "gmm_engines": "--K"}[argv[1]] in r.stderr or \
            "--steps: renamed --svi-steps" in r.stderr
        assert not (tmp_path / "a").exists()


def test_cli_error_is_a_system_exit_with_status_2():
    err = CliError("--x: bad")
    assert isinstance(err, SystemExit) and err.code == 2 and str(err) == "--x: bad"


def test_process_rank_reads_the_launchers_environment(monkeypatch):
    from elbolab.experiments.core.common import process_rank

    for key in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert process_rank(4) == 0
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert process_rank(4) == 6  # Lightning's launcher on the second node
    monkeypatch.setenv("SLURM_PROCID", "0")  # inherited inside an interactive SLURM job
    assert process_rank(4) == 6  # Lightning's launcher still decides
    monkeypatch.setenv("RANK", "5")
    assert process_rank(4) == 5  # torchrun says it directly


def test_vae_gaps_trains_on_two_spawned_processes(tmp_path):
    pytest.importorskip("lightning")
    import pandas as pd

    out = tmp_path / "v"
    argv = ["--quick", "--no-progress", "--strategy", "ddp_spawn", "--devices", "2",
            "--patience", "0", "--engines", "svi", "--guides", "mlp", "--batch-size", "64",
            "--out", str(out)]
    assert vae_gaps.main(argv) == 0
    s = pd.read_csv(out / "summary.csv")
    assert "trained on 2 processes (ddp_spawn)" in s.training_note[0]
    assert json.loads((out / "run.json").read_text())["settings"]["strategy"] == "ddp_spawn"


def test_vae_gaps_under_lightnings_launcher_writes_one_study(tmp_path):
    """--strategy ddp from a plain command: Lightning's launcher starts rank 1 by re-running the
    command; rank 1 trains and writes nothing, rank 0 writes the study once."""
    pytest.importorskip("lightning")
    exe = Path(sys.executable).parent / "elbolab"
    if not exe.exists():
        pytest.skip("the elbolab console script is not installed next to this interpreter")
    out = tmp_path / "d"
    r = subprocess.run([str(exe), "run", "vae_gaps", "--quick", "--no-progress", "--engines", "svi",
                        "--guides", "mlp", "--strategy", "ddp", "--devices", "2", "--patience",
                        "0", "--batch-size", "64", "--out", str(out)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "process 1 done training; rank 0 writes the study" in r.stdout
    assert (out / "summary.csv").exists() and not (tmp_path / "d.incomplete").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.mark.parametrize("argv, hint", [
    (["--svi-step", "10"], "did you mean --svi-steps?"),
    (["--nuts-sample", "3", "--svi-lrr", "3"],
     "did you mean --nuts-samples for --nuts-sample, --svi-lr for --svi-lrr?"),
])
def test_a_misspelled_flag_gets_the_flag_it_is_close_to(argv, hint, capsys, tmp_path):
    err = fails(capsys, gmm_engines, [*argv, "--out", str(tmp_path / "o")], argv[0],
                tmp_path / "o")
    assert "unrecognized arguments" in err and hint in err


def test_progress_bars_only_when_a_person_watches(monkeypatch):
    """A study's bars go to a terminal, never into a redirected log (hundreds of \\r lines)."""
    import io

    from elbolab.experiments.core.study import resolve
    from elbolab.experiments.gmm_engines import Settings

    class Tty(io.StringIO):
        def isatty(self):
            return True

    args, _ = resolve(Settings, [], "gmm_engines", "")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert args.progress is False
    monkeypatch.setattr(sys, "stderr", Tty())
    assert args.progress is True
    args, _ = resolve(Settings, ["--no-progress"], "gmm_engines", "")
    assert args.progress is False


def test_a_warning_during_a_study_is_one_line_naming_the_study(capsys):
    """Not Python's `/path/file.py:246: UserWarning: ...` plus a source line in the run's log."""
    import warnings

    from elbolab.experiments.core import common

    before = warnings.showwarning

    def run(argv):
        warnings.warn("gap decomposition of guide 'ffg': khat 0.85 > 0.7", UserWarning, stacklevel=2)
        return 0

    assert common.entry("vae_gaps", run, []) == 0
    err = capsys.readouterr().err
    assert err == "vae_gaps: warning: gap decomposition of guide 'ffg': khat 0.85 > 0.7\n"
    assert warnings.showwarning is before
