"""Tasks, data sources and batching."""

from cahp.data.batching import EncodedSplit, collate, encode_split, iter_batches, num_batches
from cahp.data.tasks import (
    TASKS,
    TaskData,
    TaskSpec,
    TextSplit,
    fingerprint_split,
    load_task,
    stratified_holdout,
)

__all__ = [
    "TASKS",
    "EncodedSplit",
    "TaskData",
    "TaskSpec",
    "TextSplit",
    "collate",
    "encode_split",
    "fingerprint_split",
    "iter_batches",
    "load_task",
    "num_batches",
    "stratified_holdout",
]
