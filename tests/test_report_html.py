"""The HTML report: a self-contained page (nothing fetched from anywhere), the per-layer table
with every layer and every dense layer's reason, text escaped, optional columns and the search
chart only when there is data for them, sections that fail drawn as errors in place, a saved
artifact that survives a failing renderer, and a real headless Chromium that loads the page of a
compiled model without script errors (and is shown to catch a page whose script throws)."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import types
from html.parser import HTMLParser

import pytest
import torch

tvm = pytest.importorskip("tvm")

import sparsecc  # noqa: E402
from sparsecc import report_html  # noqa: E402
from sparsecc.artifact import load  # noqa: E402
from sparsecc.cli import main  # noqa: E402
from sparsecc.report import LayerReport, Report  # noqa: E402
from target_cases import require  # noqa: E402

PLANS = [
    {"label": "uniform 50%", "predicted_speedup": 1.4, "error": 0.02, "chosen": False},
    {"label": "owl <0.1>", "predicted_speedup": 1.9, "error": 0.035, "chosen": True},
    {"label": "depth 70%", "predicted_speedup": 2.6, "error": 0.11, "chosen": False},
]


class ViewChain(torch.nn.Module):
    """Two linears with a chain of view ops between them (drawn as one dashed edge)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 16)
        self.fc2 = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x)
        y = y.reshape(2, 4, 16).permute(1, 0, 2).reshape(8, 16)
        return self.fc2(torch.relu(y))


@pytest.fixture(scope="module")
def exported() -> torch.export.ExportedProgram:
    torch.manual_seed(0)
    model = ViewChain().eval()
    with torch.no_grad():
        model.fc1.weight[:, ::2] = 0.0  # every other column pruned: a mask with a known picture
    return torch.export.export(model, (torch.randn(8, 16),))


def hand_report(search: dict | None = None, **layer_extra: float) -> Report:
    layers = [
        LayerReport("fc1", "linear", [16, 16], "sparse", "block4x1", 0.5, "bsr", 1024, 600,
                    kernel="sparse_linear_bsr [tile8]", kernel_bytes=640, **layer_extra),
        LayerReport("fc2", "linear", [8, 16], "dense", None, 0.0, dense_bytes=512,
                    reason="weight 8x16 too small to pay off <dense & kept>"),
    ]
    return Report(
        target="x86", pipeline="plan-uniform,prune-magnitude,pack,lower,build", method="magnitude",
        layers=layers,
        passes=[{"name": "plan-uniform", "seconds": 0.5, "changed": True, "counters": {"sparse_layers": 1}},
                {"name": "pack", "seconds": 0.1, "changed": True, "counters": {"layers_packed": 1}}],
        numerics=[{"pass_name": "pack", "tier": "exact", "rel": 1e-8, "max_abs": 1e-9}],
        diagnostics=[{"severity": "warning", "pass_name": "lower", "layer": "fc1",
                      "message": "bf16 values <slower> than fp32"}],
        compiled_vs_reference={"rel": 1e-7, "max_abs": 2e-8},
        search=search or {},
    )


def page(exported, report: Report, **overrides) -> str:
    artifact = types.SimpleNamespace(report=report, pruned=exported, packed_program=exported)
    for key, value in overrides.items():
        setattr(artifact, key, value)
    return report_html.render_html(artifact)


class DomSummary(HTMLParser):
    """What the tests look for in a page: the root's attributes, the layer rows, the SVGs and
    every src/href."""

    def __init__(self) -> None:
        super().__init__()
        self.root: dict[str, str] = {}
        self.layer_rows: list[dict[str, str]] = []
        self.svgs = 0
        self.links: list[str] = []
        self._table_depth = 0  # > 0 while inside table#layers

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if tag == "html":
            self.root = found
        elif tag == "table":
            if self._table_depth or found.get("id") == "layers":
                self._table_depth += 1
        elif tag == "tr" and self._table_depth and "data-layer" in found:
            self.layer_rows.append(found)
        elif tag == "svg":
            self.svgs += 1
        self.links += [v for k, v in found.items() if k in ("src", "href")]

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self._table_depth:
            self._table_depth -= 1


def summarize(text: str) -> DomSummary:
    parser = DomSummary()
    parser.feed(text)
    return parser


