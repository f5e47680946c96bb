"""CAHP benchmark: k*, accuracy before pruning / after pruning / after recovery, wall time of each stage,
and the speed targets of the selection stage.

    python benchmarks/cahp_bench.py --speed                      # speed targets (MiniLM, full SST-5 train)
    python benchmarks/cahp_bench.py --rows minilm-l6:sst5        # one pruning row (reference recipe)
    python benchmarks/cahp_bench.py                              # every row

Rows start from the fine-tuned baselines of ``finetune_baselines.py`` (made first when missing), prune with
the reference settings (the knee decides k; signatures on the whole calibration split; recovery 3 epochs at
2e-5) into ``$CAHP_HOME/cahp/<model>-<task>``, and are written to ``benchmarks/results/cahp.{json,md}``.
MPNet-base rows recover for 1 epoch instead of 3, on length-grouped batches: on 2 CPU cores an MPNet epoch
costs about 40 minutes (SST-5) to 80 minutes (MNLI) with random batches. The MPNet MNLI row is evaluated on a
stratified 2,000 of the 9,832 test pairs. The table names each row's recovery and test examples.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_baselines import cahp_home, display_command, ensure_finetuned, read_results, store_result

RESULTS = Path(__file__).resolve().parent / "results"
#: (model, task) -> extra `cahp prune` arguments on top of the reference settings. Every row recovers with
#: cross-entropy, and the MiniLM-L6 rows on random batches: the rows were measured before distillation (`kd`)
#: and length-grouped batches became `cahp prune`'s defaults, and the pins keep their commands reproducing them.
ROWS: dict[tuple[str, str], list[str]] = {
    ("minilm-l6", "sst5"): ["--recovery-loss", "ce", "--no-group-by-length"],
    ("minilm-l6", "mnli"): ["--protocol", "offline", "--recovery-loss", "ce", "--no-group-by-length"],
    ("mpnet-base", "sst5"): ["--recovery-epochs", "1", "--recovery-loss", "ce", "--group-by-length"],
    ("mpnet-base", "mnli"): [
        *["--protocol", "offline", "--recovery-epochs", "1", "--recovery-loss", "ce", "--group-by-length"],
        *["--eval-max-examples", "2000"],  # an MPNet pass over all 9,832 test pairs takes about 15 min on 1 core
    ],
}


def pruned_dir(model: str, task: str) -> Path:
    return cahp_home() / "cahp" / f"{model}-{task}"


def run_row(model: str, task: str) -> dict:
    finetuned = ensure_finetuned(model, task)
    out = pruned_dir(model, task)
    command = ["cahp", "prune", "--model", str(finetuned), "--task", task, "--out", str(out), *ROWS[(model, task)]]
    if not (out / "report.json").is_file():
        print("$", shlex.join(command), flush=True)
        subprocess.run([str(Path(sys.executable).with_name("cahp")), *command[1:]], check=True)
    report = json.loads((out / "report.json").read_text())
    accuracy = report["accuracy"]
    return {
        "model": model,
        "task": task,
        "protocol": report["task"]["protocol"],
        "heads_total": report["heads"]["total"],
        "k_star": report["selection"]["k"],
        "knee_method": report["selection"]["knee"]["method"],
        "knee_fallback": report["selection"]["knee"]["fallback"],
        "heads_kept": report["heads"]["kept"],
        "test_before": accuracy["before_pruning"]["test"]["accuracy"],
        "test_examples": accuracy["before_pruning"]["test"]["examples"],
        "test_after_pruning": accuracy["after_pruning"]["test"]["accuracy"],
        "test_after_recovery": accuracy["after_recovery"]["test"]["accuracy"],
        "validation_after_recovery": accuracy["after_recovery"]["validation"]["accuracy"],
        "measured_speedup": report["latency"]["measured_speedup"],
        "flops_ideal_speedup": report["latency"]["flops_ideal_speedup"],
        "stage_seconds": report["stage_seconds"],
        "recovery_epochs": report["config"]["recovery"]["epochs"],
        "recovery_grouped": report["config"]["recovery"].get("group_by_length", False),
        "calibration_split": report["task"].get("calibration_split", "train"),
        "command": display_command(command),
    }


def speed_targets(calibration_size: int | None) -> dict:
    """Signature collection vs a plain forward pass over the same examples, and the whole selection stage
    (signatures -> kept heads, no fine-tuning) for MiniLM on the SST-5 training split, measured in one run."""
    import numpy as np
    import torch

    from cahp.data import encode_split, iter_batches, load_task
    from cahp.methods.cahp import CAHP
    from cahp.models import load_classifier
    from cahp.scoring.salience import gradient_salience
    from cahp.selection.cahp import CAHPSelector
    from cahp.signatures.collector import collect_signatures, eager_attention
    from cahp.train.finetune import subsample

    model_dir = ensure_finetuned("minilm-l6", "sst5")
    task = load_task("sst5")
    from cahp.calibration import Calibration, SequenceClassification

    model, tokenizer = load_classifier(str(model_dir), task.num_labels)
    split = subsample(task.split("train"), calibration_size, 42)
    data = encode_split(tokenizer, split, 128)

    @torch.inference_mode()
    def plain_forward(eager: bool) -> float:
        start = time.perf_counter()
        with eager_attention(model) if eager else contextlib.nullcontext():
            for _, batch in iter_batches(tokenizer, data, 32, sort_by_length=True):
                batch.pop("labels")
                model(**batch)
        return time.perf_counter() - start

    plain_forward(False)  # warm-up
    timings: dict[str, float] = {"plain_forward_default_attention": plain_forward(False)}
    timings["plain_forward_eager_attention"] = plain_forward(True)
    start = time.perf_counter()
    objective = SequenceClassification(task.num_labels)
    moments = collect_signatures(model, Calibration(data, tokenizer, objective), progress=False)
    timings["signatures"] = time.perf_counter() - start
    train = encode_split(tokenizer, task.split("train"), 128)
    start = time.perf_counter()
    salience = gradient_salience(model, Calibration(train, tokenizer, objective), fraction=0.25, progress=False)
    timings["salience"] = time.perf_counter() - start
    start = time.perf_counter()
    selector = CAHPSelector(CAHP()).fit(moments, np.asarray(salience))
    timings["clustering_and_knee"] = time.perf_counter() - start
    timings["selection_stage_total"] = timings["signatures"] + timings["salience"] + timings["clustering_and_knee"]
    return {
        "model": "minilm-l6",
        "task": "sst5",
        "examples": len(data),
        "torch_threads": torch.get_num_threads(),
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "signatures_over_plain_forward": round(timings["signatures"] / timings["plain_forward_default_attention"], 3),
        "signatures_over_eager_forward": round(timings["signatures"] / timings["plain_forward_eager_attention"], 3),
        "target_signatures_over_forward": 1.5,
        "target_selection_stage_seconds": 120,
        "k_star": int(selector.k_),
        "command": "python benchmarks/cahp_bench.py --speed",
    }


def write_table(results: dict) -> None:
    lines = [
        "# CAHP benchmark",
        "",
        "Machine: 2 CPU cores, no GPU. MNLI rows: offline protocol (see finetune_baselines.md).",
        "",
    ]
    speed = results.get("speed")
    if speed:
        s = speed["seconds"]
        lines += [
            "## Speed targets (one run, ratios)",
            "",
            f"MiniLM-L6 on the SST-5 training split ({speed['examples']} examples, {speed['torch_threads']} threads):",
            "",
            "| measure | seconds | target |",
            "|---|---:|---|",
            f"| plain forward (default attention) | {s['plain_forward_default_attention']} | |",
            f"| plain forward (eager attention) | {s['plain_forward_eager_attention']} | |",
            f"| signature collection | {s['signatures']} | <= 1.5 x plain forward: "
            f"**{speed['signatures_over_plain_forward']}x** "
            f"(vs eager forward: {speed['signatures_over_eager_forward']}x) |",
            f"| gradient salience (25% of batches) | {s['salience']} | |",
            f"| t-SNE + MSS sweep + knee + selection | {s['clustering_and_knee']} | |",
            f"| whole selection stage | {s['selection_stage_total']} | < 120 s |",
            "",
            f"Command: `{speed['command']}`",
            "",
        ]
    rows = [r for key, r in results.items() if key != "speed"]
    if rows:
        lines += [
            "## Pruning runs (knee decides k; signatures and salience on the whole calibration split)",
            "",
            "The calibration split is the training split, except under the offline MNLI protocol, where it is the",
            "held-out 10% of validation_matched (the model was fine-tuned on the rest); an offline row that says",
            "`train` predates that rule and awaits a rerun. Recovery: cross-entropy (`--recovery-loss ce`;",
            "distillation is in recovery.md), 2e-5 on the training split, for the epochs in the table (reference: 3);",
            "grouped: length-grouped batches.",
            "",
            "| model | task | calibration split | heads kept / total | k* (how) | test examples | test before "
            "| after pruning | after recovery | recovery epochs | speedup measured / ideal "
            "| signatures s | salience s | selection s | recovery s |",
            "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            s = r["stage_seconds"]
            how = r["knee_method"] if not r["knee_fallback"] else f"fallback: {r['knee_fallback']}"
            recovery = f"{r.get('recovery_epochs', 3.0):g}" + (" (grouped)" if r.get("recovery_grouped") else "")
            lines.append(
                f"| {r['model']} | {r['task']} ({r['protocol']}) | {r.get('calibration_split', 'train')} "
                f"| {r['heads_kept']} / {r['heads_total']} "
                f"| {r['k_star']} ({how}) | {r.get('test_examples', '')} | {r['test_before']:.4f} "
                f"| {r['test_after_pruning']:.4f} "
                f"| {r['test_after_recovery']:.4f} | {recovery} "
                f"| {r['measured_speedup']:.2f}x / {r['flops_ideal_speedup']:.2f}x "
                f"| {s.get('signatures', '')} | {s.get('salience', '')} | {s.get('selection', '')} "
                f"| {s.get('recovery', '')} |"
            )
        lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in rows]
    (RESULTS / "cahp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=None, help="model:task pairs (default: all)")
    parser.add_argument("--speed", action="store_true", help="measure the speed targets only")
    parser.add_argument("--calibration-size", type=int, default=None, help="for --speed (default: all)")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    results_file = RESULTS / "cahp.json"
    if args.speed:
        store_result(results_file, "speed", speed_targets(args.calibration_size))
    else:
        for model, task in [tuple(r.split(":")) for r in args.rows] if args.rows else list(ROWS):
            store_result(results_file, f"{model}:{task}", run_row(model, task))
    write_table(read_results(results_file))


if __name__ == "__main__":
    main()
