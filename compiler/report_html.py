"""The compile report as one self-contained HTML page a person opens in a browser.

``render_html(artifact)`` draws what ``report.txt`` says and what text cannot show well: the
pipeline timeline as bars, the per-layer table (sparse and dense rows told apart, the reason for
every dense layer), the program graph before and after packing with the rewritten nodes
highlighted, pictures of a few layers' masks, the speed/accuracy trade-off of a plan search, and
the diagnostics. Everything is inline (CSS, SVG, PNG as ``data:`` URIs, a few lines of script), so
the file can be mailed or attached to a CI run and opened anywhere without a network.

The output depends only on the artifact (no clock, no random ids), so it is stable across runs.
Every section is drawn independently: one that fails shows its error in place and the rest of the
page still renders, because a report that cannot be drawn must never cost the user the artifact.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable
from typing import Any

import networkx as nx
import numpy as np
import torch

from .report import LayerReport, Report

#: Counts uncaught errors, rejected promises and console.error calls into ``data-errors`` on the
#: root element, so a headless browser's DOM dump says whether the page's scripts failed. It has
#: to come first in <head> to see errors of every later script.
ERROR_PROBE_SCRIPT = """<script>
(function () {
  var root = document.documentElement, errors = 0;
  function count() { errors += 1; root.setAttribute("data-errors", String(errors)); }
  window.addEventListener("error", count);
  window.addEventListener("unhandledrejection", count);
  var original = console.error;
  console.error = function () { count(); return original.apply(console, arguments); };
})();
</script>"""

#: The last script of the page: proof that scripts ran at all (a probe that never ran would
#: report zero errors for a page whose scripts were all broken).
READY_SCRIPT = '<script>document.documentElement.setAttribute("data-ready", "1");</script>'

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .3em; }
h2 { font-size: 1.15em; margin: 1.6em 0 .5em; border-bottom: 1px solid #ccc; }
code, .mono { font-family: ui-monospace, monospace; font-size: 12px; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.sparse td { background: #fff4e5; }
tr.sparse td.decision { color: #b35900; font-weight: bold; }
tr.dense td { background: #f2f2f2; color: #555; }
tr.dense td.decision { font-weight: bold; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; margin: 0; }
dl.facts dt { color: #666; }
dl.facts dd { margin: 0; }
.scroll { overflow: auto; max-height: 80vh; border: 1px solid #ddd; }
.graphs { display: flex; gap: 12px; align-items: flex-start; }
.graphs > div { flex: 1 1 0; min-width: 0; }
.masks { display: flex; flex-wrap: wrap; gap: 16px; }
.masks figure { margin: 0; }
.masks img { image-rendering: pixelated; border: 1px solid #999; }
.legend span { display: inline-block; margin-right: 14px; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #555; vertical-align: middle; }
.error { color: #a00; }
.sev-error { color: #a00; font-weight: bold; }
.sev-warning { color: #a60; }
.note { color: #666; }
"""

# Colors shared by the graph drawing and its legend.
_FILL = {"sparse": "#ffb347", "layer": "#ffe0b3", "input": "#cfe3ff", "output": "#cfe3ff", "op": "#ffffff"}
_STROKE = {"sparse": "#b35900", "layer": "#b35900", "input": "#3b6db3", "output": "#3b6db3", "op": "#777777"}

