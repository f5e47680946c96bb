"""``cahp bench``: compare pruning methods over budgets and seeds (a grid of runs, resumable)."""

from __future__ import annotations

import argparse
from typing import Any

from cahp.commands import command
from cahp.commands.options import add_command_parser, check_output_folder


def add_parser(sub: Any) -> None:
    """Add ``cahp bench`` to the subcommands ``sub``."""
    parser = add_command_parser(sub, "bench", "compare pruning methods over budgets and seeds (resumable)")
    parser.add_argument("--config", required=True, help="JSON file: model, task, methods, budgets, seeds, ...")
    parser.add_argument("--out", default=None, help="output folder (default: the config's out)")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")


@command("bench", resumable=True, uses_transformers=True)
def run(args: argparse.Namespace) -> int:
    """Run (or resume) the grid, across the processes of a ``torchrun`` group when launched so."""
    from cahp import distributed
    from cahp.bench import BenchConfig, run_bench

    if args.out is not None:
        check_output_folder(args.out)
    config = BenchConfig.from_file(args.config)
    if args.out is not None:
        config.out = args.out
    distributed.init_from_environment()  # torchrun / accelerate launch: one process group, rank 0 writes
    result = run_bench(config, progress=not args.quiet)
    if distributed.is_main():
        print(f"{result['cells']} cells ({result['computed']} computed now); summary: {result['summary']}")
    distributed.shutdown()
    return 0
