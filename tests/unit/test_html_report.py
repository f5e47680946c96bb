"""The one-page HTML reports: sections present when their data is, nothing loaded from outside the file, every
string escaped, and a tiny prune run's page showing exactly the heads its plan keeps."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cahp.errors import OutputExistsError
from cahp.reporting.html_report import (
    ANALYSIS_SECTIONS,
    PRUNE_SECTIONS,
    analysis_html_path,
    analysis_page,
    bench_page,
    prune_page,
)
from tests.conftest import tiny_bert_folder, tiny_task_folder

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HOSTILE = "<script>alert(\"x\")</script> & 'quotes'"


class PageParser(HTMLParser):
    """What the tests read from a page: section ids, every start tag with its attributes, the kept-heads cells."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.section_ids: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.head_cells: list[dict[str, str | None]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "section":
            self.section_ids.append(str(attributes.get("id")))
        if tag == "td" and "data-head" in attributes:
            self.head_cells.append(attributes)

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def kept_heads(self) -> dict[str, list[int]]:
        """``{layer: [heads]}`` of the cells marked kept."""
        kept: dict[str, list[int]] = {}
        for cell in self.head_cells:
            layer = str(cell["data-layer"])
            kept.setdefault(layer, [])
            if "kept" in str(cell["class"]).split():
                kept[layer].append(int(str(cell["data-head"])))
        return kept

    def images(self) -> list[bytes]:
        """The decoded bytes of every ``<img>`` (each must be a base64 PNG data URL)."""
        sources = [str(attributes.get("src")) for tag, attributes in self.tags if tag == "img"]
        prefix = "data:image/png;base64,"
        assert all(source.startswith(prefix) for source in sources), [s[:40] for s in sources]
        return [base64.b64decode(source[len(prefix) :], validate=True) for source in sources]


def assert_self_contained(text: str) -> PageParser:
    """No script, no stylesheet link, no external URL; every image a decodable embedded PNG."""
    parsed = PageParser(text)
    lowered = text.lower()
    assert 'src="http' not in lowered and "<script" not in lowered and "<link" not in lowered
    assert "://" not in text, "a URL in the page"
    assert not [tag for tag, _ in parsed.tags if tag in ("script", "link", "iframe", "object", "embed")]
    assert all(png.startswith(PNG_SIGNATURE) for png in parsed.images())
    return parsed


# ---- synthetic results (also used by tests/browser) ------------------------------------------------------------


def synthetic_prune_report(layers: int = 3, heads: int = 4, *, knee: bool = True, model: str = "tiny") -> dict:
    """A ``report.json`` content of a CAHP run (with MSS curve and embedding) or, ``knee=False``, of a scorer."""
    kept = {str(layer): [0, layer % heads] if layer % heads else [0] for layer in range(layers)}
    total = layers * heads
    selection: dict[str, Any] = {
        "method": "cahp" if knee else "random",
        "budget": "auto" if knee else "keep=5",
        "k": sum(map(len, kept.values())),
        "how": "knee of MSS(k)",
        "kept_heads_by_layer": kept,
        "guardrail_heads": [[layers - 1, 0]],
    }
    if knee:
        ks = list(range(2, total))
        selection["knee"] = {
            "k": 5,
            "method": "kneedle",
            "fallback": None,
            "degree": 3,
            "ks": ks,
            "mss": [1 - 1 / k for k in ks],
            "fitted": [1 - 1 / k for k in ks],
        }
        selection["embedding"] = np.random.default_rng(0).normal(size=(total, 2)).round(3).tolist()
        selection["clusters"] = [index % 5 for index in range(total)]

    def scores(value: float) -> dict[str, Any]:
        return {"test": {"accuracy": value, "macro_f1": value - 0.1, "examples": 16}}

    return {
        "model": model,
        "method": selection["method"],
        "task": {"task": "toy", "num_labels": 3},
        "heads": {"layers": layers, "heads_per_layer": heads, "total": total, "kept": selection["k"]},
        "kept_heads_by_layer": kept,
        "selection": selection,
        "accuracy": {"before_pruning": scores(0.8), "after_pruning": scores(0.6), "after_recovery": scores(0.7)},
        "recovery_history": [{"epoch": 1.0, "step": 4, "train_loss": 0.9}],
        "recovery": {"objective": {"loss": "kd", "temperature": 2.0, "alpha": 0.5}, "examples": 32, "seconds": 1.0},
        "parameters": {"dense": 2_000_000, "pruned": 1_500_000},
        "flops_per_sequence": {
            "seq_len": 16,
            "dense_total": 4e9,
            "pruned_total": 3e9,
            "dense_attention": 1e9,
            "pruned_attention": 4e8,
        },
        "latency": {
            "device": "cpu",
            "torch_threads": 1,
            "batch_size": 4,
            "seq_len": 16,
            "dense": {"median_seconds": 0.02},
            "pruned": {"median_seconds": 0.015},
            "measured_speedup": 1.333,
            "flops_ideal_speedup": 1.333,
        },
        "config": {"recovery": {"epochs": 1.0}},
        "command": "cahp prune --model tiny --out run",
    }


