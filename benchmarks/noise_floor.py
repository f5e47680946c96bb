"""The noise floor: how much a dense fine-tune's test accuracy moves when only its training seed changes.

For each (model, task) row of ``finetune_baselines.py`` the dense model is fine-tuned with N training seeds (the
same ``cahp finetune`` command and recipe as the baseline, plus ``--seed S``; the seed shuffles the batches,
draws the dropout masks and initialises the classification head), each evaluated on the test split, and the
per-seed accuracies, their mean and their sample standard deviation are recorded in
``benchmarks/results/noise_floor.json`` keyed ``<model>:<task>``. Every bench summary of a grid on that
fine-tune prints the standard deviation beside its tables (:func:`cahp.reporting.bench_report.grid_noise_floor`):
gaps between methods of that size are what retraining alone moves.

The seeds are the baseline's own (42, ``cahp finetune``'s default: its folder in ``$CAHP_HOME/finetuned`` is
reused) and the next ones; the others fine-tune into ``$CAHP_HOME/noise_floor/<model>-<task>-seed<S>`` (a
finished folder is reused, an interrupted one resumes).

    python benchmarks/noise_floor.py --rows minilm-l6:sst5              # 3 seeds: 42, 43, 44
    python benchmarks/noise_floor.py --rows minilm-l6:mnli --num-seeds 5
    python benchmarks/noise_floor.py                                    # every row
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cahp.models import cahp_home
from cahp.settings import TRAINING
from finetune_baselines import ROWS, display_command, ensure_finetuned, finetune_command, finetuned_dir, store_result

RESULTS = Path(__file__).resolve().parent / "results"
NOISE_FLOOR = RESULTS / "noise_floor.json"
#: The training seed of the baselines: ``cahp finetune``'s default (42), which ``finetune_baselines.py`` does not set.
BASELINE_SEED: int = TRAINING["seed"].default
#: Seeds per row unless ``--num-seeds`` says otherwise.
NUM_SEEDS = 3
#: The split whose accuracy is the noise floor (MNLI's offline protocol: validation_mismatched).
SPLIT = "test"

#: ``(seed) -> folder``: a finished ``cahp finetune`` run (its ``metrics.json``) of the row's recipe with that seed.
Finetune = Callable[[int], Path]


def seeds_of(count: int, first: int = BASELINE_SEED) -> list[int]:
    """``count`` training seeds from the baseline's: ``[42, 43, 44]`` for 3."""
    if count < 2:
        raise SystemExit(f"--num-seeds must be at least 2 (a standard deviation needs two), got {count}")
    return list(range(first, first + count))


def seed_folder(model: str, task: str, seed: int) -> Path:
    """Where the fine-tune of ``seed`` lives: the baseline's own folder for its seed, else a folder of its own."""
    if seed == BASELINE_SEED:
        return finetuned_dir(model, task)
    return cahp_home() / "noise_floor" / f"{model}-{task}-seed{seed}"


def seed_command(model: str, task: str, seed: int) -> list[str]:
    """The baseline's ``cahp finetune`` command (:func:`finetune_baselines.finetune_command`) with ``seed`` and its
    folder (the baseline's seed: the baseline command itself)."""
    command = finetune_command(model, task)
    if seed == BASELINE_SEED:
        return command
    out = command.index("--out") + 1
    return [*command[:out], str(seed_folder(model, task, seed)), *command[out + 1 :], "--seed", str(seed)]


def finetune_seed(model: str, task: str, seed: int) -> Path:
    """Fine-tune ``(model, task)`` with ``seed`` unless its folder is finished; return the folder."""
    if seed == BASELINE_SEED:
        return ensure_finetuned(model, task)
    folder = seed_folder(model, task, seed)
    if not (folder / "metrics.json").is_file():
        command = seed_command(model, task, seed)
        print("$", display_command(command), flush=True)
        cahp = Path(sys.executable).with_name("cahp")
        subprocess.run([str(cahp), *command[1:]], check=True)
    return folder


def measure(seeds: Sequence[int], finetune: Finetune, split: str = SPLIT) -> dict[str, Any]:
    """Fine-tune with every seed (``finetune``) and summarise the accuracies on ``split``.

    Returns:
        ``{"split", "per_seed": [{"seed", "<split>_accuracy", "validation_accuracy", "train_seconds",
        "torch_threads"}], "accuracies", "mean", "sd", "n"}`` (``sd``: the sample standard deviation).

    Raises:
        SystemExit: fewer than two seeds, or a run without ``split``.
    """
    if len(set(seeds)) < 2:
        raise SystemExit(f"a noise floor needs at least two distinct seeds, got {list(seeds)}")
    per_seed = []
    for seed in seeds:
        folder = finetune(seed)
        metrics = json.loads((folder / "metrics.json").read_text())
        results = metrics["results"]
        if split not in results:
            raise SystemExit(f"{folder} evaluated {sorted(results)}, not {split!r}")
        per_seed.append(
            {
                "seed": seed,
                f"{split}_accuracy": results[split]["accuracy"],
                "validation_accuracy": results.get("validation", {}).get("accuracy"),
                "train_seconds": metrics.get("train_seconds"),
                "torch_threads": metrics.get("torch_threads"),
            }
        )
    accuracies = [float(row[f"{split}_accuracy"]) for row in per_seed]
    return {
        "split": split,
        "per_seed": per_seed,
        "accuracies": accuracies,
        "mean": statistics.mean(accuracies),
        "sd": statistics.stdev(accuracies),
        "n": len(accuracies),
    }


def row_record(model: str, task: str, seeds: Sequence[int], finetune: Finetune | None = None) -> dict[str, Any]:
    """The ``noise_floor.json`` entry of one row: :func:`measure` with the row's commands (``finetune`` default:
    :func:`finetune_seed`)."""
    measured = measure(seeds, finetune or (lambda seed: finetune_seed(model, task, seed)))
    rows = f"{model}:{task}"
    extra = "" if len(seeds) == NUM_SEEDS and seeds[0] == BASELINE_SEED else f" --num-seeds {len(seeds)}"
    return {
        "model": model,
        "task": task,
        **measured,
        "command": f"python benchmarks/noise_floor.py --rows {rows}{extra}",
        "finetune_commands": {str(seed): display_command(seed_command(model, task, seed)) for seed in seeds},
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=None, help="model:task pairs (default: every baseline row)")
    parser.add_argument("--num-seeds", type=int, default=NUM_SEEDS, help="training seeds per row (at least 2)")
    parser.add_argument("--out", type=Path, default=NOISE_FLOOR, help="the results file (default: %(default)s)")
    args = parser.parse_args(argv)
    rows = [tuple(row.split(":")) for row in args.rows] if args.rows else list(ROWS)
    unknown = [":".join(row) for row in rows if row not in ROWS]
    if unknown:
        raise SystemExit(f"not a row of finetune_baselines.py: {unknown}; rows: {[':'.join(r) for r in ROWS]}")
    seeds = seeds_of(args.num_seeds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for model, task in rows:
        record = row_record(model, task, seeds)
        store_result(args.out, f"{model}:{task}", record)
        shown = ", ".join(f"{accuracy:.4f}" for accuracy in record["accuracies"])
        print(f"{model}:{task}: {SPLIT} accuracy {shown} over seeds {seeds}: sd {record['sd']:.4f}", flush=True)


if __name__ == "__main__":
    main()
