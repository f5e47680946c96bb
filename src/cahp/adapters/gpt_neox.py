"""GPT-NeoX (Pythia): ``layer.attention`` holds ONE fused ``query_key_value`` (``nn.Linear``, weight
``[3*width, hidden]``) whose output rows are interleaved per head, ``[head, (q, k, v), head_dim]``
(``qkv_layout="fused_per_head"``), and ``dense``, the output projection. It returns ``(output, probs)``
(probabilities in eager mode).

The forward reshapes with ``view(..., -1, 3 * head_size)`` and the rotary embedding covers the first
``rotary_ndims`` features of every head, so slicing whole heads needs no attribute update. The layer passes
the generation cache as ``layer_past``.
"""

from __future__ import annotations

from cahp.adapters.base import ArchitectureAdapter, register_adapter

GPT_NEOX = register_adapter(
    "gpt_neox",
    ArchitectureAdapter(
        family="gpt_neox",
        layers="layers",
        attention="attention",
        query="attention.query_key_value",
        key="attention.query_key_value",
        value="attention.query_key_value",
        output="attention.dense",
        qkv_layout="fused_per_head",
        cache_arguments=("layer_past",),
    ),
)
