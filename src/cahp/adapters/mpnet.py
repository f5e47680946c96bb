"""MPNet: ``layer.attention.attn`` holds ``q``/``k``/``v``/``o``.

Two quirks: the encoder computes ONE relative-position bias ``[batch, heads, q, k]`` for the original heads
and passes it (third positional argument) to every layer, so a pruned layer must take its own slice of it;
and the attention module returns ``(output, probs)`` only when called with ``output_attentions=True``
(otherwise ``(output,)``). Its forward reshapes the context with ``all_head_size``, which must be updated.
"""

from __future__ import annotations

from cahp.adapters.base import ArchitectureAdapter, register_adapter

MPNET = register_adapter(
    "mpnet",
    ArchitectureAdapter(
        family="mpnet",
        layers="encoder.layer",
        attention="attention.attn",
        query="attention.attn.q",
        key="attention.attn.k",
        value="attention.attn.v",
        output="attention.attn.o",
        head_count_attrs=("num_attention_heads",),
        width_attrs=("all_head_size",),
        per_head_argument=("position_bias", 2),
        probs_need_output_attentions=True,
    ),
)
