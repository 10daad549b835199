"""A run's report, rebuilt from its files: ``report.html`` (one self-contained offline page, tables
and figures inline as base64 data URIs, no script, no network) and ``report.md`` beside it.

    elbolab report RUN_DIR [RUN_DIR ...]
    elbolab report --readme README.md RUN_DIR [RUN_DIR ...]   # the README's result tables

A run folder is a study's output (``summary.csv``, ``run.json``, other CSVs, PNG figures and, from
the tour, ``log.txt``) or a folder of such runs (a tour, a comparison): one section per subfolder.
Nothing is recomputed: every number on the page is a cell of a CSV on disk, printed with 7
significant digits (4 below 1); an empty cell (NaN) shows as "—". Columns empty in every row are
left out and columns constant over a table's rows are stated once above it, so each table is as
narrow as its content allows; long tables show their first rows and say how many there are.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from experiments import rundir

MAX_ROWS = 60  # rows of one table shown in a report (the CSV keeps them all)
MAX_LOG_CHARS = 100_000
FIGURE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
REPORT_FILES = ("report.html", "report.md")
LOWER_BOUNDS = ("elbo", "elbo-collapsed", "iwae", "ais")  # bound values whose gap is an inference gap
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


# ---------------------------------------------------------------------------- what is shown


def fmt(v) -> str:
    """One cell: integers as such, floats to 7 significant digits (4 below 1), NaN as "—"."""
    if v is None or (isinstance(v, float | np.floating) and math.isnan(v)):
        return "—"
    if isinstance(v, bool | np.bool_):
        return str(bool(v))
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        return f"{v:.7g}" if abs(v) >= 1 else f"{v:.4g}"
    return str(v)


def prepare(df: pd.DataFrame) -> tuple[pd.DataFrame, dict, int]:
    """(the shown rows and columns, {constant column: value}, total rows). Columns empty in every
    row are dropped; with two or more rows, columns holding one value become the constants."""
    df = df.dropna(axis=1, how="all")
    constants = {}
    if len(df) >= 2:
        for c in list(df.columns):
            if df[c].nunique(dropna=False) == 1:
                constants[c] = df[c].iloc[0]
        df = df.drop(columns=list(constants))
    return df.head(MAX_ROWS), constants, len(df)


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


def headline(summary: pd.DataFrame) -> str:
    """One line about a study's summary table: fits, the evidence, the tightest bound, convergence."""
    parts = [f"{len(summary)} fits"]
    if "log_evidence" in summary and summary["log_evidence"].notna().any():
        row = summary[summary["log_evidence"].notna()].iloc[0]
        per = row["log_evidence"] / row["n"] if "n" in row and row["n"] else row["log_evidence"]
        method = f" ({row['log_evidence_method']})" if "log_evidence_method" in row else ""
        parts.append(f"log p(x) = {per:.4f}/datum{method}")
    bounds = summary[summary["bound"].isin(LOWER_BOUNDS)] if "bound" in summary else summary.iloc[:0]
    if "gap_per_datum" in bounds and bounds["gap_per_datum"].notna().any():
        best = bounds.loc[bounds["gap_per_datum"].idxmin()]
        parts.append(
            f"tightest: {best.get('engine', '?')}/{best.get('guide', '?')} ({best.get('bound', '?')}), "
            f"gap {best['gap_per_datum']:.4g}/datum"
        )
    if "converged" in summary:
        done = summary["converged"].astype(str).str.lower().eq("true").sum()
        parts.append(f"{done}/{len(summary)} converged")
    return "; ".join(parts)


