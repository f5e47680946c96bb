"""The benchmark's summary table and plots, rebuilt from the files of a ``cahp bench`` folder.

Reads ``bench_config.json``, ``dense.json`` and ``cells/*.json`` (and ``scores/*.json`` in folders written by
earlier versions); never recomputes a result. Writes ``summary.md``, ``summary.json``,
``plots/{accuracy_vs_heads,layer_retention,kept_depth}.png`` and ``report.html`` (all of it on one page,
:mod:`cahp.reporting.html_report`).

Nothing here depends on which methods a grid compares: the config names the ``focus`` method (the one the
summary compares with the best other method, drawn highlighted) and the ``control`` (``random`` by default,
drawn dashed black, the reference of the gain table); what a method is (deterministic, budget-aware, finds its
own head count) comes from the method registry (:func:`cahp.methods.base.method_info`).

Comparisons between two methods (against the control, the focus method against the best other) are also given
paired by seed (:func:`paired_difference`): the mean difference over the seeds both ran with its 95% t interval,
"within noise" when that interval contains zero. Cells that repeat each other (:func:`repeated_cells`: a budget
that resolved to another budget's heads, two seeds that chose the same heads) count once, and every table says
how many distinct cells stand behind it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy import stats

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

    def paired(self, value: float, reference: float) -> float:
        """What a paired comparison averages over seeds: the difference (accuracy) or the log-ratio (perplexity,
        whose ratios multiply: the mean log-ratio is the log of the geometric mean ratio)."""
        return value - reference if self.higher_is_better else math.log(value / reference)

    def shown(self, paired: float) -> str:
        """A paired value (or an interval bound) on the metric's own scale: ``+0.0123`` or ``x0.912``."""
        return f"{paired:+.{self.digits}f}" if self.higher_is_better else f"x{math.exp(paired):.3f}"


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

    With ``resample_calibration`` (each seed draws its own calibration sample), or when each seed recovers with a
    training seed of its own (:func:`recovery_varies`), every method runs every seed. Otherwise (and in records of
    earlier versions, which lack the keys) a method the registry marks ``deterministic`` runs only the first
    ``deterministic_seeds`` seeds (at least one): its other seeds would repeat the same result.

    Raises:
        CahpError: a method the registry does not know.
    """
    return _seeds(method_info(method), config)


def _seeds(info: MethodInfo, config: dict[str, Any]) -> list[int]:
    """A method's seeds: all of them, or the first ``deterministic_seeds`` for a method without randomness of its
    own when every seed sees the same calibration data (no resampling, or a causal-LM grid's fixed blocks) and
    recovers with the same training seed."""
    seeds = list(config.get("seeds", []))
    resampled = config.get("resample_calibration", False) and config.get("objective") != "causal-lm"
    if resampled or recovery_varies(config) or not info.deterministic:
        return seeds
    return seeds[: max(1, int(config.get("deterministic_seeds", 1)))]


def recovery_varies(config: dict[str, Any]) -> bool:
    """Whether each seed's cells recover with a training seed of their own: ``recovery_seeding: per_seed`` and a
    recovery that trains. A record without the key recovered every cell with one seed (``fixed``:
    :func:`cahp.legacy.upgrade_bench_record`)."""
    recovery = config.get("recovery") or {}
    return config.get("recovery_seeding", "fixed") == "per_seed" and bool(recovery.get("epochs"))


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


def _missing_cells(
    config: dict[str, Any], cells: list[dict[str, Any]], planned_then: int | None = None
) -> tuple[int, list[str]]:
    """How many cells the config plans, and summary lines naming those not in the folder yet (none when complete).

    ``planned_then``: the count a published summary recorded (:func:`rebuild_published_summary`). When today's
    method registry plans another count, that count is kept and the lines say both.
    """
    budgets, seeds = config.get("budgets", []), list(config.get("seeds", []))
    planned = [(method, seed, budget_label(budget)) for method, seed, budget in _planned(config, _known_info)]
    done = {(cell["method"], cell["seed"], budget_label(cell["budget"])) for cell in cells}
    missing = [cell for cell in planned if cell not in done]
    if not missing:
        return len(planned) if planned_then is None else planned_then, []
    count = len(planned) - len(missing)
    if planned_then is None or planned_then == len(planned):
        header = f"**Partial grid: {count} of the {len(planned)} cells this config plans.**"
    elif count >= planned_then:
        header = (
            f"**Complete as published: all {planned_then} cells this config planned then ran.** "
            f"Today's method registry plans {len(planned)}."
        )
    else:
        header = (
            f"**Partial grid: {count} of the {planned_then} cells this config planned when it was published** "
            f"(today's method registry plans {len(planned)})."
        )
    by_method: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for method, seed, budget in missing:
        by_method[method][seed].append(budget)
    every_budget = [budget_label(budget) for budget in budgets]
    parts = []
    for method, absent in by_method.items():
        named = [f"seed {seed}" + ("" if at == every_budget else f" at {', '.join(at)}") for seed, at in absent.items()]
        parts.append(f"{method} ({'; '.join(named)})")
    lines = [f"{header} Not run yet: {', '.join(parts)}. Rerunning `cahp bench` with this config resumes them."]
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
    return len(planned) if planned_then is None else planned_then, [" ".join(lines), ""]


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


CONFIDENCE = 0.95  # of the paired intervals


def paired_difference(
    values: dict[int, float], reference: dict[int, float], metric: Metric = ACCURACY, confidence: float = CONFIDENCE
) -> dict[str, Any] | None:
    """A comparison paired by seed over the seeds both sides ran (``None`` when they share none).

    Per seed ``metric.paired(value, reference)``: the difference for accuracy, the log-ratio for perplexity.
    Returns ``{mean, low, high, n, seeds, within_noise}``: the mean over the ``n`` common ``seeds``, its Student t
    interval (``n - 1`` degrees of freedom) and whether that interval contains zero. With one common seed there is
    no interval: ``low``, ``high`` and ``within_noise`` are ``None``. Perplexity adds ``ratio``, ``ratio_low``
    and ``ratio_high`` (the geometric mean ratio and its interval).
    """
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    diffs = np.array([metric.paired(values[seed], reference[seed]) for seed in seeds], dtype=np.float64)
    mean = float(diffs.mean())
    low: float | None = None
    high: float | None = None
    if len(seeds) > 1:
        quantile = float(stats.t.ppf(0.5 + confidence / 2, len(seeds) - 1))
        half = quantile * float(diffs.std(ddof=1)) / math.sqrt(len(seeds))
        low, high = mean - half, mean + half
    result: dict[str, Any] = {
        "mean": mean,
        "low": low,
        "high": high,
        "n": len(seeds),
        "seeds": seeds,
        "within_noise": None if low is None or high is None else bool(low <= 0.0 <= high),
    }
    if not metric.higher_is_better:
        result["ratio"] = math.exp(mean)
        result["ratio_low"] = None if low is None else math.exp(low)
        result["ratio_high"] = None if high is None else math.exp(high)
    return result


def paired_text(paired: dict[str, Any] | None, metric: Metric = ACCURACY) -> str:
    """``+0.0123 [+0.0040, +0.0206]``, with ``within noise`` when the interval contains zero (perplexity: the
    ratio ``x0.912 [x0.850, x0.978]``, within noise when it contains 1); ``(one seed)`` without an interval."""
    if paired is None:
        return "–"
    text = metric.shown(paired["mean"])
    if paired["low"] is None:
        return f"{text} (one seed)"
    text += f" [{metric.shown(paired['low'])}, {metric.shown(paired['high'])}]"
    return f"{text} within noise" if paired["within_noise"] else text


def seed_values(
    cells: list[dict[str, Any]], split: str, metric: Metric = ACCURACY
) -> dict[str, dict[str, dict[str, dict[int, float]]]]:
    """``{method: {budget: {stage: {seed: value}}}}``: each cell's ``metric``, what paired comparisons pair."""
    values: dict[str, dict[str, dict[str, dict[int, float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict))
    )
    for cell in cells:
        for stage in STAGES:
            value = cell[metric.results_key][stage][split][metric.name]
            values[cell["method"]][cell["budget"]][stage][int(cell["seed"])] = float(value)
    return values


def _measured(value: Any) -> Any:
    """A cell's record without what varies between two runs of one experiment: timings, resumption counts."""
    if isinstance(value, dict):
        return {key: _measured(item) for key, item in value.items() if "second" not in key and key != "steps_this_run"}
    if isinstance(value, list):
        return [_measured(item) for item in value]
    return value


def cell_identity(cell: dict[str, Any], metric: Metric = ACCURACY) -> str:
    """What makes two cells one experiment: the method, the kept heads and what was measured (the results of
    both stages and the recovery's loss history), timings left out. Two cells with the same identity repeat
    each other to the last digit: a budget that resolved to another budget's heads, or two seeds that chose
    the same heads and recovered with the same seed (``recovery_seeding: fixed``)."""
    kept = {str(layer): sorted(int(h) for h in heads) for layer, heads in cell["kept_heads_by_layer"].items() if heads}
    record = {
        "method": cell["method"],
        "kept": kept,
        "results": _measured(cell.get(metric.results_key, {})),
        "recovery": _measured([cell.get("recovery_objective"), cell.get("recovery_history", [])]),
    }
    return json.dumps(record, sort_keys=True)


def repeated_cells(
    cells: list[dict[str, Any]], budgets: list[str], metric: Metric = ACCURACY
) -> dict[tuple[str, int, str], tuple[int, str]]:
    """``{(method, seed, budget): (seed, budget)}``: each cell that repeats another (same :func:`cell_identity`)
    and the cell it repeats; the grid's distinct cells are the others.

    Of identical cells the first counts: lower seeds first, within a seed the fractions of heads before the
    budgets resolved from them (``knee``, cost budgets), then in ``budgets`` order. A repeat names a cell of its
    own seed when there is one (``knee`` repeats that seed's ``0.2``), else the first.
    """

    def order(cell: dict[str, Any]) -> tuple[int, bool, int]:
        label = str(cell["budget"])
        position = budgets.index(label) if label in budgets else len(budgets)
        return int(cell["seed"]), label == "knee" or "=" in label, position

    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for cell in sorted(cells, key=order):
        groups[cell_identity(cell, metric)].append(cell)
    repeats: dict[tuple[str, int, str], tuple[int, str]] = {}
    for members in groups.values():
        for index, cell in enumerate(members[1:], start=1):
            earlier = members[:index]
            same = next((other for other in earlier if other["seed"] == cell["seed"]), earlier[0])
            repeats[(cell["method"], int(cell["seed"]), str(cell["budget"]))] = (int(same["seed"]), str(same["budget"]))
    return repeats


def _original(key: tuple[str, int, str], repeats: dict[tuple[str, int, str], tuple[int, str]]) -> tuple[str, int, str]:
    """The first of the identical cells that ``key`` names (``key`` itself when it repeats none)."""
    while key in repeats:
        key = (key[0], *repeats[key])
    return key


def _behind(
    cells: list[dict[str, Any]], repeats: dict[tuple[str, int, str], tuple[int, str]], methods: list[str]
) -> str:
    """The line under a table: how many cells, and how many distinct ones, stand behind it."""
    keys = [(cell["method"], int(cell["seed"]), str(cell["budget"])) for cell in cells if cell["method"] in methods]
    total, distinct = len(keys), len({_original(key, repeats) for key in keys})
    return f"Behind this table: {total} cells, {'all distinct' if distinct == total else f'{distinct} distinct'}."


def _repeats_text(repeats: dict[tuple[str, int, str], tuple[int, str]], table: dict[str, Any]) -> str:
    """The sentences that name the repeated cells and the means that share them."""
    within: dict[tuple[int, str, str], list[str]] = defaultdict(list)
    across: dict[tuple[str, int, int], list[str]] = defaultdict(list)
    for (method, seed, budget), (first_seed, first_budget) in sorted(repeats.items(), key=lambda item: item[0]):
        if first_seed == seed:
            within[(seed, budget, first_budget)].append(method)
        else:
            across[(method, seed, first_seed)].append(
                budget if budget == first_budget else f"{budget} (seed {first_seed}'s {first_budget})"
            )
    parts = [
        f"seed {seed}'s `{budget}` repeats its `{first}` cell{'s' if len(methods) > 1 else ''} for "
        f"{_listed(sorted(methods))} (the budget resolved to the same heads), so "
        + (
            f"their `{budget}` means share seed {seed}'s cell with their `{first}` means"
            if len(methods) > 1
            else f"its `{budget}` mean shares seed {seed}'s cell with its `{first}` mean"
        )
        for (seed, budget, first), methods in sorted(within.items())
    ]
    parts += [
        f"{method}'s seed {seed} repeats its seed {first_seed} at {_listed(budgets)} (both seeds kept the same heads)"
        for (method, seed, first_seed), budgets in sorted(across.items())
    ]
    thin = [
        f"{method} at `{budget}`: {row['distinct']} distinct of {len(row['seeds'])}"
        for method, rows in table.items()
        for budget, row in rows.items()
        if row.get("distinct", len(row["seeds"])) < len(row["seeds"])
    ]
    text = f"{'; '.join(parts)}."
    if thin:
        text += (
            " Each seed still counts in the means, but a mean over seeds that repeat each other stands on fewer "
            f"distinct cells than seeds: {'; '.join(thin)}."
        )
    return text


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


def _timings(
    out: Path, cells: list[dict[str, Any]], recorded: dict[str, Any] | None = None
) -> dict[str, dict[str, float]]:
    """``{method: {scoring_runs, scoring_seconds_mean, cell_seconds_mean, total_seconds}}``: fits counted once
    (:func:`fit_seconds`), a cell's own time = prune and evaluate (+ recover and evaluate).

    Cells of an earlier version (no ``fit_cached``) in a folder without its ``scores/`` (a published grid) take
    the timings of the ``recorded`` summary: their fits' seconds were in ``scores/``."""
    earlier = not any("fit_cached" in cell for cell in cells)
    if recorded and "timings" in recorded and earlier and not (out / "scores").is_dir():
        return dict(recorded["timings"])
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


def rebuild_published_summary(folder: str | Path) -> Path:
    """Rewrite ``summary.md`` and ``summary.json`` of a published grid (``benchmarks/results/bench/<name>``: its
    config, ``dense.json``, cells and the summary it was published with) from its cells; its plots stay.

    A published folder lacks what stayed in the bench folder, so two things come from the summary it was
    published with: the timings of cells of an earlier version (their fits' seconds were in ``scores/``) and the
    number of cells its config planned then (today's method registry may plan more seeds for some methods).
    """
    folder = Path(folder)
    recorded = json.loads((folder / "summary.json").read_text())
    out = Path(str(json.loads((folder / "bench_config.json").read_text()).get("out", "")))
    # its paths are shown relative to the cache folder it ran in
    home = _cahp_home(out.parent.parent) if out.parent.name == "bench" else contextlib.nullcontext()
    with home:
        return write_bench_report(folder, figures=False, recorded=recorded)


@contextlib.contextmanager
def _cahp_home(home: Path) -> Iterator[None]:
    """``$CAHP_HOME`` set to ``home`` for the duration."""
    before = os.environ.get("CAHP_HOME")
    os.environ["CAHP_HOME"] = str(home)
    try:
        yield
    finally:
        if before is None:
            del os.environ["CAHP_HOME"]
        else:
            os.environ["CAHP_HOME"] = before


def write_bench_report(
    out: str | Path,
    *,
    figures: bool = True,
    recorded: dict[str, Any] | None = None,
    noise_floor: str | Path | None = None,
) -> Path:
    """Write ``summary.md``, ``summary.json``, the plots and ``report.html`` of a bench folder; returns the summary
    path.

    ``figures=False`` writes the two summaries only. ``recorded``: the summary a published folder was published
    with (:func:`rebuild_published_summary`). ``noise_floor``: the file of dense fine-tunes' spreads over
    training seeds (default :data:`NOISE_FLOOR_FILE`; :func:`grid_noise_floor`).
    """
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
    timings = _timings(out, cells, recorded)
    repeats = repeated_cells(cells, budget_order, metric)
    for method, rows in table.items():
        for budget, row in rows.items():
            keys = {_original((method, seed, str(budget)), repeats) for seed in row["seeds"]}
            row["distinct"] = len(keys)
            row_repeats = [
                {"seed": seed, "same_as": {"seed": first[0], "budget": first[1]}}
                for seed in row["seeds"]
                if (first := repeats.get((method, seed, str(budget)))) is not None
            ]
            if row_repeats:
                row["repeats"] = row_repeats
    values = seed_values(cells, split, metric)
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
        else "every method runs every seed, each seed recovering with its own training seed). Same calibration set, "
        "same recovery recipe"
        if recovery_varies(config)
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
    planned_then = int(recorded["cells_planned"]) if recorded and "cells_planned" in recorded else None
    planned, missing = _missing_cells(config, cells, planned_then)
    lines += missing
    if cells and metric is ACCURACY:
        examples = cells[0]["accuracy"]["after_pruning"][split]["examples"]
        error = float(np.sqrt(dense_value * (1 - dense_value) / examples))
        lines += [
            f"Noise: one accuracy on these {examples} examples has a binomial standard error of about ±{error:.4f}, "
            "so two single cells less than about twice that apart are not told apart by the test set; the paired "
            "tables test the differences over seeds.",
            "",
        ]
    floor = grid_noise_floor(config, NOISE_FLOOR_FILE if noise_floor is None else Path(noise_floor))
    lines += _noise_floor_lines(floor, config)
    distinct = len(cells) - len(repeats)
    if cells:
        of = f"the {len(cells)} cells" + (f" ({planned} planned)" if planned != len(cells) else "")
        cells_text = f"**Distinct cells: {distinct} of {of}.** "
        cells_text += (
            "Cells with the same method, kept heads and results (recovery included) are one experiment and count "
            f"once: {_repeats_text(repeats, table)}"
            if repeats
            else "No two cells repeat each other (same method, kept heads and results)."
        )
        lines += [cells_text, ""]
    paired_scale = "difference" if metric.higher_is_better else "log_ratio"
    paired_text_intro = (
        "Paired by seed: per seed, the difference between the two methods' accuracies at the same budget; the "
        f"mean over the seeds both ran, with its {CONFIDENCE:.0%} t interval (n - 1 degrees of freedom). "
        '"within noise": the interval contains zero. With one common seed there is no interval.'
        if metric.higher_is_better
        else "Paired by seed: per seed, the ratio of the two methods' perplexities at the same budget; the geometric "
        f"mean of these ratios over the seeds both ran, with its {CONFIDENCE:.0%} t interval, both computed on the "
        'log-ratio (n - 1 degrees of freedom); below 1 is better. "within noise": the interval contains 1 (zero '
        "on the log scale). With one common seed there is no interval."
    )

    def behind(shown: list[str]) -> list[str]:
        return [_behind(cells, repeats, shown), ""]

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
        lines += behind(methods)

    def macro_f1(method: str, budget: str) -> str:
        scores = table[method].get(budget, {}).get("macro_f1", {})
        return " / ".join(f"{scores[s]['mean']:.4f}" for s in stages) if all(s in scores for s in stages) else "–"

    stage_names = " / ".join(s.replace("_", " ") for s in stages)
    if metric is PERPLEXITY:
        lines += _zero_shot_tables(table, methods, budgets, stages, stage_names)
    else:
        lines += _markdown_table(f"Macro-F1 (mean, {stage_names})", methods, budgets, macro_f1)
        lines += behind(methods)
        lines += [
            "A macro-F1 far below the accuracy means some class is rarely predicted or rarely right: a class the "
            "model never predicts counts as 0 in the mean.",
            "",
        ]
    paired: dict[str, Any] = {"scale": paired_scale, "confidence": CONFIDENCE}
    if control in table:
        title = (
            f"Gain over the {control} control (mean accuracy, {stage_names})"
            if metric is ACCURACY
            else f"Perplexity relative to the {control} control (ratio of means, {stage_names}; below 1 is better)"
        )
        lines += _markdown_table(title, [m for m in methods if m != control], budgets, gain)
        lines += behind(methods)
        vs_control = {
            method: {
                budget: {
                    stage: paired_difference(values[method][budget][stage], values[control][budget][stage], metric)
                    for stage in stages
                }
                for budget in budgets
                if budget in table[method] and budget in table[control]
            }
            for method in methods
            if method != control
        }
        paired["vs_control"] = {"control": control, "methods": vs_control}
        lines += _paired_vs_control(vs_control, control, budgets, stages, metric, paired_text_intro)
        lines += behind(methods)
    if focus in table and len(methods) > 1:
        lines += _focus_vs_best(table, focus, methods, budgets, stages, metric)
        lines += behind(methods)
        against_best = _paired_focus_vs_best(table, values, focus, methods, budgets, stages, metric)
        paired["focus_vs_best"] = {"focus": focus, "budgets": against_best}
        lines += _paired_focus_table(against_best, focus, stages, metric)
        lines += behind(methods)
    lines += _markdown_table("Heads kept (mean)", methods, budgets, show(lambda r: f"{r['kept']['mean']:.1f}"))
    lines += behind(methods)
    if metric is PERPLEXITY:
        kv = show(lambda r: f"{r['kv_kept']['mean']:.1f}")
        lines += _markdown_table("Key-value heads kept (mean; the KV cache shrinks with them)", methods, budgets, kv)
        lines += behind(methods)
    lines += _markdown_table(
        "Mean relative depth of the kept heads (0 = first layer, 1 = last)",
        methods,
        budgets,
        show(lambda r: f"{r['depth']['mean']:.2f}"),
    )
    lines += behind(methods)
    seeded = [m for m in methods if any("seed_overlap" in row for row in table[m].values())]
    if seeded:
        lines += _markdown_table(
            "Same heads across seeds? (mean pairwise Jaccard of the selected heads; 1 = identical)",
            seeded,
            budgets,
            show(lambda r: f"{r['seed_overlap']['mean']:.2f}" if "seed_overlap" in r else "–"),
        )
        lines += behind(seeded)
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
            "cells_distinct": distinct,
            "repeated_cells": [
                {"method": method, "seed": seed, "budget": budget, "same_as": {"seed": first[0], "budget": first[1]}}
                for (method, seed, budget), first in sorted(repeats.items())
            ],
            "paired": paired,
            "recovery_seeding": config.get("recovery_seeding", "fixed"),
            "noise_floor": floor,
        },
    )
    if not figures:
        return summary
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


