"""The benchmark's summary table and plots, rebuilt from the files of a ``cahp bench`` folder.

Reads ``bench_config.json``, ``dense.json`` and ``cells/*.json`` (and ``scores/*.json`` in folders written by
earlier versions); never recomputes a result. Writes ``summary.md``, ``summary.json``,
``plots/{accuracy_vs_heads,layer_retention,kept_depth}.png`` and ``report.html`` (all of it on one page,
:mod:`cahp.reporting.html_report`).

Nothing here depends on which methods a grid compares: the config names the ``focus`` method (the one the
summary compares with the best other method, drawn highlighted) and the ``control`` (``random`` by default,
drawn dashed black, the reference of the gain table); what a method is (deterministic, budget-aware, finds its
own head count) comes from the method registry (:func:`cahp.methods.base.method_info`).
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from cahp.errors import CahpError
from cahp.methods.base import MethodInfo, method_info
from cahp.models import cahp_home
from cahp.outputs import write_json
from cahp.reporting.html_report import write_bench_html

STAGES = {"after_pruning": "after pruning (no recovery)", "after_recovery": "after recovery"}


@dataclass(frozen=True)
class Metric:
    """What a grid's summary ranks methods by: ``cell[results_key][stage][split][name]``."""

    results_key: str
    name: str
    title: str
    higher_is_better: bool
    digits: int

    def best(self, values: dict[str, float]) -> str:
        """The key of the best value."""
        return (max if self.higher_is_better else min)(values, key=lambda key: values[key])

    def better(self, value: float, than: float) -> bool:
        return value > than if self.higher_is_better else value < than

    def versus(self, value: float, reference: float) -> str:
        """Accuracy: the difference; perplexity: the ratio (it spans orders of magnitude)."""
        return f"{value - reference:+.4f}" if self.higher_is_better else f"x{value / reference:.2f}"


ACCURACY = Metric("accuracy", "accuracy", "Accuracy", True, 4)
PERPLEXITY = Metric("quality", "perplexity", "Perplexity", False, 2)


def grid_metric(config: dict[str, Any]) -> Metric:
    """Perplexity for a ``causal-lm`` grid, accuracy otherwise."""
    return PERPLEXITY if config.get("objective") == "causal-lm" else ACCURACY


DEFAULT_CONTROL = "random"

# Records of earlier versions (configs without "focus" / "method_settings", folders with ``scores/``) name the
# method they were built around; these two names only read such records.
LEGACY_FOCUS = "cahp"
LEGACY_SHARED_FIT = "cahp_shared.json"  # CAHP's signatures and salience, computed once for every seed


def budget_label(budget: float | str) -> str:
    """A budget as cell files and tables name it: ``"knee"``, a cost budget (``"flops=0.7"``) or the kept fraction
    (``0.3``)."""
    if isinstance(budget, str):
        return budget if budget == "knee" or "=" in budget else f"{float(budget):g}"
    return f"{float(budget):g}"


def focus_method(config: dict[str, Any]) -> str | None:
    """The method the summary compares with the others: ``config["focus"]``; in records without that key,
    ``cahp`` when it is one of the methods, else the first method (``None`` without methods)."""
    if config.get("focus"):
        return str(config["focus"])
    methods = list(config.get("methods", []))
    if LEGACY_FOCUS in methods:
        return LEGACY_FOCUS
    return methods[0] if methods else None


def control_method(config: dict[str, Any]) -> str:
    """The control of the gain table and the dashed line of the plots: ``config["control"]`` or ``random``."""
    return str(config.get("control") or DEFAULT_CONTROL)


def planned_cells(config: dict[str, Any]) -> list[tuple[str, int, float | str]]:
    """The ``(method, seed, budget)`` cells of a grid, in the order the runner computes them.

    Seed-major, so that an interrupted grid holds a complete comparison for its first seeds. Within a seed
    the methods that find their own head count come first (the first of them sets the ``knee`` budget of the
    others), then the rest in the config's order. :func:`method_seeds` says which seeds a method runs.

    Raises:
        CahpError: a method the registry does not know (the message lists the known ones).
    """
    return _planned(config, method_info)