def synthetic_analysis(layers: int = 3, heads: int = 4, *, cahp: bool = True) -> dict[str, Any]:
    """A ``cahp analyze`` JSON (docs/analysis.md), with a ``cahp`` block when asked."""
    rng = np.random.default_rng(1)

    def grid() -> list[list[float]]:
        return rng.uniform(size=(layers, heads)).round(4).tolist()

    payload: dict[str, Any] = {
        "format": "cahp-head-analysis",
        "version": 1,
        "command": "cahp analyze --model tiny --out heads.json",
        "model": "tiny",
        "model_type": "bert",
        "task": "toy",
        "max_length": 16,
        "grid": {"layers": layers, "heads": heads},
        "causal": False,
        "examples": 12,
        "heads": {
            "sink_score": grid(),
            "special_token_share": grid(),
            "entropy": grid(),
            "output_norm": grid(),
            "separability": None,
        },
        "adjacent_layers": [
            {"layers": [layer, layer + 1], "kl": 0.1 * (layer + 1), "js": 0.05 * (layer + 1)}
            for layer in range(layers - 1)
        ],
        "summary": {"sink_heads": [[0, 1]], "special_token_heads": [], "dormant_heads": [[2, 3]]},
        "cahp": None,
    }
    if cahp:
        payload["cahp"] = {
            "k": 4,
            "cluster": [[(layer * heads + head) % 4 for head in range(heads)] for layer in range(layers)],
            "kept": [[head == layer % heads for head in range(heads)] for layer in range(layers)],
        }
    return payload


# ---- prune ---------------------------------------------------------------------------------------------------


def test_the_page_of_a_tiny_prune_run_maps_the_heads_of_its_plan(tmp_path: Path) -> None:
    from cahp.pipeline import PruneConfig, prune
    from cahp.train import TaskOptions, TrainingConfig

    model = tiny_bert_folder(tmp_path / "tiny", layers=3, heads=4, num_labels=3)
    task = TaskOptions(str(tiny_task_folder(tmp_path / "task", examples=48)), max_length=16)
    config = PruneConfig(
        model=str(model),
        task=task,
        method_settings={"tsne_iterations": 250},
        recovery=TrainingConfig(epochs=0),
        latency_repeats=1,
        latency_seq_len=16,
        latency_batch_size=2,
    )
    report = prune(config, tmp_path / "out", progress=False)
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    parsed = assert_self_contained(page)
    assert parsed.section_ids == list(PRUNE_SECTIONS)
    plan_kept = {str(layer): sorted(heads) for layer, heads in report["plan"]["kept_heads_by_layer"].items()}
    assert parsed.kept_heads() == plan_kept
    assert parsed.kept_heads() == json.loads((tmp_path / "out" / "report.json").read_text())["kept_heads_by_layer"]
    assert len(parsed.head_cells) == 12
    embedded = parsed.images()
    assert (tmp_path / "out" / "plots" / "mss_curve.png").read_bytes() in embedded, "the run's own plot"
    assert report["recovery"]["objective"]["loss"] == "kd", "the default distillation settings are recorded ..."
    recovery = page.split('<section id="recovery">')[1].split("</section>")[0]
    assert "No recovery (epochs 0)" in recovery
    for word in ("objective", "kd", "temperature", "alpha", "teacher"):
        assert word not in recovery, f"... but a run without recovery does not list them ({word})"

    from cahp.analysis.run import analyze

    analysis = analyze(str(model), task, tmp_path / "heads.json", calibration_size=12, progress=False)
    analysis_text = (tmp_path / "heads.html").read_text(encoding="utf-8")
    for text in (page, analysis_text):  # both pages name the task as the prune report records it
        assert f"<title>cahp {'prune' if text is page else 'analyze'}: tiny on task</title>" in text
        assert "<tr><th>task</th><td>task (3 classes)</td></tr>" in text
    assert report["task"]["task"] == analysis["task_name"] == "task" and analysis["task"] == task.task


