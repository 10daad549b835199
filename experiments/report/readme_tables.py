"""The README's result tables, written from recorded runs (``make readme-tables``).

    elbolab report --readme README.md --readme docs/gmm_engines.md ... runs/gmm_engines runs/fa_gaps runs/vae_gaps
    elbolab report --readme - runs/tour        # print them instead

Each study's table is a fixed selection of columns of one of its CSVs (``TABLES``), followed by a
provenance line naming the run folder, the commit, the machine (CPU or GPU model), device, dtype,
torch version, seed and command it came from. In FILE, each table lives between
``<!-- readme-table: STUDY -->`` and ``<!-- /readme-table -->``; the text between is replaced
whole and everything else is left as it is. A study whose marker is missing, or whose CSV lacks
a column, is an error naming it, and FILE is not touched.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from elbolab.experiments.report.run_files import load_run, provenance, write_atomic
from elbolab.experiments.report.tables import markdown_table


@dataclass(frozen=True)
class TableSpec:
    csv: str
    columns: dict[str, str]  # CSV column -> README header, in order
    se: dict[str, str]  # value column -> its standard-error column, shown as "value ± se"
    decimals: int  # of every number (nats), so the column lines up
    notes: Callable[[pd.Series], str] | None = None  # a last "diagnostics" column, per row


TABLES = {
    "gmm_engines": TableSpec(
        "summary.csv",
        {"engine": "engine", "guide": "guide", "bound": "bound", "elbo": "ELBO (nats)",
         "gap": "gap = log p(x) - ELBO", "converged": "converged"},
        {"elbo": "elbo_se"},
        3,
        notes=lambda r: _mcmc_note(r),
    ),
    "fa_gaps": TableSpec(
        "gaps.csv",
        {"guide": "guide", "approximation_gap": "approximation gap / datum",
         "closed_form_approximation_gap": "closed form", "amortization_gap": "amortization gap / datum"},
        {"approximation_gap": "approximation_gap_se", "amortization_gap": "amortization_gap_se"},
        5,
    ),
    "vae_gaps": TableSpec(
        "gaps.csv",
        {"train_encoder": "trained with", "eval_family": "q* family", "split": "split",
         "log_evidence": "log p(x)", "elbo_q_star": "L[q*]", "elbo_amortized": "L[q]",
         "approximation_gap": "approx. gap", "amortization_gap": "amort. gap"},
        {},
        2,
    ),
}
BEGIN = "<!-- readme-table: {} -->"
END = "<!-- /readme-table -->"


def study_table(run_dir, study: str) -> str:
    """The Markdown table of ``study`` from the run in ``run_dir``, and its provenance line."""
    spec = TABLES[study]
    run_dir = Path(run_dir)
    path = run_dir / spec.csv
    if not path.exists():
        raise ValueError(f"RUN_DIR: {run_dir} has no {spec.csv} ({study})")
    df = pd.read_csv(path)
    missing = [c for c in [*spec.columns, *spec.se.values()] if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} for the {study} README table")
    shown = pd.DataFrame(index=df.index)
    for col, header in spec.columns.items():
        if col in spec.se:
            shown[header] = [_num(v, spec.decimals, s) for v, s in zip(df[col], df[spec.se[col]])]
        elif pd.api.types.is_float_dtype(df[col]):
            shown[header] = [_num(v, spec.decimals) for v in df[col]]
        else:
            shown[header] = df[col]
    if spec.notes is not None:
        shown["diagnostics"] = [spec.notes(row) for _, row in df.iterrows()]
    meta = load_run(run_dir).meta
    prov = dict(provenance(meta))
    machine = prov.get("GPU") if prov.get("device", "").startswith("cuda") else prov.get("CPU")
    facts = [f"commit {prov.get('commit', 'unknown')}", f"machine: {machine or 'not recorded'}"]
    facts += [f"{k} {prov[k]}" for k in ("device", "dtype", "torch", "seed", "created", "wall time")
              if k in prov]
    line = (f"<sub>Written by `make readme-tables` from `{run_dir.as_posix()}`: {'; '.join(facts)}"
            + (f"; `{prov['command']}`" if "command" in prov else "") + ".</sub>")
    return markdown_table(shown) + "\n\n" + line


def _mcmc_note(row: pd.Series) -> str:
    """R-hat, bulk ESS and divergences of a NUTS row (empty for other engines)."""
    keys = ("diag_r_hat_max", "diag_ess_bulk_min", "diag_divergences")
    if not all(k in row and pd.notna(row[k]) for k in keys):
        return ""
    return (f"R-hat {row[keys[0]]:.3f}, bulk ESS {row[keys[1]]:.0f}, "
            f"{row[keys[2]]:.0f} divergences")


def _num(v, decimals: int, se=None) -> str:
    """``v`` to ``decimals`` places (with ``± se`` when there is one), "—" for NaN."""
    if pd.isna(v):
        return "—"
    text = f"{v:.{decimals}f}".replace("-0." + "0" * decimals, "0." + "0" * decimals)
    return text if se is None or pd.isna(se) or se == 0 else f"{text} ± {se:.{decimals}f}"


def collect(run_dirs) -> dict[str, Path]:
    """{study: folder} for the given study folders and the studies inside the given tours."""
    found = {}
    for d in map(Path, run_dirs):
        run = load_run(d)
        for r in [run, *run.parts]:
            if r.study in TABLES:
                found[r.study] = r.path
    if not found:
        raise ValueError(f"RUN_DIR: none of {', '.join(map(str, run_dirs))} is a run of "
                         f"{', '.join(TABLES)}")
    return found


def update(text: str, tables: dict[str, str]) -> str:
    """``text`` with the block of each study replaced by its table."""
    for study, table in tables.items():
        pattern = re.compile(re.escape(BEGIN.format(study)) + r".*?" + re.escape(END), re.S)
        if not pattern.search(text):
            raise ValueError(f"--readme: no '{BEGIN.format(study)}' ... '{END}' block for {study}")
        text = pattern.sub(lambda _m, s=study, t=table: f"{BEGIN.format(s)}\n{t}\n{END}", text, count=1)
    return text


def flags_section() -> str:
    """Every study's ``--help``, each in a collapsed block (the README's flag list)."""
    import contextlib
    import importlib
    import io

    from elbolab.experiments.cli import EXPERIMENTS

    parts = []
    for name in EXPERIMENTS:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            importlib.import_module(f"elbolab.experiments.{name}").main(["--help"])
        parts.append(f"<details><summary><code>elbolab run {name} --help</code></summary>\n\n"
                     f"```text\n{buf.getvalue().rstrip()}\n```\n</details>")
    return "\n\n".join(parts)


def main(run_dirs, readmes) -> None:
    """Rewrite the marked tables of every file of ``readmes`` (one path, or several) from the
    runs in ``run_dirs``; ``-`` prints them instead. Each study given must have its block in at
    least one file; the flags block is written wherever it is. Every file is checked before any
    is written."""
    readmes = [Path(readmes)] if isinstance(readmes, str | Path) else [Path(r) for r in readmes]
    tables = {s: study_table(d, s) for s, d in collect(run_dirs).items()}
    if any(str(r) == "-" for r in readmes):
        tables["flags"] = flags_section()
        for s, t in tables.items():
            print(f"{BEGIN.format(s)}\n{t}\n{END}\n")
        return
    texts = {}
    for r in readmes:
        if not r.is_file():
            raise ValueError(f"--readme: {r} is not a file")
        texts[r] = r.read_text()
    for study in tables:
        if not any(BEGIN.format(study) in t for t in texts.values()):
            raise ValueError(f"--readme: no '{BEGIN.format(study)}' ... '{END}' block for {study} "
                             f"in {', '.join(map(str, readmes))}")
    if any(BEGIN.format("flags") in t for t in texts.values()):
        tables["flags"] = flags_section()
    new = {r: update(t, {s: v for s, v in tables.items() if BEGIN.format(s) in t})
           for r, t in texts.items()}
    for r, text in new.items():
        write_atomic(r, text)
        shown = [s for s in tables if BEGIN.format(s) in texts[r]]
        print(f"rewrote the {', '.join(shown) or 'no'} table(s) in {r}")
