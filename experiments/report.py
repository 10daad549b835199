"""A run's report, rebuilt from its files: ``report.html`` (one self-contained offline page, tables
and figures inline as base64 data URIs, no script, no network) and ``report.md`` beside it.

    elbolab report RUN_DIR [RUN_DIR ...]
    elbolab report --readme README.md RUN_DIR [RUN_DIR ...]   # the README's result tables

A run folder is a study's output (``summary.csv``, ``run.json``, other CSVs, PNG figures and, from
the tour, ``log.txt``) or a folder of such runs (a tour, a comparison): one section per subfolder.
Nothing is recomputed: every number on the page is a cell of a CSV on disk.

Each study's section opens with sentences written from its numbers (experiments.findings): the
tightest bound and by how much, the approximation and amortization gaps, the fits that did not
converge and why, and whether the posterior reference can be trusted (numbers against an
unconverged NUTS reference are called provisional). Its summary table shows one row label per
fit (engine/guide [params]) and the columns a reader needs; every table is cut to the page's
width, names the columns it leaves out and links the CSV that holds them all.

Cells: 7 significant digits (4 below 1); NaN as "-"; a value below 1e-9 of its column's scale
(or 1e-12 of its table's) is rounding noise and prints as 0. Columns empty in every row are
left out, columns constant over a table's rows are stated once above it, long tables show their
first rows and say how many there are.
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

from experiments import findings, rundir

MAX_ROWS = 60  # rows of one table shown in a report (the CSV keeps them all)
#: the width a table may take (the page is 1180 px wide less its margins) and how a column's
#: width is estimated from its characters (12.5 px type); text longer than WRAP_CHARS wraps
PAGE_PX = 1080
CHAR_PX = 7.4
CELL_PAD_PX = 15
WRAP_CHARS = 30
FOOTNOTE_CHARS = 60  # a text this long repeated in a table's rows is written once, under it
#: columns of each CSV the report shows first (as many as fit; the rest are named and linked)
PREFERRED = {
    "reference.csv": ["method", "quantity", "mean", "sd", "ref_mean", "ref_sd",
                      "mean_error_in_ref_sd", "sd_ratio", "w1_in_ref_sd", "reference", "draws",
                      "ref_draws", "aggregate", "ref_converged", "ref_flag"],
    "posterior.csv": ["engine", "quantity", "mean", "sd", "ref_mean", "ref_sd", "mean_error",
                      "sd_ratio", "w1", "reference", "ref_flag", "nuts_mean", "nuts_sd",
                      "nuts_r_hat", "nuts_ess_bulk", "vb_mean", "vb_sd", "em", "truth"],
    "gaps.csv": ["train_encoder", "eval_family", "split", "guide", "local_family", "amortized",
                 "n", "approximation_gap", "approximation_gap_se",
                 "closed_form_approximation_gap", "amortization_gap", "amortization_gap_se",
                 "inference_gap", "flagged", "log_evidence", "elbo_q_star", "elbo_amortized",
                 "unit", "log_evidence_method", "q_star_converged", "flags"],
    "gaps_points.csv": ["guide", "local_family", "scope", "index", "log_evidence",
                        "approximation_gap", "amortization_gap", "inference_gap", "flagged",
                        "flags"],
    "mcmc_diagnostics.csv": ["quantity", "mean", "sd", "r_hat", "ess_bulk", "ess_tail",
                             "mcse_mean", "chains", "draws"],
    "mcmc.csv": ["approximation", "points", "mean_abs_standardized_error",
                 "max_abs_standardized_error", "sd_ratio_mean", "sd_ratio_min",
                 "gaussian_kl_to_nuts_per_point", "nuts_r_hat_max", "nuts_ess_bulk_min",
                 "nuts_divergences", "nuts_draws", "nuts_converged", "ref_flag"],
}
#: columns that mark a row's numbers as unreliable: shown whenever their table is
ALWAYS_SHOWN = ("ref_flag", "reference_flag", "flagged", "nuts_converged")
#: columns of summary.csv stated above the short table when they hold one value
CONTEXT_COLUMNS = ("model", "n", "log_evidence_method", "evidence_note", "device", "dtype", "seed")
MAX_LOG_CHARS = 100_000
FIGURE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
REPORT_FILES = ("report.html", "report.md")
LOWER_BOUNDS = findings.LOWER_BOUNDS  # bound values whose gap is an inference gap
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


def fmt(v, zero_below: float = 0.0) -> str:
    """One cell: integers as such, floats to 7 significant digits (4 below 1), NaN as "—"; a
    float with 0 < |v| < ``zero_below`` is rounding noise and prints as 0
    (:func:`experiments.findings.noise_tolerance` gives a table's tolerances)."""
    if v is None or (isinstance(v, float | np.floating) and math.isnan(v)):
        return "—"
    if isinstance(v, bool | np.bool_):
        return str(bool(v))
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        v = findings.denoise(v, zero_below)
        if v == 0:
            return "0"
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


@dataclass
class Table:
    """One table as the report shows it: the columns that fit the page, the rest linked."""

    name: str
    frame: pd.DataFrame  # the shown rows (first MAX_ROWS) and columns
    constants: dict  # column -> its one value, stated above the table
    total: int  # rows in the CSV
    tol: dict  # column -> rounding-noise tolerance (findings.noise_tolerance of the CSV)
    omitted: list[str] = field(default_factory=list)  # columns of the CSV not shown
    link: str | None = None  # the CSV, relative to the report
    notes: list[str] = field(default_factory=list)


def _cell_chars(text: str) -> int:
    """Characters of width a cell takes: text longer than WRAP_CHARS wraps at that width."""
    return min(len(text), WRAP_CHARS)


def _column_px(name: str, cells: list[str]) -> float:
    """Estimated rendered width of a column (header wraps after each underscore)."""
    head = max((len(part) + 1 for part in str(name).split("_")), default=1)
    return max([head] + [_cell_chars(c) for c in cells]) * CHAR_PX + CELL_PAD_PX


def table_view(name: str, df: pd.DataFrame, link: str | None = None, preferred=None,
               context: pd.DataFrame | None = None, budget_px: float | None = None,
               keep_order: bool = False) -> Table:
    """The columns of ``df`` that fit the page (``budget_px``), ``preferred`` ones first (only
    those, when given; shown in ``df``'s order with ``keep_order``); constant columns are stated
    once; the others are named under the table and kept in the CSV at ``link``. ``context``:
    the full CSV when ``df`` is a selection of it (its constant identifying columns are stated
    too, its other columns counted as omitted)."""
    budget_px = PAGE_PX if budget_px is None else budget_px
    source = context if context is not None else df
    df = df.dropna(axis=1, how="all")
    tol = findings.noise_tolerance(df)
    total = len(df)
    rows = df.head(MAX_ROWS)
    order = list(df.columns)
    if preferred is not None:
        order = [c for c in preferred if c in df.columns]
    # the marks of unreliable numbers are kept first, then columns in order while they fit
    selection = [c for c in order if c in ALWAYS_SHOWN] + [c for c in order if c not in ALWAYS_SHOWN]
    constants, shown, omitted, used = {}, [], [], 0.0
    for c in selection:
        if total >= 2 and df[c].nunique(dropna=False) == 1:
            constants[c] = df[c].iloc[0]
            continue
        px = _column_px(c, [fmt(v, tol.get(c, 0.0)) for v in _footnotes(rows[[c]])[0][c]])
        if used + px <= budget_px or not shown:
            shown.append(c)
            used += px
        else:
            omitted.append(c)
    if context is not None:
        for c in CONTEXT_COLUMNS:
            if c in context and c not in df and len(context) >= 2 and context[c].nunique(dropna=False) == 1:
                constants[c] = context[c].iloc[0]
    empty = set(source.columns[source.isna().all()]) if len(source) else set()
    omitted += [c for c in source.columns
                if c not in shown and c not in constants and c not in omitted and c not in empty]
    shown = [c for c in (df.columns if keep_order else order) if c in shown]
    frame, notes = _footnotes(rows[shown])
    return Table(name, frame, constants, total, tol, omitted, link, notes)


def _footnotes(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """A text longer than FOOTNOTE_CHARS repeated in several rows is written once under the
    table ("[1] text") and the rows show its mark ("[1]"), so the column stays narrow."""
    frame = frame.copy()
    notes: list[str] = []
    for c in frame.columns:
        if pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c]):
            continue
        counts = frame[c].map(lambda v: v if isinstance(v, str) and len(v) > FOOTNOTE_CHARS
                              else None).value_counts()
        for text, k in counts.items():
            if k >= 2:
                notes.append(f"[{len(notes) + 1}] {text}")
                frame[c] = frame[c].where(frame[c] != text, f"[{len(notes)}]")
    return frame, notes


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
    """One line about a study's summary table: fits, the evidence, the tightest bound, convergence
    and, when the posterior reference did not converge, that."""
    parts = [f"{len(summary)} fits"]
    if "log_evidence" in summary and summary["log_evidence"].notna().any():
        row = summary[summary["log_evidence"].notna()].iloc[0]
        per = row["log_evidence"] / row["n"] if "n" in row and row["n"] else row["log_evidence"]
        method = f" ({row['log_evidence_method']})" if "log_evidence_method" in row else ""
        parts.append(f"log p(x) = {per:.4f}/datum{method}")
    labels = pd.Series(findings.fit_labels(summary), index=summary.index)
    bounds = summary[summary["bound"].isin(LOWER_BOUNDS)] if "bound" in summary else summary.iloc[:0]
    if "gap_per_datum" in bounds and bounds["gap_per_datum"].notna().any():
        tol = findings.noise_tolerance(summary).get("gap_per_datum", 0.0)
        best = bounds.loc[bounds["gap_per_datum"].idxmin()]
        gap = findings.denoise(best["gap_per_datum"], tol)
        parts.append(f"tightest: {labels[best.name]} ({best.get('bound', '?')}), "
                     f"gap {findings.num(gap)}/datum")
    if "converged" in summary:
        done = summary["converged"].astype(str).str.lower().eq("true").sum()
        parts.append(f"{done}/{len(summary)} converged")
    if "reference_flag" in summary and summary["reference_flag"].fillna("").astype(str).ne("").any():
        parts.append("posterior reference NOT converged (comparisons provisional)")
    return "; ".join(parts)


