"""Architecture adapters: where each family keeps its attention heads. Importing this package registers the
built-in families (BERT/RoBERTa/XLM-R/ELECTRA, DistilBERT, MPNet, ViT, GPT-2, Llama/Mistral/Qwen2)."""

from cahp.adapters import bert, distilbert, gpt2, llama, mpnet, vit  # noqa: F401  (registers built-ins)
from cahp.adapters.base import (
    ArchitectureAdapter,
    attention_modules,
    get_adapter,
    num_heads,
    num_kv_heads,
    num_layers,
    output_projections,
    register_adapter,
    supported_model_types,
)

__all__ = [
    "ArchitectureAdapter",
    "attention_modules",
    "get_adapter",
    "num_heads",
    "num_kv_heads",
    "num_layers",
    "output_projections",
    "register_adapter",
    "supported_model_types",
]