# -- the page as text ----------------------------------------------------------------------------


def test_page_is_self_contained(exported):
    text = page(exported, hand_report(search={"plans": PLANS}))
    assert "http://" not in text and "https://" not in text
    assert "<link" not in text and "@import" not in text and "url(" not in text
    dom = summarize(text)
    assert dom.links and all(link.startswith("data:image/png;base64,") for link in dom.links)


def test_layers_table_has_every_layer_and_dense_reasons(exported):
    report = hand_report()
    text = page(exported, report)
    assert '<table id="layers">' in text
    rows = summarize(text).layer_rows
    assert [r["data-layer"] for r in rows] == [lr.name for lr in report.layers]
    assert [r["class"] for r in rows] == ["sparse", "dense"]
    assert html.escape(report.layers[1].reason) in text
    # every text is escaped: the raw markup of the reason and the diagnostic never appears
    assert "<dense & kept>" not in text and "<slower>" not in text
    assert "bf16 values &lt;slower&gt; than fp32" in text
    assert "1,536 B dense → 1,152 B stored" in text  # 1024 + 512 dense, 640 (kernel) + 512 stored


def test_layer_names_are_escaped(exported):
    report = hand_report()
    report.layers[0].name = 'blocks.0."<b>attn</b>"'
    text = page(exported, report)
    assert "<b>attn</b>" not in text
    assert html.escape(report.layers[0].name) in text


def test_search_chart_only_with_search_data(exported):
    plain = page(exported, hand_report())
    assert 'id="search-chart"' not in plain and "Plan search" not in plain
    text = page(exported, hand_report(search={"budget": 0.1, "plans": PLANS}))
    assert 'id="search-chart"' in text
    assert text.count('class="plan chosen"') == 1 and text.count('class="plan"') == 2
    for plan in PLANS:
        assert html.escape(plan["label"]) in text
    assert "owl <0.1>" not in text


def test_predicted_and_measured_columns_only_when_present(exported):
    plain = page(exported, hand_report())
    assert "<th>predicted</th>" not in plain and "<th>measured</th>" not in plain and "<th>error</th>" not in plain
    text = page(exported, hand_report(predicted_s=2.5e-5, predicted_dense_s=4e-5, measured_s=3e-5, error=0.0123))
    for column in ("predicted", "predicted dense", "measured", "error"):
        assert f"<th>{column}</th>" in text
    assert "25.0 µs" in text and "30.0 µs" in text and "0.0123" in text


def test_graph_collapses_view_chains_and_marks_pruned_layers(exported):
    text = page(exported, hand_report())
    # reshape -> permute -> reshape between fc1 and relu: one dashed edge standing for three ops
    assert "<title>3 view op(s)</title>" in text
    assert 'class="node layer"' in text  # fc1 is sparse in the plan: its linear is marked
    assert "permute" not in re.sub(r"<title>.*?</title>", "", text)


def test_graph_size_is_capped(exported, monkeypatch):
    monkeypatch.setattr(report_html, "MAX_GRAPH_NODES", 3)
    text = page(exported, hand_report())
    assert "later nodes not drawn" in text and "3 nodes drawn" in text


def test_mask_picture_and_density():
    weight = torch.ones(256, 300)
    weight[:, 1::2] = 0.0
    density = report_html.mask_density(weight)
    assert density.shape == (128, 100)  # 2 rows x 3 columns per cell
    assert density.min() > 0.3 and density.max() < 0.7
    small = report_html.mask_density(torch.eye(8))
    assert small.shape == (8, 8) and (small == torch.eye(8).numpy()).all()


def test_masks_section_draws_sparse_layers(exported):
    text = page(exported, hand_report())
    assert text.count("<img ") == 1  # fc1 is the only sparse layer
    assert "fc1: 16x16, 50.0% zeros (block4x1)" in text


def test_failing_section_stays_local(exported):
    text = page(exported, hand_report(), pruned=None, packed_program=None)
    assert "not drawn: AttributeError" in text and "could not be drawn: AttributeError" in text
    assert len(summarize(text).layer_rows) == 2  # the rest of the page is intact


def test_output_is_deterministic(exported):
    report = hand_report(search={"plans": PLANS})
    assert page(exported, report) == page(exported, report)


