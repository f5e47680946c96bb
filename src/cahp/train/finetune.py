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
from cahp.errors import DataError
from cahp.evaluation.metrics import evaluate_split
from cahp.models import load_classifier
from cahp.outputs import StagedOutput, write_json
from cahp.train.loop import TrainingConfig, set_seed, train_model


@dataclass
class TaskOptions:
    """Which task, where its data is, and how to read it."""

    task: str = "sst5"
    data_dir: str | None = None
    protocol: str = "auto"
    text_columns: list[str] | None = None
    label_column: str = "label"
    num_labels: int | None = None
    max_length: int = 128

    def load(self) -> TaskData:
        return load_task(
            self.task,
            self.data_dir,
            protocol=self.protocol,
            text_columns=self.text_columns,
            label_column=self.label_column,
            num_labels=self.num_labels,
        )


@dataclass
class FinetuneConfig:
    """Everything that defines a fine-tuning run (written to ``run_config.json``)."""

    model: str = "minilm-l6"
    task: TaskOptions = field(default_factory=TaskOptions)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    max_train_examples: int | None = None
    eval_splits: tuple[str, ...] = ("validation", "test")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def subsample(split: TextSplit, size: int | None, seed: int) -> TextSplit:
    """A seeded, label-stratified subset of ``size`` examples (the whole split when ``size`` is None)."""
    if size is None or size >= len(split):
        return split
    if size <= 0:
        raise DataError(f"subset size must be positive, got {size}")
    classes, counts = np.unique(split.labels, return_counts=True)
    quotas = counts * size / len(split)
    taken = np.floor(quotas).astype(int)
    taken[np.argsort(taken - quotas)[: size - taken.sum()]] += 1  # largest remainders: exactly `size`
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
    task = config.task.load()
    train_split = subsample(task.split("train"), config.max_train_examples, config.training.seed)
    eval_splits = {name: task.split(name) for name in config.eval_splits if name in task.splits}
    staged = StagedOutput(out, {"command": "finetune", **config.to_dict()}, overwrite).prepare()
    if staged.resumed and progress:
        print(f"resuming the unfinished run in {staged.path}")
    set_seed(config.training.seed)
    model, tokenizer = load_classifier(config.model, task.num_labels, task.label_names)
    if torch.cuda.is_available():
        model.cuda()
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
        name: evaluate_split(model, tokenizer, data, config.training.eval_batch_size, progress, f"evaluate {name}")
        for name, data in encoded_eval.items()
    }
    metrics = {
        "model": config.model,
        "task": task.describe(),
        "train_examples": len(train_split),
        "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "history": history,
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


def is_finished_run(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a finished fine-tuning run (model and metrics written)."""
    folder = Path(folder)
    return (folder / "metrics.json").is_file() and (folder / "config.json").is_file()
