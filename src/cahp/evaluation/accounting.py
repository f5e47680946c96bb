"""Parameter and FLOP accounting from a model's CURRENT (possibly pruned) shapes.

FLOPs are forward FLOPs for ONE sequence of ``seq_len`` tokens, with every matrix product of
``[m, k] @ [k, n]`` counted as ``2*m*n*k``. Counted:

* attention, per layer: the q/k/v projections and the output projection (``2 * seq_len * in * out`` each,
  from the current weight shapes), the scores ``Q K^T`` and the context ``P V``
  (``2 * heads * seq_len^2 * head_dim`` each, kept heads only; causal models are counted with the full
  ``seq_len x seq_len`` matrix because the implementations compute it);
* every other ``nn.Linear`` / ``Conv1D`` inside the transformer layers (feed-forward, gates) for every token;
* ``nn.Linear`` / ``Conv1D`` outside the layers (pooler, classifier) ONCE, as a sequence-classification
  head reads one pooled vector; ``nn.Conv2d`` patch embeddings once per token (one kernel application each).

Not counted: embedding lookups, softmax, normalisation, activations, bias additions, residual additions,
rotary embeddings and masking (elementwise work, linear in ``seq_len``, usually a few percent).
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from cahp.adapters import ArchitectureAdapter, get_adapter
from cahp.surgery.removal import kept_heads_by_layer


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def attention_flops(model: PreTrainedModel, seq_len: int) -> int:
    """Forward FLOPs of all attention blocks for one sequence of ``seq_len`` tokens (see module docs)."""
    adapter = get_adapter(model)
    head_dim = adapter.head_size(model)
    kept = kept_heads_by_layer(model)
    total = 0
    for layer_index, layer in enumerate(adapter.layer_modules(model)):
        for projection in _attention_projections(adapter, layer):
            total += 2 * seq_len * projection.weight.numel()
        total += 2 * 2 * len(kept[layer_index]) * seq_len * seq_len * head_dim
    return total


def total_flops(model: PreTrainedModel, seq_len: int) -> int:
    """Forward FLOPs of the whole model for one sequence of ``seq_len`` tokens (see module docs)."""
    adapter = get_adapter(model)
    attention_ids: set[int] = set()
    layer_ids: set[int] = set()
    for layer in adapter.layer_modules(model):
        attention_ids |= {id(p) for p in _attention_projections(adapter, layer)}
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


def _attention_projections(adapter: ArchitectureAdapter, layer: nn.Module) -> list[nn.Module]:
    """The distinct q/k/v/o projection modules of one layer (GPT-2's fused ``c_attn`` once)."""
    paths = [adapter.query, adapter.key, adapter.value, adapter.output]
    modules = {id(m): m for m in (layer.get_submodule(path) for path in paths)}
    return list(modules.values())
