"""Rerun one committed bench cell with today's code and compare it with the committed one.

A refactor of the run (surgery, recovery, evaluation) must keep published figures reproducible. This script takes a
committed grid (``benchmarks/configs/NAME.json``, its cells in ``benchmarks/results/bench/NAME/cells/``), runs the
one cell asked for through ``cahp bench`` (a one-cell copy of the grid in a scratch folder), and records in
``benchmarks/results/reproduction.json`` / ``.md`` whether the kept heads are the same and how far each figure
moved (after pruning, after recovery; the unpruned model's too).

    python benchmarks/reproduce_cell.py --grid smollm2_lm_groups --method magnitude --budget 0.6667 --seed 0
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from cahp.bench import BenchConfig, run_bench
from cahp.reporting.bench_report import budget_label, grid_metric

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def figures(results: dict[str, Any]) -> dict[str, float]:
    """``{"split metric": value}`` of a cell's (or the dense model's) results at one stage, timings left out."""
    found = {}
    for split, measured in results.items():
        for name, value in measured.items():
            if name in ("accuracy", "macro_f1", "perplexity") and isinstance(value, int | float):
                found[f"{split} {name}"] = float(value)
    return found


def compare(new: dict[str, float], old: dict[str, float]) -> dict[str, Any]:
    """Each figure's committed and new value and their relative difference."""
    return {
        key: {"committed": old[key], "now": new[key], "relative_difference": abs(new[key] - old[key]) / abs(old[key])}
        for key in sorted(old)
        if key in new and old[key]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="a committed grid: benchmarks/configs/GRID.json")
    parser.add_argument("--method", required=True)
    parser.add_argument("--budget", required=True, help="the cell's budget as its file names it (0.5, knee, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", default="/tmp/cahp-reproduce", help="where the one-cell grid runs")
    args = parser.parse_args()

    raw = json.loads((ROOT / "configs" / f"{args.grid}.json").read_text())
    budget: Any = args.budget if args.budget == "knee" else float(args.budget)
    scratch = Path(args.scratch) / args.grid
    one_cell = {**raw, "methods": [args.method], "budgets": [budget], "seeds": [args.seed], "out": str(scratch)}
    one_cell["fitted_dir"] = str(scratch / "fitted")
    one_cell["method_settings"] = {k: v for k, v in raw.get("method_settings", {}).items() if k == args.method}
    config = BenchConfig.from_dict(one_cell)
    run_bench(config, progress=True)

    committed_folder = RESULTS / "bench" / args.grid
    name = f"{args.method}__seed{args.seed}__{budget_label(budget)}.json"
    old, new = (json.loads((folder / "cells" / name).read_text()) for folder in (committed_folder, scratch))
    metric = grid_metric(raw)
    old_dense, new_dense = (json.loads((f / "dense.json").read_text()) for f in (committed_folder, scratch))
    record = {
        "grid": args.grid,
        "cell": name,
        "command": "python benchmarks/reproduce_cell.py " + shlex.join(sys.argv[1:]),
        "same_kept_heads": new["kept_heads_by_layer"] == old["kept_heads_by_layer"],
        "kept": {"committed": old["kept"], "now": new["kept"]},
        "dense": compare(figures(new_dense[metric.results_key]), figures(old_dense[metric.results_key])),
        **{
            stage: compare(figures(new[metric.results_key][stage]), figures(old[metric.results_key][stage]))
            for stage in ("after_pruning", "after_recovery")
        },
        "recovery_train_loss": {
            "committed": [row["train_loss"] for row in old["recovery_history"]],
            "now": [row["train_loss"] for row in new["recovery_history"]],
        },
    }
    path = RESULTS / "reproduction.json"
    records = json.loads(path.read_text()) if path.is_file() else {}
    records[f"{args.grid}/{name}"] = record
    path.write_text(json.dumps(records, indent=1) + "\n")
    write_markdown(records)
    print(json.dumps(record, indent=1))


def write_markdown(records: dict[str, Any]) -> None:
    lines = [
        "# Committed cells rerun with today's code",
        "",
        "Written by `benchmarks/reproduce_cell.py` (each row's command below). A cell is the same when its kept",
        "heads are and its figures agree to float rounding.",
        "",
        "| cell | same heads | largest relative difference of a figure (dense; pruned; recovered) | "
        "recovery train loss (committed / now) |",
        "|---|---|---|---|",
    ]
    for key, record in records.items():
        largest = [
            max((entry["relative_difference"] for entry in record[stage].values()), default=0.0)
            for stage in ("dense", "after_pruning", "after_recovery")
        ]
        loss = record["recovery_train_loss"]
        lines.append(
            f"| `{key}` | {'yes' if record['same_kept_heads'] else 'no'} | "
            f"{'; '.join(f'{value:.1e}' for value in largest)} | {loss['committed']} / {loss['now']} |"
        )
    lines += ["", "Commands:", ""]
    lines += [f"- `{record['command']}`" for record in records.values()]
    (RESULTS / "reproduction.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
