"""One self-contained HTML page per run: ``cahp prune``'s ``report.html``, ``cahp analyze``'s ``<out>.html``
and ``cahp bench``'s ``report.html`` (``docs/report.md``).

The page is a view of the run's results: it reads ``report.json``'s content, the analysis JSON or the bench
folder's ``summary.md`` and plots, and never recomputes anything. Plots are embedded as base64 PNG, the CSS is
inline, and a Content-Security-Policy forbids anything but inline styles and ``data:`` images, so the file
works offline and loads nothing from anywhere. Every string from a result is escaped.

Each part of a page is a ``<section>`` with a stable id (:data:`PRUNE_SECTIONS`, :data:`ANALYSIS_SECTIONS`,
:data:`BENCH_SECTIONS`); a part whose data the run does not have is left out.
"""

from __future__ import annotations

import base64
import html
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cahp.outputs import atomic_write
from cahp.reporting.plots import (
    plot_head_space,
    plot_head_statistics,
    plot_layer_divergence,
    plot_mss_curve,
)

PRUNE_SECTIONS = ("overview", "kept-heads", "mss-curve", "head-space", "accuracy", "cost", "recovery", "command")
ANALYSIS_SECTIONS = ("overview", "head-statistics", "cahp-heads", "layer-redundancy", "command")
BENCH_SECTIONS = ("overview", "tables", "plots")
#: The per-head tables of an analysis drawn as heat maps, in this order (those present).
HEAT_MAP_STATISTICS = ("sink_score", "special_token_share", "entropy", "output_norm", "separability")

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1em 1.5em; color: #1d2733; background: #fff; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; border-bottom: 1px solid #d8dee6;
     padding-bottom: 0.2em; } h3 { font-size: 1.02em; margin-bottom: 0.3em; }
