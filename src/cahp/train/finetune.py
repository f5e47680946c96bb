"""``cahp finetune``: fine-tune a model on a task; every pruning method starts from the saved classifier."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cahp.data import EncodedSplit, TaskData, TextSplit, encode_split, load_task
from cahp.errors import ConfigError, DataError, notice
from cahp.evaluation.metrics import evaluate_split
from cahp.models import (
    check_max_length,
    label_ids,
    load_classifier,
    load_model_config,
    named_labels,
    record_label_names,
)
from cahp.outputs import StagedOutput, check_output_target, write_json
from cahp.runtime import place
from cahp.settings import FINETUNE, TASK
from cahp.train.loop import TrainingConfig, set_seed, train_model

PROTOCOLS = ("auto", "standard", "offline")


@dataclass
class TaskOptions:
    """Which task, where its data is, and how to read it. Checked on construction (:meth:`validate`).

    Raises:
        ConfigError: a setting out of range (``max_length >= 1``, one or two ``text_columns``, ...).
    """

    task: str = TASK.field("task")
    data_dir: str | None = TASK.field("data_dir")
    protocol: str = TASK.field("protocol")
    text_columns: list[str] | None = TASK.field("text_columns")  # noqa: RUF009 (its default: None)
    label_column: str = TASK.field("label_column")
    num_labels: int | None = TASK.field("num_labels")
    max_length: int = TASK.field("max_length")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> TaskOptions:
        """Check every setting; returns self. The model's own limit on ``max_length`` is checked once it is
        known (:func:`cahp.models.check_max_length`)."""
        problems = []
        if not isinstance(self.task, str) or not self.task.strip():
            problems.append(f"task must be a task name, folder or hub id, got {self.task!r}")
        if self.protocol not in PROTOCOLS:
            problems.append(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.text_columns is not None:
            columns = self.text_columns
            if isinstance(columns, str) or not all(isinstance(c, str) and c.strip() for c in columns):
                problems.append(f"text_columns must be a list of column names, got {columns!r}")
            elif not 1 <= len(columns) <= 2:
                problems.append(
                    f"text_columns takes one column or two (a sentence pair), got {len(columns)}: {list(columns)}"
                )
        if not isinstance(self.label_column, str) or not self.label_column.strip():
            problems.append(f"label_column must be a column name, got {self.label_column!r}")
        if self.num_labels is not None and (
            not isinstance(self.num_labels, int) or isinstance(self.num_labels, bool) or self.num_labels < 2
        ):
            problems.append(f"num_labels must be a whole number >= 2, got {self.num_labels!r}")
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 1:
            problems.append(f"max_length must be a whole number of tokens >= 1, got {self.max_length!r}")
        if problems:
            raise ConfigError("invalid task settings: " + "; ".join(problems))
        return self

    def load(self, model: str | os.PathLike[str] | None = None) -> TaskData:
        """Load the task; with ``model``, with its labels made to agree with that model's.

        String labels are then numbered by the model's ``config.label2id`` when it names its labels, and
        integer labels are checked against its label count (see :meth:`TaskData.aligned_to`). The model's
        config is read first, so that a bad model fails before any data is read.

        Raises:
            ModelNotFoundError, UnsupportedArchitectureError: a bad model.
            DataError: bad data, or labels the model does not know.
        """
        model_config = load_model_config(model) if model is not None else None
        names = named_labels(model_config) if model_config is not None else None
        task = load_task(
            self.task,
            self.data_dir,
            protocol=self.protocol,
            text_columns=self.text_columns,
            label_column=self.label_column,
            num_labels=self.num_labels,
            label2id=label_ids(names) if names else None,
        )
        return task.aligned_to(model_config) if model_config is not None else task


@dataclass
class FinetuneConfig:
    """Everything that defines a fine-tuning run (written to ``run_config.json``). Checked on construction.

    Raises:
        ConfigError: e.g. ``training.epochs`` not > 0, ``max_train_examples`` < 1.
    """

    model: str = FINETUNE.field("model")
    task: TaskOptions = field(default_factory=TaskOptions)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    max_train_examples: int | None = FINETUNE.field("max_train_examples")
    eval_splits: tuple[str, ...] = FINETUNE.field("eval_splits")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> FinetuneConfig:
        """Check the settings (and the nested task and training settings); returns self."""
        self.task.validate()
        self.training.validate()
        if self.training.epochs <= 0:
            raise ConfigError(f"--epochs must be > 0 to fine-tune, got {self.training.epochs}")
        size = self.max_train_examples
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ConfigError(f"--max-train-examples must be a whole number >= 1 (or unset), got {size!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def subsample(split: TextSplit, size: int | None, seed: int, label_names: Sequence[str] | None = None) -> TextSplit:
    """A seeded, label-stratified subset of ``size`` examples (the whole split when ``size`` is None).

    Each class gets its share of ``size`` (largest remainders), and at least one example whenever ``size``
    allows one per class. When it does not, the classes left out are named in a notice on stderr.
    ``label_names`` (index = label id) only make that notice readable.
    """
    if size is None or size >= len(split):
        return split
    if size <= 0:
        raise DataError(f"subset size must be positive, got {size}")
    classes, counts = np.unique(split.labels, return_counts=True)
    quotas = counts * size / len(split)
    taken = np.floor(quotas).astype(int)
    taken[np.argsort(taken - quotas)[: size - taken.sum()]] += 1  # largest remainders: exactly `size`
    if size >= len(classes):
        for empty in np.flatnonzero(taken == 0):  # a class too small for its share still keeps one example
            taken[np.argmax(taken)] -= 1  # from the largest share (>= 2, since size >= number of classes)
            taken[empty] = 1
    else:
        dropped = [int(c) for c, n in zip(classes, taken, strict=True) if n == 0]
        shown = [label_names[c] if label_names is not None and c < len(label_names) else c for c in dropped]
        notice(
            f"warning: a subset of {size} examples of {split.where()} cannot hold all {len(classes)} classes; "
            f"it has no example of class(es) {shown}"
        )
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(split.labels == c))[:n] for c, n in zip(classes, taken, strict=True)]
    return split.subset(np.sort(np.concatenate(chosen)))


def encode_eval_splits(
    tokenizer: Any, task: TaskData, names: Sequence[str], max_examples: int | None, max_length: int
) -> dict[str, EncodedSplit]:
    """The task's splits among ``names``, tokenized; each a seeded stratified subset when ``max_examples`` is
    given (seed 0: the same examples at every stage and for every method)."""
    return {
        name: encode_split(tokenizer, subsample(task.split(name), max_examples, 0), max_length)
        for name in names
        if name in task.splits
    }


def finetune(
    config: FinetuneConfig,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Fine-tune ``config.model`` on ``config.task``; save model, tokenizer and ``metrics.json`` to ``out``.

    Resumable: an interrupted run leaves ``.<out>.partial`` beside ``out``; the same call continues it.

    Returns:
        The metrics written to ``metrics.json``.
    """
    config.validate()
    check_output_target(out, overwrite)
    check_max_length(config.task.max_length, load_model_config(config.model))
    task = config.task.load(model=config.model)
    train_split = subsample(task.split("train"), config.max_train_examples, config.training.seed, task.label_names)
    eval_splits = {name: task.split(name) for name in config.eval_splits if name in task.splits}
    with StagedOutput(out, {"command": "finetune", **config.to_dict()}, overwrite, command) as staged:
        return _finetune_into(staged, config, task, train_split, eval_splits, progress, command)


