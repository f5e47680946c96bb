"""ViT: ``layer.attention`` holds ``q_proj``/``k_proj``/``v_proj``/``o_proj``; it returns ``(output, probs)``.

The layers sit directly in ``ViTModel.layers`` (no ``encoder``) in transformers 5.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from cahp.adapters.base import ArchitectureAdapter, register_adapter


def _vit_head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


VIT = register_adapter(
    "vit",
    ArchitectureAdapter(
        family="vit",
        layers="layers",
        attention="attention",
        query="attention.q_proj",
        key="attention.k_proj",
        value="attention.v_proj",
        output="attention.o_proj",
        head_dim=_vit_head_dim,
        head_count_attrs=("num_attention_heads",),
    ),
)