def method_seeds(method: str, config: dict[str, Any]) -> list[int]:
    """The seeds ``method`` runs in the grid of ``config``.

    With ``resample_calibration`` (each seed draws its own calibration sample) every method runs every seed.
    Without it (and in records of earlier versions, which lack the key) a method the registry marks
    ``deterministic`` runs only the first ``deterministic_seeds`` seeds (at least one): its other seeds would
    repeat the same result.

    Raises:
        CahpError: a method the registry does not know.
    """
    return _seeds(method_info(method), config)


def _seeds(info: MethodInfo, config: dict[str, Any]) -> list[int]:
    """A method's seeds: all of them, or the first ``deterministic_seeds`` for a method without randomness of its
    own when every seed sees the same calibration data (no resampling, or a causal-LM grid's fixed blocks)."""
    seeds = list(config.get("seeds", []))
    resampled = config.get("resample_calibration", False) and config.get("objective") != "causal-lm"
    if resampled or not info.deterministic:
        return seeds
    return seeds[: max(1, int(config.get("deterministic_seeds", 1)))]


def _planned(config: dict[str, Any], info_of: Callable[[str], MethodInfo]) -> list[tuple[str, int, float | str]]:
    methods = list(config.get("methods", []))
    infos = {method: info_of(method) for method in methods}
    ordered = sorted(methods, key=lambda method: not infos[method].finds_own_budget)
    own_seeds = {method: _seeds(infos[method], config) for method in ordered}
    return [
        (method, seed, budget)
        for seed in config.get("seeds", [])
        for method in ordered
        if seed in own_seeds[method]
        for budget in config.get("budgets", [])
    ]


def _known_info(method: str) -> MethodInfo:
    """The registry's entry, or for a method no longer registered (a plugin not installed here) one that
    runs every seed, needs no budget and does not find its own: a report must still render its cells."""
    try:
        return method_info(method)
    except CahpError:
        return MethodInfo(method, "not registered here", "unknown", False, False, False, ())


def knee_method(config: dict[str, Any]) -> str | None:
    """The method whose own head count is the ``knee`` budget of the others: the first that finds its own."""
    return next((m for m in config.get("methods", []) if _known_info(m).finds_own_budget), None)


def _missing_cells(config: dict[str, Any], cells: list[dict[str, Any]]) -> tuple[int, list[str]]:
    """How many cells the config plans, and summary lines naming those not in the folder yet (none when complete)."""
    budgets, seeds = config.get("budgets", []), list(config.get("seeds", []))
    planned = [(method, seed, budget_label(budget)) for method, seed, budget in _planned(config, _known_info)]
    done = {(cell["method"], cell["seed"], budget_label(cell["budget"])) for cell in cells}
    missing = [cell for cell in planned if cell not in done]
    if not missing:
        return len(planned), []
    by_method: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for method, seed, budget in missing:
        by_method[method][seed].append(budget)
    every_budget = [budget_label(budget) for budget in budgets]
    parts = []
    for method, absent in by_method.items():
        named = [f"seed {seed}" + ("" if at == every_budget else f" at {', '.join(at)}") for seed, at in absent.items()]
        parts.append(f"{method} ({'; '.join(named)})")
    lines = [
        f"**Partial grid: {len(planned) - len(missing)} of the {len(planned)} cells this config plans.** "
        f"Not run yet: {', '.join(parts)}. Rerunning `cahp bench` with this config resumes them."
    ]
    # Under the fixed-calibration rule, a method that has cells of the first seeds only while other methods
    # reached later seeds was planned for the first seeds only: the registry then called it deterministic.
    first = seeds[: max(1, int(config.get("deterministic_seeds", 1)))]
    seeds_done: dict[str, set[int]] = defaultdict(set)
    for cell in cells:
        seeds_done[cell["method"]].add(cell["seed"])
    went_on = any(seeds_of - set(first) for seeds_of in seeds_done.values())
    skipped = [
        method
        for method in by_method
        if went_on
        and not config.get("resample_calibration", False)
        and not _known_info(method).deterministic
        and seeds_done.get(method)
        and seeds_done[method] <= set(first)
    ]
    if skipped:
        which = f"seed {first[0]}" if len(first) == 1 else f"seeds {', '.join(map(str, first))}"
        lines.append(
            f"{_listed(skipped)} ran only {which} while the grid went on to later seeds: they were taken then for "
            "methods without randomness of their own. The method registry now says their result depends on the "
            f"seed, so their later seeds are planned too, and their rows come from {which} until those run."
        )
    return len(planned), [" ".join(lines), ""]


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _shown(path: str) -> str:
    """A path as a summary shows it: ``$CAHP_HOME/...`` rather than this machine's cache folder."""
    home = str(cahp_home())
    return "$CAHP_HOME" + path[len(home) :] if path == home or path.startswith(home + "/") else path


