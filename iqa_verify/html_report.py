"""Render a run as one self-contained ``index.html``: no network, every chart an inline SVG.

Sections: the summary table at the top; per family, the distribution of every property's per-example
error ratio against the tolerance (ratio 1); the families' diagnostics (convergence curves, gradient
gap vs unroll depth, bytes saved for backward, solvability map); every failure with its shrunk
counterexample and repro command; per-kernel property tables.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from iqa_verify.diagnostics import Chart, Diagnostic, Table
from iqa_verify.outcomes import Status, Verdict
from iqa_verify.report import THIRD_PARTY_NOTE, summary_rows

__all__ = ["render_html"]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1200px;color:#1b1f24;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #d0d7de;padding-bottom:4px}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0 16px}th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.PASS{background:#dafbe1}td.FAIL,td.INCOMPLETE{background:#ffebe9;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}pre{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:12px}
.meta{color:#57606a}.chart{display:inline-block;margin:4px 12px 12px 0;vertical-align:top}.note{color:#57606a;font-size:12px}
figure{margin:0}figcaption{font-size:12px;color:#57606a;max-width:560px}
"""


def _esc(text: Any) -> str:
    return html.escape(str(text))


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"
    import matplotlib.pyplot as plt

    return plt


def _chart_svg(chart: Chart) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    for s in chart.series:
        ax.plot(s.x, s.y, marker="o", markersize=2.5, linewidth=1.2, label=s.label)
    if chart.hline is not None:
        ax.axhline(chart.hline, color="#cf222e", linestyle="--", linewidth=1)
    if chart.logx:
        ax.set_xscale("log")
    if chart.logy:
        ax.set_yscale("log")
    ax.set_title(chart.title, fontsize=10)
    ax.set_xlabel(chart.xlabel, fontsize=9)
    ax.set_ylabel(chart.ylabel, fontsize=9)
    ax.grid(True, alpha=0.3)
    if len(chart.series) > 1:
        ax.legend(fontsize=7)
    svg = _svg(fig)
    plt.close(fig)
    return svg


