"""The ``cahp`` command line: builds the parser from the command modules (:mod:`cahp.commands`) and dispatches.
Errors print as one line.

Each command lives in its own module of :mod:`cahp.commands`, which declares its parser and its run function;
this module only puts the parsers together, runs the command asked for and turns its errors into exit statuses.
Like the command modules, it imports only the standard library at the top, so ``cahp --help`` answers at once.

Exit status: 0 done, 1 an error cahp explains (:class:`~cahp.errors.CahpError`, or an unusable path), 2 a usage
error (argparse's, or a bad argument found while building the config), 130 interrupted. Under ``torchrun`` a
usage error is printed by the first process only; every process exits with 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cahp import __version__
from cahp.commands import COMMANDS, command_modules
from cahp.commands.finetune import FINETUNE_FIELDS, finetune_config
from cahp.commands.options import HelpFormatter, Parser, UsageError, first_process
from cahp.commands.prune import LM_FIELDS, METHOD_SETTING_SHORTCUTS, PRUNE_FIELDS, prune_config
from cahp.errors import CahpError

#: What ``cahp.cli`` offers: the entry point and the parser, and (for scripts written against the earlier single
#: module) the config builders and field maps, which live in :mod:`cahp.commands`.
__all__ = [
    "FINETUNE_FIELDS",
    "LM_FIELDS",
    "METHOD_SETTING_SHORTCUTS",
    "PRUNE_FIELDS",
    "UsageError",
    "build_parser",
    "finetune_config",
    "main",
    "prune_config",
]


def build_parser() -> argparse.ArgumentParser:
    """The ``cahp`` parser: each command module adds its own (standard library only: imports nothing heavy)."""
    parser = Parser(
        prog="cahp",
        description="Make Transformer classifiers smaller and faster by removing attention heads.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cahp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in command_modules():
        module.add_parser(sub)
    return parser


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _describe_os_error(error: OSError) -> str:
    """One line for an OSError: what failed, on which path, what to do."""
    reason = error.strerror or str(error) or type(error).__name__
    paths = [str(path) for path in (error.filename, error.filename2) if path is not None]
    where = f" ({' -> '.join(paths)})" if paths else ""
    hint = ""
    if isinstance(error, PermissionError):
        hint = ": choose a folder you can write to"
    elif isinstance(error, NotADirectoryError | FileExistsError | IsADirectoryError):
        hint = ": a file stands where a folder is needed, or the reverse; check --out and the paths given"
    return f"{type(error).__name__}: {reason}{where}{hint}"


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cahp`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Spinning OpenMP threads slow training several-fold when other processes share the cores (set before
    # torch is imported; export OMP_WAIT_POLICY=ACTIVE to override).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    entry = COMMANDS[args.command]
    try:
        if entry.uses_transformers:
            _quiet_transformers()
        return entry.run(args)
    except UsageError as error:
        if first_process():  # under torchrun: once, not once per process
            print(f"cahp {args.command}: error: {error}", file=sys.stderr)
        return 2
    except CahpError as error:
        print(f"cahp: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into a command that stopped reading (`cahp methods | head`)
        _silence_stdout()
        return 141
    except OSError as error:
        print(f"cahp: error: {_describe_os_error(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = "; run the same command again to resume" if entry.resumable else ""
        print(f"cahp: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
