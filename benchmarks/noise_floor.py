"""The noise floor: how much a dense fine-tune's test accuracy moves when only its training seed changes.

A row is a checkpoint that bench grids prune, named by its folder under ``$CAHP_HOME``: a baseline of
``finetune_baselines.py`` (``finetuned/minilm-l6-sst5``, ...) or any finished ``cahp finetune`` run there
(``demo/minilm-l6-sst5``: ``cahp demo``'s; ``finetuned/minilm-l6-mnli-grouped``: the reconstruction study's). Its
recipe is fine-tuned again with other training seeds (a baseline: its ``finetune_baselines.py`` command plus
``--seed S``; any other run: ``cahp finetune --config <its folder> --seed S``); the seed shuffles the batches, draws
the dropout masks and initialises the classification head. Each seed is evaluated on the test split (``--split
validation`` for a task without a labelled one, SST-2), and the per-seed accuracies, their mean and their sample
standard deviation are recorded in ``benchmarks/results/noise_floor.json`` under the row's name. Every bench summary
of a grid on that checkpoint prints the standard deviation beside its tables
(:func:`cahp.reporting.bench_report.grid_noise_floor`); a grid on another checkpoint of the same model and task
prints it as measured on that other recipe.

The first seed is the checkpoint's own (42, ``cahp finetune``'s default): its test accuracy is read from its
``metrics.json``, from ``finetune_baselines.json`` for a baseline whose folder is not on this machine (the recorded
command must be today's), or by evaluating the folder when its run did not test. The other seeds fine-tune into
``$CAHP_HOME/noise_floor/<row>-seed<S>`` (a finished folder of the same recipe is reused, an interrupted one
resumes; a folder of another recipe is refused).

    python benchmarks/noise_floor.py --rows demo/minilm-l6-sst5              # 3 seeds: 42, 43, 44
    python benchmarks/noise_floor.py --rows finetuned/mpnet-base-mnli --num-seeds 2
    python benchmarks/noise_floor.py                                         # every baseline row
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cahp.models import cahp_home
from cahp.settings import TRAINING
from finetune_baselines import ROWS, display_command, finetune_command, read_results, store_result

RESULTS = Path(__file__).resolve().parent / "results"
NOISE_FLOOR = RESULTS / "noise_floor.json"
BASELINES = RESULTS / "finetune_baselines.json"
#: The training seed of every checkpoint here: ``cahp finetune``'s default (42), which none of them sets.
BASELINE_SEED: int = TRAINING["seed"].default
#: Seeds per row unless ``--num-seeds`` says otherwise.
NUM_SEEDS = 3
#: The split whose accuracy is the noise floor (MNLI's offline protocol: validation_mismatched).
SPLIT = "test"
#: What may differ between two runs of one recipe: the seed, the splits evaluated, where the data was read from.
RUN_VARIABLES = {("training", "seed"), ("eval_splits",), ("task", "data_dir"), ("command",)}

#: ``(seed) -> per-seed row``: ``{"seed", "<split>_accuracy", "validation_accuracy", "train_loss", "train_seconds",
#: "torch_threads", "source"}`` of the row's recipe trained with that seed.
SeedResult = Callable[[int], dict[str, Any]]


@dataclass(frozen=True)
class Recipe:
    """One row: the checkpoint folder ``$CAHP_HOME/<name>``, its model and task, and whether it is a baseline of
    ``finetune_baselines.py`` (else a finished run that is replayed from its folder)."""

    name: str
    model: str
    task: str
    baseline: bool
    split: str = SPLIT

    @property
    def checkpoint(self) -> Path:
        return cahp_home() / self.name

    def seed_folder(self, seed: int) -> Path:
        """Where ``seed``'s fine-tune lives: the checkpoint for its own seed, else a folder of its own."""
        if seed == BASELINE_SEED:
            return self.checkpoint
        return cahp_home() / "noise_floor" / f"{self.name.removeprefix('finetuned/').replace('/', '-')}-seed{seed}"

    def command(self, seed: int) -> list[str]:
        """The ``cahp finetune`` command of ``seed``: a baseline's command (its own seed: the baseline command
        itself) with ``--seed``, or a replay of the checkpoint's run with ``--seed`` that also tests.

        Raises:
            ValueError: the own seed of a replayed run (its folder is that fine-tune).
        """
        if self.baseline:
            command = finetune_command(self.model, self.task)
            if seed == BASELINE_SEED:
                return command
            out = command.index("--out") + 1
            return [*command[:out], str(self.seed_folder(seed)), *command[out + 1 :], "--seed", str(seed)]
        if seed == BASELINE_SEED:
            raise ValueError(f"$CAHP_HOME/{self.name} is seed {seed}'s fine-tune: it is not made again")
        return [
            *("cahp", "finetune", "--config", str(self.checkpoint), "--out", str(self.seed_folder(seed))),
            *("--eval-splits", ",".join(dict.fromkeys(["validation", self.split])), "--seed", str(seed)),
        ]