# ---------------------------------------------------------------------------- HTML

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1180px;
padding:0 16px;color:#1b1f24}
h1{font-size:24px;margin-bottom:4px}h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:36px}
h3{font-size:15px;margin:22px 0 6px}.prov{color:#57606a;font-size:12.5px}.prov b{color:#1b1f24}
.scroll{overflow-x:auto;margin:4px 0 10px}table{border-collapse:collapse;font-size:12.5px}
th,td{border:1px solid #d0d7de;padding:3px 7px;white-space:nowrap}th{background:#f6f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums}.note{color:#57606a;font-size:12px}
figure{display:inline-block;margin:8px 16px 8px 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #eaeef2}figcaption{font-size:12px;color:#57606a}
pre{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:11.5px}nav a{margin-right:14px}
"""


def _html_table(name: str, df: pd.DataFrame) -> str:
    shown, constants, total = prepare(df)
    out = [f"<h3>{html.escape(name)}</h3>"]
    if constants:
        text = ", ".join(f"{k} = {fmt(v)}" for k, v in constants.items())
        out.append(f'<p class="note">in every row: {html.escape(text)}</p>')
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
    body = []
    for _, row in shown.iterrows():
        cells = []
        for v in row:
            cls = ' class="num"' if isinstance(v, int | float | np.number) and not isinstance(v, bool | np.bool_) else ""
            cells.append(f"<td{cls}>{html.escape(fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    out.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>'
               + "".join(body) + "</tbody></table></div>")
    if total > len(shown):
        out.append(f'<p class="note">first {len(shown)} of {total} rows; all in {html.escape(name)}</p>')
    return "\n".join(out)


def _data_uri(path: Path) -> str:
    mime = FIGURE_TYPES[path.suffix.lower()]
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _html_run(run: Run, level: int) -> str:
    h = f"h{level}"
    title = f"elbolab {run.study}: {run.name}" if level == 1 and run.study != run.name else run.name
    out = [f'<{h} id="{html.escape(run.name)}">{html.escape(title)}</{h}>']
    prov = provenance(run.meta)
    if prov:
        out.append('<p class="prov">' + " · ".join(
            f"<b>{html.escape(k)}</b> {html.escape(v)}" for k, v in prov) + "</p>")
    if run.parts:
        out.append(_html_table("overview", _overview(run)))
        out.append("<nav>" + "".join(f'<a href="#{html.escape(p.name)}">{html.escape(p.name)}</a>'
                                     for p in run.parts) + "</nav>")
    out += [_html_table(name, df) for name, df in run.tables if name in PRIMARY]
    for fig in run.figures:
        out.append(f'<figure><img src="{_data_uri(fig)}" alt="{html.escape(fig.name)}">'
                   f"<figcaption>{html.escape(fig.name)}</figcaption></figure>")
    out += [_html_table(name, df) for name, df in run.tables if name not in PRIMARY]
    if run.others:
        out.append('<p class="note">other files: ' + ", ".join(
            f"{html.escape(p.name)} ({p.stat().st_size / 1024:.0f} KiB)" for p in run.others) + "</p>")
    if run.log:
        out.append(f"<details><summary>console output (log.txt)</summary><pre>{html.escape(run.log)}</pre></details>")
    out += [_html_run(p, min(level + 1, 3)) for p in run.parts]
    return "\n".join(out)


def _headline_of(run: Run) -> str:
    summary = dict(run.tables).get("summary.csv")
    return headline(summary) if summary is not None else f"{len(run.tables)} tables, {len(run.figures)} figures"


def _overview(run: Run) -> pd.DataFrame:
    """One row per run inside ``run``: its headline and, for a tour, its wall and CPU seconds."""
    rows = []
    for p in run.parts:
        study = (run.meta.get("studies") or {}).get(p.name)
        study = study if isinstance(study, dict) else {}
        rows.append({"run": p.name, "summary": _headline_of(p), "seconds": study.get("seconds"),
                     "cpu_seconds": study.get("cpu_seconds")})
    return pd.DataFrame(rows).dropna(axis=1, how="all")


def render_html(run: Run) -> str:
    title = f"elbolab report: {run.name}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
            f'</title><meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<style>{CSS}</style></head><body>\n{_html_run(run, 1)}\n</body></html>\n")


# ---------------------------------------------------------------------------- Markdown


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table of every row and column of ``df``, cells formatted by ``fmt``."""
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in df.columns) + " |",
             "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(esc(fmt(v)) for v in row) + " |" for _, row in df.iterrows()]
    return "\n".join(lines)


def _md_table(name: str, df: pd.DataFrame) -> list[str]:
    shown, constants, total = prepare(df)
    out = [f"**{name}**" + (f" (first {len(shown)} of {total} rows)" if total > len(shown) else ""), ""]
    if constants:
        out += ["In every row: " + ", ".join(f"{k} = {fmt(v)}" for k, v in constants.items()), ""]
    return out + [markdown_table(shown), ""]


def _md_run(run: Run, root: Path, level: int) -> str:
    title = f"elbolab {run.study}: {run.name}" if level == 1 and run.study != run.name else run.name
    out = [f"{'#' * level} {title}", ""]
    prov = provenance(run.meta)
    if prov:
        out += ["; ".join(f"**{k}** {v}" for k, v in prov), ""]
    if run.parts:
        out += [markdown_table(_overview(run)), ""]
    primary = [(n, df) for n, df in run.tables if n in PRIMARY]
    for name, df in primary:
        out += _md_table(name, df)
    for fig in run.figures:
        out += [f"![{fig.name}]({fig.relative_to(root).as_posix()})", ""]
    for name, df in run.tables:
        if name not in PRIMARY:
            out += _md_table(name, df)
    if run.log:
        out += [f"Console output: [{(run.path / 'log.txt').relative_to(root).as_posix()}]"
                f"({(run.path / 'log.txt').relative_to(root).as_posix()})", ""]
    for p in run.parts:
        out.append(_md_run(p, root, min(level + 1, 3)))
    return "\n".join(out)


def render_markdown(run: Run) -> str:
    return _md_run(run, run.path, 1)


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def build(run_dir, name: str | None = None) -> tuple[Path, Path]:
    """(Re)write ``report.html`` and ``report.md`` in ``run_dir`` from the files there."""
    run = load_run(run_dir, name)
    return (write_atomic(run.path / "report.html", render_html(run)),
            write_atomic(run.path / "report.md", render_markdown(run)))


def main(argv=None) -> int:
    from experiments import readme_tables

    p = argparse.ArgumentParser(prog="elbolab report", description=__doc__,  # whole, as written
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="study, tour or compare folder")
    p.add_argument("--readme", type=Path, default=None, metavar="FILE",
                   help="instead of reports: rewrite the marked result tables in FILE (e.g. "
                        "README.md) from these runs; '-' prints them")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.readme is not None:
            readme_tables.main(args.run_dirs, args.readme)
            return 0
        runs = [load_run(d) for d in args.run_dirs]  # every folder checked before any is written
        for run in runs:
            build(run.path)
            print(f"wrote {run.path / 'report.html'} and report.md")
    except ValueError as exc:
        print(f"elbolab report: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