#: Where ``benchmarks/noise_floor.py`` records each dense fine-tune's test accuracy over training seeds, keyed
#: ``<model>:<task>`` (the source tree's ``benchmarks/results/noise_floor.json``).
NOISE_FLOOR_FILE = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "noise_floor.json"
NOISE_FLOOR_SCRIPT = "benchmarks/noise_floor.py"


#: The folders under ``$CAHP_HOME`` whose fine-tunes benchmarks/noise_floor.py measures (a baseline's, the demo's).
NOISE_FLOOR_PARENTS = ("finetuned", "demo")


def noise_floor_key(config: dict[str, Any]) -> str | None:
    """The row of ``noise_floor.json`` of a classification grid's model: its folder under ``$CAHP_HOME``,
    ``<parent>/<name>`` (``finetuned/minilm-l6-sst5``, ``demo/minilm-l6-sst5``), else ``None`` (a folder elsewhere,
    a causal-LM grid)."""
    if config.get("objective") == "causal-lm":
        return None
    model = Path(str(config.get("model", "")))
    if model.parent.name not in NOISE_FLOOR_PARENTS:
        return None
    return f"{model.parent.name}/{model.name}"


def _grid_task(config: dict[str, Any]) -> str | None:
    task = config.get("task")
    name = task.get("task") if isinstance(task, dict) else task
    return name if isinstance(name, str) else None


