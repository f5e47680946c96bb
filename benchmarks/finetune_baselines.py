"""Fine-tuning baselines: the dense classifiers that every pruning benchmark starts from.

Each row fine-tunes one model on one task with the command printed in the table, into
``$CAHP_HOME/finetuned/<model>-<task>`` (reused when it is already there: rerunning resumes or skips), and
records validation and test accuracy and wall time in ``benchmarks/results/finetune_baselines.{json,md}``.

    python benchmarks/finetune_baselines.py                    # every row
    python benchmarks/finetune_baselines.py --rows minilm-l6:sst5 mpnet-base:mnli
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from cahp.models import cahp_home

RESULTS = Path(__file__).resolve().parent / "results"

#: (model, task) -> extra `cahp finetune` arguments. MNLI runs under the offline protocol here. MPNet-base
#: trains for one epoch on length-grouped batches: on 2 CPU cores an epoch of random batches costs about
#: 40 (SST-5) to 80 (MNLI) minutes, and grouping halves the padded tokens.
ROWS: dict[tuple[str, str], list[str]] = {
    ("minilm-l6", "sst5"): ["--epochs", "3", "--learning-rate", "5e-5"],
    ("minilm-l6", "mnli"): ["--epochs", "3", "--learning-rate", "5e-5", "--protocol", "offline"],
    ("mpnet-base", "sst5"): ["--epochs", "1", "--learning-rate", "3e-5", "--group-by-length"],
    ("mpnet-base", "mnli"): ["--epochs", "1", "--learning-rate", "3e-5", "--protocol", "offline", "--group-by-length"],
}


def finetuned_dir(model: str, task: str) -> Path:
    return cahp_home() / "finetuned" / f"{model}-{task}"


def display_command(parts: list[str]) -> str:
    """The command as a shell line, with this machine's cache folder written as ``$CAHP_HOME``."""
    return shlex.join(parts).replace(str(cahp_home()), "$CAHP_HOME")


def finetune_command(model: str, task: str) -> list[str]:
    out = finetuned_dir(model, task)
    return ["cahp", "finetune", "--model", model, "--task", task, "--out", str(out), *ROWS[(model, task)]]


def ensure_finetuned(model: str, task: str) -> Path:
    """Fine-tune (model, task) unless its folder is already complete; return the folder."""
    out = finetuned_dir(model, task)
    if not (out / "metrics.json").is_file():
        command = finetune_command(model, task)
        print("$", shlex.join(command), flush=True)
        cahp = Path(sys.executable).with_name("cahp")
        subprocess.run([str(cahp), *command[1:]], check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=None, help="model:task pairs (default: all)")
    args = parser.parse_args()
    rows = [tuple(r.split(":")) for r in args.rows] if args.rows else list(ROWS)
    RESULTS.mkdir(exist_ok=True)
    results_file = RESULTS / "finetune_baselines.json"
    for model, task in rows:
        start = time.perf_counter()
        out = ensure_finetuned(model, task)
        metrics = json.loads((out / "metrics.json").read_text())
        store_result(
            results_file,
            f"{model}:{task}",
            {
                "model": model,
                "task": task,
                "protocol": metrics["task"]["protocol"],
                "train_examples": metrics["train_examples"],
                "validation_accuracy": metrics["results"]["validation"]["accuracy"],
                "test_accuracy": metrics["results"]["test"]["accuracy"],
                "test_macro_f1": metrics["results"]["test"]["macro_f1"],
                "train_seconds": metrics["train_seconds"],
                "torch_threads": metrics.get("torch_threads", 2),  # rows from before it was recorded used 2
                "history": metrics["history"],
                "command": display_command(finetune_command(model, task)),
                "wall_seconds_this_invocation": round(time.perf_counter() - start, 1),
            },
        )
    write_table(read_results(results_file))


def _threads(count: int) -> str:
    return "1 thread" if count == 1 else f"{count} threads"


def read_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def store_result(path: Path, key: str, value: dict) -> None:
    """Add one entry to a results file, rereading it first: rows run alongside may have landed meanwhile."""
    results = read_results(path)
    results[key] = value
    path.write_text(json.dumps(results, indent=2) + "\n")


def write_table(results: dict) -> None:
    lines = [
        "# Fine-tuning baselines",
        "",
        "Dense classifiers that every pruning benchmark starts from. Machine: 2 CPU cores, no GPU.",
        "MNLI rows use the **offline protocol** (no MNLI train split offline): fine-tuned on",
        "validation_matched minus a label-stratified 10% (validation = that 10%), tested on",
        "validation_mismatched. SST-5: standard splits (train 8,544 / validation 1,101 / test 2,210).",
        "",
        "Train time is per run, with the torch threads given (rows on 1 thread ran two at a time).",
        "",
        "| model | task | protocol | train examples | validation acc | test acc | test macro-F1 | train time |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in results.values():
        lines.append(
            f"| {row['model']} | {row['task']} | {row['protocol']} | {row['train_examples']} "
            f"| {row['validation_accuracy']:.4f} | {row['test_accuracy']:.4f} | {row['test_macro_f1']:.4f} "
            f"| {row['train_seconds'] / 60:.1f} min ({_threads(row.get('torch_threads', 2))}) |"
        )
    lines += ["", "Commands (each reproduces its row; `make bench-finetune` runs them all):", ""]
    lines += [f"- `{row['command']}`" for row in results.values()]
    (RESULTS / "finetune_baselines.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