def _finetune_into(
    staged: StagedOutput,
    config: FinetuneConfig,
    task: TaskData,
    train_split: TextSplit,
    eval_splits: dict[str, TextSplit],
    progress: bool,
    command: str | None,
) -> dict[str, Any]:
    if staged.resumed and progress:
        print(f"resuming the unfinished run in {staged.path}")
    set_seed(config.training.seed)
    model, tokenizer = load_classifier(config.model, task.num_labels, task.label_names)
    check_max_length(config.task.max_length, model, tokenizer)
    if named_labels(model.config) is None:
        record_label_names(model.config, task.label_names)  # every later command maps labels the same way
    place(model)
    train_data = encode_split(tokenizer, train_split, config.task.max_length)
    encoded_eval = {name: encode_split(tokenizer, s, config.task.max_length) for name, s in eval_splits.items()}
    start = time.perf_counter()
    history = train_model(
        model,
        tokenizer,
        train_data,
        config.training,
        validation=encoded_eval.get("validation"),
        checkpoint_path=staged.path / "checkpoint.pt",
        desc=f"fine-tune {config.model} on {task.name}",
        progress=progress,
    )
    train_seconds = time.perf_counter() - start
    results = {
        name: _final_validation(history)
        if name == "validation" and _final_validation(history) is not None
        else evaluate_split(model, tokenizer, data, config.training.eval_batch_size, progress, f"evaluate {name}")
        for name, data in encoded_eval.items()
    }
    metrics = {
        "model": config.model,
        "task": task.describe(),
        "train_examples": len(train_split),
        "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "history": history,
        "total_steps": history[-1]["step"] if history else 0,
        "steps_this_run": sum(row.get("steps_this_run", 0) for row in history),
        "resumed": staged.resumed,
        "results": results,
        "label_distribution_train": np.bincount(train_split.labels, minlength=task.num_labels).tolist(),
        "command": command,
    }
    model.save_pretrained(staged.path)
    tokenizer.save_pretrained(staged.path)
    write_json(staged.path / "metrics.json", metrics)
    (staged.path / "checkpoint.pt").unlink(missing_ok=True)
    staged.commit()
    return metrics


def _final_validation(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The validation metrics the training loop computed on the final model (its last history row is written
    after the last step, with :func:`evaluate_split` and the same batch size), so that the validation split is
    not evaluated a second time; ``None`` when it computed none."""
    return history[-1].get("validation") if history else None


def is_finished_run(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a finished fine-tuning run (model and metrics written)."""
    folder = Path(folder)
    return (folder / "metrics.json").is_file() and (folder / "config.json").is_file()