def _has_spread(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("sd"), int | float) and int(entry.get("n", 0)) >= 2


def grid_noise_floor(config: dict[str, Any], path: Path = NOISE_FLOOR_FILE) -> dict[str, Any] | None:
    """The noise floor of a classification grid's dense model, as ``summary.json`` records it (``None`` for a
    causal-LM grid, whose model is not fine-tuned):

    * measured: ``{"key", "measured": True, "measured_on", "split", "mean", "sd", "n", "file"}`` (``sd``: the
      sample standard deviation of the dense fine-tune's accuracy over ``n`` training seeds). ``measured_on`` is
      ``key`` when this grid's checkpoint was measured, else the row of another recipe of the same model and task
      (``<model>-<task>...`` under ``finetuned/`` or ``demo/``), whose spread stands in, said as such;
    * not measured: ``{"key", "measured": False, "command", "file"}`` (``key`` and ``command`` are ``None`` when the
      grid's model is not a fine-tune under ``$CAHP_HOME``: :func:`noise_floor_key`).

    Raises:
        CahpError: ``path`` exists but is not a JSON object.
    """
    if config.get("objective") == "causal-lm":
        return None
    shown = "benchmarks/results/noise_floor.json" if path == NOISE_FLOOR_FILE else _shown(str(path))
    records: Any = {}
    if path.is_file():
        try:
            records = json.loads(path.read_text())
        except ValueError as error:
            raise CahpError(f"{path} is not JSON ({error}): rerun {NOISE_FLOOR_SCRIPT}") from error
        if not isinstance(records, dict):
            raise CahpError(f"{path} must hold an object keyed by checkpoint folder: rerun {NOISE_FLOOR_SCRIPT}")
    return noise_floor_of(config, records, shown)


