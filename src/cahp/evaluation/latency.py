"""Latency of dense vs pruned models, measured interleaved in one run (the machines are shared and noisy)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn


def synthetic_batch(model: nn.Module, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full-length batch of random token ids (no padding) for latency measurement."""
    generator = torch.Generator().manual_seed(seed)
    vocab = int(getattr(model.config, "vocab_size", 1000))
    low = min(1000, vocab // 2)
    input_ids = torch.randint(low, vocab, (batch_size, seq_len), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@torch.inference_mode()
def measure_latency(
    models: dict[str, nn.Module],
    batch: dict[str, torch.Tensor],
    *,
    repeats: int = 10,
    warmup: int = 2,
) -> dict[str, dict[str, Any]]:
    """Median and spread of forward latency (seconds per batch) of each model on the same batch.

    Models are timed round-robin (dense, pruned, dense, pruned, ...) so that load changes on the machine hit
    every model alike; report their ratio rather than absolute times. Per model: ``median_seconds``,
    ``min_seconds``, ``max_seconds``, ``repeats`` and every repeat's ``seconds`` (in order).
    """
    for model in models.values():
        model.eval()
    for _ in range(warmup):
        for model in models.values():
            model(**batch)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(**batch)
            samples[name].append(time.perf_counter() - start)
    return {
        name: {
            "median_seconds": statistics.median(times),
            "min_seconds": min(times),
            "max_seconds": max(times),
            "repeats": repeats,
            "seconds": times,
        }
        for name, times in samples.items()
    }
