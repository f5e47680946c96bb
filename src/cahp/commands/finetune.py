"""``cahp finetune``: fine-tune a model on a task (the starting point of pruning)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from cahp.commands import command
from cahp.commands.options import (
    TASK_FIELDS,
    TRAINING_FIELDS,
    add_command_parser,
    add_config_file_argument,
    add_output_arguments,
    add_task_arguments,
    add_training_arguments,
    apply_options,
    check_output_folder,
    command_line,
    config_option,
    read_config,
)
from cahp.settings import FINETUNE, TRAINING

if TYPE_CHECKING:
    from cahp.train.finetune import FinetuneConfig

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


def add_parser(sub: Any) -> None:
    """Add ``cahp finetune`` to the subcommands ``sub``."""
    parser = add_command_parser(sub, "finetune", "fine-tune a model on a task (the starting point of pruning)")
    add_config_file_argument(parser, "finetune")
    config_option(parser, FINETUNE["model"], "model")
    add_output_arguments(parser)
    for name in ("max_train_examples", "eval_splits"):
        config_option(parser, FINETUNE[name], name)
    add_task_arguments(parser)
    group = parser.add_argument_group("training")
    config_option(group, TRAINING["epochs"], "epochs", argument_type="positive_float")  # fine-tuning needs some
    for name in ("learning_rate", "seed"):
        config_option(group, TRAINING[name], name)
    add_training_arguments(group)


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    """The FinetuneConfig of parsed ``cahp finetune`` arguments: ``--config`` (or the defaults) + given flags."""
    from cahp.config import config_from_dict
    from cahp.train.finetune import FinetuneConfig

    config = FinetuneConfig()
    if args.config is not None:
        config = config_from_dict(FinetuneConfig, read_config(args.config, "finetune"), "finetune config")
    return apply_options(config, args, FINETUNE_FIELDS)  # the config validates itself on every change


@command("finetune", resumable=True, uses_transformers=True)
def run(args: argparse.Namespace) -> int:
    """Fine-tune, print each split's accuracy and macro-F1."""
    from cahp.train.finetune import finetune

    check_output_folder(args.out)
    config = finetune_config(args)
    metrics = finetune(config, args.out, overwrite=args.overwrite, command=command_line())
    for split, result in metrics["results"].items():
        print(f"{split}: accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}")
    print(f"saved to {args.out}")
    return 0
