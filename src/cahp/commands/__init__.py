"""The ``cahp`` commands: one module per command, each declaring its parser (``add_parser(sub)``) and its run
function (registered with :func:`command`). :mod:`cahp.cli` builds the parser from :data:`COMMAND_MODULES` and
dispatches to :data:`COMMANDS`.

A command module parses, builds a config and calls the library; the library never imports a command module.
Every module imports only the standard library (and light cahp modules) at the top: torch, transformers and
NumPy are imported by the run functions that need them, so ``cahp --help`` and ``cahp methods`` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

#: The command modules, in the order ``cahp --help`` lists their commands.
COMMAND_MODULES = ("finetune", "evaluate", "prune", "export", "analyze", "bench", "demo", "listing")


@dataclass(frozen=True)
class Command:
    """A subcommand: what it runs and how it behaves when it fails.

    Attributes:
        run: the function, given the parsed arguments; returns the exit status.
        resumable: an interrupted run continues when the same command is given again.
        uses_transformers: quiet transformers' logging and progress bars before running.
    """

    run: Callable[[argparse.Namespace], int]
    resumable: bool = False
    uses_transformers: bool = False


#: ``cahp NAME`` -> its command (filled as the command modules are imported: :func:`command_modules`).
COMMANDS: dict[str, Command] = {}


def command(
    name: str, *, resumable: bool = False, uses_transformers: bool = False
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register the decorated function as ``cahp NAME``."""

    def register(function: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(function, resumable, uses_transformers)
        return function

    return register


def command_modules() -> list[ModuleType]:
    """The command modules (imported, so every command is in :data:`COMMANDS`), in :data:`COMMAND_MODULES` order."""
    return [importlib.import_module(f"{__name__}.{name}") for name in COMMAND_MODULES]


__all__ = ["COMMANDS", "COMMAND_MODULES", "Command", "command", "command_modules"]
