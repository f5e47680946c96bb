"""GPT-2: ``layer.attn`` holds ONE fused ``c_attn`` (``Conv1D``, weight ``[hidden, 3*width]``, output columns
``[q | k | v]``: ``qkv_layout="fused"``, ``transposed``) and ``c_proj`` (weight ``[width, hidden]``); it
splits ``c_attn``'s output with ``split_size``, which must equal the kept width. Only self-attention is
described (no cross-attention)."""

from __future__ import annotations

from cahp.adapters.base import ArchitectureAdapter, register_adapter

GPT2 = register_adapter(
    "gpt2",
    ArchitectureAdapter(
        family="gpt2",
        layers="h",
        attention="attn",
        query="attn.c_attn",
        key="attn.c_attn",
        value="attn.c_attn",
        output="attn.c_proj",
        qkv_layout="fused",
        transposed=True,
        head_count_attrs=("num_heads",),
        width_attrs=("split_size",),
    ),
)
