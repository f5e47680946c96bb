"""Llama, Mistral and Qwen2: ``layer.self_attn`` holds ``q_proj``/``k_proj``/``v_proj``/``o_proj`` with
grouped-query attention: ``num_key_value_heads`` key-value heads, each shared by ``num_key_value_groups``
consecutive query heads (query head ``h`` reads key-value head ``h // num_key_value_groups``). The forward
reshapes with ``view(..., -1, head_dim)`` and repeats key-value heads ``num_key_value_groups`` times."""

from __future__ import annotations

from transformers import PretrainedConfig

from cahp.adapters.base import ArchitectureAdapter, register_adapter


def _llama_head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


LLAMA = register_adapter(
    ("llama", "mistral", "qwen2"),
    ArchitectureAdapter(
        family="llama",
        layers="layers",
        attention="self_attn",
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        output="self_attn.o_proj",
        head_dim=_llama_head_dim,
        num_kv_heads_key="num_key_value_heads",
        kv_groups_attr="num_key_value_groups",
    ),
)
