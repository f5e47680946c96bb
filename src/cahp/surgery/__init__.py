"""Surgery: the only code that changes a model's attention heads.

* :func:`head_mask` / :func:`attach_head_gates`: multiply each head's context by a gate (no weight change);
* :func:`prune_heads`: physically remove heads (original head numbers, GQA-aware) and record the structure;
* :func:`layer_geometries`: which rows/columns of each layer's projections its current heads own;
* :func:`load_pruned`: reload a pruned folder written by ``save_pretrained``;
* :func:`export_onnx`: export a (pruned) classifier to ONNX.
"""

from cahp.surgery.export import export_onnx
from cahp.surgery.masking import HeadGateHandle, attach_head_gates, head_mask
from cahp.surgery.persistence import load_pruned
from cahp.surgery.removal import (
    apply_kept_heads,
    heads_to_remove,
    is_pruned,
    kept_heads_by_layer,
    kept_kv_heads_by_layer,
    layer_geometries,
    prune_heads,
)

__all__ = [
    "HeadGateHandle",
    "apply_kept_heads",
    "attach_head_gates",
    "export_onnx",
    "head_mask",
    "heads_to_remove",
    "is_pruned",
    "kept_heads_by_layer",
    "kept_kv_heads_by_layer",
    "layer_geometries",
    "load_pruned",
    "prune_heads",
]
