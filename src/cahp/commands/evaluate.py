"""``cahp evaluate``: accuracy, macro-F1 and throughput of a saved model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cahp.commands import command
from cahp.commands.options import add_command_parser, add_task_arguments, positive_int, task_options


def add_parser(sub: Any) -> None:
    """Add ``cahp evaluate`` to the subcommands ``sub``."""
    parser = add_command_parser(sub, "evaluate", "accuracy, macro-F1 and throughput of a saved model")
    parser.add_argument("--model", required=True, help="a saved model folder (pruned models too)")
    parser.add_argument("--split", default="test", help="test, validation, train or all; comma-separated")
    parser.add_argument("--batch-size", type=positive_int, default=64, metavar="N", help="examples per forward pass")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    add_task_arguments(parser)


@command("evaluate", uses_transformers=True)
def run(args: argparse.Namespace) -> int:
    """Evaluate, print one line per split (or the report as JSON)."""
    from cahp.evaluation.evaluate import evaluate

    report = evaluate(args.model, task_options(args), args.split.split(","), args.batch_size)
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
