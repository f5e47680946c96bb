"""What the command modules share: argument types, the help formatter, options that map to config fields, the
task and training argument groups, and the steps from parsed arguments to a config.

Standard library only at the top (like every command module): building the parser imports nothing heavy.

Options that map to a config field default to ``None`` in the parser, so that a replay (``--config FILE``) can
tell a flag that was given from one that was not; the help shows the config's default (:func:`option`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from cahp.errors import CahpError

Config = TypeVar("Config")


class UsageError(Exception):
    """A bad command-line argument found after parsing (printed as ``cahp COMMAND: error: ...``, exit 2)."""


def first_process() -> bool:
    """Whether this process prints messages every process would print alike: rank 0 of a ``torchrun`` /
    ``accelerate launch`` group (``RANK`` ``0``), or a process started alone (no ``RANK``)."""
    return os.environ.get("RANK", "0") in ("", "0")


class Parser(argparse.ArgumentParser):
    """A parser whose usage errors are one line (with where to read more), not the usage block.

    Under ``torchrun`` only the first process prints it; every process exits with status 2.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n" if first_process() else None)


def command_line() -> str:
    """The command as typed (recorded in run records)."""
    return shlex.join(["cahp", *sys.argv[1:]])


# ---- argument types: refuse bad values while parsing, before any work ------------------------------------------


def _number(kind: type, what: str, accept: Callable[[float], bool]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value != value or not accept(value):  # value != value: NaN
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


positive_int = _number(int, "a whole number of at least 1", lambda value: value >= 1)
class_count = _number(int, "a whole number of at least 2 (classes)", lambda value: value >= 2)
seed_value = _number(int, "a whole number in 0..4294967295", lambda value: 0 <= value < 2**32)  # loop.SEEDS
positive_float = _number(float, "a number above 0", lambda value: 0 < value < float("inf"))
non_negative_float = _number(float, "a number of at least 0", lambda value: 0 <= value < float("inf"))
open_fraction = _number(float, "a number strictly between 0 and 1", lambda value: 0 < value < 1)
fraction_up_to_one = _number(float, "a number above 0 and at most 1", lambda value: 0 < value <= 1)
fraction_below_one = _number(float, "a number of at least 0 and below 1", lambda value: 0 <= value < 1)
unit_interval = _number(float, "a number from 0 to 1", lambda value: 0 <= value <= 1)


def comma_list(text: str) -> list[str]:
    """``"premise,hypothesis"`` -> ``["premise", "hypothesis"]`` (no empty entries)."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"must be comma-separated names without empty entries, got {text!r}")
    return items


#: Short placeholders in the usage line, by argument type.
METAVARS: dict[Callable[[str], Any], str] = {
    positive_int: "N",
    class_count: "N",
    seed_value: "N",
    positive_float: "X",
    non_negative_float: "X",
    open_fraction: "F",
    fraction_up_to_one: "F",
    fraction_below_one: "F",
    unit_interval: "F",
    comma_list: "A,B",
}


def budget_text(text: str) -> str:
    """``auto``, ``keep=K`` or ``sparsity=S``, checked and normalised."""
    from cahp.methods.plan import Budget

    try:
        return Budget.parse(text).label()
    except CahpError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# ---- options that map to config fields -------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default: the config's (written into the help by :func:`option`) or argparse's."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default:" in text or action.required or not action.option_strings:
            return text
        return super()._get_help_string(action)


def add_command_parser(sub: Any, name: str, about: str, **kwargs: Any) -> argparse.ArgumentParser:
    """The parser of ``cahp NAME`` (``about``: its one-line help and description)."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=about, description=about, formatter_class=HelpFormatter, **kwargs
    )
    return parser


def option(
    group: Any, *flags: str, default: Any, help: str, shown: str | None = None, **kwargs: Any
) -> argparse.Action:
    """An option that sets a config field: parsed with default ``None`` (not given: the config keeps its value),
    documented with the config's ``default`` (or the text ``shown``). The default is kept on the action as
    ``config_default`` so a test can check it against the config dataclass."""
    if shown is None:
        shown = ",".join(default) if isinstance(default, list | tuple) else str(default)
    if "metavar" not in kwargs and kwargs.get("type") in METAVARS:
        kwargs["metavar"] = METAVARS[kwargs["type"]]
    action: argparse.Action = group.add_argument(*flags, default=None, help=f"{help} (default: {shown})", **kwargs)
    action.config_default = default  # type: ignore[attr-defined]
    return action


def subset_option(group: Any, flag: str, help: str) -> argparse.Action:
    """A number of examples to subsample to (a config field whose default ``None`` is the whole split)."""
    return option(group, flag, default=None, type=positive_int, shown="the whole split", help=help)


def flag(group: Any, *flags: str, default: bool, help: str) -> argparse.Action:
    """A yes/no config field: ``--name`` / ``--no-name`` (the second overrides a replayed ``true``)."""
    return option(group, *flags, default=default, help=help, action=argparse.BooleanOptionalAction)


#: Options named as the TaskOptions field they set (shared by finetune, prune, evaluate and analyze).
TASK_FIELDS = ("task", "data_dir", "protocol", "text_columns", "label_column", "num_labels", "max_length")

#: Options named as the TrainingConfig field they set (finetune's training, prune's recovery).
TRAINING_FIELDS = ("batch_size", "warmup_ratio", "weight_decay", "checkpoint_every", "group_by_length")


