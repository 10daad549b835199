"""Several runs side by side: one table and one figure (``elbolab compare``).

    elbolab compare RUN_DIR [RUN_DIR ...] [--out runs/compare] [--overwrite]

Each RUN_DIR is a study's folder or a tour (whose studies are taken one by one). Their
``summary.csv`` rows are stacked into ``comparison.csv`` with columns saying where each row came
from: ``run`` (the folder, as given), ``study``, and each run's ``seed``, ``device``, ``dtype``,
``commit`` (from its run.json; the summary's own per-row values win where it has them).
``comparison_wide.csv`` puts ELBO per datum side by side, one column per run, rows matched on
(study, model, engine, guide, bound), with the largest difference between runs (the number to read
when comparing CPU with CUDA, or two seeds). ``comparison.png`` draws ELBO per datum (± 1 s.e.)
and, where there is an exact or estimated evidence, the gap per datum, by engine/guide, one
marker per run, one row of panels per study. A report of all of it (``report.html`` and
``report.md``) is written beside them; the folder is written whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from elbolab.experiments.core import rundir  # noqa: E402
from elbolab.experiments.core.study import CliError  # noqa: E402
from elbolab.experiments.report import build as report
from elbolab.experiments.report import formatting, run_files
from elbolab.experiments.tour import staged  # noqa: E402

KEY = ["engine", "guide", "bound"]
RUN_COLUMNS = ["run", "study", "fit", "seed", "device", "dtype", "commit"]
TELLERS = ("params", "train_encoder", "split", "eval_family", "model")  # what tells fits apart
MARKERS = "os^Dv<>Pp*hX"


def _label(path: Path, others: list[Path]) -> str:
    """The shortest trailing part of ``path`` that tells it from every other run."""
    parts = path.resolve().parts
    for k in range(1, len(parts) + 1):
        tail = "/".join(parts[-k:])
        if all("/".join(o.resolve().parts[-k:]) != tail for o in others if o != path):
            return tail
    return str(path)


def fit_labels(df: pd.DataFrame) -> list[str]:
    """``engine/guide (bound)`` per row; where that repeats within the table, with the first column
    of ``TELLERS`` (else any text column) that tells the rows apart, else ``#k``."""
    base = [f"{e}/{g} ({b})" for e, g, b in zip(*(df.get(c, pd.Series([""] * len(df))).astype(str)
                                                  for c in KEY))]
    labels = pd.Series(base, index=df.index)
    dup = labels.duplicated(keep=False)
    if dup.any():
        text_cols = [c for c in df.columns if df[c].dtype == object and c not in (*KEY, *RUN_COLUMNS)]
        for col in [*[c for c in TELLERS if c in df.columns], *text_cols]:
            if not df.loc[dup].assign(_l=labels).duplicated(["_l", col]).any():
                labels[dup] = labels[dup] + ", " + col + "=" + df.loc[dup, col].astype(str)
                break
        else:
            labels[dup] = labels[dup] + " #" + (labels[dup].groupby(labels[dup]).cumcount() + 1).astype(str)
    return labels.tolist()


def collect(run_dirs) -> pd.DataFrame:
    """Every summary row of every run, with ``run``, ``study``, ``fit`` (:func:`fit_labels`),
    ``seed``, ``device``, ``dtype`` and ``commit`` columns first. A folder with no summary is an
    error naming it."""
    run_dirs = [Path(d) for d in run_dirs]
    if len({d.resolve() for d in run_dirs}) < len(run_dirs):
        raise ValueError("RUN_DIR: the same folder is given twice")
    frames = []
    for d in run_dirs:
        top = run_files.load_run(d)
        studies = [r for r in [top, *top.parts] if "summary.csv" in dict(r.tables)]
        if not studies:
            raise ValueError(f"RUN_DIR: {d} holds no summary.csv (itself or in a study folder)")
        for r in studies:
            df = dict(r.tables)["summary.csv"].copy()
            meta = dict(run_files.provenance(r.meta))
            facts = {"run": _label(d, run_dirs), "study": r.study,
                     "seed": r.meta.get("seed"), "device": r.meta.get("device"),
                     "dtype": r.meta.get("dtype"), "commit": meta.get("commit", "unknown")}
            for col, value in facts.items():
                if col not in df.columns or col in ("run", "study", "commit"):
                    df[col] = value
                else:
                    df[col] = df[col].fillna(value) if value is not None else df[col]
            df["fit"] = fit_labels(df)
            frames.append(df)
    table = pd.concat(frames, ignore_index=True)
    return table[RUN_COLUMNS + [c for c in table.columns if c not in RUN_COLUMNS]]