def _ratio_svg(family: str, verdicts: Sequence[Verdict]) -> str | None:
    """One panel per property that compares tensors: each kernel x dtype's per-example ratios (log scale)."""
    props = [pid for pid in dict.fromkeys(r.property_id for v in verdicts for r in v.results) if any(
        r.ratios for v in verdicts for r in v.results if r.property_id == pid)]
    if not props:
        return None
    plt = _pyplot()
    cols = min(3, len(props))
    rows = math.ceil(len(props) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    labels = [f"{v.kernel.rsplit(':', 1)[-1]}\n{v.dtype}/{v.device}" for v in verdicts]
    for ax, pid in zip(axes.flat, props):
        for i, v in enumerate(verdicts):
            r = next((r for r in v.results if r.property_id == pid), None)
            if r is None or not r.ratios:
                continue
            ys = [max(min(x, 1e6), 1e-12) for x in r.ratios]
            xs = [i + 0.25 * ((j * 0.618) % 1 - 0.5) for j in range(len(ys))]
            color = "#cf222e" if r.status is Status.FAILED else "#0969da"
            ax.scatter(xs, ys, s=6, color=color, alpha=0.6)
        ax.axhline(1.0, color="#cf222e", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(pid, fontsize=9)
        ax.set_xticks(range(len(verdicts)), labels, fontsize=6, rotation=60, ha="right")
        ax.set_ylabel("error / allowed", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(props):]:
        ax.set_visible(False)
    fig.suptitle(f"{family}: per-example error ratio (dashed line: tolerance; below passes)", fontsize=10)
    fig.tight_layout()
    svg = _svg(fig)
    plt.close(fig)
    return svg


def _table_html(header: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[str] = ()) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            cls = classes[i] if i < len(classes) else ""
            cls = c.split(" ")[0] if cls == "verdict" else cls  # "PASS (time-bounded)" -> PASS
            cells.append(f'<td class="{_esc(cls)}">{_esc(c)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _diagnostic_html(d: Diagnostic) -> str:
    note = f'<p class="note">{_esc(d.note)}</p>' if d.note else ""
    if isinstance(d, Table):
        return f"<h3>{_esc(d.title)}</h3>{_table_html(d.header, d.rows)}{note}"
    try:
        body = _chart_svg(d)
    except Exception as exc:  # a broken chart must not cost the report
        body = f"<pre>chart could not be drawn: {_esc(exc)}</pre>"
    return f'<div class="chart"><figure>{body}<figcaption>{_esc(d.note)}</figcaption></figure></div>'


def render_html(verdicts: Sequence[Verdict], meta: Mapping[str, Any],
                diagnostics: Mapping[str, Sequence[Diagnostic] | str] | None = None) -> str:
    """The whole page. ``diagnostics`` maps a family name to its diagnostics, or to an error text."""
    env = meta.get("environment", {})
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>iqa-verify report {_esc(meta.get('run_id', ''))}</title><style>{_CSS}</style></head><body>",
        f"<h1>iqa-verify report — {_esc(meta.get('run_id', ''))}</h1>",
        f'<p class="meta">profile <b>{_esc(meta.get("profile"))}</b>, seed {_esc(meta.get("seed"))}, '
        f'torch {_esc(env.get("torch"))}, python {_esc(env.get("python"))}, {_esc(env.get("platform"))}, '
        f'GPU: {_esc(env.get("cuda") or "none")}; created {_esc(meta.get("created"))}</p>',
    ]
    if not meta.get("complete", True):
        parts.append("<p><b>This run was interrupted: the report holds what was verified before.</b></p>")
    rows = summary_rows(verdicts)
    n_pass = sum(1 for r in rows if r[4].startswith("PASS"))
    n_third = sum(1 for v in verdicts if v.third_party)
    parts += [
        f"<h2 id=summary>Summary: {n_pass} of {len(rows)} kernel × dtype runs pass</h2>",
        *([f'<p class="note">{n_third} of these runs: {_esc(THIRD_PARTY_NOTE)}</p>'] if n_third else []),
        '<p class="note">Error ratio = worst |kernel − float64 reference| / allowed; ≤ 1 passes (tolerance table'
        " plus a multiple of a same-precision baseline's error; see the README).</p>",
        _table_html(["kernel", "family", "dtype", "device", "verdict", "properties", "worst ratio"], rows,
                    ["", "", "", "", "verdict", "num", "num"]),
    ]
    families = list(dict.fromkeys([*(v.family for v in verdicts), *(diagnostics or {})]))
    for fam in families:
        parts.append(f"<h2>{_esc(fam)}</h2>")
        svg = _ratio_svg(fam, [v for v in verdicts if v.family == fam])
        if svg:
            parts.append(f'<div class="chart"><figure>{svg}</figure></div>')
        diag = (diagnostics or {}).get(fam)
        if isinstance(diag, str):
            parts.append(f"<p>Diagnostics could not be computed:</p><pre>{_esc(diag)}</pre>")
        elif diag:
            parts += [_diagnostic_html(d) for d in diag]
    failures = [(v, r) for v in verdicts for r in v.failed()]
    parts.append(f"<h2 id=failures>Failures ({len(failures)})</h2>")
    for v, r in failures:
        parts.append(f"<h3>{_esc(r.property_id)} — <code>{_esc(v.kernel)}</code> ({_esc(v.dtype)}, {_esc(v.device)})</h3>")
        parts.append(f"<p>{_esc(r.title)}: {_esc(r.status.message)}.</p>")
        if r.counterexample:
            c = r.counterexample
            parts.append(f"<p>Shrunk counterexample: <code>{_esc(c.shapes)}</code>; {_esc(c.regime)}</p>")
            parts.append(f"<pre>{_esc(c.message)}</pre><p>Reproduce:</p><pre>{_esc(c.repro)}</pre>")
            if c.inputs_path:
                parts.append(f"<p>Inputs saved to <code>{_esc(c.inputs_path)}</code>.</p>")
        if r.error:
            parts.append(f"<pre>{_esc(r.error)}</pre>")
    parts.append("<h2>Properties per kernel</h2>")
    for v in verdicts:
        status = ("PASS" if v.passed else "FAIL") + (" (time-bounded)" if v.time_bounded else "")
        who = " (third-party)" if v.third_party else ""
        parts.append(f"<details><summary><code>{_esc(v.kernel)}</code>{who} — {_esc(v.family)}, {_esc(v.dtype)},"
                     f" {_esc(v.device)}: {status}</summary>")
        prow = [[r.property_id, r.status.label, r.examples_label, f"{r.seconds:.1f}",
                 "" if r.worst_ratio is None else f"{r.worst_ratio:.3g}"] for r in v.results]
        parts.append(_table_html(["property", "status", "examples", "seconds", "worst ratio"], prow,
                                 ["", "", "num", "num", "num"]))
        parts.append("</details>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
