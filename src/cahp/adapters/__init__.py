"""Architecture adapters: where each family keeps its attention heads. Importing this package registers the
built-in families (BERT/RoBERTa/XLM-R/ELECTRA, DistilBERT, MPNet, ViT, GPT-2, GPT-NeoX/Pythia,
Llama/Mistral/Qwen2, Gemma 3). :mod:`cahp.adapters.geometry` says which rows and columns are each head's."""

from cahp.adapters import bert, distilbert, gemma3, gpt2, gpt_neox, llama, mpnet, vit  # noqa: F401  (registers built-ins)
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
from cahp.adapters.geometry import GeometryError, HeadGeometry, ProjectionKind, QkvLayout

__all__ = [
    "ArchitectureAdapter",
    "GeometryError",
    "HeadGeometry",
    "ProjectionKind",
    "QkvLayout",
    "attention_modules",
    "get_adapter",
    "num_heads",
    "num_kv_heads",
    "num_layers",
    "output_projections",
    "register_adapter",
    "supported_model_types",
]