def add_config_file_argument(parser: argparse.ArgumentParser, command_name: str) -> None:
    """``--config FILE``: replay a run of ``cahp COMMAND_NAME``."""
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help=f"replay a run: its run_config.json (or the run's folder), or a hand-written JSON file of {command_name} "
        "settings; flags given here override it (default: no file, the defaults below)",
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out`` (an output folder) and ``--overwrite``."""
    parser.add_argument(
        "--out",
        required=True,
        help="output folder (refused if it holds results; a replay needs a new one or --overwrite)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out once the run finishes")


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``task and data`` group: the options of :data:`TASK_FIELDS`."""
    group = parser.add_argument_group("task and data")
    option(group, "--task", default="sst5", help="sst5, sst2, mnli, a local folder or a hub dataset id")
    option(
        group,
        "--data-dir",
        default=None,
        shown="$CAHP_DATA_DIR, else the hub",
        help="folder holding <task>/<split>.jsonl.gz",
    )
    option(
        group,
        "--protocol",
        default="auto",
        choices=["auto", "standard", "offline"],
        help="MNLI: standard (hub train split) or offline (train on validation_matched minus 10%%)",
    )
    option(
        group,
        "--text-columns",
        default=None,
        type=comma_list,
        shown="the task's",
        help="comma-separated text columns, e.g. premise,hypothesis",
    )
    option(group, "--label-column", default="label", help="the column of the labels")
    option(
        group,
        "--num-labels",
        default=None,
        type=class_count,
        shown="the largest label + 1",
        help="number of classes, for integer labels",
    )
    option(group, "--max-length", default=128, type=positive_int, help="tokens per example")


def add_training_arguments(group: Any, *, group_by_length: bool = False, recovery: bool = False) -> None:
    """The training options finetune and prune's recovery share (each adds its own epochs and learning rate;
    ``group_by_length``: the config's default; ``recovery``: prune's, whose defaults are the objective's recipe,
    with ``--recovery-batch-size`` as a second name of ``--batch-size``)."""
    lm = _causal_lm_recovery() if recovery else None

    def shown(name: str, value: Any) -> str | None:
        return None if lm is None else f"{value:g} (causal-lm: {getattr(lm, name):g})"

    batch_flags = ("--batch-size", "--recovery-batch-size") if recovery else ("--batch-size",)
    option(group, *batch_flags, default=32, type=positive_int, shown=shown("batch_size", 32), help="examples per step")
    option(
        group,
        "--warmup-ratio",
        default=0.1,
        type=fraction_below_one,
        shown=shown("warmup_ratio", 0.1),
        help="share of steps of linear warm-up",
    )
    option(
        group,
        "--weight-decay",
        default=0.01,
        type=non_negative_float,
        shown=shown("weight_decay", 0.01),
        help="AdamW weight decay",
    )
    option(
        group,
        "--checkpoint-every",
        default=200,
        type=positive_int,
        shown=shown("checkpoint_every", 200),
        help="steps between resume checkpoints",
    )
    flag(
        group,
        "--group-by-length",
        default=group_by_length,
        help="train on batches of similar length (shuffled): less padding, faster on CPU"
        + (" (causal-lm: blocks have one length)" if recovery else ""),
    )


def _causal_lm_recovery() -> Any:
    """The causal-lm recovery recipe, for the help text (read without importing torch)."""
    from types import SimpleNamespace

    from cahp.workloads import RECOVERY_RECIPES

    return SimpleNamespace(**RECOVERY_RECIPES["causal-lm"])


# ---- from arguments to configs ----------------------------------------------------------------------------------


def replace_path(config: Any, path: str, value: Any) -> Any:
    """A copy of dataclass ``config`` with the field at dotted ``path`` set to ``value``."""
    head, _, rest = path.partition(".")
    if rest:
        value = replace_path(getattr(config, head), rest, value)
    elif isinstance(value, list) and isinstance(getattr(config, head), tuple):
        value = tuple(value)
    return dataclasses.replace(config, **{head: value})


def apply_options(config: Config, args: argparse.Namespace, fields: Mapping[str, Sequence[str]]) -> Config:
    """``config`` with every option of ``fields`` that was given (not ``None``) written to its path(s)."""
    for dest, paths in fields.items():
        value = getattr(args, dest, None)
        if value is not None:
            for path in paths:
                config = replace_path(config, path, value)
    return config


def task_options(args: argparse.Namespace) -> Any:
    """The :class:`~cahp.train.finetune.TaskOptions` of the task options given (the defaults for the others)."""
    from cahp.train.finetune import TaskOptions

    return apply_options(TaskOptions(), args, {name: (name,) for name in TASK_FIELDS})


def read_config(path: str, command_name: str) -> dict[str, Any]:
    """The JSON object of ``--config``: a file, or a run folder holding ``run_config.json``."""
    from cahp.config import read_config_file

    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "run_config.json"
    raw = read_config_file(file)
    recorded = raw.get("command")
    if recorded == "prune-lm" and command_name == "prune":  # the alias's runs replay through prune
        recorded = "prune"
    if recorded not in (None, command_name):
        raise CahpError(
            f"config file {file} records a `cahp {recorded}` run, not a `cahp {command_name}` one: replay it with "
            f"`cahp {recorded} --config {path}`"
        )
    return raw


def check_output_folder(out: str) -> None:
    """Refuse an ``--out`` that cannot become a folder, before any work (a usage error)."""
    from cahp.outputs import check_output_target

    try:
        check_output_target(out, overwrite=True)  # whether it holds results: the run checks, knowing --overwrite
    except CahpError as error:
        raise UsageError(str(error)) from None