#: ops that only re-view or pass a tensor through; a chain of them is drawn as one dashed edge
_VIEW_OPS = frozenset({
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze",
    "contiguous", "clone", "alias", "flatten", "getitem", "_to_copy", "to", "detach", "slice", "select",
    "unflatten", "view_as", "expand_as", "type_as",
})
#: beyond this many nodes (after collapsing views) a graph is cut off with a note, so a huge model
#: still gives a page a browser opens
MAX_GRAPH_NODES = 1500
MAX_MASKS = 4
MASK_CELLS = 128
_NODE_W, _NODE_H, _COL_W, _ROW_H = 150, 22, 168, 40


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _seconds(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return ""
    if abs(value) < 1e-3:
        return f"{value * 1e6:.1f} µs"
    if abs(value) < 1:
        return f"{value * 1e3:.2f} ms"
    return f"{value:.2f} s"


def _bytes(value: int | None) -> str:
    return "" if value is None else f"{value:,} B"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _section(title: str, body: Callable[[], str], section_id: str) -> str:
    """One <section>; a drawing that fails shows its error instead of taking the page down."""
    try:
        content = body()
    except Exception as exc:  # any failure of one drawing stays local
        content = f'<p class="error">this section could not be drawn: {_esc(type(exc).__name__)}: {_esc(exc)}</p>'
    return f'<section id="{section_id}"><h2>{_esc(title)}</h2>\n{content}\n</section>'


# -- header ------------------------------------------------------------------------------------


def _header(artifact: Any) -> str:
    report: Report = artifact.report
    facts = [("target", report.target), ("method", report.method), ("pipeline", report.pipeline)]
    dense, after = report.weight_bytes
    if dense:
        facts.append(("prunable weights", f"{dense:,} B dense → {after:,} B stored ({after / dense:.2f}x)"))
    sparse = sum(1 for lr in report.layers if lr.decision == "sparse")
    facts.append(("layers", f"{sparse} sparse, {len(report.layers) - sparse} dense"))
    if report.library_bytes:
        facts.append(("compiled library", f"{report.library_bytes:,} B"))
    if report.compiled_vs_reference:
        numbers = ", ".join(f"{k} {_num(v)}" for k, v in report.compiled_vs_reference.items())
        facts.append(("compiled vs masked-dense reference", numbers))
    if report.search.get("budget") is not None:
        facts.append(("search budget", _num(report.search["budget"])))
    items = "\n".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in facts)
    return f"<dl class=\"facts\">\n{items}\n</dl>"


# -- pipeline timeline -------------------------------------------------------------------------


def _timeline(report: Report) -> str:
    if not report.passes:
        return '<p class="note">no pass timings recorded</p>'
    label_w, bar_w, row_h = 170, 480, 22
    longest = max((float(p.get("seconds") or 0.0) for p in report.passes), default=0.0) or 1.0
    rows = []
    for i, entry in enumerate(report.passes):
        seconds = float(entry.get("seconds") or 0.0)
        counters = ", ".join(f"{k}={v}" for k, v in entry.get("counters", {}).items())
        state = "changed" if entry.get("changed") else "unchanged"
        tip = f"{entry.get('name')}: {seconds:.3f} s, {state}" + (f"; {counters}" if counters else "")
        width = max(1.0, bar_w * seconds / longest)
        y = i * row_h
        color = "#4a7fc1" if entry.get("changed") else "#aab8c8"
        rows.append(
            f'<g><title>{_esc(tip)}</title>'
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{_esc(entry.get("name"))}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{width:.1f}" height="{row_h - 6}" fill="{color}"/>'
            f'<text x="{label_w + width + 6:.1f}" y="{y + 15}">{_esc(f"{seconds:.2f} s")}</text></g>')
    height = row_h * len(report.passes)
    svg = (f'<svg width="{label_w + bar_w + 80}" height="{height}" '
           f'font-family="ui-monospace, monospace" font-size="12">\n' + "\n".join(rows) + "\n</svg>")
    numerics = {n.get("pass_name"): n for n in report.numerics}
    body = []
    for entry in report.passes:
        counters = ", ".join(f"{k}={v}" for k, v in entry.get("counters", {}).items())
        check = numerics.get(entry.get("name"))
        numeric = f"{check.get('tier')} {_num(check.get('rel'))}" if check else ""
        body.append(f"<tr><td>{_esc(entry.get('name'))}</td><td class=\"num\">{float(entry.get('seconds') or 0):.3f}"
                    f"</td><td>{'changed' if entry.get('changed') else 'unchanged'}</td>"
                    f"<td class=\"mono\">{_esc(counters)}</td><td>{_esc(numeric)}</td></tr>")
    table = ("<table id=\"passes\"><thead><tr><th>pass</th><th>seconds</th><th>changed</th><th>counters</th>"
             "<th>output change (relative)</th></tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table>")
    return svg + "\n" + table


