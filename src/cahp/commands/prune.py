"""``cahp prune`` (and its alias ``cahp prune-lm`` = ``cahp prune --objective causal-lm``): prune attention heads
with any registered method, recover, report; for classifiers and causal LMs alike.

The config is built from ``--config FILE`` (a ``run_config.json`` written by an earlier run, or a hand-written
one) or from :class:`~cahp.pipeline.PruneConfig`'s defaults, then every flag given is applied
(:func:`prune_config`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cahp.commands import command
from cahp.commands.options import (
    TASK_FIELDS,
    TRAINING_FIELDS,
    UsageError,
    add_command_parser,
    add_config_file_argument,
    add_output_arguments,
    add_task_arguments,
    add_training_arguments,
    apply_options,
    check_output_folder,
    command_line,
    config_option,
    first_process,
    fraction_up_to_one,
    non_negative_float,
    open_fraction,
    positive_int,
    read_config,
    recovery_option,
)
from cahp.settings import LM, PRUNE, PRUNE_RECOVERY_OBJECTIVE, RECOVERY_OBJECTIVE, REQUIRED

if TYPE_CHECKING:
    from cahp.pipeline import PruneConfig

#: ``cahp prune``'s causal-lm options: option dest -> dotted path in PruneConfig (its ``lm`` object).
LM_FIELDS: dict[str, tuple[str, ...]] = {
    name: (f"lm.{name}",)
    for name in (
        "corpus", "corpus_column", "context_length", "stride", "calibration_blocks", "eval_blocks", "eval_batch_size",
        "prompted", "prompted_split", "prompted_examples", "prompted_batch_size", "continuation_tokens",
        "generation_batch_sizes", "prompt_tokens", "new_tokens",
    )
}  # fmt: skip

#: Options that set a field of the task and of ``lm`` alike (``lm``'s only on the causal-lm objective).
SHARED_LM_FIELDS: dict[str, str] = {"data_dir": "lm.data_dir", "calibration_batch_size": "lm.calibration_batch_size"}


#: ``cahp prune``: option dest -> dotted path(s) in PruneConfig. ``--keep`` / ``--sparsity``, ``--method-setting``,
#: the method-setting shortcuts and the generated method-setting options are merged separately (:func:`prune_config`).
PRUNE_FIELDS: dict[str, tuple[str, ...]] = {
    "model": ("model",),
    "objective": ("objective",),
    "method": ("method",),
    "budget": ("budget",),
    "allow_empty_layers": ("allow_empty_layers",),
    "uniform_layers": ("uniform_layers",),
    "gqa_mode": ("gqa_mode",),
    "reconstruct": ("reconstruct",),
    "seed": ("seed", "recovery.seed"),
    "calibration_size": ("calibration_size",),
    "calibration_batch_size": ("calibration_batch_size",),
    "recovery_epochs": ("recovery.epochs",),
    "recovery_learning_rate": ("recovery.learning_rate",),
    "recovery_max_examples": ("recovery_max_examples",),
    "recovery_lora_rank": ("recovery_lora_rank",),
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
    "dtype": ("save_dtype",),
    **{name: (f"task.{name}",) for name in TASK_FIELDS},
    **{name: (f"recovery.{name}",) for name in TRAINING_FIELDS},
    **LM_FIELDS,
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


# ---- the parser -------------------------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Add ``cahp prune`` (alias ``prune-lm``) to the subcommands ``sub``."""
    about = "prune attention heads with any registered method, recover, report (classifiers and causal LMs)"
    parser = add_command_parser(sub, "prune", about, aliases=["prune-lm"])
    add_config_file_argument(parser, "prune")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="with --config: refuse to replay when the model's weights differ from the ones the run recorded "
        "(default: say so in one line and prune it anyway)",
    )
    for name in ("model", "objective"):
        config_option(parser, PRUNE[name], name)
    add_output_arguments(parser)
    config_option(parser, PRUNE["save_dtype"], "save_dtype")
    _add_method_arguments(parser)
    _add_budget_arguments(parser)
    _add_shortcut_arguments(parser)
    _add_recovery_arguments(parser)

    report = parser.add_argument_group("evaluation and latency")
    for name in ("eval_splits", "eval_max_examples", "latency_batch_size", "latency_seq_len", "latency_repeats"):
        config_option(report, PRUNE[name], name)
    add_task_arguments(parser)
    _add_lm_arguments(parser)
    parser.defer(add_method_setting_arguments)  # reads the method registry: only when `cahp prune` is used