def baseline_rows() -> list[str]:
    """The rows of ``finetune_baselines.py``: ``finetuned/<model>-<task>``."""
    return [f"finetuned/{model}-{task}" for model, task in ROWS]


def recipe_of(name: str, split: str = SPLIT) -> Recipe:
    """The recipe of row ``name``, scored on ``split``: a baseline's command, or a replay of the finished run in
    ``$CAHP_HOME/<name>``.

    Raises:
        SystemExit: neither (one line saying what rows there are).
    """
    for model, task in ROWS:
        if name == f"finetuned/{model}-{task}":
            return Recipe(name, model, task, True, split)
    folder = cahp_home() / name
    config = folder / "run_config.json"
    if not (folder / "metrics.json").is_file() or not config.is_file():
        raise SystemExit(
            f"{name!r} is neither a row of finetune_baselines.py ({', '.join(baseline_rows())}) nor a finished "
            f"`cahp finetune` run in {folder}: give a folder name under $CAHP_HOME"
        )
    recorded = json.loads(config.read_text())
    task = recorded["task"]["task"] if isinstance(recorded.get("task"), dict) else recorded.get("task")
    return Recipe(name, str(recorded["model"]), str(task), False, split)


def _without(config: dict[str, Any], paths: set[tuple[str, ...]]) -> dict[str, Any]:
    kept = {key: value for key, value in config.items() if (key,) not in paths}
    for key, value in kept.items():
        if isinstance(value, dict):
            kept[key] = {k: v for k, v in value.items() if (key, k) not in paths}
    return kept


def check_same_recipe(folder: Path, reference: Path, seed: int) -> None:
    """Refuse ``folder`` unless its run is ``reference``'s recipe trained with ``seed`` (see :data:`RUN_VARIABLES`).

    Raises:
        SystemExit: another seed or another recipe, naming the settings that differ.
    """
    run = json.loads((folder / "run_config.json").read_text())
    if run.get("training", {}).get("seed") != seed:
        raise SystemExit(f"{folder} was trained with seed {run.get('training', {}).get('seed')}, not {seed}: move it")
    if not (reference / "run_config.json").is_file():
        return
    expected = _without(json.loads((reference / "run_config.json").read_text()), RUN_VARIABLES)
    found = _without(run, RUN_VARIABLES)
    if found != expected:
        differing = sorted(key for key in {*expected, *found} if expected.get(key) != found.get(key))
        raise SystemExit(f"{folder} holds another recipe than {reference} ({', '.join(differing)} differ): move it")


def _row(seed: int, split: str, accuracy: float, record: dict[str, Any], source: str) -> dict[str, Any]:
    """A per-seed row: ``accuracy`` on ``split``, the rest from ``record`` (a run's ``metrics.json`` or a baseline's
    ``finetune_baselines.json`` entry)."""
    results = record.get("results", {})
    history = record.get("history") or [{}]
    return {
        "seed": seed,
        f"{split}_accuracy": accuracy,
        "validation_accuracy": results.get("validation", {}).get("accuracy", record.get("validation_accuracy")),
        "train_loss": history[-1].get("train_loss"),  # the last epoch's mean (None: a record without history)
        "train_seconds": record.get("train_seconds"),
        "torch_threads": record.get("torch_threads"),
        "source": source,
    }


