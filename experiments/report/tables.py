"""A CSV as a table of the report: cut to the page's width (the rest named and linked), constant
columns stated once, long texts as footnotes, written as HTML or GitHub Markdown."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from elbolab.experiments.report.formatting import fmt, noise_tolerance

MAX_ROWS = 60  # rows of one table shown in a report (the CSV keeps them all)
#: the width a table may take (the page is 1180 px wide less its margins) and how a column's
#: width is estimated from its characters (12.5 px type); text longer than WRAP_CHARS wraps
PAGE_PX = 1080
CHAR_PX = 7.4
CELL_PAD_PX = 15
WRAP_CHARS = 30
FOOTNOTE_CHARS = 60  # a text this long repeated in a table's rows is written once, under it
#: columns that mark a row's numbers as unreliable: shown whenever their table is
ALWAYS_SHOWN = ("ref_flag", "reference_flag", "flagged", "nuts_converged")
#: columns of summary.csv stated above the short table when they hold one value
CONTEXT_COLUMNS = ("model", "n", "log_evidence_method", "evidence_note", "device", "dtype", "seed")


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
    tol: dict  # column -> rounding-noise tolerance (formatting.noise_tolerance of the CSV)
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
    tol = noise_tolerance(df)
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


def _html_cell(v, tol: float) -> str:
    text = html.escape(fmt(v, tol))
    if isinstance(v, int | float | np.number) and not isinstance(v, bool | np.bool_):
        return f'<td class="num">{text}</td>'
    if isinstance(v, str) and len(v) > WRAP_CHARS:
        return f'<td class="text"><div>{text}</div></td>'
    return f"<td>{text}</td>"


def _html_header(name) -> str:
    return "_<wbr>".join(html.escape(part) for part in str(name).split("_"))


def html_table(t: Table) -> str:
    """``t`` as HTML: its constants, the table, its footnotes and what it leaves out."""
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


def md_table(t: Table) -> list[str]:
    """``t`` as Markdown lines: its constants, the table, its footnotes, its omitted columns."""
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