def _add_method_arguments(parser: argparse.ArgumentParser) -> None:
    method = parser.add_argument_group("method")
    config_option(method, PRUNE["method"], "method")
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
    for name in ("seed", "calibration_size"):
        config_option(method, PRUNE[name], name)
    lm_batch = LM["calibration_batch_size"].default  # the option sets lm's on causal-lm (SHARED_LM_FIELDS)
    shown = f"{PRUNE['calibration_batch_size'].default} (causal-lm: {lm_batch})"
    config_option(method, PRUNE["calibration_batch_size"], "calibration_batch_size", shown=shown)


def _add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    budget = parser.add_argument_group("budget and constraints")
    exclusive = budget.add_mutually_exclusive_group()
    auto = PRUNE["budget"].default
    exclusive.add_argument(
        "--keep",
        type=positive_int,
        default=None,
        metavar="K",
        help=f"keep K heads in all (default: {auto}, the method finds its own count; methods without one need "
        "--keep or --sparsity)",
    )
    exclusive.add_argument(
        "--sparsity",
        type=open_fraction,
        default=None,
        metavar="S",
        help=f"remove this share of the heads, strictly between 0 and 1 (default: {auto}, see --keep)",
    )
    exclusive.add_argument(
        "--flops",
        type=fraction_up_to_one,
        default=None,
        metavar="F",
        help="keep the most heads whose model costs at most this share of the unpruned model's FLOPs at the task's "
        "typical length (the calibration examples' mean; attention is only part of a model, so there is a floor: "
        f"the error says it) (default: {auto}, see --keep)",
    )
    exclusive.add_argument(
        "--latency",
        type=fraction_up_to_one,
        default=None,
        metavar="L",
        help="keep the most heads whose model's latency, predicted from a lookup table measured on this machine at "
        f"the calibration batch shape, is at most this share of the unpruned model's (default: {auto}, see --keep)",
    )
    config_option(exclusive, PRUNE["budget"], "budget")
    for name in ("allow_empty_layers", "uniform_layers", "gqa_mode"):
        config_option(budget, PRUNE[name], name)


def _add_shortcut_arguments(parser: argparse.ArgumentParser) -> None:
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


def _add_recovery_arguments(parser: argparse.ArgumentParser) -> None:
    recovery = parser.add_argument_group(
        "recovery fine-tune (--recovery-epochs 0: retraining-free; defaults: the objective's recipe)"
    )
    recovery_option(
        recovery,
        "epochs",
        flags=("--recovery-epochs",),
        help="passes over the training split (causal-lm: over the calibration blocks)",
    )
    recovery_option(recovery, "learning_rate", flags=("--recovery-learning-rate",))
    config_option(recovery, PRUNE["recovery_max_examples"], "recovery_max_examples")
    add_training_arguments(recovery, recovery=True)
    config_option(recovery, PRUNE["recovery_lora_rank"], "recovery_lora_rank")
    config_option(recovery, PRUNE["reconstruct"], "reconstruct")
    objective = {**RECOVERY_OBJECTIVE.defaults(), **PRUNE_RECOVERY_OBJECTIVE}  # PruneConfig's recovery_objective
    for name, spec in RECOVERY_OBJECTIVE.items():
        config_option(recovery, spec, name, default=objective[name])


def _add_lm_arguments(parser: argparse.ArgumentParser) -> None:
    """The causal-lm objective's text, prompted tasks and generation measurements (``PruneConfig.lm``)."""
    groups = {
        "causal-lm: language-modelling data (also --data-dir, --calibration-batch-size)": (
            "corpus", "corpus_column", "context_length", "stride", "calibration_blocks", "eval_blocks",
            "eval_batch_size",
        ),
        "causal-lm: zero-shot prompted classification": (
            "prompted", "prompted_split", "prompted_examples", "prompted_batch_size",
        ),
        "causal-lm: generation measurements (and --latency-repeats)": (
            "continuation_tokens", "generation_batch_sizes", "prompt_tokens", "new_tokens",
        ),
    }  # fmt: skip
    for title, names in groups.items():
        group = parser.add_argument_group(title)
        for name in names:
            config_option(group, LM[name], name)


