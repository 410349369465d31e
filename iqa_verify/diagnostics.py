"""Diagnostics a family contributes to reports: charts and tables as plain data.

A family's ``diagnostics(profile)`` returns these (convergence curves per solver, gradient gap vs unroll
depth, the inverse forms' solvability map, ...). Reports store them in ``report.json`` and render them in
``report.md`` (tables) and ``index.html`` (charts and tables); nothing here knows about plotting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Series", "Chart", "Table", "Diagnostic"]


@dataclass(frozen=True)
class Series:
    """One line of a chart: ``label`` and its points (x[i], y[i])."""

    label: str
    x: tuple[float, ...]
    y: tuple[float, ...]


@dataclass(frozen=True)
class Chart:
    """A line chart; ``logx``/``logy`` choose log axes; ``hline`` draws a reference level (e.g. a target)."""

    title: str
    xlabel: str
    ylabel: str
    series: tuple[Series, ...]
    logx: bool = False
    logy: bool = False
    hline: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Table:
    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...] = field(default_factory=tuple)
    note: str = ""


Diagnostic = Chart | Table
