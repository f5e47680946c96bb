"""Accuracy without retraining: every method x ``--reconstruct none|bias|scale|weights``, its cost, and
reconstruction + a short recovery against recovery alone.

    python benchmarks/reconstruction.py configs              # (re)write the grids' configs under configs/
    python benchmarks/reconstruction.py run minilm_mnli      # run one study's grids (resumable) and publish them
    python benchmarks/reconstruction.py cost minilm_mnli     # the cost ratios, measured in one run
    python benchmarks/reconstruction.py demo                 # the demo's CAHP run, 1 recovery epoch, none vs weights
    python benchmarks/reconstruction.py report               # results/reconstruction.{json,md} from the cells

A study is a model, a task and the grids that share its fitted methods (``fitted_dir``): one ``cahp bench`` grid per
reconstruction mode (``reconstruction_<study>_<mode>``), plus the recovery comparison where the study has one. The
grids run through ``bench_grids.py`` (resumable cell by cell, published to ``results/bench/<grid>/``); the report
reads only the published cells. Every seed draws its own calibration sample (``resample_calibration``), which the
methods and the reconstruction's statistics both use, so all methods run every seed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grids import CONFIGS, RESULTS, publish, run_grid
from finetune_baselines import cahp_home, display_command

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
MODES = ("none", "bias", "scale", "weights")
#: The methods: CAHP, the leaders of the comparison with recovery (AttAttr, DSP, gradient importance), the Fisher
#: search and Kwon's, a data-free one (magnitude) and the random control. Left out for CPU time (2 cores): ``l0``
#: (a gate training per budget and seed), ``hies`` and ``entropy`` (never leaders), ``cahp-consensus``, and the
#: analysis scorers ``sink`` / ``redundancy``.
METHODS = ["cahp", "kwon", "attattr", "gradient", "fisher", "dsp", "magnitude", "random"]
#: The heads kept; every mode runs the first, ``none`` and ``weights`` run all of them.
BUDGETS = [0.5, 0.3, 0.2]
SEEDS = [0, 1, 2]

MNLI_CHECKPOINT = "$CAHP_HOME/finetuned/minilm-l6-mnli-grouped"
#: The MNLI checkpoint of this study: the finetune baseline's recipe with length-grouped batches (3x faster on CPU).
MNLI_FINETUNE = [
    *("cahp", "finetune", "--model", "minilm-l6", "--task", "mnli", "--protocol", "offline", "--epochs", "3"),
    *("--learning-rate", "5e-5", "--group-by-length", "--out", MNLI_CHECKPOINT),
]

STUDIES: dict[str, dict[str, Any]] = {
    "minilm_mnli": {
        "title": "MiniLM-L6 / MNLI (offline protocol, test = validation_mismatched, 2,000 examples)",
        "model": MNLI_CHECKPOINT,
        "finetune": MNLI_FINETUNE,
        "task": {"task": "mnli", "protocol": "offline", "max_length": 128},
        "calibration_size": 512,
        "eval_max_examples": 2000,
        "recovery_max_examples": 1000,
        "weights_budgets": [0.5, 0.3],  # CPU time: 20% only without reconstruction
    },
    "minilm_sst5": {
        "title": "MiniLM-L6 / SST-5 (`cahp demo`'s checkpoint, test 2,210 examples)",
        "model": "$CAHP_HOME/demo/minilm-l6-sst5",
        "finetune": ["cahp", "demo"],
        "task": {"task": "sst5", "max_length": 64},
        "calibration_size": 512,
        "eval_max_examples": None,
        "recovery_max_examples": 1000,
    },
    "smollm2_groups": {
        "title": "SmolLM2-135M, language modelling, one key-value group of three removed per layer",
        "model": "smollm2-135m",
        "objective": "causal-lm",
        "methods": ["kwon", "fisher", "magnitude", "random"],
        "budgets": [0.6667],
        "modes": ("none", "scale", "weights"),  # a stock Llama o_proj has no bias to store one in
        "gqa_mode": "groups",
        "seeds": [0],  # every seed sees the same blocks, and only random draws: one seed (CPU time)
    },
    "smollm2_uniform": {
        "title": "SmolLM2-135M, language modelling, one query head of three removed in every group",
        "model": "smollm2-135m",
        "objective": "causal-lm",
        "methods": ["fisher", "magnitude", "random"],
        "budgets": [0.6667],
        "modes": ("none", "scale", "weights"),
        "gqa_mode": "uniform",
        "seeds": [0],  # every seed sees the same blocks, and only random draws: one seed (CPU time)
    },
}
SMOLLM2_LM = {
    "corpus": "mnli-premises",
    "context_length": 256,
    "calibration_blocks": 64,
    "eval_blocks": 32,
    "calibration_batch_size": 4,
    "eval_batch_size": 8,
    "prompted": ["sst2"],
    "prompted_split": "validation",
    "prompted_examples": 200,
    "sample_seed": 42,
}
#: The recovery comparison (MiniLM / MNLI): recovery alone against reconstruction + a recovery that ends at the same
#: wall time (its epochs: one epoch less the reconstruction's share of it, from ``cost``), and a quarter epoch.
RECOVERY_METHODS = ["cahp", "attattr"]
RECOVERY_BUDGETS = [0.5]
#: The recovery recipe of the committed MNLI grids.
RECOVERY_RECIPE = {"learning_rate": 5e-05, "batch_size": 32, "warmup_ratio": 0.1, "weight_decay": 0.01, "seed": 42}


def grid_name(study: str, mode: str) -> str:
    return f"reconstruction_{study}_{mode}"


def study_grids(study: str) -> dict[str, dict[str, Any]]:
    """The bench configs of one study, by grid name."""
    spec = STUDIES[study]
    home = "$CAHP_HOME/bench"
    grids: dict[str, dict[str, Any]] = {}
    for mode in spec.get("modes", MODES):
        config: dict[str, Any] = {
            "model": spec["model"],
            "out": f"{home}/{grid_name(study, mode)}",
            "fitted_dir": f"{home}/reconstruction_{study}_fitted",
            "methods": spec.get("methods", METHODS),
            "budgets": spec.get("budgets", spec.get("weights_budgets", BUDGETS) if mode == "weights" else BUDGETS)
            if mode in ("none", "weights") or "budgets" in spec
            else BUDGETS[:1],
            "seeds": spec.get("seeds", SEEDS),
            "recovery": {"epochs": 0.0},
            "reconstruct": mode,
        }
        if spec.get("objective") == "causal-lm":
            config.update({"objective": "causal-lm", "lm": SMOLLM2_LM, "gqa_mode": spec["gqa_mode"]})
            config["uniform_layers"] = True
        else:
            config.update(
                {
                    "task": spec["task"],
                    "calibration_size": spec["calibration_size"],
                    "calibration_seed": 0,
                    "resample_calibration": True,
                    "eval_splits": ["test"],
                    "eval_max_examples": spec["eval_max_examples"],
                }
            )
        grids[grid_name(study, mode)] = config
    if study == "minilm_mnli":
        base = grids[grid_name(study, "none")]
        for name, mode, epochs in (
            ("recovery_alone", "none", 1.0),
            ("weights_equal_time", "weights", equal_time_epochs(study)),
            ("weights_quarter", "weights", 0.25),
        ):
            grids[f"reconstruction_{study}_{name}"] = {
                **base,
                "out": f"{home}/reconstruction_{study}_{name}",
                "methods": RECOVERY_METHODS,
                "budgets": RECOVERY_BUDGETS,
                "reconstruct": mode,
                "recovery": {"epochs": epochs, **RECOVERY_RECIPE},
                "recovery_seeding": "per_seed",  # each seed's recovery has its own training seed
                "recovery_max_examples": STUDIES[study]["recovery_max_examples"],
            }
    return grids


def equal_time_epochs(study: str) -> float:
    """One epoch less the share of it that the ``weights`` reconstruction takes (``cost``'s measurement; 0.9 until
    it is measured)."""
    cost = _load(OUT / "reconstruction_cost.json").get(study)
    if not cost:
        return 0.9
    return round(max(0.05, 1.0 - cost["ratios"]["weights"]["to_recovery_epoch"]), 2)


def write_configs(studies: list[str]) -> None:
    for study in studies:
        for name, config in study_grids(study).items():
            (CONFIGS / f"{name}.json").write_text(json.dumps(config, indent=1) + "\n")
            print(f"wrote benchmarks/configs/{name}.json")


def ensure_checkpoint(study: str) -> None:
    spec = STUDIES[study]
    folder = Path(spec["model"].replace("$CAHP_HOME", str(cahp_home())))
    if spec.get("objective") == "causal-lm" or (folder / "config.json").is_file():
        return
    command = [part.replace("$CAHP_HOME", str(cahp_home())) for part in spec["finetune"]]
    print("$", display_command(command), flush=True)
    subprocess.run([str(Path(sys.executable).with_name("cahp")), *command[1:]], check=True)


def run(study: str, grids: list[str] | None) -> None:
    ensure_checkpoint(study)
    names = grids or list(study_grids(study))
    for name in names:
        run_grid(name)
        publish(name)


# ---- cost -------------------------------------------------------------------------------------------------------


def measure_cost(study: str, method: str = "gradient", budget: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """In one process: a plain forward pass of the dense model over the calibration data, each mode's
    reconstruction of the same plan, and one recovery epoch (the study's recipe), as seconds and ratios."""
    import copy

    import torch

    from cahp.bench import BenchConfig
    from cahp.bench.runner import _Bench
    from cahp.reconstruction import reconstruct
    from cahp.surgery import prune_heads

    torch.manual_seed(seed)
    config = BenchConfig.from_dict(json.loads((CONFIGS / f"{grid_name(study, 'none')}.json").read_text()))
    config.methods, config.budgets, config.seeds = [method], [budget], [seed]
    bench = _Bench(config, {}, progress=False)
    plan = bench.plan(method, seed, budget)[0]
    calibration = bench.engine(seed).calibration
    model = bench.model
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for batch in calibration.batches():
            calibration.forward(model, batch)
    forward = time.perf_counter() - start
    removed = {
        layer: [h for h in range(bench.grid.heads) if h not in kept] for layer, kept in plan.kept_heads_by_layer.items()
    }
    seconds: dict[str, float] = {}
    records: dict[str, Any] = {}
    for mode in ("bias", "scale", "weights") if not config.is_lm else ("scale", "weights"):
        pruned = prune_heads(copy.deepcopy(model), removed, gqa_mode=config.gqa_mode)  # type: ignore[arg-type]
        start = time.perf_counter()
        records[mode] = reconstruct(model, pruned, calibration, mode)
        seconds[mode] = time.perf_counter() - start
    recovery: dict[str, Any] = {}
    if not config.is_lm:  # one epoch of the recovery comparison's recipe, on the same plan
        from dataclasses import replace

        from cahp.run import execute
        from cahp.stages import StageCache

        raw = json.loads((CONFIGS / f"{grid_name(study, 'none')}.json").read_text())
        raw.update(
            recovery={"epochs": 1.0, **RECOVERY_RECIPE}, recovery_max_examples=STUDIES[study]["recovery_max_examples"]
        )
        recovering = _Bench(BenchConfig.from_dict(raw), {}, progress=False)
        settings = replace(recovering.settings_, measure=False)
        outcome = execute(recovering.work, plan, settings, StageCache(None, progress=False))
        recovery = {"seconds": outcome.recovery_run["seconds"], "examples": raw["recovery_max_examples"]}
    epoch = recovery.get("seconds")
    return {
        "study": study,
        "method": method,
        "budget": budget,
        "seed": seed,
        "calibration_examples": len(calibration),
        "tokens": records["weights"]["tokens"],
        "torch_threads": torch.get_num_threads(),
        "forward_seconds": round(forward, 3),
        "reconstruction_seconds": {mode: round(value, 3) for mode, value in seconds.items()},
        "recovery_epoch": recovery,
        "ratios": {
            mode: {
                "to_forward_pass": round(value / forward, 2),
                "to_recovery_epoch": round(value / epoch, 3) if epoch else None,
            }
            for mode, value in seconds.items()
        },
        "forward_passes": {mode: record["forward_passes"] for mode, record in records.items()},
    }


# ---- the demo ---------------------------------------------------------------------------------------------------

#: ``cahp demo``'s CAHP run replayed with one recovery epoch, without and with the ``weights`` reconstruction.
DEMO_RUN = "$CAHP_HOME/demo/minilm-l6-sst5-cahp/run_config.json"


def demo_runs() -> dict[str, Any]:
    """Replay the demo's pruning run (``cahp prune --config``) with a one-epoch recovery, ``--reconstruct none`` and
    ``weights`` (each run once, in ``$CAHP_HOME/demo_<mode>_e1``), and return their figures and stage seconds."""
    home = str(cahp_home())
    runs: dict[str, Any] = {}
    for mode in ("none", "weights"):
        out = Path(home) / f"demo_{mode}_e1"
        command = ["cahp", "prune", "--config", DEMO_RUN, "--reconstruct", mode, "--recovery-epochs", "1"]
        command += ["--out", f"$CAHP_HOME/demo_{mode}_e1"]
        if not (out / "report.json").is_file():
            print("$", " ".join(command), flush=True)
            local = [part.replace("$CAHP_HOME", home) for part in command]
            subprocess.run([str(Path(sys.executable).with_name("cahp")), *local[1:]], check=True)
        report = json.loads((out / "report.json").read_text())
        runs[mode] = {
            "command": " ".join(command),
            "heads_kept": report["heads"]["kept"],
            "accuracy": {stage: report["accuracy"][stage]["test"]["accuracy"] for stage in report["accuracy"]},
            "stage_seconds": report["stage_seconds"],
            "torch_threads": report.get("latency", {}).get("torch_threads"),
        }
    return runs


# ---- report -----------------------------------------------------------------------------------------------------


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def cells(grid: str) -> list[dict[str, Any]]:
    folder = RESULTS / grid / "cells"
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def quality(cell: dict[str, Any], stage: str) -> float:
    """Test accuracy (classification) or perplexity (causal LM) of a cell at ``stage``."""
    if "accuracy" in cell:
        return float(cell["accuracy"][stage]["test"]["accuracy"])
    return float(cell["quality"][stage]["perplexity"]["perplexity"])


def study_table(study: str) -> dict[str, Any]:
    """``{method: {budget: {mode: {mean, sd, seeds, values}}}}``, the dense figure, and each mode's gain over
    ``none`` paired by seed (:func:`cahp.reporting.bench_report.paired_difference`: the difference, in accuracy or
    perplexity, with its 95% t interval)."""
    from cahp.reporting.bench_report import paired_difference, published_noise_floor

    spec = STUDIES[study]
    by_mode = {mode: cells(grid_name(study, mode)) for mode in spec.get("modes", MODES)}
    dense_file = RESULTS / grid_name(study, "none") / "dense.json"
    dense = _load(dense_file)
    table: dict[str, Any] = {}
    flops: dict[str, dict[str, float]] = {}
    seconds: dict[str, list[float]] = {mode: [] for mode in by_mode}
    for mode, members in by_mode.items():
        for cell in members:
            value = quality(cell, "after_pruning")
            entry = table.setdefault(cell["method"], {}).setdefault(cell["budget"], {}).setdefault(mode, {})
            entry.setdefault("values", {})[cell["seed"]] = value
            share = (cell.get("budget_cost") or {}).get("flops_share")
            if share is not None:
                flops.setdefault(cell["method"], {})[cell["budget"]] = share
            if cell.get("post_surgery"):
                seconds[mode].append(cell["post_surgery"]["reconstruction"]["seconds"])
    for budgets in table.values():
        for modes in budgets.values():
            for entry in modes.values():
                values = list(entry["values"].values())
                entry.update(
                    mean=statistics.fmean(values),
                    sd=statistics.stdev(values) if len(values) > 1 else 0.0,
                    seeds=len(values),
                )
            if "none" in modes:
                for mode in modes:
                    paired = paired_difference(modes[mode]["values"], modes["none"]["values"])  # seed by seed
                    if mode != "none" and paired is not None:
                        modes[mode]["gain_over_none"] = paired
    none_grid = RESULTS / grid_name(study, "none")
    return {
        "title": spec["title"],
        "dense": _dense_quality(dense),
        "noise_floor": published_noise_floor(none_grid) if (none_grid / "summary.json").is_file() else None,
        "table": table,
        "flops_share": flops,
        "reconstruction_seconds_median": {m: statistics.median(v) for m, v in seconds.items() if v},
    }


def _dense_quality(dense: dict[str, Any]) -> float | None:
    if not dense:
        return None
    if "accuracy" in dense:
        return float(dense["accuracy"]["test"]["accuracy"])
    return float(dense["quality"]["perplexity"]["perplexity"]) if "quality" in dense else None


def recovery_table(study: str) -> dict[str, Any]:
    """The recovery comparison: accuracy after recovery and wall seconds (reconstruction + recovery) per arm."""
    arms = {}
    for arm in ("recovery_alone", "weights_equal_time", "weights_quarter"):
        members = cells(f"reconstruction_{study}_{arm}")
        if not members:
            continue
        rows: dict[str, Any] = {}
        for cell in members:
            key = f"{cell['method']}@{cell['budget']}"
            recon = (cell.get("post_surgery") or {}).get("reconstruction", {}).get("seconds", 0.0)
            wall = recon + float(cell["seconds"].get("recovery_and_evaluate", 0.0))
            row = rows.setdefault(key, {"values": {}, "seconds": []})
            row["values"][cell["seed"]] = quality(cell, "after_recovery")
            row["seconds"].append(wall)
        for row in rows.values():
            row["mean"] = statistics.fmean(row["values"].values())
            row["median_seconds"] = statistics.median(row["seconds"])
        arms[arm] = rows
    return arms


def report() -> None:
    results = {
        study: {**study_table(study), **({"recovery": recovery_table(study)} if study == "minilm_mnli" else {})}
        for study in STUDIES
        if cells(grid_name(study, "none"))
    }
    results["cost"] = _load(OUT / "reconstruction_cost.json")
    results["demo"] = _load(OUT / "reconstruction_demo.json")
    (OUT / "reconstruction.json").write_text(json.dumps(results, indent=1) + "\n")
    (OUT / "reconstruction.md").write_text(markdown(results))
    print("wrote benchmarks/results/reconstruction.{json,md}")


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Reconstruction after head removal: every method, no gradient step",
        "",
        "Written by `python benchmarks/reconstruction.py report` from the published cells of the",
        "`reconstruction_*` grids (commands: each grid's `COMMAND`; configs in `benchmarks/configs/`). Each cell:",
        "the method's plan on its seed's calibration sample, surgery, the reconstruction fitted on the same sample,",
        "then the test figure. Mean over seeds (sd, seeds); `weights - none`: paired mean difference with its 95% t",
        "interval over seeds. Machine: 2 CPU cores, no GPU.",
        "",
    ]
    for study, result in results.items():
        if study == "cost" or "table" not in result:
            continue
        lm = study.startswith("smollm2")
        unit = "perplexity (lower is better)" if lm else "test accuracy"
        modes = [m for m in MODES if any(m in b for r in result["table"].values() for b in r.values())]
        dense = result["dense"]
        lines += [f"## {result['title']}", "", f"Dense {unit}: {dense:.4f}" if dense else "Dense: not run", ""]
        lines += [result["noise_floor"], ""] if result.get("noise_floor") else []
        budgets = sorted({b for r in result["table"].values() for b in r}, key=lambda b: -float(b))
        for budget in budgets:
            lines += [
                f"### {float(budget):.0%} of the heads kept",
                "",
                "| method | FLOPs share | " + " | ".join(modes) + " | weights - none |",
                "|---|---:|" + "---:|" * len(modes) + "---:|",
            ]
            rows = []
            for method, budgets_of in result["table"].items():
                if budget not in budgets_of:
                    continue
                entry = budgets_of[budget]
                share = result["flops_share"].get(method, {}).get(budget)
                cells_text = [
                    f"{entry[m]['mean']:.4f} ({entry[m]['sd']:.4f}, {entry[m]['seeds']})" if m in entry else "–"
                    for m in modes
                ]
                gain = entry.get("weights", {}).get("gain_over_none")
                gain_text = "–"
                if gain and gain["low"] is not None:
                    gain_text = f"{gain['mean']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}]"
                elif gain:
                    gain_text = f"{gain['mean']:+.4f} (one seed)"
                best = entry.get("weights", entry.get("none"))
                rows.append((best["mean"] if best else 0.0, method, share, cells_text, gain_text))
            for _, method, share, cells_text, gain_text in sorted(rows, key=lambda r: r[0], reverse=not lm):
                share_text = f"{share:.3f}" if share is not None else "–"
                lines.append(f"| {method} | {share_text} | " + " | ".join(cells_text) + f" | {gain_text} |")
            lines += ["", *best_lines(result, budget, modes, lm), ""]
        if result.get("recovery"):
            lines += [
                "### Reconstruction + a short recovery vs recovery alone",
                "",
                "| method@budget | " + " | ".join(result["recovery"]) + " |",
                "|---|" + "---:|" * len(result["recovery"]),
            ]
            keys = sorted({k for arm in result["recovery"].values() for k in arm})
            for key in keys:
                texts = []
                for arm in result["recovery"].values():
                    row = arm.get(key)
                    texts.append(f"{row['mean']:.4f} ({row['median_seconds']:.0f} s)" if row else "–")
                lines.append(f"| {key} | " + " | ".join(texts) + " |")
            lines.append("")
    demo = results.get("demo") or {}
    if demo:
        lines += [
            "## The demo's CAHP run with one recovery epoch (`python benchmarks/reconstruction.py demo`)",
            "",
            "| reconstruct | heads | after pruning | after recovery | reconstruction s | recovery s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for mode, run in demo.items():
            seconds = run["stage_seconds"]
            lines.append(
                f"| {mode} | {run['heads_kept']} | {run['accuracy']['after_pruning']:.4f} | "
                f"{run['accuracy']['after_recovery']:.4f} | {seconds.get('reconstruction', 0.0):.0f} | "
                f"{seconds['recovery_run']:.0f} |"
            )
        lines += ["", f"Dense: {next(iter(demo.values()))['accuracy']['before_pruning']:.4f}.", ""]
    cost = results.get("cost") or {}
    for study, record in cost.items():
        lines += [
            f"## Cost ({study}, {record['method']} at {record['budget']:.0%}, {record['calibration_examples']} "
            f"calibration examples, {record['torch_threads']} threads, one run)",
            "",
            "| mode | seconds | / one forward pass | / one recovery epoch |",
            "|---|---:|---:|---:|",
        ]
        for mode, ratio in record["ratios"].items():
            epoch = ratio["to_recovery_epoch"]
            lines.append(
                f"| {mode} | {record['reconstruction_seconds'][mode]:.1f} | {ratio['to_forward_pass']:.2f} | "
                f"{epoch if epoch is not None else '–'} |"
            )
        lines += ["", f"One forward pass over the calibration data: {record['forward_seconds']:.1f} s.", ""]
    return "\n".join(lines) + "\n"


def best_lines(result: dict[str, Any], budget: str, modes: list[str], lm: bool) -> list[str]:
    """Per mode, the best method's mean against dense (points, or a perplexity ratio), and CAHP's where it ran."""
    dense = result["dense"]
    lines = []
    for mode in modes:
        means = {
            method: budgets[budget][mode]["mean"]
            for method, budgets in result["table"].items()
            if budget in budgets and mode in budgets[budget]
        }
        if not means or not dense:
            continue
        best = (min if lm else max)(means, key=lambda method: means[method])

        def versus(value: float) -> str:
            return f"{value / dense:.3f}x dense" if lm else f"{100 * (value - dense):+.1f} points from dense"

        text = f"- `{mode}`: best {best} {means[best]:.4f} ({versus(means[best])})"
        if "cahp" in means and best != "cahp":
            text += f"; cahp {means['cahp']:.4f} ({versus(means['cahp'])})"
        lines.append(text)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("configs").add_argument("studies", nargs="*", default=list(STUDIES))
    runner = sub.add_parser("run")
    runner.add_argument("study", choices=list(STUDIES))
    runner.add_argument("--grids", nargs="*", default=None, help="grid names (default: every grid of the study)")
    cost = sub.add_parser("cost")
    cost.add_argument("study", choices=list(STUDIES))
    sub.add_parser("demo")
    sub.add_parser("report")
    args = parser.parse_args()
    if args.step == "configs":
        write_configs(args.studies)
    elif args.step == "run":
        run(args.study, args.grids)
    elif args.step == "cost":
        ensure_checkpoint(args.study)
        record = measure_cost(args.study)
        record["command"] = f"python benchmarks/reconstruction.py cost {shlex.quote(args.study)}"
        costs = _load(OUT / "reconstruction_cost.json")
        costs[args.study] = record
        (OUT / "reconstruction_cost.json").write_text(json.dumps(costs, indent=1) + "\n")
        print(json.dumps(record, indent=1))
    elif args.step == "demo":
        runs = demo_runs()
        (OUT / "reconstruction_demo.json").write_text(json.dumps(runs, indent=1) + "\n")
        print(json.dumps(runs, indent=1))
    else:
        report()


if __name__ == "__main__":
    main()
