"""The solvability map of the inverse forms: which unknown is identifiable, and how well each built-in
kernel (and the design notes' Type2 recursion) round-trips, over a grid of (T, D, E) with and without S_0.

For each grid point and each unknown, one random consistent problem (B = H = 1, mild decay, float64
knowns, o = la_forward(x_true) rounded to ``dtype``) is built with :func:`build_solve_problem`, and:

- ``rank`` / ``n_cols`` / ``identifiable``: numerical rank of the dense map A of the unknown (float64,
  torch's pinv cut-off) against the number of unknowns T * n;
- ``kappa``: sigma_max / sigma_rank of A;
- ``o_residual[kernel]``: ``‖la_forward(x) - o‖ / ‖o‖`` (float64) of each kernel's solution x;
- ``x_error[kernel]``: ``‖x - x_true‖ / ‖x_true‖`` (large where the unknown is not identifiable: the
  minimum-norm answer is the projection of x_true, not x_true).

:func:`solvability_map` returns plain rows (:class:`SolvabilityRow`); :func:`to_markdown` renders them.
This is a report diagnostic that measures the built-in kernels (it imports them); nothing here judges a
kernel, and no property imports this module (the family loads it on demand for the report).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from iqa_verify.diagnostics import Table
from iqa_verify.kernels.la_solve_k import la_solve_k, la_solve_k_recursion
from iqa_verify.kernels.la_solve_q import la_solve_q
from iqa_verify.kernels.la_solve_v import la_solve_v, la_solve_v_sequential
from iqa_verify.properties.la_forward.cases import LACase
from iqa_verify.properties.la_inverse.cases import KNOWNS, Conditioning, SolveCase, build_solve_problem
from iqa_verify.properties.la_inverse.checks import analyse
from iqa_verify.reference.la_inverse import Unknown

__all__ = ["DEFAULT_GRID", "KERNELS", "SolvabilityRow", "solvability_map", "solvability_tables", "to_markdown"]

KERNELS: dict[Unknown, dict[str, Callable]] = {
    Unknown.V: {"la_solve_v": la_solve_v, "la_solve_v_sequential": la_solve_v_sequential},
    Unknown.K: {"la_solve_k": la_solve_k, "la_solve_k_recursion (notes)": la_solve_k_recursion},
    Unknown.Q: {"la_solve_q": la_solve_q},
}
"""The kernels measured per unknown (display name -> callable with the contract's signature)."""

DEFAULT_GRID: tuple[tuple[int, int, int], ...] = (
    (1, 1, 1), (4, 4, 1), (4, 1, 4), (8, 4, 2), (8, 2, 4), (8, 4, 4), (16, 4, 4), (16, 8, 2), (33, 2, 2),
    (33, 3, 5), (20, 2, 1), (20, 2, 2), (20, 2, 3), (20, 2, 6),
)
"""(T, D, E) points: square and rectangular maps, t < D, E = 1 and E growing at fixed (T, D)."""


@dataclass(frozen=True)
class SolvabilityRow:
    """One (unknown, T, D, E, S_0) point; see the module docstring for the fields."""

    unknown: str
    T: int
    D: int
    E: int
    initial_state: bool
    rank: int
    n_cols: int
    identifiable: bool
    kappa: float
    o_residual: dict[str, float] = field(default_factory=dict)
    x_error: dict[str, float] = field(default_factory=dict)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float((a - b).norm())


def solvability_map(
    grid: Sequence[tuple[int, int, int]] = DEFAULT_GRID,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    unknowns: Sequence[Unknown] = (Unknown.V, Unknown.K, Unknown.Q),
) -> list[SolvabilityRow]:
    """Rows for every (unknown, (T, D, E) in ``grid``, S_0 given or not), kernels run in ``dtype``."""
    rows = []
    for unknown in unknowns:
        for T, D, E in grid:
            for initial in (False, True):
                spec = SolveCase(unknown, LACase(B=1, T=T, H=1, D=D, E=E, initial_state=initial, seed=seed),
                                 Conditioning.ILL)
                p = build_solve_problem(spec, dtype)
                knowns = [p.forward_inputs[n] for n in KNOWNS[unknown]]
                args64 = (*knowns, p.o, p.forward_inputs["g"], p.forward_inputs["initial_state"])
                sys_ = analyse(unknown, dict(zip(("a", "b", "o", "g", "s0"), args64)), 1.0)
                row = SolvabilityRow(unknown.value, T, D, E, initial, int(sys_.rank[0, 0]), sys_.n_cols,
                                     sys_.identifiable((0, 0)), float(sys_.kappa[0, 0]))
                for name, kernel in KERNELS[unknown].items():
                    args = tuple(t.to(dtype) if t is not None else None for t in args64)
                    x = kernel(*args, scale=1.0).to(torch.float64)
                    row.o_residual[name] = _rel(sys_.lmap.apply(x), p.o)
                    row.x_error[name] = _rel(x, p.x_true)
                rows.append(row)
    return rows


def _table_cells(rows: Sequence[SolvabilityRow]) -> tuple[list[str], list[list[str]]]:
    names = list(dict.fromkeys(n for r in rows for n in r.o_residual))
    head = ["unknown", "T", "D", "E", "S0", "rank / unknowns", "identifiable", "kappa"]
    head += [f"‖o‖ res. {n}" for n in names] + [f"‖x - x_true‖ {n}" for n in names]
    body = []
    for r in rows:
        cells = [r.unknown, str(r.T), str(r.D), str(r.E), "yes" if r.initial_state else "no", f"{r.rank} / {r.n_cols}",
                 "yes" if r.identifiable else "no", f"{r.kappa:.3g}"]
        cells += [f"{r.o_residual[n]:.2e}" if n in r.o_residual else "" for n in names]
        cells += [f"{r.x_error[n]:.2e}" if n in r.x_error else "" for n in names]
        body.append(cells)
    return head, body


def to_markdown(rows: Sequence[SolvabilityRow]) -> str:
    """A Markdown table: one line per row, one o-residual / x-error column pair per kernel."""
    head, body = _table_cells(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def solvability_tables(unknown: Unknown, profile=None) -> list[Table]:
    """The family's report diagnostics: the solvability map of ``unknown`` (kernels run in float32)."""
    head, body = _table_cells(solvability_map(dtype=torch.float32, unknowns=(unknown,)))
    note = ("One random consistent problem per point (mild decay, B = H = 1). rank/unknowns from the float64 dense"
            " map; residuals are relative norms; x errors are large exactly where the unknown is not identifiable"
            " (the minimum-norm answer is then the projection of x_true).")
    return [Table(f"solvability map: {unknown.value}", tuple(head), tuple(tuple(c) for c in body), note)]
