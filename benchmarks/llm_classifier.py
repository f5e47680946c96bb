"""Decoder classifier: SmolLM2-135M-Instruct fine-tuned on an SST-2 subset, then CAHP vs random head pruning.

The decoder's LM objective has no classes, so CAHP cannot run on it (benchmarks/llm.py); on a classifier head it
can. Three CLI runs, each skipped when its output is already finished (and each resumable on its own):

1. ``cahp finetune --model smollm2-135m --task sst2``: a seeded stratified subset of the training split
   (``--train-examples``, default 2,000), ``--max-length 64``, 1 epoch, evaluated on the whole validation split
   (872 examples; SST-2's test split has no labels);
2. ``cahp prune --method cahp`` and ``cahp prune --method random`` on that classifier, at the same budget
   (``--keep``, default 180 of 270 query heads: a third removed), grouped-query ``groups`` mode (whole
   key-value groups: the KV cache shrinks), every layer keeping a group; when CAHP keeps more heads than asked
   (the guardrail's groups), random also runs at CAHP's count (``random-matched``). Each has a short recovery
   (distillation from the fine-tuned model, ``--recovery-examples`` training examples, 1 epoch); accuracy
   before pruning, after pruning and after recovery on a seeded stratified subset of the validation split
   (``--eval-examples``).

Every run uses one CPU thread (``OMP_NUM_THREADS=1``). Then writes ``benchmarks/results/llm_classifier.json``
(the numbers and the exact commands) and ``llm_classifier.md`` (a view of the JSON).

    OMP_NUM_THREADS=1 CAHP_DATA_DIR=../shared/data nice python benchmarks/llm_classifier.py
    OMP_NUM_THREADS=1 CAHP_DATA_DIR=../shared/data python benchmarks/llm_classifier.py --train-examples 200 \
        --eval-examples 100 --recovery-examples 64 --work runs/llm_classifier_small     # a quick check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
METHODS = ("cahp", "random")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-examples", type=int, default=2000, help="fine-tuning subset of SST-2 train")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example")
    parser.add_argument("--batch-size", type=int, default=16, help="fine-tuning and recovery batch")
    parser.add_argument("--learning-rate", type=float, default=5e-5, help="fine-tuning and recovery peak rate")
    parser.add_argument("--keep", type=int, default=180, help="query heads kept of 270 (a multiple of 3)")
    parser.add_argument("--calibration-size", type=int, default=256, help="calibration examples (train split)")
    parser.add_argument("--recovery-examples", type=int, default=256, help="recovery subset of the train split")
    parser.add_argument("--eval-examples", type=int, default=300, help="validation subset of the prune runs")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", default=str(REPO / "runs" / "llm_classifier"), help="the runs' folders")
    parser.add_argument("--out", default=str(RESULTS), help="where llm_classifier.{json,md} go")
    return parser.parse_args()


def commands(args: argparse.Namespace, cahp_kept: int | None = None) -> dict[str, list[str]]:
    """The CLI command of each run (``cahp ...`` arguments), by run name. With ``cahp_kept`` (the heads CAHP's
    run kept, when its guardrail or whole groups made it keep more than ``--keep``), random runs at that count
    too (``prune-random-matched``), so that one random row matches CAHP's size exactly."""
    work = Path(args.work)
    finetune = ["finetune", "--model", "smollm2-135m", "--task", "sst2"]
    finetune += ["--max-train-examples", str(args.train_examples), "--max-length", str(args.max_length)]
    finetune += ["--epochs", "1", "--batch-size", str(args.batch_size), "--learning-rate", str(args.learning_rate)]
    finetune += ["--group-by-length", "--eval-splits", "validation", "--seed", str(args.seed)]
    finetune += ["--out", str(work / "finetune")]
    runs = {"finetune": finetune}
    budgets = [(method, method, args.keep) for method in METHODS]
    if cahp_kept is not None and cahp_kept != args.keep:
        budgets.append(("random-matched", "random", cahp_kept))
    for name, method, keep in budgets:
        prune = ["prune", "--model", str(work / "finetune"), "--task", "sst2", "--method", method]
        prune += ["--keep", str(keep), "--gqa-mode", "groups", "--seed", str(args.seed)]
        prune += ["--calibration-size", str(args.calibration_size), "--max-length", str(args.max_length)]
        prune += ["--recovery-epochs", "1", "--recovery-max-examples", str(args.recovery_examples)]
        prune += ["--recovery-learning-rate", str(args.learning_rate), "--batch-size", str(args.batch_size)]
        prune += ["--eval-splits", "validation", "--eval-max-examples", str(args.eval_examples)]
        prune += ["--latency-batch-size", "1", "--latency-seq-len", str(args.max_length), "--latency-repeats", "3"]
        prune += ["--out", str(work / f"prune-{name}")]
        runs[f"prune-{name}"] = prune
    return runs


