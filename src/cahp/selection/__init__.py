"""From head profiles and salience to CAHP's clusters: head space, MSS(k) sweep, knee, representatives."""

from cahp.selection.clustering import (
    Clustering,
    KSweep,
    cluster_heads,
    effective_perplexity,
    embed_heads,
    head_distances,
    mean_simplified_silhouette,
    sweep_k,
)
from cahp.selection.knee import KneeResult, find_knee
from cahp.selection.representatives import (
    HeadSelection,
    default_head_ids,
    normalize_salience,
    select_representatives,
)

__all__ = [
    "Clustering",
    "HeadSelection",
    "KSweep",
    "KneeResult",
    "cluster_heads",
    "default_head_ids",
    "effective_perplexity",
    "embed_heads",
    "find_knee",
    "head_distances",
    "mean_simplified_silhouette",
    "normalize_salience",
    "select_representatives",
    "sweep_k",
]
