"""What the command modules share: argument types, the help formatter, options that map to config fields, the
task and training argument groups, and the steps from parsed arguments to a config.

Standard library only at the top (like every command module): building the parser imports nothing heavy.

Options that map to a config field are generated from the field's :class:`~cahp.settings.FieldSpec` (its default,
help, flags and type: :func:`config_option`), the way ``transformers.HfArgumentParser`` builds options from dataclass
fields, so a default is written once. They default to ``None`` in the parser, so that a replay (``--config FILE``)
can tell a flag that was given from one that was not; the help shows the config's default.
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
from cahp.settings import TASK, TRAINING, FieldSpec

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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list[Callable[[argparse.ArgumentParser], None]] = []

    def defer(self, add: Callable[[argparse.ArgumentParser], None]) -> None:
        """Call ``add(self)`` before this parser is first used (parsing, help, usage), not while it is built: for
        options read from somewhere slower than the parser itself (the method registry)."""
        self._deferred.append(add)

    def complete(self) -> Parser:
        """Add the deferred options now (they are added on first use anyway); returns self."""
        while self._deferred:
            self._deferred.pop(0)(self)
        return self

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:  # argparse's own signature, overloaded
        self.complete()
        return super().parse_known_args(*args, **kwargs)

    def format_usage(self) -> str:
        self.complete()
        return super().format_usage()

    def format_help(self) -> str:
        self.complete()
        return super().format_help()

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
    """``auto``, ``keep=K``, ``sparsity=S``, ``flops=F`` or ``latency=L``, checked and normalised."""
    from cahp.methods.plan import Budget

    try:
        return Budget.parse(text).label()
    except CahpError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def task_names(text: str) -> list[str]:
    """``"sst2,mnli"`` -> ``["sst2", "mnli"]``; ``"none"`` -> ``[]``."""
    return [] if text.strip().lower() == "none" else comma_list(text)


def batch_sizes(text: str) -> list[int]:
    """``"1,8"`` -> ``[1, 8]`` (positive whole numbers)."""
    return [positive_int(item) for item in comma_list(text)]


#: The argument types a :class:`~cahp.settings.FieldSpec` names, by name.
ARGUMENT_TYPES: dict[str, Callable[[str], Any]] = {
    "positive_int": positive_int,
    "class_count": class_count,
    "seed_value": seed_value,
    "positive_float": positive_float,
    "non_negative_float": non_negative_float,
    "open_fraction": open_fraction,
    "fraction_up_to_one": fraction_up_to_one,
    "fraction_below_one": fraction_below_one,
    "unit_interval": unit_interval,
    "comma_list": comma_list,
    "task_names": task_names,
    "batch_sizes": batch_sizes,
    "budget_text": budget_text,
}


# ---- options that map to config fields -------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default: the config's (written into the help by :func:`option`) or argparse's."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default:" in text or action.required or not action.option_strings:
            return text
        return super()._get_help_string(action)


def add_command_parser(sub: Any, name: str, about: str, **kwargs: Any) -> Parser:
    """The parser of ``cahp NAME`` (``about``: its one-line help and description; a :class:`Parser`, the class of
    the ``cahp`` parser that ``sub`` belongs to)."""
    parser = sub.add_parser(name, help=about, description=about, formatter_class=HelpFormatter, **kwargs)
    assert isinstance(parser, Parser)
    return parser


#: ``config_option``'s ``default`` when not given: the field's own.
_FIELD_DEFAULT: Any = object()


def shown_value(value: Any) -> str:
    """A default as the help shows it: ``("validation", "test")`` -> ``validation,test``."""
    return ",".join(str(item) for item in value) if isinstance(value, list | tuple) else str(value)


def config_option(
    group: Any,
    spec: FieldSpec,
    name: str,
    *,
    default: Any = _FIELD_DEFAULT,
    flags: Sequence[str] = (),
    help: str | None = None,
    argument_type: str | None = None,
    shown: str | None = None,
) -> argparse.Action:
    """The option of the config field ``name``, generated from its ``spec``: parsed with default ``None`` (not given:
    the config keeps its value), documented with the config's default.

    Args:
        group: the parser or argument group it joins.
        spec: the field's spec (:mod:`cahp.settings`): help, default, flags (else ``--name-with-dashes``), type,
            metavar, choices; a ``bool`` default without a type gives ``--name`` / ``--no-name`` (the second
            overrides a replayed ``true``).
        name: the field's name.
        default: the value the config takes when the option is not given, where it is not the field's own (a
            nested config's or a recipe's).
        flags, help, argument_type: the option's names, help and type (an :data:`ARGUMENT_TYPES` name) where this
            command reads the field otherwise.
        shown: the text of ``(default: ...)`` (else the spec's ``shown``, else the value).

    The default is kept on the action as ``config_default`` (a test checks it against the config dataclasses).
    """
    value = spec.default if default is _FIELD_DEFAULT else default
    if shown is None:
        shown = spec.shown.format(default=shown_value(value)) if spec.shown else shown_value(value)
    kwargs: dict[str, Any] = {}
    if (argument_type := argument_type or spec.type) is not None:
        kwargs["type"] = ARGUMENT_TYPES[argument_type]
    elif isinstance(value, bool):
        kwargs["action"] = argparse.BooleanOptionalAction
    metavar = spec.metavar or (METAVARS.get(kwargs["type"]) if "type" in kwargs else None)
    if metavar is not None:
        kwargs["metavar"] = metavar
    if spec.choices is not None:
        kwargs["choices"] = list(spec.choices)
    text = (help or spec.help).replace("%", "%%")  # argparse formats the help with %
    names = tuple(flags) or spec.flags or (f"--{name.replace('_', '-')}",)
    action: argparse.Action = group.add_argument(*names, default=None, help=f"{text} (default: {shown})", **kwargs)
    action.config_default = value  # type: ignore[attr-defined]
    return action


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
    for name in TASK_FIELDS:
        config_option(group, TASK[name], name)


def recovery_default(objective: str, name: str) -> Any:
    """The recovery's ``name`` setting when a ``cahp prune`` config gives no recovery: the objective's recipe
    (:data:`cahp.workloads.RECOVERY_RECIPES`, plain values: read without importing torch), else the field's."""
    from cahp.workloads import RECOVERY_RECIPES

    return RECOVERY_RECIPES[objective].get(name, TRAINING[name].default)


def recovery_option(group: Any, name: str, **kwargs: Any) -> argparse.Action:
    """A ``cahp prune`` recovery option (``TrainingConfig`` field ``name``): its default is the classification
    recipe's, and the help shows the causal-lm recipe's beside it."""
    value = recovery_default("classification", name)
    if not isinstance(value, bool):
        kwargs.setdefault("shown", f"{value:g} (causal-lm: {recovery_default('causal-lm', name):g})")
    return config_option(group, TRAINING[name], name, default=value, **kwargs)


def add_training_arguments(group: Any, *, recovery: bool = False) -> None:
    """The training options finetune and prune's recovery share (each adds its own epochs and learning rate;
    ``recovery``: prune's, whose defaults are the objective's recipe, with ``--recovery-batch-size`` as a second
    name of ``--batch-size``)."""
    if not recovery:
        for name in TRAINING_FIELDS:
            config_option(group, TRAINING[name], name)
        return
    recovery_option(group, "batch_size", flags=("--batch-size", "--recovery-batch-size"))
    for name in ("warmup_ratio", "weight_decay", "checkpoint_every"):
        recovery_option(group, name)
    recovery_option(
        group, "group_by_length", help=f"{TRAINING['group_by_length'].help} (causal-lm: blocks have one length)"
    )


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
