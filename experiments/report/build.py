"""A run's report, rebuilt from its files: ``report.html`` (one self-contained offline page, tables
and figures inline as base64 data URIs, no script, no network) and ``report.md`` beside it.

    elbolab report RUN_DIR [RUN_DIR ...]
    elbolab report --readme README.md RUN_DIR [RUN_DIR ...]   # the README's result tables

A run folder is a study's output (``summary.csv``, ``run.json``, other CSVs, PNG figures and, from
the tour, ``log.txt``) or a folder of such runs (a tour, a comparison): one section per subfolder.
Nothing is recomputed: every number on the page is a cell of a CSV on disk.

Each study's section opens with sentences written from its numbers (elbolab.experiments.report.findings): the
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
import sys
from pathlib import Path

import pandas as pd

from elbolab.experiments.report import convergence, findings
from elbolab.experiments.report.formatting import denoise, fit_labels, noise_tolerance, num
from elbolab.experiments.report.run_files import (
    FIGURE_TYPES,
    PRIMARY,
    Run,
    load_run,
    provenance,
    write_atomic,
)
from elbolab.experiments.report.tables import (
    CHAR_PX,
    WRAP_CHARS,
    Table,
    html_table,
    markdown_table,
    md_table,
    table_view,
)

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
LOWER_BOUNDS = findings.LOWER_BOUNDS  # bound values whose gap is an inference gap


def headline(summary: pd.DataFrame) -> str:
    """One line about a study's summary table: fits, the evidence, the tightest bound, convergence
    and, when the posterior reference did not converge, that."""
    parts = [f"{len(summary)} fits"]
    if "log_evidence" in summary and summary["log_evidence"].notna().any():
        row = summary[summary["log_evidence"].notna()].iloc[0]
        per = row["log_evidence"] / row["n"] if "n" in row and row["n"] else row["log_evidence"]
        method = f" ({row['log_evidence_method']})" if "log_evidence_method" in row else ""
        parts.append(f"log p(x) = {per:.4f}/datum{method}")
    labels = pd.Series(fit_labels(summary), index=summary.index)
    bounds = summary[summary["bound"].isin(LOWER_BOUNDS)] if "bound" in summary else summary.iloc[:0]
    if "gap_per_datum" in bounds and bounds["gap_per_datum"].notna().any():
        tol = noise_tolerance(summary).get("gap_per_datum", 0.0)
        best = bounds.loc[bounds["gap_per_datum"].idxmin()]
        gap = denoise(best["gap_per_datum"], tol)
        parts.append(f"tightest: {labels[best.name]} ({best.get('bound', '?')}), "
                     f"gap {num(gap)}/datum")
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
    chains = convergence.nuts_chains(dict(run.tables), run.meta)
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
        out.append(html_table(table_view("overview", _overview(run))))
        out.append("<nav>" + "".join(f'<a href="#{html.escape(p.name)}">{html.escape(p.name)}</a>'
                                     for p in run.parts) + "</nav>")
    first, rest = _section_tables(run, root)
    out += [html_table(t) for t in first]
    for fig in run.figures:
        out.append(f'<figure><img src="{_data_uri(fig)}" alt="{html.escape(fig.name)}">'
                   f"<figcaption>{html.escape(fig.name)}</figcaption></figure>")
    out += [html_table(t) for t in rest]
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
        out += md_table(t)
    for fig in run.figures:
        out += [f"![{fig.name}]({fig.relative_to(root).as_posix()})", ""]
    for t in rest:
        out += md_table(t)
    if run.log:
        out += [f"Console output: [{(run.path / 'log.txt').relative_to(root).as_posix()}]"
                f"({(run.path / 'log.txt').relative_to(root).as_posix()})", ""]
    for p in run.parts:
        out.append(_md_run(p, root, min(level + 1, 3)))
    return "\n".join(out)


def render_markdown(run: Run) -> str:
    return _md_run(run, run.path, 1)


def build(run_dir, name: str | None = None) -> tuple[Path, Path]:
    """(Re)write ``report.html`` and ``report.md`` in ``run_dir`` from the files there."""
    run = load_run(run_dir, name)
    return (write_atomic(run.path / "report.html", render_html(run)),
            write_atomic(run.path / "report.md", render_markdown(run)))


def main(argv=None) -> int:
    from elbolab.experiments.report import readme_tables

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
