"""Atomic run folders: a study writes into ``<out>.incomplete`` and renames it when complete; a
finished run is replaced only with --overwrite, and then whole; a failed run leaves nothing; the
``files`` of run.json are exactly the folder's; run.json says what made the numbers."""

from __future__ import annotations

import json
import os
import re
import socket

import pytest

from elbolab.experiments import gmm_engines
from elbolab.experiments.core import rundir

#: a run of a few seconds: EM on 12 simulated points
FAST = ["--quick", "--no-progress", "--engines", "em", "--n", "12"]


def run(out, *flags):
    return gmm_engines.main([*FAST, "--out", str(out), *flags])


def test_run_json_records_what_made_the_numbers(tmp_path):
    out = tmp_path / "gmm"
    assert run(out, "--seed", "3") == 0
    assert not rundir.incomplete_path(out).exists()
    meta = json.loads((out / "run.json").read_text())
    assert meta["files"] == sorted(p.name for p in out.iterdir())
    assert "run.json" in meta["files"] and not any(f.startswith(".") for f in meta["files"])
    assert meta["seed"] == 3 and meta["settings"]["seed"] == 3 and meta["dtype"] == "float64"
    assert meta["device"] == "cpu" and meta["study"] == "gmm_engines"
    assert meta["settings"]["n"] == 12 and meta["setting_sources"]["n"] == "command line"
    assert meta["setting_sources"]["restarts"] == "quick"
    assert meta["setting_sources"]["K"] == "default"
    assert {"torch", "pyro", "arviz", "numpy", "python"} <= set(meta["versions"])
    assert meta["machine"]["cpu"] and meta["machine"]["cpu_count"] >= 1
    assert meta["machine"]["gpu"] is None
    commit = meta["git"]["commit"]
    assert commit == "unknown" or re.fullmatch(r"[0-9a-f]{40}", commit)


def test_finished_run_is_refused_then_replaced_whole_with_overwrite(tmp_path, capsys):
    out = tmp_path / "gmm"
    assert run(out, "--seed", "1") == 0
    (out / "note-from-the-old-run.txt").write_text("old")
    before = json.loads((out / "run.json").read_text())
    with pytest.raises(SystemExit) as info:
        run(out, "--seed", "2")
    assert info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text()) == before  # untouched
    assert run(out, "--seed", "2", "--overwrite") == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["seed"] == 2 and not (out / "note-from-the-old-run.txt").exists()
    assert meta["files"] == sorted(p.name for p in out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gmm"]  # nothing else left beside it


def test_a_folder_that_is_not_a_run_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(SystemExit):
        run(out, "--overwrite")
    assert "holds no run" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(empty) == 0 and (empty / "run.json").is_file()


def test_a_failed_run_leaves_no_folder(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("failure in the middle of the run")

    monkeypatch.setattr(gmm_engines, "posterior_table", broken)  # after summary.csv is written
    out = tmp_path / "a" / "b" / "gmm"
    with pytest.raises(RuntimeError, match="middle"):
        run(out)
    assert list(tmp_path.iterdir()) == []  # not even the parents it created
    # and a failed --overwrite keeps the old run whole
    monkeypatch.undo()
    old = tmp_path / "old"
    assert run(old, "--seed", "5") == 0
    before = sorted(p.name for p in old.iterdir()), (old / "summary.csv").read_bytes()
    monkeypatch.setattr(gmm_engines, "posterior_table", broken)
    with pytest.raises(RuntimeError):
        run(old, "--seed", "6", "--overwrite")
    assert (sorted(p.name for p in old.iterdir()), (old / "summary.csv").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_interrupted_folder_handling(tmp_path, capsys):
    out = tmp_path / "gmm"
    tmp = rundir.incomplete_path(out)
    # an interrupted run without checkpoints has nothing to keep: a new run replaces it
    tmp.mkdir()
    (tmp / "summary.csv").write_text("")
    assert run(out) == 0 and not tmp.exists()
    # ... one with checkpoints is kept until the user says --resume or --overwrite
    out2 = tmp_path / "gmm2"
    tmp2 = rundir.incomplete_path(out2)
    (tmp2 / "checkpoints").mkdir(parents=True)
    (tmp2 / "checkpoints" / "svi-collapsed.pt").write_bytes(b"x")
    with pytest.raises(SystemExit):
        run(out2)
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and tmp2.exists()
    assert run(out2, "--overwrite") == 0 and not tmp2.exists()
    # ... and one another live process is writing is refused
    out3 = tmp_path / "gmm3"
    tmp3 = rundir.incomplete_path(out3)
    tmp3.mkdir()
    (tmp3 / rundir.LOCK).write_text(f"{os.getppid()} {socket.gethostname()}\n")
    with pytest.raises(SystemExit):
        run(out3)
    assert "another run" in capsys.readouterr().err


def test_resume_needs_an_interrupted_run(tmp_path, capsys):
    out = tmp_path / "gmm"
    with pytest.raises(SystemExit) as info:
        gmm_engines.main(["--resume", str(out)])
    assert info.value.code == 2 and "no interrupted run" in capsys.readouterr().err
    assert run(out) == 0
    with pytest.raises(SystemExit):
        gmm_engines.main(["--resume", str(out)])
    assert "finished run" in capsys.readouterr().err