def test_a_report_with_recovery_lists_its_objective() -> None:
    report = synthetic_prune_report()
    recovery = prune_page(report).split('<section id="recovery">')[1].split("</section>")[0]
    assert "objective: loss" in recovery and "kd" in recovery and "objective: temperature" in recovery
    report["config"]["recovery"]["epochs"] = 0
    recovery = prune_page(report).split('<section id="recovery">')[1].split("</section>")[0]
    assert "objective" not in recovery and "No recovery (epochs 0)" in recovery


def test_a_scorer_run_has_no_mss_curve_nor_head_space_and_marks_guardrail_heads() -> None:
    report = synthetic_prune_report(knee=False)
    parsed = assert_self_contained(prune_page(report))
    assert parsed.section_ids == [s for s in PRUNE_SECTIONS if s not in ("mss-curve", "head-space")]
    assert parsed.images() == []
    guardrail = [cell for cell in parsed.head_cells if "guardrail" in str(cell["class"])]
    assert [(cell["data-layer"], cell["data-head"]) for cell in guardrail] == [("2", "0")]
    assert parsed.kept_heads() == report["kept_heads_by_layer"]


def test_a_plot_missing_from_the_folder_is_drawn_from_the_report(tmp_path: Path) -> None:
    (tmp_path / "plots").mkdir()
    parsed = assert_self_contained(prune_page(synthetic_prune_report(), tmp_path / "plots"))
    assert {"mss-curve", "head-space"} <= set(parsed.section_ids)
    assert len(parsed.images()) == 2


def test_every_string_from_the_results_is_escaped() -> None:
    report = synthetic_prune_report(model=HOSTILE)
    report["command"] = f"cahp prune --model '{HOSTILE}'"
    report["task"]["task"] = "<b>toy</b>"
    page = prune_page(report)
    assert "<script>" not in page and "<b>toy</b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;quotes&#x27;" in page
    assert HOSTILE in "".join(PageParser(page).text), "the text reads as given once parsed"

    analysis = synthetic_analysis()
    analysis["model"] = HOSTILE
    assert "<script>" not in analysis_page(analysis)


# ---- analyze -------------------------------------------------------------------------------------------------


def test_the_analysis_page_shows_heat_maps_cahp_heads_and_the_layer_profile() -> None:
    payload = synthetic_analysis()
    parsed = assert_self_contained(analysis_page(payload))
    assert parsed.section_ids == list(ANALYSIS_SECTIONS)
    assert len(parsed.images()) == 2  # the heat maps and the divergence profile
    assert parsed.kept_heads() == {str(layer): [layer % 4] for layer in range(3)}
    text = "".join(parsed.text)
    assert "cahp cluster" in text and "separability" not in text.split("Layers x heads:")[1].split(".")[0]
    assert "L0H1" in text and "L2H3" in text  # the sink and dormant heads

    without = PageParser(analysis_page(synthetic_analysis(layers=1, cahp=False)))
    assert without.section_ids == ["overview", "head-statistics", "command"]


