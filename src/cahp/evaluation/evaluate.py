"""``cahp evaluate``: task metrics of a saved (fine-tuned or pruned) model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from cahp.data import encode_split
from cahp.evaluation.metrics import evaluate_split
from cahp.models import load_classifier, resolve_model
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
    """
    resolve_model(model)  # a bad model path fails before any data is read
    data = task.load()
    names = list(splits)
    if "all" in names:
        names = [s for s in data.splits if s != "train"]
    if data.name == "mnli":
        names = list(dict.fromkeys([*names, "validation", "test"]))
    chosen = {name: data.split(name) for name in names}
    classifier, tokenizer = load_classifier(str(model), data.num_labels, data.label_names)
    if torch.cuda.is_available():
        classifier.cuda()
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
