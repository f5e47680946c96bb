"""Task metrics: predictions over a split, accuracy, macro-F1 and throughput."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score
from tqdm.auto import tqdm

from cahp.data.batching import EncodedSplit, iter_batches, num_batches
from cahp.runtime import model_device


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    tokenizer: Any,
    data: EncodedSplit,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "evaluate",
) -> np.ndarray:
    """Logits ``[examples, labels]`` in the split's order (batches are length-sorted to pad less)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    logits = None
    bar = tqdm(total=num_batches(data, batch_size), desc=desc, disable=not progress, leave=False)
    for indices, batch in iter_batches(tokenizer, data, batch_size, sort_by_length=True):
        batch.pop("labels")
        out = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu().numpy()
        if logits is None:
            logits = np.zeros((len(data), out.shape[-1]), dtype=np.float32)
        logits[indices] = out
        bar.update()
    bar.close()
    model.train(was_training)
    return logits if logits is not None else np.zeros((0, 0), dtype=np.float32)


def classification_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 (over the labels present in either array)."""
    return {
        "accuracy": float(np.mean(labels == predictions)) if len(labels) else float("nan"),
        "macro_f1": float(f1_score(labels, predictions, average="macro")) if len(labels) else float("nan"),
    }


def evaluate_split(
    model: torch.nn.Module,
    tokenizer: Any,
    data: EncodedSplit,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "evaluate",
) -> dict[str, float]:
    """Accuracy, macro-F1, example count and examples per second on one encoded split."""
    start = time.perf_counter()
    logits = predict_logits(model, tokenizer, data, batch_size, progress, desc)
    seconds = time.perf_counter() - start
    metrics = classification_metrics(data.labels, logits.argmax(-1))
    metrics.update(examples=len(data), seconds=round(seconds, 3), examples_per_second=round(len(data) / seconds, 2))
    return metrics
