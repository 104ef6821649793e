"""Plans of one model for several targets, side by side, with the reason each decision differs.

``sparsecc search`` makes a plan per target from that target's cost model, so one model gets
different plans on different devices: a layer whose sparse kernel pays on x86 may not on the GPU
(launch and idle SMs), a pattern that is cheap on one ISA may not be on another. This module lines
the plans up per layer and explains each layer on which they differ from what every plan recorded:
the chosen pattern and sparsity, the predicted sparse and dense times, the error, and for dense
layers the reason.
"""

from __future__ import annotations

import html

from .errors import SparseccError
from .plan import LayerPlan, Plan


def _decision(lp: LayerPlan | None) -> str:
    if lp is None:
        return "(absent)"
    return f"{lp.pattern} {lp.sparsity:.0%}" if lp.is_sparse else "dense"


def _why(target: str, lp: LayerPlan | None) -> str:
    if lp is None:
        return f"{target}: not in its plan"
    if lp.is_sparse:
        gain = ""
        if lp.predicted_s and lp.dense_s:
            gain = (f", predicted {lp.predicted_s * 1e6:.1f} us vs {lp.dense_s * 1e6:.1f} us dense "
                    f"({lp.dense_s / lp.predicted_s:.2f}x)")
        error = "" if lp.error is None else f", error {lp.error:.4f}"
        return f"{target}: {lp.pattern} at {lp.sparsity:.0%}{gain}{error}"
    return f"{target}: dense: {lp.reason or 'no reason recorded'}"


def compare(plans: dict[str, Plan]) -> list[dict[str, object]]:
    """Per layer (in the first plan's order): each target's decision, whether they differ, and
    the explanation lines of a differing layer."""
    if len(plans) < 2:
        raise SparseccError("compare needs at least two plans")
    names: list[str] = []
    for plan in plans.values():
        names += [n for n in plan.layers if n not in names]
    rows = []
    for name in names:
        layer_plans = {label: plan.layers.get(name) for label, plan in plans.items()}
        decisions = {label: _decision(lp) for label, lp in layer_plans.items()}
        differs = len(set(decisions.values())) > 1
        rows.append({"layer": name, "decisions": decisions, "differs": differs,
                     "why": [_why(label, lp) for label, lp in layer_plans.items()] if differs else []})
    return rows


def format_text(plans: dict[str, Plan]) -> str:
    rows = compare(plans)
    labels = list(plans)
    width = max(len(r["layer"]) for r in rows)
    lines = [f"{'layer':{width}s}  " + "  ".join(f"{label:16s}" for label in labels)]
    lines.append("-" * len(lines[0]))
    for row in rows:
        mark = " *" if row["differs"] else ""
        lines.append(f"{row['layer']:{width}s}  " + "  ".join(f"{row['decisions'][label]:16s}" for label in labels)
                     + mark)
    differing = [r for r in rows if r["differs"]]
    lines.append("")
    lines.append(f"{len(differing)} of {len(rows)} layers differ (*); why:")
    for row in differing:
        lines.append(f"- {row['layer']}")
        lines += [f"    {why}" for why in row["why"]]
    for label, plan in plans.items():
        if plan.search:
            s = plan.search
            lines.append(f"{label}: budget {s.get('budget')}, predicted {s.get('predicted_speedup', 0):.2f}x over its "
                         f"dense kernels, {1 - s.get('kept_fraction', 1):.0%} of weights removed")
    return "\n".join(lines) + "\n"


def format_html(plans: dict[str, Plan]) -> str:
    """The comparison as one self-contained HTML page (a table; differing rows explained)."""
    rows = compare(plans)
    labels = list(plans)
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    body = []
    for row in rows:
        cells = "".join(f"<td>{html.escape(str(row['decisions'][label]))}</td>" for label in labels)
        why = "<br>".join(html.escape(w) for w in row["why"])
        cls = ' class="differs"' if row["differs"] else ""
        body.append(f"<tr{cls}><td>{html.escape(str(row['layer']))}</td>{cells}<td>{why}</td></tr>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>sparsecc plans compared</title><style>"
            "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:3px 6px;font-size:13px;vertical-align:top}tr.differs{background:#fff3d6}</style></head><body>"
            f"<h1>Plans compared: {html.escape(', '.join(labels))}</h1><table id='plans'><tr><th>layer</th>{head}"
            f"<th>why they differ</th></tr>{''.join(body)}</table></body></html>\n")
