"""``cahp demo``: the main job on the embedded default (MiniLM-L6 on SST-5)."""

from __future__ import annotations

import argparse
from typing import Any

from cahp.commands import command
from cahp.commands.options import add_command_parser


def add_parser(sub: Any) -> None:
    """Add ``cahp demo`` to the subcommands ``sub``."""
    parser = add_command_parser(sub, "demo", "the main job on the embedded default (MiniLM-L6 on SST-5)")
    parser.add_argument(
        "--data-dir", default=None, help="folder holding sst5/<split>.jsonl.gz (default: $CAHP_DATA_DIR, else the hub)"
    )
    parser.add_argument("--refresh", action="store_true", help="redo the cached fine-tuning")


@command("demo", resumable=True, uses_transformers=True)
def run(args: argparse.Namespace) -> int:
    """Run the demo (:func:`cahp.demo.run_demo`)."""
    from cahp.demo import run_demo

    run_demo(data_dir=args.data_dir, refresh=args.refresh)
    return 0