def load_cells(out: Path) -> list[dict[str, Any]]:
    """Every finished cell of a bench folder."""
    return [json.loads(path.read_text()) for path in sorted((Path(out) / "cells").glob("*.json"))]


def report_split(cells: list[dict[str, Any]], metric: Metric = ACCURACY) -> str:
    """The split the summary reports: ``test`` when evaluated, else the first one (perplexity: its evaluation)."""
    if metric is PERPLEXITY:
        return "perplexity"
    splits = list(cells[0]["accuracy"]["after_pruning"]) if cells else []
    return "test" if "test" in splits else (splits[0] if splits else "test")


def _stats(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "n": int(array.size)}


def relative_depth(kept_heads_by_layer: dict[str, list[int]], layers: int) -> float:
    """Mean layer of the kept heads, scaled to ``[0, 1]`` (0 = first layer, 1 = last)."""
    depths = [int(layer) for layer, heads in kept_heads_by_layer.items() for _ in heads]
    return float(np.mean(depths)) / max(1, layers - 1) if depths else float("nan")


def layer_retention(kept_heads_by_layer: dict[str, list[int]], layers: int, heads: int) -> np.ndarray:
    """``[layers]`` share of each layer's heads that are kept."""
    return np.array([len(kept_heads_by_layer.get(str(layer), [])) / heads for layer in range(layers)])


def jaccard(first: dict[str, list[int]], second: dict[str, list[int]]) -> float:
    """Overlap ``|A & B| / |A | B|`` of two head selections given as ``{layer: [heads]}``."""
    a = {(int(layer), int(h)) for layer, heads in first.items() for h in heads}
    b = {(int(layer), int(h)) for layer, heads in second.items() for h in heads}
    return len(a & b) / len(a | b) if a | b else 1.0


