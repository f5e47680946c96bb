"""``cahp evaluate``: task metrics of a saved (fine-tuned or pruned) model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from cahp.data import encode_split
from cahp.errors import ConfigError
from cahp.evaluation.metrics import evaluate_split
from cahp.models import check_max_length, load_classifier, load_model_config
from cahp.runtime import place
from cahp.train.finetune import TaskOptions

#: What MNLI's canonical splits are called in results, by protocol.
MNLI_SPLIT_NAMES = {
    "standard": {"validation": "matched", "test": "mismatched"},
    "offline": {"validation": "matched (held-out 10% of validation_matched)", "test": "mismatched"},
}


def evaluate(
    model: str | os.PathLike[str],
    task: TaskOptions,
    splits: Sequence[str] = ("test",),
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy, macro-F1 and examples per second of ``model`` on each of ``splits``.

    ``splits`` may hold ``"all"`` (every labelled split except train). For MNLI both matched and
    mismatched are always reported (``validation`` and ``test``), with the protocol named.

    String labels are numbered by the model's ``label2id`` (see :meth:`cahp.data.TaskData.aligned_to`).

    Raises:
        ConfigError: ``batch_size`` < 1 or ``max_length`` above the model's limit.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size must be a whole number >= 1, got {batch_size!r}")
    check_max_length(task.max_length, load_model_config(model))  # a bad model fails before any data is read
    data = task.load(model=model)
    names = list(splits)
    if "all" in names:
        names = [s for s in data.splits if s != "train"]
    if data.name == "mnli":
        names = list(dict.fromkeys([*names, "validation", "test"]))
    chosen = {name: data.split(name) for name in names}
    classifier, tokenizer = load_classifier(str(model), data.num_labels, data.label_names)
    check_max_length(task.max_length, classifier, tokenizer)
    place(classifier)
    results = {}
    for name, split in chosen.items():
        encoded = encode_split(tokenizer, split, task.max_length)
        results[name] = evaluate_split(classifier, tokenizer, encoded, batch_size, progress, f"evaluate {name}")
    report: dict[str, Any] = {
        "model": str(model),
        "task": data.describe(),
        "max_length": task.max_length,
        "parameters": sum(p.numel() for p in classifier.parameters()),
        "results": results,
    }
    if data.name == "mnli":
        report["mnli"] = {MNLI_SPLIT_NAMES[data.protocol][k]: results[k]["accuracy"] for k in ("validation", "test")}
    return report
