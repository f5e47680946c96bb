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
    budget_text,
    check_output_folder,
    comma_list,
    command_line,
    first_process,
    flag,
    fraction_up_to_one,
    non_negative_float,
    open_fraction,
    option,
    positive_float,
    positive_int,
    read_config,
    seed_value,
    subset_option,
    unit_interval,
)

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


#: ``cahp prune``: option dest -> dotted path(s) in PruneConfig. The budget, ``--method-setting`` and the
#: method-setting shortcuts are merged separately (:func:`prune_config`).
PRUNE_FIELDS: dict[str, tuple[str, ...]] = {
    "model": ("model",),
    "objective": ("objective",),
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
    option(
        parser,
        "--model",
        default=None,
        shown="the --config file's; required without one",
        help="the model: a fine-tuned classifier (classification) or a causal LM (causal-lm): folder, alias or hub id",
    )
    option(
        parser,
        "--objective",
        default="classification",
        shown="classification; `cahp prune-lm` is `cahp prune --objective causal-lm`",
        help="the workload: classification (a fine-tuned classifier on --task), causal-lm (a decoder LLM on its "
        "language-modelling loss over --corpus), or a registered third-party workload",
    )
    add_output_arguments(parser)
    _add_method_arguments(parser)
    _add_budget_arguments(parser)
    _add_shortcut_arguments(parser)
    _add_recovery_arguments(parser)

    report = parser.add_argument_group("evaluation and latency")
    option(
        report,
        "--eval-splits",
        default=["validation", "test"],
        type=comma_list,
        help="splits evaluated before pruning, after pruning and after recovery, comma-separated",
    )
    subset_option(report, "--eval-max-examples", "evaluate on a seeded stratified subset of each split")
    option(report, "--latency-batch-size", default=32, type=positive_int, help="batch of the latency measurement")
    option(report, "--latency-seq-len", default=128, type=positive_int, help="tokens per sequence, latency")
    option(report, "--latency-repeats", default=10, type=positive_int, help="timed repeats of every speed measurement")
    add_task_arguments(parser)
    _add_lm_arguments(parser)


def _add_method_arguments(parser: argparse.ArgumentParser) -> None:
    method = parser.add_argument_group("method")
    option(
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
    option(
        method,
        "--seed",
        default=42,
        type=seed_value,
        help="seeds the method, the calibration subset and the recovery fine-tune",
    )
    subset_option(method, "--calibration-size", "examples of the calibration split (a seeded class-stratified subset)")
    option(
        method,
        "--calibration-batch-size",
        default=32,
        type=positive_int,
        help="calibration examples per batch, for methods that do not set their own",
    )


def _add_budget_arguments(parser: argparse.ArgumentParser) -> None:
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
    flag(budget, "--allow-empty-layers", default=False, help="a layer may lose every head")
    flag(budget, "--uniform-layers", default=False, help="keep the same number of heads in every layer")
    option(
        budget,
        "--gqa-mode",
        default="groups",
        choices=["groups", "uniform"],
        help="grouped-query attention: remove whole key-value groups, or the same number of query heads in every group",
    )


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
    option(
        recovery,
        "--recovery-epochs",
        default=3.0,
        shown="3 (causal-lm: 0)",
        type=non_negative_float,
        help="passes over the training split (causal-lm: over the calibration blocks)",
    )
    option(
        recovery,
        "--recovery-learning-rate",
        default=2e-5,
        shown="2e-05 (causal-lm: 5e-05)",
        type=positive_float,
        help="peak learning rate",
    )
    subset_option(recovery, "--recovery-max-examples", "recover on a seeded stratified subset of the training split")
    add_training_arguments(recovery, group_by_length=True, recovery=True)
    option(
        recovery,
        "--recovery-lora-rank",
        default=None,
        type=positive_int,
        metavar="R",
        shown="none: every weight trains",
        help="train rank-R LoRA adapters on the attention and MLP projections instead, merged before saving "
        "(needs pip install 'cahp[lora]')",
    )
    option(
        recovery,
        "--recovery-loss",
        default="kd",
        choices=["ce", "kd", "kd-relations"],
        help="ce: the task's own loss (cross-entropy on the labels; causal-lm: on the next tokens); kd: plus "
        "distillation of the unpruned model's logits; kd-relations: plus its q/k/v self-attention relations "
        "(causal on causal-lm) (docs/recovery.md)",
    )
    option(recovery, "--kd-temperature", default=2.0, type=positive_float, help="kd: softening temperature")
    option(recovery, "--kd-alpha", default=0.5, type=unit_interval, help="kd: weight of the label loss")
    option(recovery, "--relation-heads", default=8, type=positive_int, help="kd-relations: relation heads per layer")
    option(recovery, "--relation-layers", default="all", help="kd-relations: all, last, or layer numbers like 4,5")
    option(recovery, "--relation-weight", default=1.0, type=non_negative_float, help="kd-relations: its weight")
    option(
        recovery,
        "--hidden-weight",
        default=0.0,
        type=non_negative_float,
        help="kd-relations: weight of hidden-state matching (0: off)",
    )


def _task_names(text: str) -> list[str]:
    """``"sst2,mnli"`` -> ``["sst2", "mnli"]``; ``"none"`` -> ``[]``."""
    return [] if text.strip().lower() == "none" else comma_list(text)


def _batch_sizes(text: str) -> list[int]:
    """``"1,8"`` -> ``[1, 8]`` (positive whole numbers)."""
    return [positive_int(item) for item in comma_list(text)]


def _add_lm_arguments(parser: argparse.ArgumentParser) -> None:
    """The causal-lm objective's text, prompted tasks and generation measurements (``PruneConfig.lm``)."""
    data = parser.add_argument_group("causal-lm: language-modelling data (also --data-dir, --calibration-batch-size)")
    option(
        data,
        "--corpus",
        default="mnli-premises",
        help="mnli-premises (offline stand-in for WikiText), a .txt/.jsonl/.csv/.tsv file (.gz too), or a hub "
        "dataset like wikitext:wikitext-2-raw-v1",
    )
    option(data, "--corpus-column", default=None, shown="text", help="text column of a record file or hub dataset")
    option(data, "--context-length", default=256, type=positive_int, help="tokens per block")
    option(data, "--stride", default=None, type=positive_int, shown="the context length", help="tokens between blocks")
    option(data, "--calibration-blocks", default=32, type=positive_int, help="calibration blocks (and recovery data)")
    option(data, "--eval-blocks", default=32, type=positive_int, help="perplexity blocks")
    option(data, "--eval-batch-size", default=8, type=positive_int, help="blocks per perplexity forward")

    prompted = parser.add_argument_group("causal-lm: zero-shot prompted classification")
    option(
        prompted,
        "--prompted",
        default=["sst2"],
        type=_task_names,
        metavar="A,B",
        help="tasks (sst2, sst5, mnli) or none",
    )
    option(prompted, "--prompted-split", default="validation", help="the split evaluated")
    option(
        prompted, "--prompted-examples", default=200, type=positive_int, help="a seeded stratified subset of the split"
    )
    option(prompted, "--prompted-batch-size", default=16, type=positive_int, help="prompts per forward")

    measure = parser.add_argument_group("causal-lm: generation measurements (and --latency-repeats)")
    option(measure, "--continuation-tokens", default=16, type=positive_int, help="tokens of each greedy continuation")
    option(
        measure,
        "--generation-batch-sizes",
        default=[1, 8],
        shown="1,8",
        type=_batch_sizes,
        metavar="A,B",
        help="batch sizes of the prefill and generation timing",
    )
    option(measure, "--prompt-tokens", default=128, type=positive_int, help="prompt tokens, prefill and generation")
    option(measure, "--new-tokens", default=32, type=positive_int, help="tokens generated per prompt, timing")


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

    Method settings merge key by key: the replayed run's, then the shortcut options (``--metric``, ...), then
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
        inputs = raw.get("inputs") if isinstance(raw.get("inputs"), dict) else {}
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
    """``config`` with the budget given by ``--budget``, or ``--keep`` / ``--sparsity`` (unchanged when none is)."""
    from cahp.methods.plan import Budget

    if args.budget is not None:
        return dataclasses.replace(config, budget=args.budget)
    if args.keep is not None or args.sparsity is not None:
        return dataclasses.replace(config, budget=Budget.from_options(args.keep, args.sparsity).label())
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
        views = "report.json, report.html and plots" if "accuracy" in report else "report.json and plots"
        print(f"pruned model, {views} saved to {args.out}")
    distributed.shutdown()
    return 0