def aggregate(
    cells: list[dict[str, Any]], split: str, metric: Metric = ACCURACY
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{method: {budget: {after_pruning, after_recovery, macro_f1, kept, depth, retention, seeds[, seed_overlap]}}}``
    over seeds (the stages hold ``metric``); ``macro_f1`` holds a stage only where every cell recorded it;
    ``seed_overlap`` (several seeds only) is the mean pairwise Jaccard of the selected heads. A causal-LM grid
    adds ``zero_shot`` (``{task: {stage: accuracy stats}}``) and ``kv_kept``."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for cell in cells:
        groups[(cell["method"], cell["budget"])].append(cell)
    table: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (method, budget), members in groups.items():
        layers, heads = members[0]["layers"], members[0]["heads_per_layer"]
        results = [c[metric.results_key] for c in members]
        row: dict[str, Any] = {stage: _stats([r[stage][split][metric.name] for r in results]) for stage in STAGES}
        f1 = {stage: [r[stage][split].get("macro_f1") for r in results] for stage in STAGES}
        row["macro_f1"] = {stage: _stats(values) for stage, values in f1.items() if None not in values}
        if metric is PERPLEXITY:
            row["zero_shot"] = {
                name: {stage: _stats([r[stage][name]["accuracy"] for r in results]) for stage in STAGES}
                for name in results[0]["after_pruning"]
                if name != split
            }
            row["kv_kept"] = _stats([c["kv_kept"] for c in members])
        row["kept"] = _stats([c["kept"] for c in members])
        row["kept_fraction"] = row["kept"]["mean"] / members[0]["heads_total"]
        row["depth"] = _stats([relative_depth(c["kept_heads_by_layer"], layers) for c in members])
        row["retention"] = np.mean(
            [layer_retention(c["kept_heads_by_layer"], layers, heads) for c in members], axis=0
        ).tolist()
        row["seeds"] = sorted(c["seed"] for c in members)
        if len(members) > 1:
            row["seed_overlap"] = _stats(
                [
                    jaccard(a["selected_heads_by_layer"], b["selected_heads_by_layer"])
                    for a, b in itertools.combinations(members, 2)
                ]
            )
        table[method][budget] = row
    return dict(table)


def fit_seconds(cells: list[dict[str, Any]]) -> dict[str, list[float]]:
    """``{method: [seconds of each fit]}``: the fits the cells used, each counted once.

    A cell records its method's fit seconds in ``seconds.scoring``, also when it reused a fit (``fit_cached``):
    one fit serves every budget of a (method, seed), or of a (method, seed, head count) for a budget-aware
    method (``budget_aware`` in the cell, else in the registry). Each such group counts the cells that fitted
    (``fit_cached`` false), or one cell when all reused a fit made earlier (cells of earlier versions carry no
    ``fit_cached``: they count as reusing).
    """
    groups: dict[tuple[str, int, int | None], list[dict[str, Any]]] = defaultdict(list)
    for cell in cells:
        aware = cell.get("budget_aware", _known_info(cell["method"]).budget_aware)
        groups[(cell["method"], cell["seed"], cell.get("keep") if aware else None)].append(cell)
    fits: dict[str, list[float]] = defaultdict(list)
    for (method, _, _), members in groups.items():
        fitted = [cell for cell in members if cell.get("fit_cached") is False]
        fits[method] += [float(cell["seconds"].get("scoring", 0.0)) for cell in fitted or members[:1]]
    return dict(fits)


def _legacy_scoring(out: Path, cells: list[dict[str, Any]]) -> dict[str, list[float]] | None:
    """Folders of earlier versions keep each fit's seconds in ``scores/<method>__seed<s>[...].json``; ``None``
    when the folder has none or its cells come from this version (they record ``fit_cached``)."""
    paths = list((out / "scores").glob("*__seed*.json"))  # unsorted, as then: sums stay identical to the last bit
    if not paths or any("fit_cached" in cell for cell in cells):
        return None
    fits: dict[str, list[float]] = defaultdict(list)
    for path in paths:
        fits[path.name.split("__", 1)[0]].append(float(json.loads(path.read_text())["seconds"]))
    return dict(fits)


def _timings(out: Path, cells: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{method: {scoring_runs, scoring_seconds_mean, cell_seconds_mean, total_seconds}}``: fits counted once
    (:func:`fit_seconds`), a cell's own time = prune and evaluate (+ recover and evaluate)."""
    cell_seconds: dict[str, list[float]] = defaultdict(list)
    for cell in cells:
        seconds = cell["seconds"]
        # selection time is left out: it is the fit (counted once per fit) or reading its cache
        cell_seconds[cell["method"]].append(seconds["prune_and_evaluate"] + seconds["recovery_and_evaluate"])
    legacy = _legacy_scoring(out, cells)
    scoring = legacy if legacy is not None else fit_seconds(cells)
    result: dict[str, dict[str, float]] = {}
    for method in [*cell_seconds, *(m for m in scoring if m not in cell_seconds)]:
        fits, own = scoring.get(method, []), cell_seconds.get(method, [])
        result[method] = {
            "scoring_runs": len(fits),
            "scoring_seconds_mean": float(np.mean(fits)) if fits else 0.0,
            "cell_seconds_mean": float(np.mean(own)) if own else 0.0,
            "total_seconds": float(np.sum(fits) + np.sum(own)),
        }
    shared = out / "scores" / LEGACY_SHARED_FIT
    if legacy is not None and LEGACY_FOCUS in result and shared.is_file():
        prep = float(json.loads(shared.read_text())["seconds"])
        result[LEGACY_FOCUS]["shared_signatures_salience_seconds"] = prep
        result[LEGACY_FOCUS]["total_seconds"] += prep
    return result


def _fmt(stats: dict[str, float], digits: int = 4) -> str:
    text = f"{stats['mean']:.{digits}f}"
    return f"{text} ± {stats['std']:.{digits}f}" if stats["n"] > 1 else text


def _ordered(table: dict[str, Any], preferred: list[str]) -> list[str]:
    return [m for m in preferred if m in table] + sorted(m for m in table if m not in preferred)


def write_bench_report(out: str | Path) -> Path:
    """Write ``summary.md``, ``summary.json``, the plots and ``report.html`` of a bench folder; returns the summary
    path."""
    out = Path(out)
    config = json.loads((out / "bench_config.json").read_text())
    dense = json.loads((out / "dense.json").read_text())
    cells = load_cells(out)
    metric = grid_metric(config)
    split = report_split(cells, metric)
    table = aggregate(cells, split, metric)
    methods = _ordered(table, config.get("methods", []))
    budget_order = [budget_label(b) for b in config.get("budgets", [])]
    budgets = [b for b in budget_order if any(b in table[m] for m in methods)]
    timings = _timings(out, cells)
    focus, control = focus_method(config), control_method(config)
    resampled = bool(config.get("resample_calibration", False))
    dense_value = dense[metric.results_key].get(split, {}).get(metric.name, float("nan"))

    recovery = config.get("recovery", {})
    retraining_free = not recovery.get("epochs")
    stages = {"after_pruning": STAGES["after_pruning"]} if retraining_free else STAGES
    data = (
        "the language-modelling loss of the calibration blocks"
        if metric is PERPLEXITY
        else f"{config.get('recovery_max_examples') or 'all'} training examples"
    )
    recovery_text = (
        f"none: this grid is retraining-free, so {metric.name} is measured right after pruning"
        if retraining_free
        else f"{recovery.get('epochs')} epoch(s) at lr {recovery.get('learning_rate')} on {data}"
        f"{', length-grouped batches' if recovery.get('group_by_length') else ''}"
        f"{_objective_text(config.get('recovery_objective'))}, the same for every method"
    )
    task = dense.get("task", {})
    protocol = f" ({task['protocol']} {task['task']} protocol)" if task.get("task") == "mnli" else ""
    calibration_seed = config.get("calibration_seed", 0)
    drawn = (
        f"drawn anew for each seed s (sampling seed {calibration_seed} + s), the same for every method"
        if resampled
        else f"(seed {calibration_seed}) for every method"
    )
    knee = knee_method(config)
    knee_text = f" (`knee` = {knee}'s k*, the head count it finds itself)" if knee and "knee" in budget_order else ""
    seeds_text = (
        "every method runs every seed, each seed on its own calibration sample. Same recovery recipe"
        if resampled and metric is ACCURACY
        else "methods without randomness of their own run one seed). Same calibration set, same recovery recipe"
    )
    if metric is PERPLEXITY:
        calibration = task.get("calibration", {})
        evaluation = task.get("evaluation", {})
        prompted = ", ".join(f"{n} examples of {t}" for t, n in task.get("prompted", {}).items())
        subject = "causal-lm"
        setting = (
            f"Calibration: {calibration.get('blocks')} blocks of {calibration.get('context_length')} tokens of "
            f"{task.get('calibration_split')}, the same for every method and seed"
        )
        measured = (
            f"Perplexity (lower is better) on {evaluation.get('blocks')} blocks of {evaluation.get('context_length')} "
            f"tokens of {evaluation.get('label')}; dense model {dense_value:.2f} with {dense['heads_total']} heads. "
            f"Zero-shot accuracy on {prompted or 'no prompted task'}. "
        )
    else:
        subject = config["task"]["task"]
        setting = (
            f"Calibration: {config.get('calibration_size') or 'all'} examples of the "
            f"`{task.get('calibration_split', 'train')}` split {drawn}{protocol}"
        )
        measured = f"Accuracy on `{split}`; dense model {dense_value:.4f} with {dense['heads_total']} heads. "
    lines = [
        f"# Head-pruning benchmark: {Path(config['model']).name} on {subject}",
        "",
        f"Model `{_shown(config['model'])}`. {setting}. Recovery: {recovery_text}.",
        "",
        measured + f"Budgets are fractions of heads kept{knee_text}; the one-head-per-layer guardrail may keep "
        "a few more (see the heads-kept table). Cells show mean ± sample std over seeds; a value without ± "
        f"comes from one seed ({seeds_text} and recovery seed for every method."
        f" `{control}` is the control.",
        "",
    ]
    planned, missing = _missing_cells(config, cells)
    lines += missing
    if cells and metric is ACCURACY:
        examples = cells[0]["accuracy"]["after_pruning"][split]["examples"]
        error = float(np.sqrt(dense_value * (1 - dense_value) / examples))
        lines += [
            f"Noise: one accuracy on these {examples} examples has a binomial standard error of about ±{error:.4f}, "
            "so differences below about twice that are within noise.",
            "",
        ]

    def show(render: Callable[[dict[str, Any]], str]) -> Callable[[str, str], str]:
        return lambda method, budget: render(table[method][budget]) if budget in table[method] else "–"

    def gain(method: str, budget: str) -> str:
        row, reference = table[method].get(budget), table.get(control, {}).get(budget)
        if row is None or reference is None:
            return "–"
        return " / ".join(metric.versus(row[s]["mean"], reference[s]["mean"]) for s in stages)

    def stage_value(stage: str) -> Callable[[dict[str, Any]], str]:
        return lambda row: _fmt(row[stage], metric.digits)

    for stage, title in stages.items():
        lines += _markdown_table(f"{metric.title} {title}", methods, budgets, show(stage_value(stage)))

    def macro_f1(method: str, budget: str) -> str:
        scores = table[method].get(budget, {}).get("macro_f1", {})
        return " / ".join(f"{scores[s]['mean']:.4f}" for s in stages) if all(s in scores for s in stages) else "–"

    stage_names = " / ".join(s.replace("_", " ") for s in stages)
    if metric is PERPLEXITY:
        lines += _zero_shot_tables(table, methods, budgets, stages, stage_names)
    else:
        lines += _markdown_table(f"Macro-F1 (mean, {stage_names})", methods, budgets, macro_f1)
        lines += [
            "A macro-F1 far below the accuracy means some class is rarely predicted or rarely right: a class the "
            "model never predicts counts as 0 in the mean.",
            "",
        ]
    if control in table:
        title = (
            f"Gain over the {control} control (mean accuracy, {stage_names})"
            if metric is ACCURACY
            else f"Perplexity relative to the {control} control (ratio of means, {stage_names}; below 1 is better)"
        )
        lines += _markdown_table(title, [m for m in methods if m != control], budgets, gain)
    if focus in table and len(methods) > 1:
        lines += _focus_vs_best(table, focus, methods, budgets, stages, metric)
    lines += _markdown_table("Heads kept (mean)", methods, budgets, show(lambda r: f"{r['kept']['mean']:.1f}"))
    if metric is PERPLEXITY:
        kv = show(lambda r: f"{r['kv_kept']['mean']:.1f}")
        lines += _markdown_table("Key-value heads kept (mean; the KV cache shrinks with them)", methods, budgets, kv)
    lines += _markdown_table(
        "Mean relative depth of the kept heads (0 = first layer, 1 = last)",
        methods,
        budgets,
        show(lambda r: f"{r['depth']['mean']:.2f}"),
    )
    seeded = [m for m in methods if any("seed_overlap" in row for row in table[m].values())]
    if seeded:
        lines += _markdown_table(
            "Same heads across seeds? (mean pairwise Jaccard of the selected heads; 1 = identical)",
            seeded,
            budgets,
            show(lambda r: f"{r['seed_overlap']['mean']:.2f}" if "seed_overlap" in r else "–"),
        )
    lines += ["## Wall time (seconds)", "", "| method | scoring runs | scoring, mean | cell, mean | total |"]
    lines.append("|---|---|---|---|---|")
    for method in methods:
        t = timings.get(method, {})
        lines.append(
            f"| {method} | {t.get('scoring_runs', 0)} | {t.get('scoring_seconds_mean', 0):.1f} | "
            f"{t.get('cell_seconds_mean', 0):.1f} | {t.get('total_seconds', 0):.1f} |"
        )
    cell_text = f"A cell = prune, evaluate{'' if retraining_free else ', recover, evaluate'}."
    if "shared_signatures_salience_seconds" in timings.get(LEGACY_FOCUS, {}):  # scores/ of an earlier version
        shared = timings[LEGACY_FOCUS]["shared_signatures_salience_seconds"]
        cell_text = (
            f"CAHP's signatures and salience ({shared:.1f} s) are computed once for all seeds and counted in its "
            f"total. {cell_text}"
        )
    lines += ["", cell_text]
    lines += ["", "Plots: `plots/accuracy_vs_heads.png`, `plots/layer_retention.png`, `plots/kept_depth.png`."]
    lines += ["All of it on one page: `report.html`.", ""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    write_json(
        out / "summary.json",
        {
            "split": split,
            "metric": metric.name,
            f"dense_{metric.name}": dense_value,
            "table": table,
            "timings": timings,
            "cells": len(cells),
            "cells_planned": planned,
        },
    )
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    if cells:
        roles = {"focus": focus, "control": control}
        plot_accuracy_vs_heads(
            table, methods, dense_value, split, plots / "accuracy_vs_heads.png", stages, metric=metric, **roles
        )
        plot_layer_retention(table, methods, plots / "layer_retention.png")
        plot_kept_depth(table, methods, plots / "kept_depth.png", **roles)
    write_bench_html(out)
    return summary


def _focus_vs_best(
    table: dict[str, Any],
    focus: str,
    methods: list[str],
    budgets: list[str],
    stages: dict[str, str],
    metric: Metric = ACCURACY,
) -> list[str]:
    """Per budget and stage: the focus method's mean against the best other method's (by mean)."""
    digits = metric.digits
    lines = [
        f"## {focus} vs the best other method (mean {metric.name})",
        "",
        f"| budget | stage | {focus} | best other | {'difference' if metric.higher_is_better else 'ratio'} | "
        f"rank of {focus} |",
        "|---|---|---|---|---|---|",
    ]
    for budget in budgets:
        for stage in stages:
            means = {m: table[m][budget][stage]["mean"] for m in methods if budget in table[m]}
            if focus not in means or len(means) < 2:
                continue
            best = metric.best({m: v for m, v in means.items() if m != focus})
            rank = 1 + sum(metric.better(value, means[focus]) for m, value in means.items() if m != focus)
            lines.append(
                f"| {budget} | {stage.replace('_', ' ')} | {means[focus]:.{digits}f} | {best} "
                f"{means[best]:.{digits}f} | {metric.versus(means[focus], means[best])} | {rank} of {len(means)} |"
            )
    return [*lines, ""]


def _zero_shot_tables(
    table: dict[str, Any], methods: list[str], budgets: list[str], stages: dict[str, str], stage_names: str
) -> list[str]:
    """A causal-LM grid: per prompted task, the mean zero-shot accuracy at each stage."""
    tasks = sorted({task for method in methods for row in table[method].values() for task in row["zero_shot"]})
    lines: list[str] = []
    for task in tasks:

        def accuracy(method: str, budget: str, task: str = task) -> str:
            scores = table[method].get(budget, {}).get("zero_shot", {}).get(task)
            return " / ".join(f"{scores[s]['mean']:.4f}" for s in stages) if scores else "–"

        lines += _markdown_table(f"{task} accuracy (mean, {stage_names})", methods, budgets, accuracy)
    return lines


def _markdown_table(title: str, methods: list[str], budgets: list[str], cell: Callable[[str, str], str]) -> list[str]:
    lines = [f"## {title}", "", "| method | " + " | ".join(budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    lines += [f"| {method} | " + " | ".join(cell(method, budget) for budget in budgets) + " |" for method in methods]
    return [*lines, ""]


def _curve(table: dict[str, Any], method: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = sorted(table[method].values(), key=lambda row: row["kept_fraction"])
    x = np.array([row["kept_fraction"] for row in rows])
    mean = np.array([row[key]["mean"] for row in rows])
    std = np.array([row[key]["std"] for row in rows])
    return x, mean, std


def _style(method: str, index: int, focus: str | None, control: str | None) -> dict[str, Any]:
    """The control dashed black, the focus method thick red, the others from a palette without red and grey."""
    if method == control:
        return {"color": "black", "ls": "--", "marker": "x"}
    if method == focus:
        return {"color": "#c44e52", "ls": "-", "marker": "o", "lw": 2.2}
    colours = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]  # a ListedColormap's list of colours
    palette = [c for i, c in enumerate(colours) if i not in (3, 7)]  # no red, no grey
    return {"color": palette[index % len(palette)], "ls": "-", "marker": "."}


def plot_accuracy_vs_heads(
    table: dict[str, Any],
    methods: list[str],
    dense_value: float,
    split: str,
    path: Path,
    stages: dict[str, str] = STAGES,
    *,
    focus: str | None = None,
    control: str | None = DEFAULT_CONTROL,
    metric: Metric = ACCURACY,
) -> Path:
    """Accuracy (or perplexity, on a log scale) against the share of heads kept, per method (mean line, ±std
    band), one panel per stage.

    ``focus`` is drawn highlighted and ``control`` dashed black. A retraining-free grid passes only
    ``after_pruning``: a second panel would repeat the first under a title that claims a recovery.
    """
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4.6), sharey=True, squeeze=False)
    for ax, (stage, title) in zip(axes[0], stages.items(), strict=True):
        for index, method in enumerate(methods):
            x, mean, std = _curve(table, method, stage)
            style = _style(method, index, focus, control)
            ax.plot(x, mean, label=method, **style)
            ax.fill_between(x, mean - std, mean + std, color=style["color"], alpha=0.15, lw=0)
        ax.axhline(dense_value, color="grey", ls=":", label="dense")
        ax.set_title(title)
        ax.set_xlabel("share of heads kept")
        ax.grid(alpha=0.3)
        if not metric.higher_is_better:
            ax.set_yscale("log")
    axes[0][0].set_ylabel(split if split == metric.name else f"{split} {metric.name}")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layer_retention(table: dict[str, Any], methods: list[str], path: Path) -> Path:
    """Per method, a budgets x layers map of the mean share of each layer's heads kept."""
    columns = min(4, len(methods))
    rows_count = (len(methods) + columns - 1) // columns
    fig, axes = plt.subplots(
        rows_count, columns, figsize=(4.2 * columns, 3.0 * rows_count), squeeze=False, layout="constrained"
    )
    image = None
    for ax, method in zip(axes.flat, methods, strict=False):
        budgets = sorted(table[method], key=lambda b: -table[method][b]["kept_fraction"])
        grid = np.array([table[method][b]["retention"] for b in budgets])
        image = ax.imshow(grid, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_yticks(range(len(budgets)), [f"{b} ({table[method][b]['kept']['mean']:.0f})" for b in budgets])
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("layer")
        ax.set_title(method)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="share of the layer's heads kept")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_kept_depth(
    table: dict[str, Any],
    methods: list[str],
    path: Path,
    *,
    focus: str | None = None,
    control: str | None = DEFAULT_CONTROL,
) -> Path:
    """Mean relative depth of the kept heads against the share kept (proximity bias: above 0.5 = deep)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for index, method in enumerate(methods):
        x, mean, _ = _curve(table, method, "depth")
        ax.plot(x, mean, label=method, **_style(method, index, focus, control))
    ax.axhline(0.5, color="grey", ls=":", label="uniform over layers")
    ax.set_xlabel("share of heads kept")
    ax.set_ylabel("mean relative depth of kept heads")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _objective_text(objective: dict[str, Any] | None) -> str:
    """``", distilled from the dense model (kd, T=2, alpha=0.5)"``; empty for cross-entropy (grids before
    recovery objectives existed recovered with it)."""
    if not objective or objective.get("loss", "ce") == "ce":
        return ""
    settings = f"T={objective.get('temperature')}, alpha={objective.get('alpha')}"
    return f", distilled from the dense model ({objective['loss']}, {settings})"