section { margin: 1.2em 0 1.8em; } .subtitle { color: #5a6776; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 13px; }
th, td { border: 1px solid #d8dee6; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f1f4f8; }
img { max-width: 100%; height: auto; } code, pre { background: #f4f6f9; border-radius: 3px; }
pre { padding: 0.6em; white-space: pre-wrap; word-break: break-all; }
table.heads td { width: 20px; height: 18px; padding: 0; text-align: center; font-size: 10px; color: #fff; }
table.heads td.kept { background: #3b6ea8; } table.heads td.guardrail { background: #e08a2c; }
table.heads td.removed { background: #e9edf2; color: #9aa5b1; }
table.heads th { font-weight: normal; font-size: 11px; padding: 0 4px; }
table.heads td.count { color: #1d2733; background: none; border: none; padding: 0 4px; text-align: left; }
table.fields td { text-align: left; }
.row { display: flex; flex-wrap: wrap; gap: 0 2.5em; align-items: flex-start; }
.row > section { flex: 1 1 420px; min-width: 0; }
.legend span { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; vertical-align: -2px; }
"""


# ---- building blocks -----------------------------------------------------------------------------------------


def escape(value: Any) -> str:
    """``value`` as text safe inside HTML elements and quoted attributes."""
    return html.escape(str(value), quote=True)


def section(section_id: str, title: str, body: str) -> str:
    """``<section id=...>`` with an ``<h2>`` title; ``body`` is HTML already escaped."""
    return f'<section id="{escape(section_id)}">\n<h2>{escape(title)}</h2>\n{body}\n</section>'


def table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    """An HTML table of escaped cells (the first column reads as a row label)."""
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def fields(rows: Iterable[tuple[Any, Any] | list[Any]]) -> str:
    """A two-column table of ``(name, value)`` rows, names as row headers (escaped)."""
    body = "".join(f"<tr><th>{escape(name)}</th><td>{escape(value)}</td></tr>\n" for name, value in rows)
    return f'<table class="fields">\n<tbody>\n{body}</tbody>\n</table>'


def row(*parts: str) -> str:
    """Sections side by side where the window is wide enough (the empty ones left out)."""
    shown = [part for part in parts if part]
    return f'<div class="row">\n{"".join(shown)}\n</div>' if shown else ""


def image(png: bytes, alt: str) -> str:
    """An ``<img>`` holding ``png`` as a base64 ``data:`` URL."""
    encoded = base64.b64encode(png).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{encoded}">'


def drawn_png(draw: Callable[[Path], Any]) -> bytes | None:
    """The PNG ``draw(path)`` writes to a temporary file, or ``None`` when it writes nothing (a plot helper that
    has no data to draw)."""
    with tempfile.TemporaryDirectory(prefix="cahp-html-") as folder:
        path = Path(folder) / "plot.png"
        draw(path)
        return path.read_bytes() if path.is_file() else None


def page(title: str, subtitle: str, sections: list[str]) -> str:
    """The whole document: inline CSS, a CSP that forbids every external load, then the sections."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f'<h1>{escape(title)}</h1>\n<p class="subtitle">{escape(subtitle)}</p>\n'
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )


def write_html(text: str, path: str | os.PathLike[str]) -> Path:
    """Write a page atomically (temporary file + rename)."""
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def task_label(name: Any, num_labels: Any = None) -> str:
    """How both pages name a task: its name as the run records it (a built-in task's name, a data folder's
    name, a hub id), with its class count when known: ``sst5 (5 classes)``."""
    return f"{name} ({num_labels} classes)" if num_labels is not None else str(name)


def _command_section(command: str | None) -> str:
    text = command or "(run from the Python API: no command line)"
    return section("command", "Command", f"<pre>{escape(text)}</pre>")


# ---- cahp prune ----------------------------------------------------------------------------------------------


def kept_heads_table(kept_heads_by_layer: dict[str, list[int]], heads: int, guardrail: Iterable[Any] = ()) -> str:
    """The layers x heads map as a table: one cell per head (``class="kept"``, ``"kept guardrail"`` or
    ``"removed"``, ``data-layer``/``data-head`` attributes), and the heads kept per layer."""
    added = {(int(layer), int(head)) for layer, head in guardrail}
    header = "<tr><th>layer</th>" + "".join(f"<th>{h}</th>" for h in range(heads)) + "<th>kept</th></tr>"
    rows = []
    for layer in sorted(kept_heads_by_layer, key=int):
        kept = {int(h) for h in kept_heads_by_layer[layer]}
        cells = []
        for head in range(heads):
            state = ("kept guardrail" if (int(layer), head) in added else "kept") if head in kept else "removed"
            label = escape(f"layer {layer} head {head}: {state}")
            cells.append(f'<td class="{state}" data-layer="{escape(layer)}" data-head="{head}" title="{label}"></td>')
        rows.append(f'<tr><th>{escape(layer)}</th>{"".join(cells)}<td class="count">{len(kept)}</td></tr>')
    legend = (
        '<p class="legend"><span style="background:#3b6ea8"></span>kept'
        '<span style="background:#e08a2c"></span>kept by the one-head-per-layer guardrail'
        '<span style="background:#e9edf2"></span>removed</p>'
    )
    return (
        f'<table class="heads">\n<thead>{header}</thead>\n<tbody>\n' + "\n".join(rows) + f"\n</tbody>\n</table>{legend}"
    )


def _plot(plots_dir: Path | None, name: str, draw: Callable[[Path], Any]) -> bytes | None:
    """The run's own plot ``plots_dir/name`` when it exists, else the same plot drawn from the report."""
    if plots_dir is not None and (Path(plots_dir) / name).is_file():
        return (Path(plots_dir) / name).read_bytes()
    return drawn_png(draw)


def _prune_overview(report: dict[str, Any]) -> str:
    heads, selection = report["heads"], report.get("selection", {})
    task = report.get("task", {})
    rows = [
        ("model", report.get("model", "")),
        ("task", task_label(task.get("task", ""), task.get("num_labels"))),
        ("method", report.get("method", "cahp")),
        ("budget", f"{selection.get('budget', 'auto')}: {selection.get('how', '')}".rstrip(": ")),
        ("heads kept", f"{heads['kept']} of {heads['total']} ({heads['layers']} layers x {heads['heads_per_layer']})"),
    ]
    if report.get("objective") == "causal-lm":
        rows[1] = ("task", "causal language modelling")
        rows.append(("key-value heads kept", f"{heads.get('kv_kept')} of {heads.get('kv_total')}"))
    calibration = report.get("calibration")
    if calibration and "blocks" in calibration:
        rows.append(("calibration", f"{calibration['blocks']} blocks of {calibration.get('context_length')} tokens"))
    elif calibration:
        rows.append(("calibration", f"{calibration.get('examples')} examples of {calibration.get('split')}"))
    return section("overview", "Overview", fields(rows))


def _accuracy_section(accuracy: dict[str, dict[str, Any]]) -> str:
    stages = [
        ("before_pruning", "before pruning"),
        ("after_pruning", "after pruning"),
        ("after_recovery", "after recovery"),
    ]
    stages = [(key, label) for key, label in stages if key in accuracy]
    rows = []
    for split in accuracy[stages[0][0]]:
        for metric in ("accuracy", "macro_f1"):
            values = [accuracy[key].get(split, {}).get(metric) for key, _ in stages]
            if any(value is not None for value in values):
                rows.append([f"{split} {metric.replace('_', '-')}", *(_number(value) for value in values)])
        examples = accuracy[stages[0][0]][split].get("examples")
        if examples is not None:
            rows.append([f"{split} examples", *([examples] * len(stages))])
    return section("accuracy", "Accuracy", table(["", *(label for _, label in stages)], rows))


def _cost_section(report: dict[str, Any]) -> str:
    rows: list[list[Any]] = []
    parameters = report.get("parameters")
    if parameters:
        dense, pruned = parameters["dense"], parameters["pruned"]
        rows.append(["parameters", f"{dense / 1e6:.2f}M", f"{pruned / 1e6:.2f}M", f"{pruned / dense:.3f}"])
    flops = report.get("flops_per_sequence")
    if flops:
        for key, label in (("total", "FLOPs per sequence"), ("attention", "attention FLOPs per sequence")):
            dense, pruned = flops[f"dense_{key}"], flops[f"pruned_{key}"]
            ratio = f"{pruned / dense:.3f}" if dense else "–"
            rows.append([f"{label} ({flops['seq_len']} tokens)", f"{dense / 1e9:.3f}G", f"{pruned / 1e9:.3f}G", ratio])
    rows += _generation_rows(report)
    latency = report.get("latency")
    if latency:
        dense, pruned = latency["dense"]["median_seconds"], latency["pruned"]["median_seconds"]
        label = f"median latency (batch {latency['batch_size']} x {latency['seq_len']} tokens)"
        rows.append([label, f"{dense * 1e3:.1f} ms", f"{pruned * 1e3:.1f} ms", f"{pruned / dense:.3f}"])
    if not rows:
        return ""
    body = table(["", "dense", "pruned", "pruned / dense"], rows)
    if latency:
        body += (
            f"<p>Speedup {escape(latency['measured_speedup'])}x measured on {escape(latency.get('device', 'cpu'))}"
            f" ({escape(latency.get('torch_threads', '?'))} threads); FLOPs-ideal "
            f"{escape(latency['flops_ideal_speedup'])}x.</p>"
        )
    title = "Parameters, KV cache and speed" if report.get("kv_cache") else "Parameters, FLOPs and latency"
    return section("cost", title, body)


def _quality_section(report: dict[str, Any]) -> str:
    """A causal LM's perplexity and zero-shot accuracy before pruning, after pruning and after recovery."""
    quality = report["quality"]
    stages = [(key, label) for key, label in LM_STAGES if quality.get(key) is not None]
    rows: list[list[Any]] = [
        ["perplexity", *(_number(quality[key]["perplexity"]["perplexity"], 2) for key, _ in stages)]
    ]
    for task, result in quality["dense"].get("prompted", {}).items():
        for metric in ("accuracy", "macro_f1"):
            values = [quality[key]["prompted"][task][metric] for key, _ in stages]
            rows.append([f"{task} zero-shot {metric.replace('_', '-')}", *(_number(value) for value in values)])
        rows.append([f"{task} examples", *([result.get("examples")] * len(stages))])
    body = table(["", *(label for _, label in stages)], rows)
    evaluation = report.get("corpus", {}).get("evaluation", {})
    body += f"<p>Perplexity on {escape(evaluation.get('label', 'the evaluation blocks'))}.</p>"
    continuations = quality["dense"].get("continuations") or []
    after = report.get("after", "pruned")
    if continuations:
        body += "<h3>Greedy continuations</h3>" + table(
            ["prompt", "dense", after],
            [
                [c["prompt"], c["continuation"], final["continuation"]]
                for c, final in zip(continuations, quality[after].get("continuations", []), strict=False)
            ],
        )
    return section("quality", "Perplexity and zero-shot accuracy", body)


#: A causal LM's evaluated stages in ``report["quality"]``.
LM_STAGES = (("dense", "before pruning"), ("pruned", "after pruning"), ("recovered", "after recovery"))


def _generation_rows(report: dict[str, Any]) -> list[list[Any]]:
    """KV-cache bytes and prefill / generation speed rows of a causal LM's cost table."""
    rows: list[list[Any]] = []
    kv = report.get("kv_cache")
    if kv:
        dense, pruned = kv["dense"]["bytes_per_token"], kv["pruned"]["bytes_per_token"]
        rows.append(["KV cache (bytes per token)", f"{dense:,}", f"{pruned:,}", f"{kv['ratio']:.3f}"])
    generation = report.get("generation", {})
    for batch, measured in generation.get("by_batch", {}).items():
        dense, pruned = measured["dense"], measured["pruned"]
        rows.append(
            [
                f"prefill, batch {batch} x {generation.get('prompt_tokens')} tokens",
                f"{dense['prefill_seconds'] * 1e3:.1f} ms",
                f"{pruned['prefill_seconds'] * 1e3:.1f} ms",
                f"{pruned['prefill_seconds'] / dense['prefill_seconds']:.3f}",
            ]
        )
        rows.append(
            [
                f"generation, batch {batch} (tokens/s)",
                f"{dense['tokens_per_second']:.1f}",
                f"{pruned['tokens_per_second']:.1f}",
                f"{pruned['tokens_per_second'] / dense['tokens_per_second']:.3f}",
            ]
        )
    return rows


def _recovery_section(report: dict[str, Any]) -> str:
    recovery = report.get("recovery")
    if recovery is None:
        return ""
    epochs = report.get("config", {}).get("recovery", {}).get("epochs", 0)
    if not epochs:  # the recovery settings (e.g. the default distillation) were not used: none are listed
        return section("recovery", "Recovery", "<p>No recovery (epochs 0): the run is retraining-free.</p>")
    objective = recovery.get("objective", {})
    if isinstance(objective, str):  # a causal LM's: its label (``causal-lm kd (T=2, alpha=0.5)``)
        objective = {"loss": objective}
    rows = [
        ["epochs", epochs],
        ["examples" if "blocks" not in recovery else "blocks", recovery.get("examples", recovery.get("blocks", 0))],
    ]
    relations = objective.get("loss") == "kd-relations"  # the relation settings only matter there
    shown = {key: value for key, value in objective.items() if relations or key in ("loss", "temperature", "alpha")}
    rows += [
        [f"objective: {key}", value] for key, value in shown.items() if key == "loss" or shown.get("loss", "ce") != "ce"
    ]
    for key in ("seconds", "teacher_seconds", "teacher_forwards"):
        if key in recovery:
            rows.append([key.replace("_", " "), recovery[key]])
    if "lora" in recovery:
        lora = recovery["lora"]
        rows.append(["LoRA", f"rank {lora['rank']}, {lora['trainable_parameters']:,} trainable parameters, merged"])
    body = fields(rows)
    history = report.get("recovery_history") or recovery.get("history") or []
    if history:
        body += "<h3>Training loss</h3>" + table(
            ["epoch", "step", "train loss"],
            [[entry.get("epoch"), entry.get("step"), _number(entry.get("train_loss"))] for entry in history],
        )
    return section("recovery", "Recovery", body)


def prune_page(report: dict[str, Any], plots_dir: str | os.PathLike[str] | None = None) -> str:
    """The page of a ``cahp prune`` report (``report.json``'s content).

    Args:
        report: the report :func:`cahp.pipeline.prune` returns.
        plots_dir: the run's ``plots`` folder: its PNGs are embedded as they are; a plot missing there is drawn
            from the report with the same helper.
    """
    folder = Path(plots_dir) if plots_dir is not None else None
    selection, heads = report.get("selection", {}), report["heads"]
    kept_map = kept_heads_table(
        report["kept_heads_by_layer"], heads["heads_per_layer"], selection.get("guardrail_heads", [])
    )
    accuracy = _accuracy_section(report["accuracy"]) if report.get("accuracy") else ""
    if report.get("objective") == "causal-lm":
        accuracy = _quality_section(report)
    sections = [
        row(_prune_overview(report), section("kept-heads", "Kept heads (layers x heads)", kept_map)),
        row(*_selection_plots(selection, heads["heads_per_layer"], folder)),
        row(accuracy, _cost_section(report)),
        row(_recovery_section(report), _command_section(report.get("command"))),
    ]
    task = report.get("task", {}).get("task", "") or report.get("objective", "")
    title = f"cahp prune: {Path(str(report.get('model', 'model'))).name} on {task_label(task)}"
    subtitle = f"{report.get('method', 'cahp')}: {heads['kept']} of {heads['total']} heads kept"
    return page(title, subtitle, [part for part in sections if part])


def _selection_plots(selection: dict[str, Any], heads: int, folder: Path | None) -> tuple[str, str]:
    """The MSS(k) curve and the head space sections (empty for a selection without them: scorers + budget)."""
    mss = _plot(folder, "mss_curve.png", lambda path: plot_mss_curve(selection, path))
    mss_section = ""
    if mss is not None:
        knee = selection.get("knee", {})
        caption = f"<p>Knee k* = {escape(knee.get('k'))}; k used = {escape(selection.get('k'))}.</p>"
        mss_section = section("mss-curve", "MSS(k) and the knee", image(mss, "MSS(k) curve with the knee") + caption)
    space = _plot(folder, "head_space.png", lambda path: plot_head_space(selection, heads, path))
    caption = "<p>Each point is a head, coloured by cluster; kept heads are circled and labelled layer.head.</p>"
    space_section = (
        section("head-space", "Head space", image(space, "2-D head space coloured by cluster") + caption)
        if space is not None
        else ""
    )
    return mss_section, space_section


def write_prune_html(
    report: dict[str, Any], path: str | os.PathLike[str], plots_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Write :func:`prune_page` to ``path`` atomically."""
    return write_html(prune_page(report, plots_dir), path)


# ---- cahp analyze --------------------------------------------------------------------------------------------


def analysis_html_path(json_path: str | os.PathLike[str]) -> Path:
    """Where ``cahp analyze`` writes its page: ``analysis.json`` -> ``analysis.html``."""
    path = Path(json_path)
    return path.with_name(path.name + ".html") if path.suffix == ".html" else path.with_suffix(".html")


def _head_list(heads: list[list[int]]) -> str:
    return ", ".join(f"L{layer}H{head}" for layer, head in heads) or "none"


def _statistics_section(payload: dict[str, Any]) -> str:
    """The per-head tables of :data:`HEAT_MAP_STATISTICS` the file has (and CAHP's clusters) as heat maps."""
    tables = payload.get("heads", {})
    statistics = {name: tables[name] for name in HEAT_MAP_STATISTICS if tables.get(name) is not None}
    if (payload.get("cahp") or {}).get("cluster") is not None:
        statistics["cahp_cluster"] = payload["cahp"]["cluster"]
    if not statistics:
        return ""
    png = drawn_png(lambda path: plot_head_statistics(statistics, path, categorical=("cahp_cluster",)))
    if png is None:
        return ""
    shown = ", ".join(name.replace("_", " ") for name in statistics)
    body = image(png, f"heat maps (layers x heads): {shown}") + f"<p>Layers x heads: {escape(shown)}.</p>"
    return section("head-statistics", "Per-head statistics", body)


def _cahp_section(cahp: dict[str, Any] | None, heads: int) -> str:
    """The heads CAHP keeps at its knee (``cahp analyze --cahp``), as a layers x heads map."""
    if not cahp or cahp.get("kept") is None:
        return ""
    kept = {str(layer): [h for h, flag in enumerate(row) if flag] for layer, row in enumerate(cahp["kept"])}
    text = f"<p>CAHP's heads at its knee (k* = {escape(cahp.get('k'))}).</p>"
    return section("cahp-heads", "Heads CAHP keeps", text + kept_heads_table(kept, heads))


def analysis_page(payload: dict[str, Any]) -> str:
    """The page of a ``cahp analyze`` JSON (schema: ``docs/analysis.md``): per-head heat maps and the
    adjacent-layer divergence profile."""
    grid, found = payload["grid"], payload.get("summary", {})
    task = payload.get("task_name") or payload.get("task", "")  # files before task_name: the task as given
    overview = [
        ("model", f"{payload.get('model', '')} ({payload.get('model_type', '')})"),
        ("task", task_label(task, payload.get("num_labels"))),
        ("max length", f"{payload.get('max_length', '')} tokens"),
        ("heads", f"{grid['layers']} layers x {grid['heads']} heads"),
        ("examples", payload.get("examples", "")),
        ("attention", "causal" if payload.get("causal") else "bidirectional"),
    ]
    overview += [(kind.replace("_", " "), _head_list(found.get(kind, []))) for kind in found]
    sections = [section("overview", "Overview", fields(overview))]
    sections.append(_statistics_section(payload))
    sections.append(_cahp_section(payload.get("cahp"), grid["heads"]))
    pairs = payload.get("adjacent_layers", [])
    if pairs:
        png = drawn_png(lambda path: plot_layer_divergence(pairs, path))
        rows = [
            [f"{pair['layers'][0]} → {pair['layers'][1]}", _number(pair["kl"]), _number(pair["js"])] for pair in pairs
        ]
        body = (image(png, "adjacent-layer KL and JS divergence") if png else "") + table(["layers", "KL", "JS"], rows)
        sections.append(section("layer-redundancy", "Adjacent-layer redundancy", body))
    sections.append(_command_section(payload.get("command")))
    title = f"cahp analyze: {Path(str(payload.get('model', 'model'))).name} on {task_label(task)}"
    subtitle = f"{grid['layers']} x {grid['heads']} heads, {payload.get('examples', '?')} examples"
    return page(title, subtitle, [part for part in sections if part])


def write_analysis_html(payload: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write :func:`analysis_page` to ``path`` atomically."""
    return write_html(analysis_page(payload), path)


# ---- cahp bench ----------------------------------------------------------------------------------------------

_INLINE = ((re.compile(r"`([^`]+)`"), r"<code>\1</code>"), (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"))


def inline_markdown(text: str) -> str:
    """``text`` escaped, with the summary's inline markup (`` `code` ``, ``**bold**``) as HTML."""
    result = escape(text)
    for pattern, replacement in _INLINE:
        result = pattern.sub(replacement, result)
    return result


def markdown_blocks(lines: list[str]) -> str:
    """Paragraphs and ``|`` tables of the summary's markdown as HTML (headings are handled by the caller)."""
    parts: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index].strip()
        if line.startswith("|"):
            block = []
            while index < len(lines) and lines[index].strip().startswith("|"):
                block.append([cell.strip() for cell in lines[index].strip().strip("|").split("|")])
                index += 1
            rows = [row for row in block if not all(set(cell) <= set("-: ") for cell in row)]
            head = "".join(f"<th>{inline_markdown(cell)}</th>" for cell in rows[0])
            body = "".join(
                "<tr>" + "".join(f"<td>{inline_markdown(c)}</td>" for c in row) + "</tr>\n" for row in rows[1:]
            )
            parts.append(f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>")
            continue
        if line:
            parts.append(f"<p>{inline_markdown(line)}</p>")
        index += 1
    return "\n".join(parts)


def bench_page(out: str | os.PathLike[str]) -> str:
    """The page of a ``cahp bench`` folder: ``summary.md``'s text and tables, and the PNGs of ``plots/``."""
    out = Path(out)
    lines = (out / "summary.md").read_text(encoding="utf-8").splitlines()
    title = lines[0].lstrip("# ").strip() if lines and lines[0].startswith("# ") else f"cahp bench: {out.name}"
    body = lines[1:] if lines and lines[0].startswith("# ") else lines
    blocks: list[tuple[str, list[str]]] = [("", [])]
    for line in body:
        if line.startswith("## "):
            blocks.append((line[3:].strip(), []))
        else:
            blocks[-1][1].append(line)
    sections = [section("overview", "Overview", markdown_blocks(blocks[0][1]))]
    tables = [f"<h3>{inline_markdown(heading)}</h3>\n{markdown_blocks(text)}" for heading, text in blocks[1:]]
    if tables:
        sections.append(section("tables", "Tables", "\n".join(tables)))
    plots = sorted((out / "plots").glob("*.png")) if (out / "plots").is_dir() else []
    if plots:
        figures = [
            f"<h3>{escape(path.stem.replace('_', ' '))}</h3>\n{image(path.read_bytes(), path.stem)}" for path in plots
        ]
        sections.append(section("plots", "Plots", "\n".join(figures)))
    return page(title, f"cahp bench folder {out.name}", sections)


def write_bench_html(out: str | os.PathLike[str]) -> Path:
    """Write :func:`bench_page` to ``out/report.html`` atomically."""
    return write_html(bench_page(out), Path(out) / "report.html")