# ---- the method-setting options, generated from the registry ----------------------------------------------------

#: The dest of a generated method-setting option: this prefix, the method, ``:``, the setting.
METHOD_SETTING_DEST = "method_setting:"


def method_setting_flag(method: str, setting: str) -> str:
    """The option of ``method``'s ``setting``: ``--fisher-max-examples``."""
    return f"--{method}-{setting.replace('_', '-')}"


def json_value(text: str) -> Any:
    """A JSON value (an object or a list)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"must be JSON, got {text!r}") from None


def json_or_text(text: str) -> Any:
    """JSON when it parses (numbers, true/false, null, objects), else the text (as ``--method-setting`` reads it)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _setting_kind(default: Any) -> dict[str, Any]:
    """How an option reads a setting whose default is ``default``: by its type (a ``bool``: ``--x`` / ``--no-x``),
    JSON for objects and lists, JSON or text where the default (``None``, or none) says nothing."""
    if isinstance(default, bool):
        return {"action": argparse.BooleanOptionalAction}
    for kind, metavar in ((int, "N"), (float, "X"), (str, "TEXT")):
        if isinstance(default, kind):
            return {"type": kind, "metavar": metavar}
    return {"type": json_value if isinstance(default, dict | list) else json_or_text, "metavar": "JSON"}


def add_method_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """A group ``settings of METHOD`` for every registered method with settings (plugins too, read from their
    cards without importing them): ``--METHOD-SETTING``, given only when set, and taken only when ``--method`` is
    METHOD (:func:`prune_config`). A flag another option already has is left out (``--method-setting`` sets it)."""
    from cahp.methods.base import available_methods

    for method, info in available_methods().items():
        if not info.settings:
            continue
        group = parser.add_argument_group(f"settings of {method}")
        for setting in info.settings:
            default = info.defaults.get(setting, REQUIRED)
            if default is REQUIRED:
                shown = "none: the method requires it"
            else:
                shown = json.dumps(default) if isinstance(default, dict | list | type(None)) else str(default)
            text = (info.setting_help.get(setting) or f"the {setting} setting of {method}").replace("``", "")
            try:
                group.add_argument(
                    method_setting_flag(method, setting),
                    dest=f"{METHOD_SETTING_DEST}{method}:{setting}",
                    default=None,
                    help=f"{text} (default: {shown})".replace("%", "%%"),
                    **_setting_kind(default),
                )
            except argparse.ArgumentError:  # a name another option has: a plugin's flag never shadows one
                continue