def _section_tables(run: Run, root: Path) -> tuple[list[Table], list[Table]]:
    """(the tables shown before the figures, those after): the short summary (findings'
    columns, linking summary.csv), then every other CSV, each cut to the page's width."""
    first, rest = [], []
    chains = findings.nuts_chains(dict(run.tables), run.meta)
    for name, df in run.tables:
        link = (run.path / name).relative_to(root).as_posix()
        if name == "summary.csv":
            short = findings.short_summary(df, chains)
            t = table_view("summary", short, link, findings.SHORT_PRIORITY, context=df,
                           keep_order=True)
            t.omitted = [c for c in t.omitted if c not in ("engine", "guide", "params", "converged",
                                                           "reference_flag")]
            if "reference_flag" in short:
                flags = df["reference_flag"].fillna("").astype(str)
                t.notes += [f"provisional: {f}" if not f.startswith("provisional") else f
                            for f in dict.fromkeys(flags[flags != ""].map(_flag_reason))]
            first.append(t)
        elif name in PRIMARY:
            first.append(table_view(name, df, link, PREFERRED.get(name)))
        else:
            rest.append(table_view(name, df, link, PREFERRED.get(name)))
    return first, rest


def _flag_reason(flag: str) -> str:
    """The reference's mark, without the summary's "this fit is the reference; " prefix."""
    return flag.split("; ", 1)[1] if flag.startswith("this fit is the reference") else flag