def noise_floor_of(config: dict[str, Any], records: dict[str, Any], shown: str) -> dict[str, Any]:
    """:func:`grid_noise_floor` of a classification grid over the rows ``records`` (of the file ``shown``)."""
    key = noise_floor_key(config)
    task = _grid_task(config)
    name = Path(str(config.get("model", ""))).name
    same_model = sorted(
        row
        for row, entry in records.items()
        if _has_spread(entry) and entry.get("task") == task and name.startswith(f"{entry.get('model')}-{task}")
    )
    measured_on = key if key is not None and _has_spread(records.get(key)) else next(iter(same_model), None)
    if key is not None and measured_on is not None:
        entry = records[measured_on]
        return {
            "key": key,
            "measured": True,
            "measured_on": measured_on,
            "split": entry.get("split", "test"),
            "mean": entry.get("mean"),
            "sd": float(entry["sd"]),
            "n": int(entry["n"]),
            "file": shown,
        }
    command = _noise_floor_command(key, config) if key is not None else None
    return {"key": key, "measured": False, "command": command, "file": shown}


def _noise_floor_command(key: str, config: dict[str, Any]) -> str:
    """The command that measures row ``key`` on the split the grid reports (``test`` unless it evaluates none)."""
    splits = config.get("eval_splits") or ["test"]
    option = "" if "test" in splits else f" --split {splits[0]}"
    return f"python {NOISE_FLOOR_SCRIPT} --rows {key}{option}"