def _shown(argv: list[str]) -> str:
    """A command as the results show it: relative to the repository, with the environment it ran in."""
    text = shlex.join(["cahp", *argv]).replace(str(REPO) + "/", "")
    return f"OMP_NUM_THREADS=1 CAHP_DATA_DIR=../shared/data {text}"


def run(name: str, argv: list[str], done: Path, log: Path) -> None:
    """Run ``cahp argv`` (progress into ``log``) unless ``done`` exists."""
    if done.is_file():
        print(f"{name}: finished already ({done})", flush=True)
        return
    print(f"{name}: {_shown(argv)}  (progress: {log})", flush=True)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    with log.open("a") as handle:
        status = subprocess.run([sys.executable, "-m", "cahp", *argv], stdout=handle, stderr=subprocess.STDOUT, env=env)
    if status.returncode != 0:
        raise SystemExit(f"{name} failed (exit {status.returncode}); see {log}, then rerun to resume")


def prune_row(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one ``cahp prune`` report that the table shows."""
    accuracy = report["accuracy"]
    recovery = report.get("recovery", {})
    group = report["heads"]["heads_per_layer"] // report["heads"]["kv_heads_per_layer"]  # groups mode: whole groups
    selection = report.get("selection") or {}
    return {
        "method": report["method"],
        "heads_requested": report["heads"]["requested"],
        "heads_kept": report["heads"]["kept"],
        "heads_total": report["heads"]["total"],
        "kv_heads_kept": sum(len(heads) // group for heads in report["kept_heads_by_layer"].values()),
        "kv_heads_total": report["heads"]["kv_heads_per_layer"] * report["heads"]["layers"],
        "guardrail_heads": len(report["plan"].get("guardrail_heads", [])),
        "validation_before": accuracy["before_pruning"]["validation"],
        "validation_pruned": accuracy["after_pruning"]["validation"],
        "validation_recovered": accuracy["after_recovery"]["validation"],
        "parameters": report["parameters"],
        "latency": report.get("latency"),
        "recovery": {key: value for key, value in recovery.items() if key != "history"},
        "stage_seconds": report.get("stage_seconds"),
        "selection": {key: value for key, value in selection.items() if isinstance(value, int | float | str)},
        "kept_heads_by_layer": report["kept_heads_by_layer"],
    }


def main() -> int:
    args = parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    argvs = commands(args)
    run("finetune", argvs["finetune"], work / "finetune" / "metrics.json", work / "finetune.log")
    run("prune-cahp", argvs["prune-cahp"], work / "prune-cahp" / "report.json", work / "prune-cahp.log")
    cahp_kept = json.loads((work / "prune-cahp" / "report.json").read_text())["heads"]["kept"]
    argvs = commands(args, cahp_kept)
    names = [name for name in argvs if name.startswith("prune-")]
    for name in names[1:]:  # prune-cahp ran above
        run(name, argvs[name], work / name / "report.json", work / f"{name}.log")

    metrics = json.loads((work / "finetune" / "metrics.json").read_text())
    reports = {name[len("prune-") :]: json.loads((work / name / "report.json").read_text()) for name in names}
    result = {
        "model": "smollm2-135m (SmolLM2-135M-Instruct, GGUF Q4_1 de-quantized to fp32; Llama, 30 layers x 9 query "
        "/ 3 key-value heads) with a sequence-classification head read at the last real token",
        "task": "sst2",
        "date": datetime.date.today().isoformat(),
        "machine": {"python": platform.python_version(), "threads": 1},
        "settings": {key: value for key, value in vars(args).items() if key not in ("work", "out")},
        "commands": {name: _shown(argv) for name, argv in argvs.items()},
        "script": "OMP_NUM_THREADS=1 CAHP_DATA_DIR=../shared/data python "
        + shlex.join(["benchmarks/llm_classifier.py", *sys.argv[1:]]),
        "finetune": {
            "train_examples": metrics["train_examples"],
            "label_distribution_train": metrics["label_distribution_train"],
            "train_seconds": metrics["train_seconds"],
            "total_steps": metrics["total_steps"],
            "train_loss": [row["train_loss"] for row in metrics["history"]],
            "validation": metrics["results"]["validation"],
        },
        "prune": {name: prune_row(report) for name, report in reports.items()},
    }
    from cahp.outputs import write_json

    write_json(out / "llm_classifier.json", result)
    markdown = out / "llm_classifier.md"
    analysis = _kept_analysis(markdown.read_text() if markdown.is_file() else "")
    markdown.write_text(render_markdown(result) + "\n" + analysis + "\n")
    print(f"wrote {out / 'llm_classifier.json'} and {markdown}")
    return 0


def render_markdown(result: dict[str, Any]) -> str:
    """The tables (a view of llm_classifier.json)."""
    finetune = result["finetune"]
    validation = finetune["validation"]
    first = next(iter(result["prune"].values()))
    lines = [
        "# SmolLM2-135M-Instruct as an SST-2 classifier: fine-tuned, then CAHP vs random head pruning",
        "",
        f"Script: `{result['script']}` ({result['date']}, CPU, one thread). Commands it ran:",
        "",
        *[f"- {name}: `{command}`" for name, command in result["commands"].items()],
        "",
        "## Fine-tuning",
        "",
        f"{finetune['train_examples']} training examples (labels {finetune['label_distribution_train']}), "
        f"{finetune['total_steps']} steps in {finetune['train_seconds'] / 60:.1f} min (wall, with one validation "
        f"pass), final train loss "
        f"{finetune['train_loss'][-1]:.4f}. Whole SST-2 validation split ({validation['examples']} examples): "
        f"accuracy **{validation['accuracy']:.4f}**, macro-F1 {validation['macro_f1']:.4f}.",
        "",
        f"## Pruning ({first['heads_total']} query heads, groups mode, validation subset of "
        f"{first['validation_before']['examples']} examples)",
        "",
        "| method | heads kept (requested) | KV heads kept | accuracy dense | after pruning | after recovery | "
        "macro-F1 after recovery | params (M) | latency speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["prune"].items():
        latency = row.get("latency") or {}
        speedup = latency.get("measured_speedup")
        shown = name if name == row["method"] else f"{row['method']} (keep {row['heads_requested']}: CAHP's count)"
        lines.append(
            f"| {shown} | {row['heads_kept']} ({row['heads_requested']}) | "
            f"{row['kv_heads_kept']} of {row['kv_heads_total']} | "
            f"{row['validation_before']['accuracy']:.4f} | {row['validation_pruned']['accuracy']:.4f} | "
            f"{row['validation_recovered']['accuracy']:.4f} | {row['validation_recovered']['macro_f1']:.4f} | "
            f"{row['parameters']['dense'] / 1e6:.1f} -> {row['parameters']['pruned'] / 1e6:.1f} | "
            + (f"{speedup:.2f}x |" if isinstance(speedup, int | float) else "- |")
        )
    objective = first["recovery"].get("objective", {})
    settings = result["settings"]
    lines += [
        "",
        f"Every run: calibration {settings['calibration_size']} training examples; recovery 1 epoch on "
        f"{first['recovery'].get('examples')} training examples, loss `{objective.get('loss')}` (T "
        f"{objective.get('temperature')}, alpha {objective.get('alpha')}: distillation from the fine-tuned model), "
        f"learning rate {settings['learning_rate']}; latency: batch 1, {settings['max_length']} tokens, median of 3, "
        "dense vs pruned interleaved. Times (fine-tuning included) are wall time on a shared 2-core machine.",
        "",
    ]
    return "\n".join(lines)


def _kept_analysis(previous: str) -> str:
    """The hand-written analysis of an earlier llm_classifier.md (from its ``## Analysis`` heading on)."""
    marker = "\n## Analysis"
    if marker in previous:
        return previous[previous.index(marker) + 1 :].rstrip()
    return "## Analysis\n\nNot written yet."


if __name__ == "__main__":
    sys.exit(main())
