"""Weight magnitude: the L2 norm of every weight that belongs to a head.

A head owns its query rows, its key and value rows, and its columns of the output projection (the projection's
input slice ``h * head_dim : (h + 1) * head_dim``). With grouped-query attention a query head counts the whole
key-value head it reads (shared rows are counted once for EACH query head of the group); GPT-2's fused,
transposed ``Conv1D`` ``c_attn`` is read as ``[q | k | v]`` column blocks. Biases are ignored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from cahp.adapters import get_adapter
from cahp.data.batching import EncodedSplit
from cahp.scoring.base import HeadScorer, register_scorer


def _as_out_in(module: nn.Module, transposed: bool) -> torch.Tensor:
    """The projection weight as ``[out, in]`` (``nn.Linear``'s layout)."""
    weight = module.weight.detach().float()
    return weight.t() if transposed else weight


@register_scorer("magnitude")
class MagnitudeScorer(HeadScorer):
    """``sqrt(|W_q[h]|^2 + |W_k[kv(h)]|^2 + |W_v[kv(h)]|^2 + |W_o[:, h]|^2)`` per head (Frobenius norms).

    Data-free and deterministic (``seed`` is unused).
    """

    deterministic = True

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__(seed=seed)

    def _score(self, model: PreTrainedModel, tokenizer: Any, data: EncodedSplit, num_labels: int) -> np.ndarray:
        adapter = get_adapter(model)
        heads, kv_heads, size = adapter.num_heads(model), adapter.num_kv_heads(model), adapter.head_size(model)
        group = heads // kv_heads
        scores = np.zeros((adapter.num_layers(model), heads))
        for layer, module in enumerate(adapter.layer_modules(model)):
            query = _as_out_in(module.get_submodule(adapter.query), adapter.transposed)
            key = _as_out_in(module.get_submodule(adapter.key), adapter.transposed)
            value = _as_out_in(module.get_submodule(adapter.value), adapter.transposed)
            output = _as_out_in(module.get_submodule(adapter.output), adapter.transposed)
            if adapter.fused_qkv:  # one [3 * width, in] matrix: rows [q | k | v]
                width = heads * size
                query, key, value = query[:width], key[width : 2 * width], value[2 * width :]
            q_norms = query.unflatten(0, (heads, size)).pow(2).sum(dim=(1, 2))  # [heads]
            k_norms = key.unflatten(0, (kv_heads, size)).pow(2).sum(dim=(1, 2))  # [kv_heads]
            v_norms = value.unflatten(0, (kv_heads, size)).pow(2).sum(dim=(1, 2))
            o_norms = output.unflatten(1, (heads, size)).pow(2).sum(dim=(0, 2))  # [heads]
            shared = (k_norms + v_norms).repeat_interleave(group)  # query head h reads kv head h // group
            scores[layer] = (q_norms + shared + o_norms).sqrt().double().cpu().numpy()
        return scores