def _given_method_settings(args: argparse.Namespace, method: str) -> dict[tuple[str, ...], Any]:
    """The generated method-setting options given, as ``{(setting,): value}``.

    Raises:
        UsageError: one belongs to a method other than ``method``.
    """
    given: dict[tuple[str, ...], Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith(METHOD_SETTING_DEST) or value is None:
            continue
        owner, _, setting = dest.removeprefix(METHOD_SETTING_DEST).rpartition(":")
        if owner != method:
            raise UsageError(
                f"{method_setting_flag(owner, setting)} is a setting of method {owner}, and this run's method is "
                f"{method}: add --method {owner}, or drop it"
            )
        given[(setting,)] = value
    return given


# ---- from arguments to the config -------------------------------------------------------------------------------


def key_values(pairs: Sequence[str]) -> dict[str, Any]:
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


def prune_config(args: argparse.Namespace) -> PruneConfig:
    """The PruneConfig of parsed ``cahp prune`` arguments: ``--config`` (or the defaults) + given flags.

    Method settings merge key by key: the replayed run's, then the shortcut options (``--metric``, ...), then the
    generated ones of the run's method (``--fisher-max-examples``; another method's is a usage error), then
    ``--method-setting``. A ``--method`` other than the replayed run's starts from no settings; a setting that
    changes ``NAME`` drops the replayed ``NAME_settings`` (they belonged to the old ``NAME``).
    """
    if args.config is None and args.model is None:  # before importing torch: a usage error is instant
        raise UsageError("the following arguments are required: --model (or --config FILE to replay a run)")
    if args.command == "prune-lm" and args.objective is None:
        args.objective = "causal-lm"  # the alias
    from cahp.pipeline import PruneConfig

    args.replayed = None
    if args.config is not None:
        raw = read_config(args.config, "prune")
        inputs: dict[str, Any] = raw["inputs"] if isinstance(raw.get("inputs"), dict) else {}
        args.replayed = inputs or None
        recorded = inputs.get("model_path")
        if (
            args.model is None
            and isinstance(recorded, str)
            and Path(recorded).is_absolute()
            and Path(recorded).exists()
        ):
            # the folder the run read, wherever this replay runs from (its model as typed may be relative)
            raw = {**raw, "model": recorded}
        config = PruneConfig.from_dict(raw)
        if args.objective not in (None, config.objective):  # the other objective's recipe and text settings
            config = PruneConfig.from_dict(
                {**config.to_dict(), "objective": args.objective, "recovery": None, "lm": None}
            )
    else:
        config = PruneConfig(model=args.model, objective=args.objective or "classification")
    settings = copy.deepcopy(config.method_settings) if args.method in (None, config.method) else {}
    given_lm = [f"--{dest.replace('_', '-')}" for dest in LM_FIELDS if getattr(args, dest, None) is not None]
    if given_lm and config.lm is None:
        raise UsageError(
            f"{', '.join(given_lm)} set the causal-lm objective's text; add --objective causal-lm (or drop them)"
        )
    config = apply_options(config, args, PRUNE_FIELDS)
    if config.lm is not None:
        config = apply_options(config, args, {dest: (path,) for dest, path in SHARED_LM_FIELDS.items()})

    given: dict[tuple[str, ...], Any] = {
        keys: getattr(args, dest)
        for dest, keys in METHOD_SETTING_SHORTCUTS.items()
        if getattr(args, dest, None) is not None
    }
    given.update(_given_method_settings(args, config.method))
    given.update({(key,): value for key, value in key_values(args.method_setting or []).items()})
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


def _with_budget(config: Any, args: argparse.Namespace) -> Any:
    """``config`` with the budget given by ``--keep`` / ``--sparsity`` / ``--flops`` / ``--latency`` (unchanged when
    none is; ``--budget`` is an option of :data:`PRUNE_FIELDS`, and the five exclude each other)."""
    from cahp.methods.plan import Budget

    given = (args.keep, args.sparsity, args.flops, args.latency)
    if any(value is not None for value in given):
        return dataclasses.replace(config, budget=Budget.from_options(*given).label())
    return config


# ---- the command ------------------------------------------------------------------------------------------------


@command("prune", resumable=True, uses_transformers=True)
@command("prune-lm", resumable=True, uses_transformers=True)
def run(args: argparse.Namespace) -> int:
    """Prune (or resume), across the processes of a ``torchrun`` group when launched so; rank 0 prints."""
    from cahp import distributed
    from cahp.pipeline import prune, summary

    check_output_folder(args.out)
    if args.command == "prune-lm" and first_process():  # once, not once per process
        print("cahp prune-lm is an alias of `cahp prune --objective causal-lm`", file=sys.stderr)
    config = prune_config(args)
    distributed.init_from_environment()  # torchrun / accelerate launch: one process group, rank 0 writes
    report = prune(
        config,
        args.out,
        overwrite=args.overwrite,
        command=command_line(),
        replayed=args.replayed,
        strict=args.strict,
    )
    if distributed.is_main():
        print(summary(report))
        views = (
            "report.json, report.html and plots"
            if (Path(args.out) / "report.html").is_file()
            else "report.json and plots"
        )
        print(f"pruned model, {views} saved to {args.out}")
    distributed.shutdown()
    return 0
