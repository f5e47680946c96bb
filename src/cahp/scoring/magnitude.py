"""Weight magnitude: the L2 norm of every weight that belongs to a head.

A head owns its query rows, its key and value rows, and its input columns of the output projection, exactly as
the adapter's :class:`~cahp.adapters.HeadGeometry` lays them out (separate projections, a fused
``[q | k | v]`` projection whose k and v blocks are ``kv_heads * head_dim`` wide, GPT-NeoX's per-head
interleaved ``[head, (q, k, v), head_dim]``, ``nn.Linear`` or transposed ``Conv1D`` weights). With
grouped-query attention a query head counts the whole key-value head it reads (shared rows are counted once
for EACH query head of the group). Biases are ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from transformers import PreTrainedModel

from cahp.adapters import get_adapter
from cahp.scoring.base import HeadScorer, register_scorer

if TYPE_CHECKING:
    from cahp.adapters.geometry import ProjectionKind
    from cahp.calibration import Calibration


def _squared_norms(weight: torch.Tensor, index: torch.Tensor, axis: int, heads: int, head_dim: int) -> torch.Tensor:
    """Sum of squared entries of each head's slices ``index`` (``[heads * head_dim]``, head-major) along weight
    axis ``axis`` -> ``[heads]`` (on the CPU)."""
    per_head = weight.detach().float().index_select(axis, index.to(weight.device)).unflatten(axis, (heads, head_dim))
    return per_head.pow(2).sum(dim=[d for d in range(per_head.ndim) if d != axis]).cpu()


#: What the registry lists without importing this module (read with ``ast``: see :mod:`cahp.methods.base`).
METHOD_CARD = {
    "class": "MagnitudeScorer",
    "kind": "scorer",
    "budget_aware": False,
    "deterministic": True,
    "settings": {"seed": 0},
}


@register_scorer("magnitude")
class MagnitudeScorer(HeadScorer):
    """``sqrt(|W_q[h]|^2 + |W_k[kv(h)]|^2 + |W_v[kv(h)]|^2 + |W_o[:, h]|^2)`` per head (Frobenius norms).

    Data-free and deterministic (``seed`` is unused; the calibration is ignored).
    """

    deterministic = True

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__(seed=seed)

    def _score(self, model: PreTrainedModel, calibration: Calibration) -> np.ndarray:
        adapter = get_adapter(model)
        geometry = adapter.geometry(model)  # an unpruned model: the original head counts
        size = geometry.head_dim
        reads = torch.tensor(geometry.kv_positions(), dtype=torch.long)  # the key-value head of each query head
        scores = np.zeros((adapter.num_layers(model), geometry.query_heads))
        projections: tuple[tuple[ProjectionKind, str], ...] = (
            ("query", adapter.query),
            ("key", adapter.key),
            ("value", adapter.value),
        )
        for layer, module in enumerate(adapter.layer_modules(model)):
            norms = {}  # query: [heads]; key, value: [kv_heads]
            for kind, path in projections:
                weight = cast(torch.Tensor, module.get_submodule(path).weight)
                norms[kind] = _squared_norms(
                    weight, geometry.rows(kind), geometry.out_axis, geometry.heads_of(kind), size
                )
            output = cast(torch.Tensor, module.get_submodule(adapter.output).weight)
            o_norms = _squared_norms(output, geometry.output_columns(), geometry.in_axis, geometry.query_heads, size)
            shared = (norms["key"] + norms["value"])[reads]
            scores[layer] = (norms["query"] + shared + o_norms).sqrt().double().numpy()
        return scores
