"""What every benchmark shares: interleaved repeats, medians with min/max, the machine's load, the
agreement check that must pass before a time is reported, and the row of the summary table.

Rules (``bench/README`` in the module docstrings): each benchmark first checks that elbolab and the
alternative reach the same answer within a stated tolerance (:func:`agree`; a failed check is
reported in the row, and the ratio is not claimed); the two sides are timed in turns
(:func:`interleaved`), never all of one then all of the other, so a change of load hits both; the
table reports medians with min/max and the 1-minute load average sampled while it ran.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def load_average() -> float:
    """The 1-minute load average (nan where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan


@dataclass
class Timing:
    """Seconds of ``repeat`` runs of one side, with the load average sampled around them."""

    seconds: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # this process's CPU seconds in each run

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu) if self.cpu else math.nan

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.nan

    @property
    def min(self) -> float:
        return min(self.seconds) if self.seconds else math.nan

    @property
    def max(self) -> float:
        return max(self.seconds) if self.seconds else math.nan

    def spread(self, scale: float = 1.0, fmt: str = "{:.3g}") -> str:
        """``median [min, max]`` of ``scale / seconds`` (a rate) or of ``seconds * scale``."""
        return f"{fmt.format(self.median * scale)} [{fmt.format(self.min * scale)}, " \
               f"{fmt.format(self.max * scale)}]"


def interleaved(sides: dict[str, Callable[[], float | None]], repeat: int) -> dict[str, Timing]:
    """Run each side ``repeat`` times in turns (A B A B ..., the order alternating each round).

    A side returns its own measured seconds (e.g. the time inside a fit, excluding set-up) or
    None, in which case its wall time is used. The load average is sampled after every run, and
    the process's CPU time is kept beside the wall time (on a shared machine the wall time of a
    single-threaded side is about its CPU time times the load per core).
    """
    out = {name: Timing() for name in sides}
    names = list(sides)
    for r in range(repeat):
        for name in (names if r % 2 == 0 else names[::-1]):
            c0, t0 = time.process_time(), time.perf_counter()
            own = sides[name]()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            out[name].seconds.append(wall if own is None else float(own))
            out[name].cpu.append(cpu)
            out[name].loads.append(load_average())
    return out


@dataclass
class Agreement:
    """Whether both sides reach the same answer: ``what`` compared, the measured ``difference``
    and the ``tolerance`` it must stay within."""

    what: str
    difference: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.difference) and abs(self.difference) <= self.tolerance

    def __str__(self) -> str:
        mark = "ok" if self.ok else "FAILED"
        return f"{self.what}: |diff| {abs(self.difference):.2g} <= {self.tolerance:.2g} {mark}"


def agree(what: str, a: float, b: float, tolerance: float) -> Agreement:
    """The agreement of two numbers (absolute difference against ``tolerance``)."""
    return Agreement(what, float(a) - float(b), float(tolerance))


@dataclass
class Row:
    """One line of the summary table. ``ratio`` is elbolab / alternative oriented so that larger
    is better for elbolab (or a cost ratio, ``lower_is_better``); ``met`` compares it (or, with ``goal_on="ours"``, elbolab's own figure)
    with ``goal_value``. ``note``: why a goal is not met, or what was skipped."""

    workload: str
    ours: str
    alternative: str
    ratio: float
    goal: str
    goal_value: float
    load: float
    checks: list[Agreement] = field(default_factory=list)
    goal_on: str = "ratio"
    ours_value: float = math.nan
    note: str = ""
    skipped: bool = False
    lower_is_better: bool = False  # the ratio is a cost ratio (e.g. time at 1e6 / time at 1e3)

    @property
    def checked(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def met(self) -> str:
        if self.skipped:
            return "skipped"
        if not self.checked:
            return "no (answers differ)"
        value = self.ours_value if self.goal_on == "ours" else self.ratio
        if self.lower_is_better:
            return "yes" if value <= self.goal_value else "no"
        return "yes" if value >= self.goal_value else "no"


def skipped_row(workload: str, goal: str, reason: str) -> Row:
    return Row(workload, "-", "-", math.nan, goal, math.nan, load_average(), note=reason,
               skipped=True)


def table(rows: list[Row]) -> str:
    """The summary as a Markdown table (what ``make bench`` prints and writes)."""
    head = ("| workload | elbolab | alternative | ratio | goal | met | load |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        ratio = "-" if not math.isfinite(r.ratio) else f"{r.ratio:.3g}x"
        load = "-" if not math.isfinite(r.load) else f"{r.load:.1f}"
        lines.append(f"| {r.workload} | {r.ours} | {r.alternative} | {ratio} | {r.goal} | "
                     f"{r.met} | {load} |")
    return "\n".join(lines)


def details(rows: list[Row]) -> str:
    """The agreement checks and notes under the table."""
    out = []
    for r in rows:
        for c in r.checks:
            out.append(f"- {r.workload}: {c}")
        if r.note:
            out.append(f"- {r.workload}: {r.note}")
    return "\n".join(out)


def mean_load(timings: dict[str, Timing]) -> float:
    loads = [v for t in timings.values() for v in t.loads if math.isfinite(v)]
    return statistics.mean(loads) if loads else math.nan


__all__ = ["Agreement", "Row", "Timing", "agree", "details", "interleaved", "load_average",
           "mean_load", "skipped_row", "table"]