# -- layers ------------------------------------------------------------------------------------


def _layer_table(report: Report) -> str:
    has = {key: any(getattr(lr, key) is not None for lr in report.layers)
           for key in ("predicted_s", "predicted_dense_s", "measured_s", "error")}
    columns = ["layer", "kind", "shape", "decision", "pattern", "sparsity", "packed format", "kernel", "stored bytes"]
    columns += [title for key, title in (("predicted_s", "predicted"), ("predicted_dense_s", "predicted dense"),
                                         ("measured_s", "measured"), ("error", "error")) if has[key]]
    columns.append("reason / note")
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    rows = [_layer_row(lr, has) for lr in report.layers]
    return (f'<table id="layers"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(rows)
            + "\n</tbody></table>")


def _layer_row(lr: LayerReport, has: dict[str, bool]) -> str:
    decision = "sparse" if lr.decision == "sparse" else "dense"
    stored = _bytes(lr.stored_bytes)
    if lr.dense_bytes and lr.stored_bytes != lr.dense_bytes:
        stored += f" (dense {lr.dense_bytes:,})"
    cells = [
        f'<td class="mono">{_esc(lr.name)}</td>', f"<td>{_esc(lr.kind)}</td>",
        f'<td class="mono">{_esc("x".join(str(d) for d in lr.shape))}</td>',
        f'<td class="decision">{_esc(lr.decision)}</td>', f"<td>{_esc(lr.pattern or '')}</td>",
        f'<td class="num">{lr.sparsity * 100:.1f}%</td>', f"<td>{_esc(lr.packed_format or '')}</td>",
        f'<td class="mono">{_esc(lr.kernel or "")}</td>', f'<td class="num">{_esc(stored)}</td>',
    ]
    for key in ("predicted_s", "predicted_dense_s", "measured_s"):
        if has[key]:
            cells.append(f'<td class="num">{_esc(_seconds(getattr(lr, key)))}</td>')
    if has["error"]:
        cells.append(f'<td class="num">{_esc("" if lr.error is None else f"{lr.error:.3g}")}</td>')
    cells.append(f"<td>{_esc(lr.reason)}</td>")
    return f'<tr class="{decision}" data-layer="{_esc(lr.name)}">' + "".join(cells) + "</tr>"


# -- graphs ------------------------------------------------------------------------------------


def _short_op(target: Any) -> str:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name.split("::")[-1]
    return str(getattr(target, "__name__", target))


def _full_op(target: Any) -> str:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name.replace("::", ".") + (f".{schema.overload_name}" if schema.overload_name else "")
    return str(getattr(target, "__name__", target))


def _is_sparse_op(target: Any) -> bool:
    name = _full_op(target)
    return "sparsecc" in name or "sparse_linear" in name