# ---------------------------------------------------------------------------- HTML

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1180px;
padding:0 16px;color:#1b1f24}
h1{font-size:24px;margin-bottom:4px}h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:36px}
h3{font-size:15px;margin:22px 0 6px}.prov{color:#57606a;font-size:12.5px}.prov b{color:#1b1f24}
.scroll{overflow-x:auto;margin:4px 0 10px}table{border-collapse:collapse;font-size:12.5px}
th,td{border:1px solid #d0d7de;padding:3px 6px;white-space:nowrap}th{background:#f6f8fa;
white-space:normal;vertical-align:bottom}td.text div{white-space:normal;max-width:WRAPem;min-width:6em}
td.num{text-align:right;font-variant-numeric:tabular-nums}.note{color:#57606a;font-size:12px}
ul.findings{background:#f6f8fa;border-left:4px solid #0969da;padding:8px 12px 8px 28px;margin:10px 0}
ul.findings li{margin:3px 0}
figure{display:inline-block;margin:8px 16px 8px 0;vertical-align:top;max-width:100%}
figure img{max-width:100%;border:1px solid #eaeef2}figcaption{font-size:12px;color:#57606a}
pre{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:11.5px}nav a{margin-right:14px}
""".replace("WRAP", str(round(WRAP_CHARS * CHAR_PX / 12.5, 1)))


def _html_cell(v, tol: float) -> str:
    text = html.escape(fmt(v, tol))
    if isinstance(v, int | float | np.number) and not isinstance(v, bool | np.bool_):
        return f'<td class="num">{text}</td>'
    if isinstance(v, str) and len(v) > WRAP_CHARS:
        return f'<td class="text"><div>{text}</div></td>'
    return f"<td>{text}</td>"


def _html_header(name) -> str:
    return "_<wbr>".join(html.escape(part) for part in str(name).split("_"))


def _html_table(t: Table) -> str:
    out = [f"<h3>{html.escape(t.name)}</h3>"]
    if t.constants:
        text = ", ".join(f"{k} = {fmt(v, t.tol.get(k, 0.0))}" for k, v in t.constants.items())
        out.append(f'<p class="note">in every row: {html.escape(text)}</p>')
    head = "".join(f"<th>{_html_header(c)}</th>" for c in t.frame.columns)
    body = ["<tr>" + "".join(_html_cell(v, t.tol.get(c, 0.0)) for c, v in row.items()) + "</tr>"
            for _, row in t.frame.iterrows()]
    out.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>'
               + "".join(body) + "</tbody></table></div>")
    for note in t.notes:
        out.append(f'<p class="note">{html.escape(note)}</p>')
    out.append(_html_more(t))
    return "\n".join(x for x in out if x)


def _html_more(t: Table) -> str:
    """What the table leaves out (rows, columns) and the CSV that holds it all."""
    parts = []
    if t.total > len(t.frame):
        parts.append(f"first {len(t.frame)} of {t.total} rows")
    if t.omitted:
        parts.append(f"{len(t.omitted)} more column{'s' if len(t.omitted) > 1 else ''} ("
                     + ", ".join(t.omitted) + ")")
    if not parts:
        return ""
    where = (f'<a href="{html.escape(t.link)}">{html.escape(Path(t.link).name)}</a>' if t.link
             else html.escape(t.name))
    return f'<p class="note">{html.escape("; ".join(parts))}: all in {where}</p>'


def _data_uri(path: Path) -> str:
    mime = FIGURE_TYPES[path.suffix.lower()]
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _html_run(run: Run, level: int, root: Path) -> str:
    h = f"h{level}"
    title = f"elbolab {run.study}: {run.name}" if level == 1 and run.study != run.name else run.name
    out = [f'<section class="run" id="{html.escape(run.name)}">',
           f"<{h}>{html.escape(title)}</{h}>"]
    prov = provenance(run.meta)
    if prov:
        out.append('<p class="prov">' + " · ".join(
            f"<b>{html.escape(k)}</b> {html.escape(v)}" for k, v in prov) + "</p>")
    said = findings.study_findings(dict(run.tables), run.meta)
    if said:
        out.append('<ul class="findings">' + "".join(f"<li>{html.escape(s)}</li>" for s in said)
                   + "</ul>")
    if run.parts:
        out.append(_html_table(table_view("overview", _overview(run))))
        out.append("<nav>" + "".join(f'<a href="#{html.escape(p.name)}">{html.escape(p.name)}</a>'
                                     for p in run.parts) + "</nav>")
    first, rest = _section_tables(run, root)
    out += [_html_table(t) for t in first]
    for fig in run.figures:
        out.append(f'<figure><img src="{_data_uri(fig)}" alt="{html.escape(fig.name)}">'
                   f"<figcaption>{html.escape(fig.name)}</figcaption></figure>")
    out += [_html_table(t) for t in rest]
    if run.others:
        out.append('<p class="note">other files: ' + ", ".join(
            f"{html.escape(p.name)} ({p.stat().st_size / 1024:.0f} KiB)" for p in run.others) + "</p>")
    if run.log:
        out.append(f"<details><summary>console output (log.txt)</summary><pre>{html.escape(run.log)}</pre></details>")
    out += [_html_run(p, min(level + 1, 3), root) for p in run.parts]
    out.append("</section>")
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
            f"<style>{CSS}</style></head><body>\n{_html_run(run, 1, run.path)}\n</body></html>\n")


# ---------------------------------------------------------------------------- Markdown


def markdown_table(df: pd.DataFrame, tol: dict | None = None) -> str:
    """A GitHub Markdown table of every row and column of ``df``, cells formatted by ``fmt``
    (``tol``: column -> rounding-noise tolerance)."""
    tol = tol or {}
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in df.columns) + " |",
             "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(esc(fmt(v, tol.get(c, 0.0))) for c, v in row.items()) + " |"
              for _, row in df.iterrows()]
    return "\n".join(lines)


def _md_table(t: Table) -> list[str]:
    cut = f" (first {len(t.frame)} of {t.total} rows)" if t.total > len(t.frame) else ""
    out = [f"**{t.name}**{cut}", ""]
    if t.constants:
        out += ["In every row: " + ", ".join(f"{k} = {fmt(v, t.tol.get(k, 0.0))}"
                                             for k, v in t.constants.items()), ""]
    out += [markdown_table(t.frame, t.tol), ""]
    out += [f"{note}" for note in t.notes] + ([""] if t.notes else [])
    if t.omitted and t.link:
        out += [f"{len(t.omitted)} more column(s) ({', '.join(t.omitted)}): all in "
                f"[{Path(t.link).name}]({t.link})", ""]
    return out


def _md_run(run: Run, root: Path, level: int) -> str:
    title = f"elbolab {run.study}: {run.name}" if level == 1 and run.study != run.name else run.name
    out = [f"{'#' * level} {title}", ""]
    prov = provenance(run.meta)
    if prov:
        out += ["; ".join(f"**{k}** {v}" for k, v in prov), ""]
    said = findings.study_findings(dict(run.tables), run.meta)
    if said:
        out += [f"- {s}" for s in said] + [""]
    if run.parts:
        out += [markdown_table(_overview(run)), ""]
    first, rest = _section_tables(run, root)
    for t in first:
        out += _md_table(t)
    for fig in run.figures:
        out += [f"![{fig.name}]({fig.relative_to(root).as_posix()})", ""]
    for t in rest:
        out += _md_table(t)
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
    p.add_argument("--readme", type=Path, action="append", default=None, metavar="FILE",
                   help="instead of reports: rewrite the marked result tables in FILE (e.g. "
                        "README.md; repeat for several files) from these runs; '-' prints them")
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
