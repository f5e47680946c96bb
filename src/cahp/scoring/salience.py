"""Gradient head salience (Michel et al., 2019): ``|dL/dm_h|`` for a gate ``m_h = 1`` on each head's output.

Weights are frozen (no parameter gradients are computed) and never modified; the gates act through
:func:`cahp.surgery.head_mask`, so this works on every architecture with an adapter.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from cahp.adapters import get_adapter
from cahp.data.batching import EncodedSplit, iter_batches
from cahp.errors import CahpError
from cahp.evaluation.metrics import model_device
from cahp.surgery import head_mask

#: The salience of the reference: :func:`gradient_salience`.
REFERENCE_SALIENCE = "gradient"


def check_salience_source(name: str) -> None:
    """Refuse a salience source that is neither the reference gradient nor a head scorer that needs no budget."""
    if name == REFERENCE_SALIENCE:
        return
    from cahp.scoring.base import available_scorers, scorer_class

    if name not in available_scorers():
        raise CahpError(
            f"unknown salience {name!r}: use {REFERENCE_SALIENCE!r} (the reference) or a head scorer "
            f"({', '.join(n for n in available_scorers() if not scorer_class(n).budget_aware)})"
        )
    if scorer_class(name).budget_aware:
        raise CahpError(
            f"{name!r} scores depend on how many heads are kept, so they cannot rank the heads of a cluster; "
            "choose another salience"
        )


def gradient_salience(
    model: PreTrainedModel,
    tokenizer: Any,
    data: EncodedSplit,
    *,
    batch_size: int = 32,
    fraction: float = 0.25,
    seed: int = 42,
    progress: bool = True,
) -> np.ndarray:
    """Mean over batches of ``|dL/dm|``, for the first ``fraction`` of (seeded, shuffled) training batches.

    Returns:
        ``[layers, heads]`` float64 salience in original head numbering (not normalised).
    """
    adapter = get_adapter(model)
    device = model_device(model)
    gates = torch.ones(adapter.num_layers(model), adapter.num_heads(model), device=device, requires_grad=True)
    total = math.ceil(len(data) / batch_size)
    used = max(1, math.ceil(fraction * total))
    accumulated = torch.zeros_like(gates, dtype=torch.float64)
    was_training = model.training
    model.eval()  # deterministic: no dropout
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    try:
        with head_mask(model, gates):
            batches = iter_batches(tokenizer, data, batch_size, shuffle=True, seed=seed)
            bar = tqdm(range(used), desc="salience", disable=not progress, leave=False)
            for _, (_, batch) in zip(bar, batches, strict=False):  # the first `used` batches
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                (gradient,) = torch.autograd.grad(loss, gates)
                accumulated += gradient.abs().double()
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires_grad[name])
        model.train(was_training)
    return (accumulated / used).cpu().numpy()
