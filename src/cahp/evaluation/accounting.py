"""Parameter and FLOP accounting from a model's CURRENT (possibly pruned) shapes.

FLOPs are forward FLOPs for ONE sequence of ``seq_len`` tokens, with every matrix product of
``[m, k] @ [k, n]`` counted as ``2*m*n*k``. Counted:

* attention, per layer: the q/k/v projections and the output projection (``2 * seq_len * in * out`` each,
  from the current weight shapes; the adapter's :meth:`~cahp.adapters.ArchitectureAdapter.attention_projections`
  lists a fused q/k/v projection once), the scores ``Q K^T`` and the context ``P V``
  (``2 * heads * seq_len^2 * head_dim`` each, with the layer's current heads and head size from
  :func:`cahp.surgery.layer_geometries`; causal models are counted with the full ``seq_len x seq_len``
  matrix because the implementations compute it);
* every other ``nn.Linear`` / ``Conv1D`` inside the transformer layers (feed-forward, gates) for every token;
* ``nn.Linear`` / ``Conv1D`` outside the layers (pooler, classifier) ONCE, as a sequence-classification
  head reads one pooled vector; ``nn.Conv2d`` patch embeddings once per token (one kernel application each).

Not counted: embedding lookups, softmax, normalisation, activations, bias additions, residual additions,
rotary embeddings and masking (elementwise work, linear in ``seq_len``, usually a few percent).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from cahp.adapters import get_adapter
from cahp.surgery.removal import layer_geometries


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def attention_flops(model: PreTrainedModel, seq_len: int) -> int:
    """Forward FLOPs of all attention blocks for one sequence of ``seq_len`` tokens (see module docs)."""
    adapter = get_adapter(model)
    total = 0
    for layer, geometry in zip(adapter.layer_modules(model), layer_geometries(model), strict=True):
        for projection in adapter.attention_projections(layer):
            total += 2 * seq_len * cast(torch.Tensor, projection.weight).numel()
        total += 2 * 2 * geometry.query_heads * seq_len * seq_len * geometry.head_dim
    return total


def total_flops(model: PreTrainedModel, seq_len: int) -> int:
    """Forward FLOPs of the whole model for one sequence of ``seq_len`` tokens (see module docs)."""
    adapter = get_adapter(model)
    attention_ids: set[int] = set()
    layer_ids: set[int] = set()
    for layer in adapter.layer_modules(model):
        attention_ids |= {id(p) for p in adapter.attention_projections(layer)}
        layer_ids |= {id(m) for m in layer.modules()}
    total = attention_flops(model, seq_len)
    for module in model.modules():
        if id(module) in attention_ids:
            continue
        if isinstance(module, nn.Linear | Conv1D):
            tokens = seq_len if id(module) in layer_ids else 1
            total += 2 * tokens * module.weight.numel()
        elif isinstance(module, nn.Conv2d):
            total += 2 * seq_len * module.weight.numel()
    return total