def folder_result(folder: Path, seed: int, split: str = SPLIT, source: str = "fine-tuned") -> dict[str, Any]:
    """The per-seed row of a finished fine-tune in ``folder``.

    Raises:
        SystemExit: its run did not evaluate ``split``.
    """
    metrics = json.loads((folder / "metrics.json").read_text())
    if split not in metrics["results"]:
        raise SystemExit(f"{folder} evaluated {sorted(metrics['results'])}, not {split!r}")
    return _row(seed, split, metrics["results"][split]["accuracy"], metrics, source)


def _evaluated(folder: Path, seed: int, split: str) -> dict[str, Any]:
    """The checkpoint's own seed when its run did not test: evaluated now with its recorded task settings."""
    from cahp.evaluation.evaluate import evaluate
    from cahp.train import TaskOptions

    run = json.loads((folder / "run_config.json").read_text())
    options = {**run["task"], "data_dir": os.environ.get("CAHP_DATA_DIR") or run["task"].get("data_dir")}
    report = evaluate(folder, TaskOptions(**options), [split])
    metrics = json.loads((folder / "metrics.json").read_text())
    accuracy = report["results"][split]["accuracy"]
    return _row(seed, split, accuracy, metrics, "evaluated now: its run tested no split")


def _recorded(recipe: Recipe) -> dict[str, Any] | None:
    """A baseline's own seed as ``finetune_baselines.json`` recorded it, if its command is today's."""
    record = read_results(BASELINES).get(f"{recipe.model}:{recipe.task}")
    if not recipe.baseline or not isinstance(record, dict):
        return None
    if record.get("command") != display_command(recipe.command(BASELINE_SEED)):
        return None
    accuracy = record[f"{recipe.split}_accuracy"]
    return _row(BASELINE_SEED, recipe.split, accuracy, record, "recorded in benchmarks/results/finetune_baselines.json")


def seed_result(recipe: Recipe, seed: int) -> dict[str, Any]:
    """``seed``'s row of ``recipe``: its own seed from the checkpoint (or its record), the others fine-tuned unless
    a finished folder of the same recipe holds them."""
    folder = recipe.seed_folder(seed)
    if seed == BASELINE_SEED:
        if (folder / "metrics.json").is_file():
            metrics = json.loads((folder / "metrics.json").read_text())
            if recipe.split in metrics["results"]:
                return folder_result(folder, seed, recipe.split, "the checkpoint's own run")
            return _evaluated(folder, seed, recipe.split)
        recorded = _recorded(recipe)
        if recorded is not None:
            return recorded
    elif (folder / "metrics.json").is_file():
        check_same_recipe(folder, recipe.checkpoint, seed)
        return folder_result(folder, seed, recipe.split)
    command = recipe.command(seed)
    print("$", display_command(command), flush=True)
    subprocess.run([str(Path(sys.executable).with_name("cahp")), *command[1:]], check=True)
    return folder_result(folder, seed, recipe.split)


def seeds_of(count: int, first: int = BASELINE_SEED) -> list[int]:
    """``count`` training seeds from the baseline's: ``[42, 43, 44]`` for 3."""
    if count < 2:
        raise SystemExit(f"--num-seeds must be at least 2 (a standard deviation needs two), got {count}")
    return list(range(first, first + count))