def wide(table: pd.DataFrame, value: str = "elbo_per_datum") -> pd.DataFrame:
    """``value`` per (study, fit), one column per run, and the largest difference between runs
    (NaN where fewer than two runs have the row)."""
    if value not in table.columns:
        raise ValueError(f"summary.csv: no {value} column to compare")
    w = table.set_index(["study", "fit", "run"])[value].unstack("run")
    order = list(dict.fromkeys(zip(table["study"], table["fit"])))
    w = w.reindex(pd.MultiIndex.from_tuples(order, names=["study", "fit"]))
    w = w[list(dict.fromkeys(table["run"]))]
    spread = w.max(axis=1) - w.min(axis=1)
    w["max_difference"] = spread.where(w.notna().sum(axis=1) >= 2)
    return w.reset_index()


def plot(table: pd.DataFrame, path: Path) -> Path:
    """ELBO per datum (± s.e.) and gap per datum by engine/guide, one marker per run."""
    studies = list(dict.fromkeys(table["study"]))
    runs = list(dict.fromkeys(table["run"]))
    has_gap = "gap_per_datum" in table and table["gap_per_datum"].notna().any()
    ncol = 2 if has_gap else 1
    heights = [max(1.6, 0.28 * table.loc[table.study == s, "fit"].nunique()) for s in studies]
    fig, axes = plt.subplots(len(studies), ncol, figsize=(6.2 * ncol, sum(heights) + 1.2),
                             squeeze=False, gridspec_kw={"height_ratios": heights})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labelled = set()
    for i, s in enumerate(studies):
        sub = table[table.study == s]
        labels = list(dict.fromkeys(sub["fit"]))
        ypos = {lab: j for j, lab in enumerate(labels)}
        for col, (value, se, xlabel) in enumerate(
            [("elbo_per_datum", "elbo_se", "ELBO per datum (nats)"),
             ("gap_per_datum", None, "gap per datum = (log p(x) - ELBO) / n (nats)")][:ncol]
        ):
            ax = axes[i][col]
            for k, run in enumerate(runs):
                rows = sub[(sub.run == run) & sub[value].notna()] if value in sub else sub.iloc[:0]
                if rows.empty:
                    continue
                offset = (k - (len(runs) - 1) / 2) * 0.8 / max(len(runs), 1)
                y = np.array([ypos[lab] for lab in rows["fit"]]) + offset
                err = (rows[se] / rows["n"]).fillna(0).to_numpy() if se and se in rows and "n" in rows else None
                ax.errorbar(rows[value].to_numpy(), y, xerr=err, fmt=MARKERS[k % len(MARKERS)],
                            color=colors[k % len(colors)], ms=5, capsize=2, lw=1,
                            label=None if run in labelled else run)
                labelled.add(run)
            ax.set_yticks(range(len(labels)))
            ax.set_yticklabels(labels if col == 0 else [""] * len(labels), fontsize=7)
            ax.set_ylim(len(labels) - 0.5, -0.5)
            ax.grid(axis="x", alpha=0.3)
            ax.set_title(s if col == 0 else f"{s}: gap", fontsize=9, loc="left")
            if i == len(studies) - 1:
                ax.set_xlabel(xlabel, fontsize=8)
    fig.legend(loc="upper center", ncol=min(len(runs), 4), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (sum(heights) + 1.2)))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(run_dirs, out: Path, overwrite: bool = False) -> Path:
    """Write comparison.csv, comparison_wide.csv, comparison.png, run.json and the report to
    ``out``; return the report's path."""
    rundir.check_out(Path(out), overwrite=overwrite)  # before reading anything
    table = collect(run_dirs)
    spread = wide(table)
    with staged(out, overwrite) as tmp:
        table.to_csv(tmp / "comparison.csv", index=False)
        spread.to_csv(tmp / "comparison_wide.csv", index=False)
        plot(table, tmp / "comparison.png")
        runs = {}
        for d in map(Path, run_dirs):
            top = run_files.load_run(d)
            runs[_label(d, [Path(x) for x in run_dirs])] = {
                "path": str(d), **{r.study: dict(run_files.provenance(r.meta)) for r in [top, *top.parts]
                                   if r.meta}}
        meta = {"study": "compare", "command": " ".join(["elbolab compare", *map(str, run_dirs)]),
                "created": datetime.now(UTC).isoformat(timespec="seconds"), "runs": runs}
        (tmp / "run.json").write_text(json.dumps(meta, indent=2, default=str))
        report.build(tmp, name=Path(out).name)
    return Path(out) / "report.html"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="elbolab compare", description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="study or tour folders")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="(default runs/compare)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out whole")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = compare(args.run_dirs, args.out, args.overwrite)
    except (ValueError, CliError) as exc:
        print(f"elbolab compare: {exc}", file=sys.stderr)
        return 2
    table = pd.read_csv(args.out / "comparison_wide.csv")
    print(f"{len(table)} rows from {len(args.run_dirs)} runs; largest ELBO/datum difference "
          f"between runs: {formatting.fmt(table['max_difference'].max())} nats")
    print(f"wrote comparison.csv, comparison_wide.csv, comparison.png; report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