def test_heat_map_labels_carry_no_offset_and_cluster_ids_get_discrete_colours() -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from cahp.reporting.plots import head_statistics_figure

    rng = np.random.default_rng(0)
    statistics = {
        "special_token_share": (0.9999 + rng.uniform(0, 1e-4, (3, 4))).tolist(),  # a default axis: "+9.999e-1"
        "separability": (1e-7 * rng.uniform(0, 1, (3, 4))).tolist(),  # a default axis: "1e-7"
        "cahp_cluster": [[0, 5, 9, 5], [9, 9, 0, 0], [5, 0, 9, 5]],
    }
    fig = head_statistics_figure(statistics, categorical=("cahp_cluster",))
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.get_images()]
    bars = [panel.get_images()[0].colorbar.ax for panel in panels]
    try:
        assert [panel.get_title() for panel in panels] == [
            "special token share",
            "separability",
            "cahp cluster (3 clusters)",
        ]
        for bar in bars[:2]:
            assert bar.yaxis.get_offset_text().get_text() == "", "no offset label above the bar (over the title)"
            labels = [label.get_text() for label in bar.get_yticklabels()]
            assert len(labels) >= 2 and len(set(labels)) == len(labels), labels
        image = panels[2].get_images()[0]
        assert isinstance(image.cmap, ListedColormap) and image.cmap.N == 3, "one colour per cluster id"
        assert [label.get_text() for label in bars[2].get_yticklabels()] == ["0", "5", "9"]
        assert sorted(text.get_text() for text in panels[2].texts) == sorted(
            str(v) for row in statistics["cahp_cluster"] for v in row
        ), "the ids are printed in the cells"
    finally:
        plt.close(fig)


def test_cahp_analyze_writes_its_page_beside_the_json(tmp_path: Path) -> None:
    from cahp.analysis.run import analyze, check_output_file
    from cahp.train import TaskOptions

    model = tiny_bert_folder(tmp_path / "model", layers=2, heads=4, num_labels=3)
    task = TaskOptions(str(tiny_task_folder(tmp_path / "task", examples=24)), max_length=16)
    out = tmp_path / "heads.json"
    payload = analyze(str(model), task, out, calibration_size=12, progress=False)
    page = analysis_html_path(out)
    assert page == tmp_path / "heads.html"
    parsed = assert_self_contained(page.read_text(encoding="utf-8"))
    assert {"overview", "head-statistics", "layer-redundancy"} <= set(parsed.section_ids)
    assert f"{payload['adjacent_layers'][0]['js']:.4f}" in page.read_text(encoding="utf-8")
    out.unlink()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_output_file(out, overwrite=False)  # the page alone is not replaced silently either
    assert analysis_html_path(tmp_path / "x.html") == tmp_path / "x.html.html"


# ---- bench ---------------------------------------------------------------------------------------------------


def test_the_bench_page_renders_the_summary_tables_and_plots(tmp_path: Path) -> None:
    from cahp.reporting.bench_report import write_bench_report
    from tests.unit.test_bench_report import _cell, _config, _folder

    cells = [_cell(method, 0, budget, 0.5) for method in ("cahp", "random") for budget in ("0.5", "knee")]
    root = _folder(tmp_path / "bench", _config(["cahp", "random"], [0]), cells)
    summary = write_bench_report(root).read_text()
    page = (root / "report.html").read_text(encoding="utf-8")
    assert page == bench_page(root)
    parsed = assert_self_contained(page)
    assert parsed.section_ids == ["overview", "tables", "plots"]
    markdown_tables = sum(1 for line in summary.splitlines() if line.startswith("|---"))
    assert sum(1 for tag, _ in parsed.tags if tag == "table") == markdown_tables
    assert len(parsed.images()) == len(list((root / "plots").glob("*.png"))) == 3
    assert "<code>random</code>" in page and "|" not in "".join(parsed.text)
