"""Gemma 3 (text): Llama's attention layout (``q_proj``/``k_proj``/``v_proj``/``o_proj``, grouped-query attention
with consecutive query heads per key-value head, ``head_dim`` read from the config) plus two things surgery leaves
alone: ``q_norm``/``k_norm`` are RMSNorms over one head's ``head_dim``, shared by every head, and the attention's
scale comes from ``query_pre_attn_scalar``, not the head count. Sliding-window and global layers alternate
(``layer_types``); both keep their window when heads go. Gemma 3 270M has one key-value head per layer, so only
query heads can be removed there (``--gqa-mode uniform`` or ``query``-level plans that keep every group)."""

from __future__ import annotations

from cahp.adapters.base import ArchitectureAdapter, register_adapter
from cahp.adapters.llama import LLAMA

GEMMA3 = register_adapter(
    ("gemma3_text",),
    ArchitectureAdapter(
        family="gemma3",
        layers=LLAMA.layers,
        attention=LLAMA.attention,
        query=LLAMA.query,
        key=LLAMA.key,
        value=LLAMA.value,
        output=LLAMA.output,
        head_dim=LLAMA.head_dim,
        num_kv_heads_key=LLAMA.num_kv_heads_key,
        kv_groups_attr=LLAMA.kv_groups_attr,
    ),
)
