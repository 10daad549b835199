"""Figures every study draws the same way: objective traces and MCMC trace / rank plots.

``elbo_traces.png`` (:func:`plot_bounds`): the left panel holds only lower bounds on log p(x)
(``elbo``, ``elbo-collapsed``, ``iwae``, ``ais``) per data point, with the log evidence as a
horizontal line; objectives that are not bounds (EM's MAP objective log p(x, theta), the exact
log-likelihood log p(x | theta_t) that EM climbs) get their own panel. A panel's x axis is
logarithmic when its longest trace has ``LOG_AXIS_FROM`` points or more, else linear (a few EM
iterations, each marked); legends sit under their panel. Legends say which
parameters a row used (``[fixed-em]``, ``[learned]``, from ``result.settings['params']``) and
the model of a row whose model differs from the first row's (as the report's row labels do).

``<prefix>_trace.png`` / ``<prefix>_rank.png`` (:func:`plot_mcmc`): ArviZ trace and rank plots
(Vehtari et al. 2021) of the scalar quantities with the largest R-hat (at most
``max_quantities``), so a long vector of invariants still gives a readable figure.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from elbolab.inference import arviz_io  # noqa: E402
from elbolab.inference.evaluation.reference import component_names, mcmc_table  # noqa: E402
from elbolab.inference.tracing import to_numpy  # noqa: E402
from elbolab.models.capabilities import Evidence  # noqa: E402

#: objectives that are lower bounds on log p(x)
LOWER_BOUNDS = ("elbo", "elbo-collapsed", "iwae", "ais")
#: objectives drawn on the second panel (not bounds on log p(x))
OTHER_OBJECTIVES = ("log-joint-map", "log-likelihood")
#: a panel whose longest trace has fewer points than this gets a linear x axis (a log axis
#: squeezes a handful of EM iterations into its right end)
LOG_AXIS_FROM = 50
#: inches and dots per inch of a full-width figure: 11.5 x 100 = 1150 px, the report's page
#: width, so fonts are shown at their size (LEGEND_FONTSIZE pt = 12.5 px)
FIGURE_WIDTH = 11.5
DPI = 100
LEGEND_FONTSIZE = 9


def label_of(result, with_model: bool = False) -> str:
    """``engine/guide [params] (bound)``, with the model first when ``with_model`` (the report's
    row labels, :func:`elbolab.experiments.report.formatting.fit_labels`, add the bound in a column)."""
    params = result.settings.get("params") if isinstance(result.settings, dict) else None
    text = f"{result.engine}/{result.guide}" + (f" [{params}]" if params else "")
    text += f" ({result.bound})"
    return f"{result.model}: {text}" if with_model else text


def bounds_figure(results, title: str = "objective per data point", log_evidence=None,
                  evidence_label: str | None = None):
    """The figure of :func:`plot_bounds` (returned, not saved). ``log_evidence``: an Evidence
    or a number (total nats; drawn per data point of the first bound's ``n_data``)."""
    bounds = [r for r in results if r.trace and r.bound in LOWER_BOUNDS]
    others = [r for r in results if r.trace and r.bound in OTHER_OBJECTIVES]
    first_model = results[0].model if results else None  # other models are named
    panels = [("lower bounds on log p(x)", bounds)] + (
        [("objectives that are not bounds on log p(x)", others)] if others else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(FIGURE_WIDTH / 2 * len(panels), 4.6),
                             squeeze=False)
    if len(panels) == 1:
        fig.set_size_inches(FIGURE_WIDTH * 0.6, 4.6)
    ev = log_evidence.value if isinstance(log_evidence, Evidence) else log_evidence
    for ax, (name, rs) in zip(axes[0], panels):
        finals, longest = [], 0
        for i, r in enumerate(rs):  # past 10 lines the colours repeat: change the line style
            y = np.asarray(r.trace, dtype=np.float64) / r.n_data
            ax.plot(np.arange(1, len(y) + 1), y, lw=1, ls=("-", "--", ":", "-.")[i // 10 % 4],
                    label=label_of(r, r.model != first_model),
                    marker="o" if len(y) <= 20 else None, ms=3)
            finals.append(y[-1])
            longest = max(longest, len(y))
        if ev is not None and rs is bounds and bounds:
            method = log_evidence.method if isinstance(log_evidence, Evidence) else "given"
            line = ev / bounds[0].n_data
            ax.axhline(line, color="k", ls="--", lw=1,
                       label=evidence_label or f"log p(x) ({method}) = {line:.5g}")
            finals.append(line)
        if finals:
            lo, hi = min(finals), max(finals)
            pad = max(hi - lo, 0.05 * max(1.0, abs(hi)))
            ax.set_ylim(lo - 1.5 * pad, hi + 0.3 * pad)
        if longest >= LOG_AXIS_FROM:
            ax.set_xscale("log")
            ax.set_xlabel("iteration / step (log scale)")
        else:  # a few iterations: a linear axis with whole-number ticks
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("iteration / step")
        ax.set_ylabel("nats per data point")
        ax.set_title(name, fontsize=10)
        if rs:
            legend_below(ax)
    fig.suptitle(title)
    return fig


def legend_below(ax, fontsize: float = LEGEND_FONTSIZE):
    """The axes' legend under it, in columns, so no line is hidden and the text stays readable
    at the page's width (saved with ``bbox_inches="tight"``)."""
    handles, labels = ax.get_legend_handles_labels()
    ncol = 1 if len(labels) <= 3 else 2
    return ax.legend(handles, labels, fontsize=fontsize, loc="upper center",
                     bbox_to_anchor=(0.5, -0.16), ncol=ncol, frameon=False)


def plot_bounds(results, path: Path, title: str = "objective per data point", log_evidence=None,
                evidence_label: str | None = None) -> Path:
    """Write ``elbo_traces.png`` (module docstring) to ``path``."""
    fig = bounds_figure(results, title, log_evidence, evidence_label)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_mcmc(samples: dict, out: Path, prefix: str = "mcmc", var_names=None,
              max_quantities: int = 8, labels: dict | None = None) -> list[Path]:
    """ArviZ trace and rank plots of the ``max_quantities`` scalar components with the largest
    R-hat among ``samples[var_names]`` (name -> (chain, draw, ...)), named as in
    :func:`elbolab.inference.evaluation.reference.mcmc_table` (``labels``: its argument); returns the two paths."""
    table = mcmc_table(samples, var_names, labels)
    chosen = table["quantity"].head(max_quantities).tolist()
    series = {}
    for v in (var_names or list(samples)):
        full = np.asarray(to_numpy(samples[v]), dtype=np.float64)
        flat = full.reshape(full.shape[0], full.shape[1], -1)
        names = list((labels or {}).get(v) or component_names(v, full.shape[2:]))
        for j, name in enumerate(names):
            if name in chosen:
                series[name] = flat[:, :, j]
    series = {k: series[k] for k in chosen}
    paths = []
    rows = len(chosen)
    fig = arviz_io.plot_trace(series, figsize=(10, 1.6 * rows + 0.6))
    fig.tight_layout()
    paths.append(Path(out) / f"{prefix}_trace.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    cols = min(4, rows)
    fig = arviz_io.plot_rank(series, figsize=(3.2 * cols, 2.4 * math.ceil(rows / cols) + 0.4))
    fig.tight_layout()
    paths.append(Path(out) / f"{prefix}_rank.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def mcmc_outputs(samples: dict, out: Path, var_names=None, prefix: str = "mcmc",
                 max_quantities: int = 8, labels: dict | None = None):
    """``<prefix>_diagnostics.csv`` (R-hat, bulk/tail ESS, MCSE per scalar quantity, worst
    first; :func:`elbolab.inference.evaluation.reference.mcmc_table`, whose ``labels`` name the components) and
    the trace and rank plots of :func:`plot_mcmc`; returns the table."""
    table = mcmc_table(samples, var_names, labels)
    table.to_csv(Path(out) / f"{prefix}_diagnostics.csv", index=False)
    plot_mcmc(samples, out, prefix, var_names, max_quantities, labels)
    return table


__all__ = ["LOWER_BOUNDS", "OTHER_OBJECTIVES", "bounds_figure", "label_of", "legend_below",
           "mcmc_outputs", "plot_bounds", "plot_mcmc"]
