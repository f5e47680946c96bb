"""Tokenization with dynamic padding: each batch is padded to its own longest example, on whichever side
the tokenizer pads."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cahp.data.tasks import TextSplit


@dataclass
class EncodedSplit:
    """A tokenized split: one dict of token-id lists per example, plus labels ``[examples]``."""

    features: list[dict[str, list[int]]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example (examples without ``input_ids``, images say, all count as length 1)."""
        return np.array([len(f["input_ids"]) if "input_ids" in f else 1 for f in self.features])


def encode_split(tokenizer: Any, split: TextSplit, max_length: int = 128) -> EncodedSplit:
    """Tokenize without padding, truncating to ``max_length`` tokens."""
    if not len(split):
        return EncodedSplit([], split.labels)
    columns = list(zip(*split.texts, strict=True))
    encoded = tokenizer(*columns, truncation=True, max_length=max_length, padding=False)
    keys = [k for k in encoded if k in ("input_ids", "attention_mask", "token_type_ids")]
    features = [{k: encoded[k][i] for k in keys} for i in range(len(split))]
    return EncodedSplit(features, split.labels)


#: The model inputs a batch keeps of what the tokenizer's (or another collator's) ``pad`` returns.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")


def collate(tokenizer: Any, features: list[dict[str, Any]], labels: np.ndarray | None) -> dict[str, Any]:
    """Pad one batch to its longest example and return tensors (``labels`` included when given).

    ``tokenizer`` is anything with the tokenizers' ``pad(features, padding=True, return_tensors="pt")``: a text
    tokenizer, or a workload's own collator (an image workload stacks ``pixel_values``)."""
    batch = tokenizer.pad(features, padding=True, return_tensors="pt")
    batch = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    if labels is not None:
        batch["labels"] = torch.as_tensor(labels, dtype=torch.long)
    return batch


def iter_batches(
    tokenizer: Any,
    data: EncodedSplit,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    sort_by_length: bool = False,
    group_by_length: bool = False,
    skip_batches: int = 0,
) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Yield ``(example_indices, batch)`` pairs.

    ``shuffle`` draws a permutation from ``(seed, epoch)`` alone, so an interrupted epoch can be resumed by
    skipping the batches already seen. ``sort_by_length`` (evaluation) groups similar lengths to pad less.
    ``group_by_length`` (training, with ``shuffle``) sorts each window of ``GROUP_WINDOW`` shuffled batches by
    length and then shuffles the batch order: batches stay random in content and order, yet pad far less.
    """
    order = np.arange(len(data))
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(data))
        if group_by_length:
            order = _grouped_by_length(order, data.lengths, batch_size, rng)
    elif sort_by_length:
        order = np.argsort(data.lengths, kind="stable")
    for batch_index, start in enumerate(range(0, len(order), batch_size)):
        if batch_index < skip_batches:
            continue
        indices = order[start : start + batch_size]
        yield indices, collate(tokenizer, [data.features[i] for i in indices], data.labels[indices])


#: Batches per window that ``group_by_length`` sorts together.
GROUP_WINDOW = 50


def _grouped_by_length(order: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    window = batch_size * GROUP_WINDOW
    grouped = [
        chunk[np.argsort(lengths[chunk], kind="stable")[::-1]]
        for chunk in (order[i : i + window] for i in range(0, len(order), window))
    ]
    flat = np.concatenate(grouped)
    batches = [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]
    # the last (possibly short) batch stays last so every other batch keeps the full size
    head = rng.permutation(len(batches) - 1) if len(batches) > 1 else np.array([], dtype=int)
    return np.concatenate([*(batches[i] for i in head), batches[-1]])


def num_batches(data: EncodedSplit, batch_size: int) -> int:
    return (len(data) + batch_size - 1) // batch_size