def _value_type(node: torch.fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return f"{str(val.dtype).replace('torch.', '')}[{', '.join(str(d) for d in val.shape)}]"
    return ""


def _graph_of(exported: torch.export.ExportedProgram, sparse_layers: set[str]) -> tuple[nx.DiGraph, int]:
    """The program's data flow without weights, with chains of view ops contracted into edges.

    Nodes carry ``kind`` (input, output, sparse, layer, op), ``label`` and ``tip``; edges carry
    ``hidden``, the number of view ops they stand for. Returns the graph and how many view ops
    were contracted."""
    sig = exported.graph_signature
    weights = dict(sig.inputs_to_parameters)
    weights.update(sig.inputs_to_buffers)
    weights.update(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
    graph = nx.DiGraph()
    for node in exported.graph.nodes:
        if node.op == "placeholder" and node.name in weights:
            continue
        if node.op == "placeholder":
            kind, label = "input", node.name
        elif node.op == "output":
            kind, label = "output", "output"
        elif _is_sparse_op(node.target):
            kind, label = "sparse", _short_op(node.target)
        else:
            label = _short_op(node.target)
            # a linear/conv reading a weight of a layer the plan made sparse: pruned, still dense
            kind = "op"
            for arg in node.args[1:2]:
                if isinstance(arg, torch.fx.Node) and arg.name in weights:
                    owner = weights[arg.name]
                    owner = owner[: -len(".weight")] if owner.endswith(".weight") else owner
                    if owner in sparse_layers:
                        kind = "layer"
        tip = f"{node.name}: {_full_op(node.target) if node.op == 'call_function' else node.op}"
        if node.op == "call_function":
            used = [weights[a.name] for a in node.all_input_nodes if a.name in weights]
            if used:
                tip += f" (weights: {', '.join(used)})"
        value = _value_type(node)
        if value:
            tip += f" -> {value}"
        graph.add_node(node.name, kind=kind, label=label, tip=tip,
                       view=node.op == "call_function" and label in _VIEW_OPS)
        for arg in node.all_input_nodes:
            if arg.name in graph:
                graph.add_edge(arg.name, node.name, hidden=0)
    contracted = 0
    for name in list(graph.nodes):
        if not graph.nodes[name]["view"]:
            continue
        preds, succs = list(graph.predecessors(name)), list(graph.successors(name))
        if len(preds) != 1 or len(succs) != 1:
            continue
        src, dst = preds[0], succs[0]
        hidden = graph.edges[src, name]["hidden"] + graph.edges[name, dst]["hidden"] + 1
        graph.remove_node(name)
        if graph.has_edge(src, dst):
            hidden = max(hidden, graph.edges[src, dst]["hidden"])
        graph.add_edge(src, dst, hidden=hidden)
        contracted += 1
    return graph, contracted


def _layout(graph: nx.DiGraph) -> dict[str, tuple[int, int]]:
    """(column, row) per node: the row is the longest path from an input (topological depth);
    within a row nodes are ordered by their parents' mean column, which keeps edges short."""
    order = {name: i for i, name in enumerate(graph.nodes)}
    depth: dict[str, int] = {}
    for name in nx.topological_sort(graph):
        depth[name] = max((depth[p] + 1 for p in graph.predecessors(name)), default=0)
    rows: dict[int, list[str]] = {}
    for name in graph.nodes:  # insertion order keeps the result deterministic
        rows.setdefault(depth[name], []).append(name)
    widest = max((len(r) for r in rows.values()), default=1)
    place: dict[str, tuple[int, int]] = {}
    for row in sorted(rows):
        members = rows[row]

        def centre(name: str) -> tuple[float, int]:
            cols = [place[p][0] for p in graph.predecessors(name) if p in place]
            return (sum(cols) / len(cols) if cols else 0.0, order[name])

        members.sort(key=centre)
        offset = (widest - len(members)) // 2
        for i, name in enumerate(members):
            place[name] = (offset + i, row)
    return place


def _graph_svg(exported: torch.export.ExportedProgram, sparse_layers: set[str], title: str) -> str:
    graph, contracted = _graph_of(exported, sparse_layers)
    note = []
    if contracted:
        note.append(f"{contracted} view op(s) in chains drawn as dashed edges")
    if graph.number_of_nodes() > MAX_GRAPH_NODES:
        dropped = graph.number_of_nodes() - MAX_GRAPH_NODES
        graph = graph.subgraph(list(graph.nodes)[:MAX_GRAPH_NODES]).copy()
        note.append(f"{dropped} later nodes not drawn")
    place = _layout(graph)
    cols = max((c for c, _ in place.values()), default=0) + 1
    rows = max((r for _, r in place.values()), default=0) + 1
    width, height = cols * _COL_W + 16, rows * _ROW_H + 16

    def xy(name: str) -> tuple[float, float]:
        col, row = place[name]
        return 8 + col * _COL_W + (_COL_W - _NODE_W) / 2, 8 + row * _ROW_H

    parts = []
    for src, dst, data in graph.edges(data=True):
        x1, y1 = xy(src)
        x2, y2 = xy(dst)
        dash = ' stroke-dasharray="4 3"' if data["hidden"] else ""
        tip = f"<title>{data['hidden']} view op(s)</title>" if data["hidden"] else ""
        parts.append(f'<line x1="{x1 + _NODE_W / 2:.0f}" y1="{y1 + _NODE_H:.0f}" x2="{x2 + _NODE_W / 2:.0f}" '
                     f'y2="{y2:.0f}" stroke="#999"{dash}>{tip}</line>')
    sparse_count = 0
    for name, data in graph.nodes(data=True):
        x, y = xy(name)
        kind = data["kind"]
        sparse_count += kind == "sparse"
        label = data["label"] if len(data["label"]) <= 21 else data["label"][:20] + "…"
        width_px = 2 if kind in ("sparse", "layer") else 1
        parts.append(
            f'<g class="node {kind}"><title>{_esc(data["tip"])}</title>'
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{_NODE_W}" height="{_NODE_H}" rx="4" fill="{_FILL[kind]}" '
            f'stroke="{_STROKE[kind]}" stroke-width="{width_px}"/>'
            f'<text x="{x + _NODE_W / 2:.0f}" y="{y + 15:.0f}" text-anchor="middle">{_esc(label)}</text></g>')
    svg = (f'<svg width="{width}" height="{height}" '
           f'font-family="ui-monospace, monospace" font-size="11">\n' + "\n".join(parts) + "\n</svg>")
    facts = f"{graph.number_of_nodes()} nodes drawn" + (f", {sparse_count} sparse ops" if sparse_count else "")
    if note:
        facts += "; " + "; ".join(note)
    return (f"<div><h3>{_esc(title)}</h3><p class=\"note\">{_esc(facts)}</p>"
            f'<div class="scroll">{svg}</div></div>')


def _graphs(artifact: Any) -> str:
    sparse_layers = {lr.name for lr in artifact.report.layers if lr.decision == "sparse"}
    legend = "".join(
        f'<span><span class="swatch" style="background:{_FILL[k]};border-color:{_STROKE[k]}"></span> '
        f"{_esc(text)}</span>"
        for k, text in (("sparse", "sparse op written by packing (sparsecc)"),
                        ("layer", "layer pruned (masked dense, before packing)"),
                        ("input", "program input / output"), ("op", "other op")))
    legend += '<span>- - - chain of view ops</span>'
    before = _graph_safe(artifact.pruned, sparse_layers, "before: pruned program (masked dense)")
    after = _graph_safe(artifact.packed_program, sparse_layers, "after: packed program")
    return (f'<p class="legend">{legend}</p><p class="note">Weights are left out; hover a node for its name, '
            f'op, weights and result type.</p>\n<div class="graphs">{before}\n{after}</div>')


def _graph_safe(exported: Any, sparse_layers: set[str], title: str) -> str:
    try:
        return _graph_svg(exported, sparse_layers, title)
    except Exception as exc:  # one graph failing leaves the other
        return (f'<div><h3>{_esc(title)}</h3><p class="error">not drawn: '
                f"{_esc(type(exc).__name__)}: {_esc(exc)}</p></div>")


# -- masks -------------------------------------------------------------------------------------


def _weight_of(exported: torch.export.ExportedProgram, layer: str) -> torch.Tensor | None:
    state = exported.state_dict
    constants = getattr(exported, "constants", {}) or {}
    for key in (f"{layer}.weight", layer):
        if key in state:
            return state[key]
        if key in constants and isinstance(constants[key], torch.Tensor):
            return constants[key]
    return None


def mask_density(weight: torch.Tensor, cells: int = MASK_CELLS) -> np.ndarray:
    """The weight as a matrix (rows = outputs) of nonzero fractions, averaged over blocks so that
    neither side has more than ``cells`` entries."""
    matrix = (weight.detach().reshape(weight.shape[0], -1) != 0).to(torch.float32).numpy()
    rows, cols = matrix.shape
    fr, fc = max(1, math.ceil(rows / cells)), max(1, math.ceil(cols / cells))
    out_r, out_c = math.ceil(rows / fr), math.ceil(cols / fc)
    padded = np.zeros((out_r * fr, out_c * fc), np.float32)
    counted = np.zeros_like(padded)
    padded[:rows, :cols] = matrix
    counted[:rows, :cols] = 1.0
    sums = padded.reshape(out_r, fr, out_c, fc).sum(axis=(1, 3))
    counts = counted.reshape(out_r, fr, out_c, fc).sum(axis=(1, 3))
    return sums / np.maximum(counts, 1.0)


def _png_uri(density: np.ndarray) -> str:
    from PIL import Image

    pixels = np.round(255.0 * (1.0 - density)).astype(np.uint8)  # nonzero drawn dark
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _masks(artifact: Any) -> str:
    chosen = [lr for lr in artifact.report.layers if lr.decision == "sparse"][:MAX_MASKS]
    if not chosen:
        return '<p class="note">no sparse layers</p>'
    figures = []
    for lr in chosen:
        weight = _weight_of(artifact.pruned, lr.name)
        if weight is None or weight.dim() < 2:
            figures.append(f"<figure><figcaption>{_esc(lr.name)}: weight not found</figcaption></figure>")
            continue
        density = mask_density(weight)
        zeros = float((weight == 0).sum()) / weight.numel()
        scale = max(1, 256 // max(density.shape))
        rows, cols = weight.shape[0], weight.numel() // weight.shape[0]
        caption = (f"{lr.name}: {rows}x{cols}, {zeros * 100:.1f}% zeros ({lr.pattern or 'no pattern'})"
                   + ("" if density.shape == (rows, cols) else f", {density.shape[0]}x{density.shape[1]} cells"))
        figures.append(
            f'<figure><img src="{_png_uri(density)}" width="{density.shape[1] * scale}" '
            f'height="{density.shape[0] * scale}" alt="{_esc("mask of " + lr.name)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")
    return ('<p class="note">Dark: kept weights, light: zeros (rows are outputs; a cell covering several '
            'weights is shaded by its fraction kept).</p>\n<div class="masks">' + "\n".join(figures) + "</div>")


# -- search ------------------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def _range(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    pad = (high - low) * 0.08 or (abs(high) * 0.1 or 1.0)
    # errors and speedups are never negative: an axis reaching below zero would only mislead
    return (max(low - pad, 0.0) if low >= 0 else low - pad), high + pad


def _search_chart(plans: list[dict[str, Any]]) -> str:
    points = [(p, _finite(p.get("predicted_speedup")), _finite(p.get("error"))) for p in plans]
    drawn = [(p, x, y) for p, x, y in points if x is not None and y is not None]
    width, height, left, bottom, top, right = 560, 340, 70, 44, 14, 20
    parts = []
    if drawn:
        x_lo, x_hi = _range([x for _, x, _ in drawn])
        y_lo, y_hi = _range([y for _, _, y in drawn])

        def sx(x: float) -> float:
            return left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)

        def sy(y: float) -> float:
            return height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - bottom - top)

        parts.append(f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" '
                     'stroke="#333"/>')
        parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#333"/>')
        for tick in _ticks(x_lo, x_hi):
            parts.append(f'<text x="{sx(tick):.1f}" y="{height - bottom + 16}" text-anchor="middle">'
                         f"{tick:.2f}x</text>")
        for tick in _ticks(y_lo, y_hi):
            parts.append(f'<text x="{left - 6}" y="{sy(tick) + 4:.1f}" text-anchor="end">{tick:.3g}</text>')
        parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">'
                     "predicted speedup</text>")
        parts.append(f'<text x="14" y="{(top + height - bottom) / 2}" text-anchor="middle" '
                     f'transform="rotate(-90 14 {(top + height - bottom) / 2})">error</text>')
        # the chosen plan last, so it is drawn on top
        for plan, x, y in sorted(drawn, key=lambda item: bool(item[0].get("chosen"))):
            chosen = bool(plan.get("chosen"))
            tip = f"{plan.get('label')}: {x:.3f}x, error {y:.4g}" + (" (chosen)" if chosen else "")
            style = 'r="7" fill="#d9480f" stroke="#000"' if chosen else 'r="4" fill="#4a7fc1" fill-opacity="0.7"'
            parts.append(f'<g class="plan{" chosen" if chosen else ""}"><title>{_esc(tip)}</title>'
                         f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" {style}/></g>')
            if chosen:
                parts.append(f'<text x="{sx(x) + 10:.1f}" y="{sy(y) - 8:.1f}" font-weight="bold">'
                             f"{_esc(plan.get('label'))}</text>")
    svg = (f'<svg id="search-chart" width="{width}" height="{height}" '
           f'font-family="system-ui, sans-serif" font-size="11">\n' + "\n".join(parts) + "\n</svg>")
    rows = "\n".join(
        f'<tr{" class=sparse" if p.get("chosen") else ""}><td>{_esc(p.get("label"))}</td>'
        f'<td class="num">{_esc("" if x is None else f"{x:.3f}x")}</td>'
        f'<td class="num">{_esc("" if y is None else f"{y:.4g}")}</td>'
        f'<td>{"chosen" if p.get("chosen") else ""}</td></tr>'
        for p, x, y in points)
    table = ("<table><thead><tr><th>plan</th><th>predicted speedup</th><th>error</th><th></th></tr></thead>"
             f"<tbody>\n{rows}\n</tbody></table>")
    return svg + "\n" + table


# -- diagnostics -------------------------------------------------------------------------------


def _diagnostics(report: Report) -> str:
    if not report.diagnostics:
        return '<p class="note">none</p>'
    rows = "\n".join(
        f'<tr><td class="sev-{_esc(d.get("severity", ""))}">{_esc(d.get("severity", ""))}</td>'
        f"<td>{_esc(d.get('pass_name') or '')}</td><td class=\"mono\">{_esc(d.get('layer') or '')}</td>"
        f"<td>{_esc(d.get('message', ''))}</td></tr>"
        for d in report.diagnostics)
    return ('<table id="diagnostics"><thead><tr><th>severity</th><th>pass</th><th>layer</th><th>message</th>'
            f"</tr></thead><tbody>\n{rows}\n</tbody></table>")


def _recovery(report: Report) -> str:
    """The held-out metric after pruning and after recovery (and per soup ingredient)."""
    rec = report.recovery or {}
    rows = [("after pruning", rec.get("heldout_before")), ("after recovery", rec.get("heldout_after"))]
    rows += [(f"soup ingredient {k.split('_')[1]}", v) for k, v in sorted(rec.items()) if k.startswith("ingredient_")]
    body = "\n".join(f"<tr><td>{_esc(label)}</td><td class=\"mono\">{value:.4g}</td></tr>" for label, value in rows
                     if isinstance(value, int | float))
    return (f'<p>{_esc(report.recovery_line() or "")}</p><table id="recovery-table"><thead><tr><th>model</th>'
            f"<th>held-out distance to dense</th></tr></thead><tbody>\n{body}\n</tbody></table>")


# -- page --------------------------------------------------------------------------------------


def render_html(artifact: Any) -> str:
    """The artifact's report as one self-contained HTML page (no external resources)."""
    report: Report = artifact.report
    sections = [
        _section("Summary", lambda: _header(artifact), "summary"),
        _section("Pipeline timeline", lambda: _timeline(report), "timeline"),
        _section("Layers", lambda: _layer_table(report), "layer-table"),
        _section("Program graph before and after packing", lambda: _graphs(artifact), "graphs"),
        _section("Masks", lambda: _masks(artifact), "masks"),
    ]
    plans = report.search.get("plans") if isinstance(report.search, dict) else None
    if plans:
        sections.append(_section("Plan search: predicted speed vs error", lambda: _search_chart(plans), "search"))
    if report.recovery:
        sections.append(_section("Recovery", lambda: _recovery(report), "recovery"))
    sections.append(_section("Diagnostics", lambda: _diagnostics(report), "diagnostics-section"))
    title = f"sparsecc report: {report.target}, {report.method}"
    return (
        '<!DOCTYPE html>\n<html lang="en" data-errors="0">\n<head>\n<meta charset="utf-8">\n'
        f"{ERROR_PROBE_SCRIPT}\n<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_esc(title)}</h1>\n"
        + "\n".join(sections) + f"\n{READY_SCRIPT}\n</body>\n</html>\n")