# -- a compiled model ----------------------------------------------------------------------------


class TinyMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 64)
        self.fc2 = torch.nn.Linear(64, 32)
        self.head = torch.nn.Linear(32, 10)  # 10 rows: no whole 4x1 blocks, stays dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 64)
    artifact = sparsecc.compile(TinyMLP().eval(), (x,), target="x86", sparsity=0.5, pattern="block4x1",
                                method="magnitude", calibration=[(torch.randn(2, 4, 64),)])
    return artifact.save(tmp_path_factory.mktemp("html") / "out")


@pytest.mark.slow
def test_saved_artifact_has_report_html(saved, tmp_path, capsys):
    text = (saved / "report.html").read_text(encoding="utf-8")
    artifact = load(saved)
    assert [r["data-layer"] for r in summarize(text).layer_rows] == [lr.name for lr in artifact.report.layers]
    sparse = sum(lr.decision == "sparse" for lr in artifact.report.layers)
    assert sparse == 2 and text.count('class="node sparse"') == sparse  # the packed graph's sparse ops
    assert "report.html" in (saved / "manifest.json").read_text()
    # the command line draws the same page from the loaded artifact
    assert main(["inspect", str(saved), "--format", "html", "-o", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == text
    capsys.readouterr()
    assert main(["inspect", str(saved), "--format", "html"]) == 0
    assert capsys.readouterr().out == text
    assert main(["inspect", str(saved), "-o", str(tmp_path / "x.html")]) == 2  # -o without html: refused


@pytest.mark.slow
def test_save_survives_a_failing_renderer(saved, tmp_path, monkeypatch):
    def broken(artifact):
        raise RuntimeError("drawing exploded")

    monkeypatch.setattr(report_html, "render_html", broken)
    artifact = load(saved)
    with pytest.warns(UserWarning, match="drawing exploded"):
        out = artifact.save(tmp_path / "again")
    text = (out / "report.html").read_text(encoding="utf-8")
    assert "drawing exploded" in text and "sparsecc report" in text
    load(out)  # complete and consistent: every hash checks


# -- a real browser ------------------------------------------------------------------------------


def browser() -> str:
    """The headless browser (a toolchain: skipped here without it, a failure in CI)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    require([] if found else ["chromium (Debian: apt-get install chromium)"], "a headless browser")
    assert found is not None
    return found


def open_in_browser(path, profile) -> tuple[DomSummary, str]:
    """Load ``path`` in headless Chromium: the DOM after its scripts ran, and the browser's log."""
    done = subprocess.run(
        [browser(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return summarize(done.stdout), done.stderr


def uncaught(log: str) -> list[str]:
    return [line for line in log.splitlines() if ":CONSOLE" in line and "Uncaught" in line]


@pytest.mark.slow
def test_report_loads_in_headless_chromium(saved, tmp_path):
    dom, log = open_in_browser(saved / "report.html", tmp_path / "profile")
    assert dom.root.get("data-ready") == "1", "the page's scripts did not run"
    assert dom.root.get("data-errors") == "0" and not uncaught(log), uncaught(log)
    artifact = load(saved)
    assert [r["data-layer"] for r in dom.layer_rows] == [lr.name for lr in artifact.report.layers]
    assert dom.svgs >= 3  # timeline, graph before, graph after


def probed_page(path, script: str):
    """A page with the report's error probe and ready marker around one body ``script``."""
    path.write_text('<!DOCTYPE html>\n<html data-errors="0"><head>' + report_html.ERROR_PROBE_SCRIPT
                    + f"</head><body><script>{script}</script>" + report_html.READY_SCRIPT + "</body></html>\n")
    return path


def test_browser_check_catches_a_throwing_script(tmp_path):
    bad = probed_page(tmp_path / "bad.html", 'throw new Error("boom")')
    dom, log = open_in_browser(bad, tmp_path / "profile")
    assert dom.root.get("data-ready") == "1"
    assert dom.root.get("data-errors") == "1"
    assert any("boom" in line for line in uncaught(log))


def test_browser_check_catches_console_errors(tmp_path):
    bad = probed_page(tmp_path / "console.html", 'console.error("bad state")')
    dom, _ = open_in_browser(bad, tmp_path / "profile")
    assert dom.root.get("data-errors") == "1"
