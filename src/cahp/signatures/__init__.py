"""Per-head behavioural signatures: padding-aware resized attention maps and their streaming statistics."""

from cahp.signatures.resize import DEFAULT_SIZE, interpolation_matrices, resize_attention_maps
from cahp.signatures.stats import StreamingMoments

__all__ = ["DEFAULT_SIZE", "StreamingMoments", "interpolation_matrices", "resize_attention_maps"]
