"""CAHP's design choices, ablated, and the accuracy of its faster calibrations.

    python benchmarks/ablation.py configs               # (re)write the grids' configs under configs/
    python benchmarks/ablation.py run sst5 ablation     # run one task's study (resumable) and publish its grids
    python benchmarks/ablation.py run mnli ablation_recovery embedding_none   # one variant of a study
    python benchmarks/ablation.py report                # results/ablation.{json,md} from the published cells

Two studies per task (MiniLM-L6 on SST-5 and on MNLI), each a set of ``cahp bench`` grids that differ only in
CAHP's settings, so every comparison is paired by seed (each seed draws its own calibration sample):

- ``ablation``: one choice changed at a time from the faithful ``cahp`` (the ``reference`` grid, which also runs
  the leading methods at CAHP's own head count and at 20%), at the knee and at 20% of the heads, 3 seeds, scored
  right after surgery with the ``weights`` reconstruction (``cahp prune``'s default). No recovery (CPU time).
- ``ablation_recovery``: the reference and the choices that moved accuracy after surgery (the embedding, the
  representative rule) or came closest to the leaders (AttAttr as the salience), again with the fits of
  ``ablation`` (same heads), then one recovery epoch (1,000 examples, its training seed varying with the grid seed).
- ``calibration``: the reference sweep against ``sweep=shared`` and ``converge_tol`` on a large calibration set
  (all of SST-5's training split, 4,096 MNLI examples), with no reconstruction, right after pruning and after one
  recovery epoch (1,000 examples, its training seed varying with the grid seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grids import CONFIGS, RESULTS, publish, run_grid
from reconstruction import MNLI_CHECKPOINT, RECOVERY_RECIPE, ensure_checkpoint

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
SEEDS = [0, 1, 2]
BUDGETS = ["knee", 0.2]
#: The methods the ablation compares CAHP with: the leaders of the comparison with recovery.
LEADERS = ["attattr", "dsp", "gradient"]

#: One choice changed from the faithful settings (``cahp``'s defaults: JM, t-SNE at perplexity 10, degree 6, the
#: most salient head by the reference's gradient salience). The code offers no PCA embedding, only t-SNE or none
#: (the separability profiles clustered as they are).
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "metric_bhattacharyya": ("separability metric", {"metric": "bhattacharyya"}),
    "embedding_none": ("embedding", {"embedding": "none"}),
    "perplexity_30": ("t-SNE perplexity", {"perplexity": 30.0}),
    "degree_4": ("polynomial degree", {"poly_degree": 4}),
    "degree_8": ("polynomial degree", {"poly_degree": 8}),
    "representative_medoid": ("representative rule", {"representative": "medoid"}),
    "salience_fisher": ("salience source", {"salience": "fisher"}),
    "salience_attattr": ("salience source", {"salience": "attattr"}),
}
#: The choices ``ablation_recovery`` reruns with a recovery epoch (CPU time: not all of them).
RECOVERY_ABLATIONS = ["embedding_none", "representative_medoid", "salience_attattr"]
#: The studies and the variant each compares with.
STUDY_REFERENCE = {"ablation": "reference", "calibration": "separate", "ablation_recovery": "reference"}
#: ``dsp`` cannot be a salience: its scores depend on how many heads are kept, so CAHP refuses it (one line).
#: The faster calibrations, against the reference (``separate``): ``benchmarks/calibration.py``'s settings.
CALIBRATIONS: dict[str, dict[str, Any]] = {
    "separate": {},
    "shared": {"sweep": "shared"},
    "converge": {"sweep": "shared", "converge_tol": 0.1},
}

TASKS: dict[str, dict[str, Any]] = {
    "sst5": {
        "title": "MiniLM-L6 / SST-5 (`cahp demo`'s checkpoint, test 2,210 examples)",
        "study": "minilm_sst5",  # reconstruction.py's study of the same model, task and calibration
        "model": "$CAHP_HOME/demo/minilm-l6-sst5",
        "task": {"task": "sst5", "max_length": 64},
        "eval_max_examples": None,
        "large_calibration": None,  # the whole training split (8,544)
    },
    "mnli": {
        "title": "MiniLM-L6 / MNLI (offline protocol, test = validation_mismatched, 2,000 examples)",
        "study": "minilm_mnli",
        "model": MNLI_CHECKPOINT,
        "task": {"task": "mnli", "protocol": "offline", "max_length": 128},
        "eval_max_examples": 2000,
        "large_calibration": 4096,
    },
}


def grid_name(task: str, study: str, variant: str) -> str:
    return f"{study}_minilm_{task}_{variant}"


def study_grids(task: str, study: str) -> dict[str, dict[str, Any]]:
    spec = TASKS[task]
    home = "$CAHP_HOME/bench"
    base: dict[str, Any] = {
        "model": spec["model"],
        "task": spec["task"],
        "methods": ["cahp"],
        "budgets": BUDGETS,
        "seeds": SEEDS,
        "calibration_seed": 0,
        "resample_calibration": True,
        "eval_splits": ["test"],
        "eval_max_examples": spec["eval_max_examples"],
    }
    grids: dict[str, dict[str, Any]] = {}
    recovery = {"recovery": {"epochs": 1.0, **RECOVERY_RECIPE}, "recovery_seeding": "per_seed"}
    if study in ("ablation", "ablation_recovery"):
        base.update(
            calibration_size=512,
            fitted_dir=f"{home}/reconstruction_{spec['study']}_fitted",  # the reconstruction study's fits
            recovery={"epochs": 0.0},
            reconstruct="weights",
        )
        if study == "ablation_recovery":
            base.update(**recovery, recovery_max_examples=1000)
        variants = ABLATIONS if study == "ablation" else {v: ABLATIONS[v] for v in RECOVERY_ABLATIONS}
        grids[grid_name(task, study, "reference")] = {**base, "methods": ["cahp", *LEADERS]}
        for variant, (_, settings) in variants.items():
            grids[grid_name(task, study, variant)] = {**base, "method_settings": {"cahp": settings}}
    else:
        base.update(
            calibration_size=spec["large_calibration"],
            fitted_dir=f"{home}/calibration_minilm_{task}_fitted",
            **recovery,
            recovery_max_examples=1000,
            reconstruct="none",
        )
        for variant, settings in CALIBRATIONS.items():
            grids[grid_name(task, study, variant)] = {**base, "method_settings": {"cahp": settings}}
    for name, config in grids.items():
        config["out"] = f"{home}/{name}"
        if not config.get("method_settings", {}).get("cahp", True):
            config.pop("method_settings")
    return grids


def write_configs() -> None:
    for task in TASKS:
        for study in STUDY_REFERENCE:
            for name, config in study_grids(task, study).items():
                (CONFIGS / f"{name}.json").write_text(json.dumps(config, indent=1) + "\n")
                print(f"wrote benchmarks/configs/{name}.json")


def run(task: str, study: str, variants: list[str] | None) -> None:
    ensure_checkpoint(TASKS[task]["study"])
    for name in study_grids(task, study):
        if variants and not any(name.endswith(f"_{variant}") for variant in variants):
            continue
        run_grid(name)
        publish(name)


# ---- report -----------------------------------------------------------------------------------------------------


def _cells(grid: str) -> list[dict[str, Any]]:
    folder = RESULTS / grid / "cells"
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def _summary(values: dict[int, float]) -> dict[str, Any]:
    data = list(values.values())
    return {
        "values": values,
        "mean": statistics.fmean(data),
        "sd": statistics.stdev(data) if len(data) > 1 else 0.0,
        "seeds": len(data),
    }


def collect(task: str, study: str) -> dict[str, Any]:
    """``{variant: {method: {budget: {stage: summary}}}}`` plus each variant's paired difference from the reference
    (``cahp`` in the reference grid) per budget and stage, heads kept and fit seconds."""
    from cahp.reporting.bench_report import paired_difference, published_noise_floor

    stages = ("after_pruning",) if study == "ablation" else ("after_pruning", "after_recovery")
    reference_variant = STUDY_REFERENCE[study]
    variants = {
        "ablation": ["reference", *ABLATIONS],
        "calibration": list(CALIBRATIONS),
        "ablation_recovery": ["reference", *RECOVERY_ABLATIONS],
    }[study]
    table: dict[str, Any] = {}
    for variant in variants:
        for cell in _cells(grid_name(task, study, variant)):
            entry = table.setdefault(variant, {}).setdefault(cell["method"], {}).setdefault(str(cell["budget"]), {})
            for stage in stages:
                accuracy = cell["accuracy"][stage]["test"]["accuracy"]
                entry.setdefault(stage, {}).setdefault("values", {})[cell["seed"]] = accuracy
            entry.setdefault("kept", {})[cell["seed"]] = cell["kept"]
            entry.setdefault("heads", {})[cell["seed"]] = cell["kept_heads_by_layer"]
            entry.setdefault("fit_seconds", {})[cell["seed"]] = cell["seconds"]["scoring"]
    for methods in table.values():
        for budgets in methods.values():
            for entry in budgets.values():
                for stage in stages:
                    entry[stage] = _summary(entry[stage]["values"])
    for methods in table.values():  # the knee cells that are the 0.2 cells (same heads): one experiment, not two
        for budgets in methods.values():
            knee, fifth = budgets.get("knee"), budgets.get("0.2")
            if knee and fifth:
                same = [seed for seed, heads in knee["heads"].items() if fifth["heads"].get(seed) == heads]
                knee["same_heads_as_0.2"] = same
    reference = table.get(reference_variant, {}).get("cahp", {})
    for variant, methods in table.items():
        for method, budgets in methods.items():
            if variant == reference_variant and method == "cahp":
                continue
            for budget, entry in budgets.items():
                if budget not in reference:
                    continue
                for stage in stages:
                    paired = paired_difference(entry[stage]["values"], reference[budget][stage]["values"])
                    entry[stage]["vs_reference"] = paired
    reference_grid = RESULTS / grid_name(task, study, reference_variant)
    dense_file = reference_grid / "dense.json"
    dense = json.loads(dense_file.read_text())["accuracy"]["test"]["accuracy"] if dense_file.is_file() else None
    return {
        "title": TASKS[task]["title"],
        "dense": dense,
        "noise_floor": published_noise_floor(reference_grid),
        "stages": list(stages),
        "table": table,
    }


def _fmt(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    text = f"{entry['mean']:.4f} ± {entry['sd']:.4f}" if entry["seeds"] > 1 else f"{entry['mean']:.4f}"
    paired = entry.get("vs_reference")
    if paired and paired.get("low") is not None:
        mark = "" if paired["within_noise"] else " *"
        text += f" ({100 * paired['mean']:+.1f} [{100 * paired['low']:+.1f}, {100 * paired['high']:+.1f}]{mark})"
    return text


def _kept(entry: dict[str, Any]) -> str:
    kept = sorted(entry["kept"].values())
    return str(kept[0]) if kept[0] == kept[-1] else f"{kept[0]}-{kept[-1]}"


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# CAHP's design choices and calibrations",
        "",
        "Command: `python benchmarks/ablation.py run <task> <study>` for each task and study, then "
        "`python benchmarks/ablation.py report`. Grids: `results/bench/ablation_*` and `results/bench/calibration_*`.",
        "",
        "Cells: mean ± sample std over seeds 0-2 (each seed its own calibration sample and t-SNE / FasterPAM seed). "
        "In brackets: the paired difference from the reference in accuracy points, seed by seed, with its 95% t "
        "interval; `*` marks an interval that excludes zero. `knee` is each variant's own k* (heads kept in the last "
        "columns), so a variant that moves the knee changes the head count too; where a seed's knee keeps the "
        "same heads as its 0.2 cell (column `knee = 0.2`), the two columns share that experiment.",
    ]
    for key, result in payload["results"].items():
        study = key.split("/")[1]
        lines += ["", f"## {result['title']}: {study}", ""]
        lines.append(f"Dense accuracy {result['dense']:.4f}." if result["dense"] is not None else "Dense: not run.")
        lines += ["", result["noise_floor"]]
        lines.append("")
        stages = result["stages"]
        header = ["variant", "method"] + [
            f"{budget} {stage.replace('_', ' ')}" for budget in BUDGETS for stage in stages
        ]
        header += ["heads at knee", "knee = 0.2 (seeds)", "fit s (median)"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for variant, methods in result["table"].items():
            for method, budgets in methods.items():
                row = [variant, method]
                for budget in BUDGETS:
                    for stage in stages:
                        row.append(_fmt(budgets.get(str(budget), {}).get(stage)))
                knee = budgets.get("knee")
                row.append(_kept(knee) if knee else "-")
                row.append(str(len(knee.get("same_heads_as_0.2", []))) if knee else "-")
                fit = [s for entry in budgets.values() for s in entry["fit_seconds"].values()]
                row.append(f"{statistics.median(fit):.1f}" if fit else "-")
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def report() -> None:
    results = {}
    for task in TASKS:
        for study, reference in STUDY_REFERENCE.items():
            if _cells(grid_name(task, study, reference)):
                results[f"{task}/{study}"] = collect(task, study)
    payload = {"command": "python benchmarks/ablation.py report", "results": results}
    (OUT / "ablation.json").write_text(json.dumps(payload, indent=1) + "\n")
    (OUT / "ablation.md").write_text(markdown(payload))
    print("wrote benchmarks/results/ablation.{json,md}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("configs")
    runner = sub.add_parser("run")
    runner.add_argument("task", choices=sorted(TASKS))
    runner.add_argument("study", choices=list(STUDY_REFERENCE))
    runner.add_argument("variants", nargs="*", help="only these variants (default: all)")
    sub.add_parser("report")
    args = parser.parse_args(argv)
    if args.step == "configs":
        write_configs()
    elif args.step == "run":
        run(args.task, args.study, args.variants)
    else:
        report()


if __name__ == "__main__":
    main()
