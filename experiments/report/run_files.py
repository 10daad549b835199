"""A run folder as the report reads it (its CSVs, figures, log, run.json's provenance and the runs
inside it), and writing a file into it atomically."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from elbolab.experiments.core import rundir

MAX_LOG_CHARS = 100_000
FIGURE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
REPORT_FILES = ("report.html", "report.md")
PRIMARY = ("summary.csv", "comparison_wide.csv")  # shown first, before the figures


@dataclass
class Run:
    """What a report shows of one folder: its own files and, for a tour, its studies."""

    path: Path
    name: str  # the folder's name
    study: str  # run.json's "study" (else the folder's name)
    meta: dict
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    others: list[Path] = field(default_factory=list)
    log: str | None = None
    parts: list[Run] = field(default_factory=list)


def load_run(path, name: str | None = None) -> Run:
    """Read a run folder (recursively for the runs inside it); a bad folder raises ValueError
    naming it. ``name``: the title, if not the folder's name (a folder not yet in place)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"RUN_DIR: {path} is not a folder")
    meta = {}
    if (path / "run.json").exists():
        try:
            meta = json.loads((path / "run.json").read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"RUN_DIR: {path / 'run.json'} is not readable JSON ({exc})") from exc
    run = Run(path=path, name=name or path.name, study=str(meta.get("study") or path.name), meta=meta)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    for p in sorted((p for p in files if p.suffix == ".csv"), key=lambda p: p.name not in PRIMARY):
        try:
            run.tables.append((p.name, pd.read_csv(p)))
        except (OSError, ValueError) as exc:
            raise ValueError(f"RUN_DIR: {p} is not a readable CSV ({exc})") from exc
    run.figures = [p for p in files if p.suffix.lower() in FIGURE_TYPES]
    run.others = [
        p for p in files
        if p.suffix != ".csv" and p not in run.figures
        and p.name not in (*REPORT_FILES, "run.json", "log.txt")
    ]
    if (path / "log.txt").exists():
        run.log = (path / "log.txt").read_text(errors="replace")[-MAX_LOG_CHARS:]
    subdirs = [p for p in path.iterdir() if _visible_dir(p)]
    order = list(meta.get("studies") or [])
    subdirs.sort(key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))
    run.parts = [load_run(p) for p in subdirs if _is_run(p)]
    if not (run.tables or run.figures or run.parts):
        raise ValueError(f"RUN_DIR: {path} holds no summary.csv, CSV table, figure or run folder")
    return run


def _visible_dir(p: Path) -> bool:
    """A folder that may hold a run: not hidden, not an unfinished run's working folder."""
    return p.is_dir() and not p.name.startswith(".") and not p.name.endswith(rundir.SUFFIX)


def _is_run(path: Path) -> bool:
    return any((path / f).exists() for f in ("summary.csv", "run.json")) or any(
        _is_run(p) for p in path.iterdir() if _visible_dir(p)
    )


def provenance(meta: dict) -> list[tuple[str, str]]:
    """(label, value) pairs saying where and how a run was made, from whatever run.json holds."""
    places = [meta] + [meta[k] for k in ("machine", "environment", "git", "versions", "settings")
                       if isinstance(meta.get(k), dict)]

    def find(*keys):
        for place in places:
            for k in keys:
                if place.get(k) not in (None, "", {}):
                    return place[k]
        return None

    commit = find("commit", "git_commit", "sha")
    if isinstance(meta.get("git"), str):
        commit = commit or meta["git"]
    dirty = find("dirty", "git_dirty")
    rows = [
        ("command", find("command")),
        ("created", find("created", "started")),
        ("commit", f"{str(commit)[:12]}{' (uncommitted changes)' if dirty else ''}" if commit else None),
        ("seed", find("seed")),
        ("device", find("device")),
        ("dtype", find("dtype")),
        ("CPU", find("cpu", "cpu_model", "processor")),
        ("CPU cores", find("cpu_count", "cores", "logical_cpus")),
        ("GPU", find("gpu", "gpu_model", "gpu_name")),
        ("torch", find("torch")),
        ("pyro", find("pyro")),
        ("platform", find("platform")),
        ("wall time", _secs(meta.get("wall_seconds"))),
        ("CPU time", _secs(meta.get("cpu_seconds"))),
    ]
    return [(k, str(v)) for k, v in rows if v is not None]


def _secs(v) -> str | None:
    return f"{v:.1f} s" if isinstance(v, int | float) else None


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