def measure(seeds: Sequence[int], result_of: SeedResult, split: str = SPLIT) -> dict[str, Any]:
    """Every seed's row (``result_of``) and the summary of their accuracies on ``split``.

    Returns:
        ``{"split", "per_seed", "accuracies", "mean", "sd", "n"}`` (``sd``: the sample standard deviation).

    Raises:
        SystemExit: fewer than two distinct seeds.
    """
    if len(set(seeds)) < 2:
        raise SystemExit(f"a noise floor needs at least two distinct seeds, got {list(seeds)}")
    per_seed = [result_of(seed) for seed in seeds]
    accuracies = [float(row[f"{split}_accuracy"]) for row in per_seed]
    return {
        "split": split,
        "per_seed": per_seed,
        "accuracies": accuracies,
        "mean": statistics.mean(accuracies),
        "sd": statistics.stdev(accuracies),
        "n": len(accuracies),
    }


def row_record(recipe: Recipe, seeds: Sequence[int], result_of: SeedResult | None = None) -> dict[str, Any]:
    """The ``noise_floor.json`` entry of one row: :func:`measure` with the row's commands (``result_of`` default:
    :func:`seed_result`)."""
    measured = measure(seeds, result_of or (lambda seed: seed_result(recipe, seed)), recipe.split)
    extra = "" if len(seeds) == NUM_SEEDS and seeds[0] == BASELINE_SEED else f" --num-seeds {len(seeds)}"
    extra += "" if recipe.split == SPLIT else f" --split {recipe.split}"
    return {
        "model": recipe.model,
        "task": recipe.task,
        "checkpoint": f"$CAHP_HOME/{recipe.name}",
        **measured,
        "command": f"python benchmarks/noise_floor.py --rows {recipe.name}{extra}",
        "finetune_commands": {
            str(seed): display_command(recipe.command(seed))
            if recipe.baseline or seed != BASELINE_SEED
            else f"the checkpoint itself ($CAHP_HOME/{recipe.name})"
            for seed in seeds
        },
    }


def _whole_split_dense(grid: Path, split: str) -> float | None:
    """The dense accuracy a grid measured on the whole of ``split`` (None: not measured, or on a subset)."""
    dense_file = grid / "dense.json"
    if not dense_file.is_file():
        return None
    dense = json.loads(dense_file.read_text())
    scored = dense.get("accuracy", {}).get(split)
    if not scored or scored.get("examples") != dense.get("task", {}).get("split_sizes", {}).get(split):
        return None
    return float(scored["accuracy"])


def grids_reading(records: dict[str, Any], bench: Path = RESULTS / "bench") -> dict[str, dict[str, list[str]]]:
    """Per row: the published grids whose summaries print its spread, ``{"own": [...], "stand_in": [...]}`` (their
    own checkpoint, or another recipe of the same model and task: :func:`grid_noise_floor`), and under
    ``"other_fine_tune"`` the own grids whose dense model scores otherwise than the row's first seed (the checkpoint)
    on the whole split: they pruned another fine-tune of the recipe than the one measured, as ``"grid (accuracy)"``."""
    from cahp.reporting.bench_report import noise_floor_of

    readers: dict[str, dict[str, list[str]]] = {
        row: {"own": [], "stand_in": [], "other_fine_tune": []} for row in records
    }
    for config in sorted(bench.glob("*/bench_config.json")):
        grid = json.loads(config.read_text())
        if grid.get("objective") == "causal-lm":
            continue
        floor = noise_floor_of(grid, records, "benchmarks/results/noise_floor.json")
        if not floor["measured"]:
            continue
        row = floor["measured_on"]
        own = row == floor["key"]
        readers[row]["own" if own else "stand_in"].append(config.parent.name)
        split = records[row]["split"]
        dense = _whole_split_dense(config.parent, split) if own else None
        if dense is not None and round(dense, 4) != round(records[row]["per_seed"][0][f"{split}_accuracy"], 4):
            readers[row]["other_fine_tune"].append(f"{config.parent.name} ({dense:.4f})")
    return readers