def published_noise_floor(folder: str | Path) -> str:
    """One sentence for a study's table: the noise floor that the published grid in ``folder`` prints (its
    ``summary.json``)."""
    floor = json.loads((Path(folder) / "summary.json").read_text()).get("noise_floor")
    if floor is None:
        return "Noise floor: none (the dense model is the released checkpoint, not a fine-tune)."
    if not floor.get("measured"):
        return f"Noise floor: not measured ({floor.get('command') or NOISE_FLOOR_SCRIPT})."
    where = "" if floor["measured_on"] == floor["key"] else f", measured on `{floor['measured_on']}`"
    return (
        f"Noise floor: the dense fine-tune's {floor['split']} accuracy varies by sd {floor['sd']:.4f} over "
        f"{floor['n']} training seeds ({100 * floor['sd']:.1f} points{where}; results/noise_floor.md)."
    )


def _noise_floor_lines(floor: dict[str, Any] | None, config: dict[str, Any]) -> list[str]:
    """The paragraph beside the tables: the dense fine-tune's spread over training seeds (or how to measure it),
    and whether this grid's seeds vary the recovery's training seed."""
    parts = []
    if floor is None:
        parts.append(
            "Noise floor: none to measure: the dense model is the released checkpoint, not a fine-tune of ours; "
            "the spread over seeds is that of the calibration sample, the method and the recovery."
        )
    elif floor["measured"]:
        parts.append(
            f"Noise floor: a dense fine-tune's {floor['split']} accuracy varies by sd {floor['sd']:.4f} over "
            f"{floor['n']} training seeds ({NOISE_FLOOR_SCRIPT})."
        )
        if floor.get("measured_on", floor["key"]) != floor["key"]:
            parts.append(
                f"Measured on `{floor['measured_on']}`, another fine-tune recipe of the same model and task (this "
                f"grid's `{floor['key']}` was not measured: `{_noise_floor_command(floor['key'], config)}`)."
            )
    elif floor["key"] is not None:
        parts.append(
            f"Noise floor: not measured yet for {floor['key']} (a dense fine-tune's spread over training seeds); "
            f"`{floor['command']}` measures it into `{floor['file']}`."
        )
    else:
        parts.append(
            f"Noise floor: not measured for this grid's model ({NOISE_FLOOR_SCRIPT} measures the fine-tunes in the "
            f"cache folder's {' and '.join(f'`{parent}/`' for parent in NOISE_FLOOR_PARENTS)})."
        )
    recovery = config.get("recovery") or {}
    if recovery.get("epochs"):
        seed = recovery.get("seed", "recovery.seed")  # records of this version always hold it
        parts.append(
            f"Each seed s recovers with training seed {seed} + s (batch order, dropout; the same for every method), "
            "so the spread over seeds includes training noise."
            if recovery_varies(config)
            else f"Every cell recovers with training seed {seed}, so the spread over seeds leaves training noise out."
        )
    return [" ".join(parts), ""]


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


