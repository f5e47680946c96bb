"""``cahp analyze``: what each attention head does (sinks, special-token and dormant heads, adjacent-layer
redundancy), written as one JSON file and one HTML page beside it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from cahp.commands import command
from cahp.commands.options import (
    add_command_parser,
    add_task_arguments,
    command_line,
    positive_int,
    seed_value,
    task_options,
)


def add_parser(sub: Any) -> None:
    """Add ``cahp analyze`` to the subcommands ``sub``."""
    about = "what each attention head does: sinks, special-token and dormant heads, adjacent-layer redundancy"
    parser = add_command_parser(sub, "analyze", about)
    parser.add_argument("--model", required=True, help="an unpruned model: alias (`cahp models`), folder or hub id")
    parser.add_argument("--out", required=True, metavar="FILE.json", help="the JSON file to write (docs/analysis.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--calibration-size",
        type=positive_int,
        default=256,
        metavar="N",
        help="calibration examples (class-stratified subset of the task's calibration split)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="examples per forward pass")
    parser.add_argument("--seed", type=seed_value, default=0, metavar="N", help="picks the calibration subset")
    parser.add_argument(
        "--cahp",
        action="store_true",
        help="also fit CAHP on the same examples and record each head's cluster and whether CAHP keeps it",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--objective",
        default="classification",
        choices=["classification", "causal-lm"],
        help="classification: the examples of --task; causal-lm: a decoder LLM on blocks of --corpus (--cahp "
        "needs classes: classification only)",
    )
    add_task_arguments(parser)
    from cahp.commands.options import config_option
    from cahp.settings import LM

    text = parser.add_argument_group("causal-lm: the calibration blocks (also --data-dir)")
    for name in ("corpus", "corpus_column", "context_length", "stride", "calibration_blocks"):
        config_option(text, LM[name], name)


#: The causal-lm text options of ``cahp analyze`` (``LMOptions`` fields).
LM_TEXT = ("corpus", "corpus_column", "context_length", "stride", "calibration_blocks", "data_dir")


def lm_options(args: argparse.Namespace) -> Any:
    """The causal-lm text settings of ``cahp analyze``: the given options; no prompted tasks, one evaluation
    block (the analysis reads the calibration blocks only)."""
    from cahp.commands.options import UsageError
    from cahp.workloads.causal_lm import LMOptions

    given = {name: getattr(args, name) for name in LM_TEXT if getattr(args, name, None) is not None}
    if args.objective != "causal-lm":
        stray = [f"--{name.replace('_', '-')}" for name in given if name != "data_dir"]
        if stray:
            raise UsageError(f"{', '.join(stray)} set the causal-lm objective's text; add --objective causal-lm")
        return None
    return LMOptions(**given, prompted=(), eval_blocks=1)


def check_output(out: str, overwrite: bool) -> Path:
    """The absolute path of ``--out`` after refusing, before the model or the data is loaded, a file the run could
    not or must not write: a folder, one under a missing folder or in a folder without write permission, or an
    existing file (or page beside it) without ``--overwrite``.

    Raises:
        OutputError: the file cannot be written.
        OutputExistsError: it exists and ``overwrite`` is false.
    """
    from cahp.analysis.run import check_output_file
    from cahp.errors import OutputError

    path = check_output_file(out, overwrite)
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise OutputError(f"--out {path}: no permission to write in {path.parent}; choose a folder you can write to")
    return path


@command("analyze", uses_transformers=True)
def run(args: argparse.Namespace) -> int:
    """Analyse the heads, print the summary and where the files are."""
    check_output(args.out, args.overwrite)  # before any work
    from cahp.analysis.run import analyze, summary
    from cahp.reporting.html_report import analysis_html_path

    lm = lm_options(args)
    payload = analyze(
        args.model,
        task_options(args),
        args.out,
        objective=args.objective,
        lm=lm,
        calibration_size=args.calibration_size,
        batch_size=args.batch_size,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.quiet,
        command=command_line(),
        cahp=args.cahp,
    )
    print(summary(payload))
    print(f"head analysis saved to {args.out} (one page: {analysis_html_path(Path(args.out))})")
    return 0