def write_table(
    records: dict[str, Any], out: Path = RESULTS / "noise_floor.md", bench: Path = RESULTS / "bench"
) -> Path:
    """``results/noise_floor.md``: every row's accuracies per seed, their mean and sd, and the grids that print it."""
    readers = grids_reading(records, bench)
    lines = [
        "# The noise floor: a dense fine-tune's accuracy over training seeds",
        "",
        "Each row fine-tunes the recipe of a checkpoint that bench grids prune again with other training seeds (batch",
        "order, dropout, the classification head's initialisation) and scores every seed on the same split. `sd`: the",
        "sample standard deviation over the seeds, the spread that retraining alone gives; a bench summary prints it",
        "beside its tables. Machine: 2 CPU cores, each fine-tune on 1 thread. Written by",
        "`python benchmarks/noise_floor.py` (each row's command below).",
        "",
        "| checkpoint | model | task | split | accuracy per seed (seed: value) | mean | sd | n | grids printing it |",
        "|---|---|---|---|---|---:|---:|---:|---|",
    ]
    for name, row in sorted(records.items()):
        per_seed = ", ".join(f"{entry['seed']}: {entry[row['split'] + '_accuracy']:.4f}" for entry in row["per_seed"])
        grids = readers[name]
        shown = f"{len(grids['own'])} on it" + (f", {len(grids['stand_in'])} as stand-in" if grids["stand_in"] else "")
        lines.append(
            f"| `{name}` | {row['model']} | {row['task']} | {row['split']} | {per_seed} | {row['mean']:.4f} "
            f"| {row['sd']:.4f} | {row['n']} | {shown} |"
        )
    lines += ["", "Stand-in: a grid on another recipe of the same model and task, its own checkpoint unmeasured.", ""]
    for name, row in sorted(records.items()):
        lines += [f"`{name}`: `{row['command']}`", ""]
        for entry in row["per_seed"]:
            command = row["finetune_commands"][str(entry["seed"])]
            shown = f"`{command}`" if command.startswith("cahp ") else command
            lines.append(f"- seed {entry['seed']} ({entry['source']}): {shown}")
        if readers[name]["stand_in"]:
            lines.append(f"- stand-in for: {', '.join(readers[name]['stand_in'])}")
        if readers[name]["other_fine_tune"]:
            first = row["per_seed"][0]
            lines.append(
                f"- grids whose dense model is not the checkpoint measured here (its accuracy on the whole "
                f"{row['split']} split in brackets; seed {first['seed']}'s checkpoint as measured: "
                f"{first[row['split'] + '_accuracy']:.4f}): {', '.join(readers[name]['other_fine_tune'])}. They pruned "
                "another fine-tune of this recipe."
            )
        lines.append("")
    out.write_text("\n".join(lines))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rows", nargs="*", default=None, help="checkpoint folders under $CAHP_HOME (default: every baseline row)"
    )
    parser.add_argument("--num-seeds", type=int, default=NUM_SEEDS, help="training seeds per row (at least 2)")
    parser.add_argument(
        "--split",
        default=SPLIT,
        choices=("test", "validation"),
        help="the split scored (default: %(default)s; SST-2, which has no labelled test split: validation)",
    )
    parser.add_argument("--out", type=Path, default=NOISE_FLOOR, help="the results file (default: %(default)s)")
    parser.add_argument("--table-only", action="store_true", help="rewrite results/noise_floor.md; fine-tune nothing")
    args = parser.parse_args(argv)
    if args.table_only:
        print(write_table(read_results(args.out)).read_text())
        return
    seeds = seeds_of(args.num_seeds)
    recipes = [recipe_of(name, args.split) for name in (args.rows or baseline_rows())]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for recipe in recipes:
        record = row_record(recipe, seeds)
        store_result(args.out, recipe.name, record)
        shown = ", ".join(f"{accuracy:.4f}" for accuracy in record["accuracies"])
        print(f"{recipe.name}: {recipe.split} accuracy {shown} over seeds {seeds}: sd {record['sd']:.4f}", flush=True)
    if args.out == NOISE_FLOOR:
        print(f"wrote {write_table(read_results(args.out))}")


if __name__ == "__main__":
    main()