def _seeds_text(results: list[dict[str, Any] | None]) -> str:
    """The common seeds of a row's paired comparisons (``0, 1, 2``)."""
    seeds: list[int] = next((result["seeds"] for result in results if result is not None), [])
    return ", ".join(str(seed) for seed in seeds) or "–"


def _paired_vs_control(
    paired: dict[str, dict[str, dict[str, dict[str, Any] | None]]],
    control: str,
    budgets: list[str],
    stages: dict[str, str],
    metric: Metric,
    intro: str,
) -> list[str]:
    """The gain table's comparisons paired by seed: one row per method and budget, one column per stage."""
    what = "difference" if metric.higher_is_better else "ratio"
    lines = [
        f"## Against the {control} control, paired by seed ({metric.name} {what}, {CONFIDENCE:.0%} interval)",
        "",
        intro,
        "",
        "| method | budget | seeds | " + " | ".join(stage.replace("_", " ") for stage in stages) + " |",
        "|---" * (len(stages) + 3) + "|",
    ]
    for method, rows in paired.items():
        for budget in budgets:
            if budget not in rows:
                continue
            results = [rows[budget][stage] for stage in stages]
            cells = " | ".join(paired_text(result, metric) for result in results)
            lines.append(f"| {method} | {budget} | {_seeds_text(results)} | {cells} |")
    return [*lines, ""]


