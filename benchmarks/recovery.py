"""Recovery objectives compared: the same pruned cells recovered with cross-entropy and with distillation.

    python benchmarks/recovery.py                       # every study below (runs what is missing, then publishes)
    python benchmarks/recovery.py --studies pilot       # one study
    python benchmarks/recovery.py --publish-only        # tables from what the grids hold now (partial too)

A study is a set of ``cahp bench`` grids (``configs/recovery_*.json``) that differ ONLY in
``recovery_objective``: same model, methods, budgets, seeds, calibration samples (one shared ``fitted_dir``, so
each method is fitted once per seed for all objectives) and recovery recipe; a column whose label names another
setting (``kd at lr 2e-5``) changes that setting too. Each grid runs through
``bench_grids.py`` (resumable cell by cell) and is published to ``results/bench/<grid>/``; this script then writes
``results/recovery.md`` / ``.json`` and ``results/recovery_<study>.png``: accuracy and macro-F1 after recovery per
method, budget and objective (mean ± sd over seeds), the difference distillation makes, and the wall time of the
recovery with the teacher's share.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grids import RESULTS, publish, run_grid
from cahp.reporting.bench_report import published_noise_floor

HERE = Path(__file__).resolve().parent
#: study -> {objective label: grid config name}
STUDIES: dict[str, dict[str, str]] = {
    "pilot": {
        "ce": "recovery_pilot_minilm_sst5_ce",
        "kd": "recovery_pilot_minilm_sst5_kd",
        "kd-relations": "recovery_pilot_minilm_sst5_kd_relations",
    },
    "sst5": {"ce": "recovery_minilm_sst5_ce", "kd": "recovery_minilm_sst5_kd"},
    "aim-sst5": {
        "ce": "recovery_aim_minilm_sst5_ce",
        "kd": "recovery_aim_minilm_sst5_kd",
        "kd at lr 2e-5": "recovery_aim_minilm_sst5_kd_lr2e-5",
        "kd-relations": "recovery_aim_minilm_sst5_kd_relations",
    },
    "mnli": {"ce": "recovery_minilm_mnli_ce", "kd": "recovery_minilm_mnli_kd"},
    "aim-mnli": {
        "ce": "recovery_aim_minilm_mnli_ce",
        "kd": "recovery_aim_minilm_mnli_kd",
        "kd-relations": "recovery_aim_minilm_mnli_kd_relations",
    },
    "mpnet-mnli": {"ce": "recovery_mpnet_mnli_ce", "kd": "recovery_mpnet_mnli_kd"},
}
ABOUT = {
    "pilot": "Which objective: CAHP at its knee on MiniLM-L6 / SST-5, the demo-size recipe (calibration 2,000 "
    "examples, recovery 1 epoch on 2,000 examples, lr 5e-5, length-grouped batches), 3 seeds.",
    "sst5": "The comparison under a fuller recipe: MiniLM-L6 / SST-5; CAHP's signatures on the whole training split "
    "(every method gets it; attattr caps itself at 200 examples, DSP trains 150 steps); recovery 1 epoch on the "
    "whole training split (lr 5e-5, length-grouped batches), `ce` vs `kd`, same steps; seeds 0-2 planned, n says how "
    "many each row has (the grids resume where they stopped).",
    "aim-sst5": "The aim row: CAHP at its knee on MiniLM-L6 / SST-5 with the reference recovery (3 epochs on the "
    "whole training split, lr 5e-5, length-grouped batches), `ce` vs `kd` (the pilot's best distillation objective), "
    "same steps; CAHP's signatures on the whole training split; seeds 0-2. `kd at lr 2e-5` also changes the "
    "learning rate to the reference run's (`results/cahp.md`); `kd-relations` adds the self-attention relation "
    "terms to `kd` (every layer, 8 relation heads).",
    "mnli": "The comparison under a fuller recipe on MiniLM-L6 / MNLI (offline protocol): the recipe of the SST-5 "
    "study, calibration on the whole calibration split, recovery 1 epoch on the whole training split; seeds "
    "0-2 planned, n says how many each row has (the grids resume where they stopped).",
    "aim-mnli": "The aim row on MiniLM-L6 / MNLI (offline protocol): CAHP at its knee with the reference recovery "
    "(3 epochs on the whole training split, lr 5e-5, length-grouped batches), `ce`, `kd` and `kd-relations` (every "
    "layer, 8 relation heads), same steps; CAHP's signatures on the whole calibration split; seeds 0-2 planned, n "
    "says how many each row has.",
    "mpnet-mnli": "MPNet-base / MNLI (offline protocol) at CAHP's knee with the recipe of its `results/cahp.md` row "
    "(signatures on the whole calibration split, recovery 1 epoch on the whole training split at lr 2e-5, "
    "length-grouped batches, 2,000 stratified mismatched pairs evaluated), `ce` vs `kd`, one seed.",
}


def _cells(grid: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((RESULTS / grid / "cells").glob("*.json"))]


def _stats(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def study_table(study: str) -> dict:
    """``{"dense": ..., "rows": {method: {budget: {objective: {accuracy, macro_f1, kept, seconds, teacher}}}}}``."""
    rows: dict[str, dict[str, dict[str, dict]]] = {}
    dense = None
    noise_floor = None
    for objective, grid in STUDIES[study].items():
        if not (RESULTS / grid / "dense.json").is_file():
            continue
        noise_floor = noise_floor or published_noise_floor(RESULTS / grid)
        dense_record = json.loads((RESULTS / grid / "dense.json").read_text())
        split = next(iter(dense_record["accuracy"]))
        dense = {"split": split, **dense_record["accuracy"][split]}
        groups: dict[tuple[str, str], list[dict]] = {}
        for cell in _cells(grid):
            groups.setdefault((cell["method"], cell["budget"]), []).append(cell)
        for (method, budget), cells in groups.items():
            recovered = [c["accuracy"]["after_recovery"][split] for c in cells]
            rows.setdefault(method, {}).setdefault(budget, {})[objective] = {
                "accuracy": _stats([r["accuracy"] for r in recovered]),
                "macro_f1": _stats([r["macro_f1"] for r in recovered]),
                "after_pruning": _stats([c["accuracy"]["after_pruning"][split]["accuracy"] for c in cells]),
                "kept": _stats([c["kept"] for c in cells]),
                "recovery_seconds": _stats([c["seconds"]["recovery_and_evaluate"] for c in cells]),
                "teacher_seconds": _stats([c.get("teacher", {}).get("teacher_seconds", 0.0) for c in cells]),
                "teacher_setup_seconds": max(
                    (c.get("teacher", {}).get("shared_setup", {}).get("teacher_seconds", 0.0) for c in cells),
                    default=0.0,
                ),
                "seeds": sorted(c["seed"] for c in cells),
            }
    return {
        "dense": dense,
        "noise_floor": noise_floor,
        "rows": rows,
        "objectives": list(STUDIES[study]),
        "about": ABOUT[study],
    }


def _markdown(tables: dict[str, dict]) -> str:
    lines = [
        "# Recovery objectives",
        "",
        "Accuracy and macro-F1 on the test split after recovery, mean ± sd over seeds (n = seeds); `Δ` is each",
        "distillation objective minus `ce` (accuracy points). `rec. s` is the wall time of a cell's recovery and",
        "evaluation, `teacher` the seconds of it spent in the teacher (`kd`: none per cell; its one logit",
        "pass over the recovery data, shared by every cell of the grid, in brackets). Timings come from a",
        "2-core machine shared with other jobs: the grids of a study ran side by side or one after another",
        "under changing load, so they are rough.",
        "Written by `python benchmarks/recovery.py` (the grids: `configs/recovery_*.json`).",
        "",
    ]
    for study, table in tables.items():
        dense = table["dense"]
        if dense is None:
            continue
        lines += [
            f"## {study}",
            "",
            table["about"],
            "",
            f"Dense model: accuracy {dense['accuracy']:.4f}, macro-F1 {dense['macro_f1']:.4f} ({dense['split']}).",
            table["noise_floor"],
            "",
        ]
        objectives = table["objectives"]
        header = ["method", "budget", "kept"]
        for objective in objectives:
            header += [f"{objective} acc", f"{objective} F1"] + ([f"Δ {objective}"] if objective != "ce" else [])
        header += [f"rec. s ({'/'.join(objectives)})", "teacher s per cell (+ once per grid)"]
        lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for method, budgets in table["rows"].items():
            for budget, by_objective in sorted(budgets.items()):
                if not by_objective:
                    continue
                first = next(iter(by_objective.values()))
                row = [method, budget, f"{first['kept']['mean']:.1f}"]
                for objective in objectives:
                    result = by_objective.get(objective)
                    if result is None:
                        row += ["–", "–"] + (["–"] if objective != "ce" else [])
                        continue
                    acc, f1 = result["accuracy"], result["macro_f1"]
                    row += [f"{acc['mean']:.4f} ± {acc['std']:.4f} (n={acc['n']})", f"{f1['mean']:.4f}"]
                    if objective != "ce":
                        base = by_objective.get("ce")
                        row.append(f"{100 * (acc['mean'] - base['accuracy']['mean']):+.2f}" if base else "–")
                times = [by_objective[o]["recovery_seconds"]["mean"] for o in objectives if o in by_objective]
                teacher = [
                    f"{by_objective[o]['teacher_seconds']['mean']:.0f}"
                    + (
                        f" (+{by_objective[o]['teacher_setup_seconds']:.0f})"
                        if by_objective[o]["teacher_setup_seconds"]
                        else ""
                    )
                    for o in objectives
                    if o in by_objective
                ]
                row += ["/".join(f"{t:.0f}" for t in times), "/".join(teacher)]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def _plot(study: str, table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, series = [], {objective: ([], []) for objective in table["objectives"]}
    for method, budgets in table["rows"].items():
        for budget, by_objective in sorted(budgets.items()):
            labels.append(f"{method}\n{budget}")
            for objective, (means, stds) in series.items():
                result = by_objective.get(objective)
                means.append(result["accuracy"]["mean"] if result else float("nan"))
                stds.append(result["accuracy"]["std"] if result else 0.0)
    if not labels:
        return
    width = 0.8 / len(series)
    figure, axes = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4))
    for index, (objective, (means, stds)) in enumerate(series.items()):
        positions = [i + (index - (len(series) - 1) / 2) * width for i in range(len(labels))]
        axes.bar(positions, means, width, yerr=stds, label=objective, capsize=2)
    if table["dense"]:
        axes.axhline(table["dense"]["accuracy"], color="black", linestyle="--", linewidth=1, label="dense")
    axes.set_xticks(range(len(labels)), labels, fontsize=8)
    axes.set_ylabel("test accuracy after recovery")
    values = [m for means, _ in series.values() for m in means if m == m]
    axes.set_ylim(min(values) - 0.05, max([*values, table["dense"]["accuracy"]]) + 0.02)
    axes.set_title(f"Recovery objectives: {study}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def grid_started(grid: str) -> bool:
    """Whether the grid's folder holds its dense evaluation (the first thing a grid writes)."""
    from cahp.bench import BenchConfig

    return (Path(BenchConfig.from_file(HERE / "configs" / f"{grid}.json").out) / "dense.json").is_file()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", nargs="+", choices=list(STUDIES), default=list(STUDIES))
    parser.add_argument("--publish-only", action="store_true", help="publish what the grids hold now; run nothing")
    args = parser.parse_args()
    for study in args.studies:
        for grid in STUDIES[study].values():
            if not args.publish_only:
                run_grid(grid)
            if args.publish_only and not grid_started(grid):
                print(
                    f"{grid}: nothing to publish on this machine (run: python benchmarks/recovery.py --studies {study})"
                )
                continue
            publish(grid)
    tables = {study: study_table(study) for study in STUDIES}
    out = HERE / "results"
    (out / "recovery.json").write_text(json.dumps(tables, indent=2) + "\n")
    (out / "recovery.md").write_text(_markdown(tables))
    for study, table in tables.items():
        _plot(study, table, out / f"recovery_{study}.png")
    print(f"wrote {out / 'recovery.md'}")


if __name__ == "__main__":
    main()