def _paired_focus_vs_best(
    table: dict[str, Any],
    values: dict[str, dict[str, dict[str, dict[int, float]]]],
    focus: str,
    methods: list[str],
    budgets: list[str],
    stages: dict[str, str],
    metric: Metric = ACCURACY,
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{budget: {stage: {other, **paired}}}``: the focus method against the best other method by mean (the one
    :func:`_focus_vs_best` names), paired by seed (:func:`paired_difference`)."""
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for budget in budgets:
        for stage in stages:
            means = {m: table[m][budget][stage]["mean"] for m in methods if budget in table[m]}
            if focus not in means or len(means) < 2:
                continue
            best = metric.best({m: v for m, v in means.items() if m != focus})
            compared = paired_difference(values[focus][budget][stage], values[best][budget][stage], metric)
            if compared is not None:
                result.setdefault(budget, {})[stage] = {"other": best, **compared}
    return result


def _paired_focus_table(
    paired: dict[str, dict[str, dict[str, Any]]], focus: str, stages: dict[str, str], metric: Metric
) -> list[str]:
    """The focus method against the best other method, paired by seed: one row per budget and stage."""
    what = "difference" if metric.higher_is_better else "ratio"
    sign = "−" if metric.higher_is_better else "/"
    lines = [
        f"## {focus} vs the best other method, paired by seed ({metric.name} {what}, {CONFIDENCE:.0%} interval)",
        "",
        f"| budget | stage | best other | seeds | {focus} {sign} best other |",
        "|---|---|---|---|---|",
    ]
    for budget, by_stage in paired.items():
        for stage in stages:
            if stage in by_stage:
                result = by_stage[stage]
                lines.append(
                    f"| {budget} | {stage.replace('_', ' ')} | {result['other']} | {_seeds_text([result])} | "
                    f"{paired_text(result, metric)} |"
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
