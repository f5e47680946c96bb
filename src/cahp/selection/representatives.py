"""From clusters to a keep-plan: one representative per cluster, then the per-layer guardrail.

Heads are indexed globally: row ``g`` of the head space is ``(layer, head) = divmod(g, heads_per_layer)``
unless explicit ``head_ids`` are given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from cahp.errors import CahpError

Representative = Literal["salience", "medoid"]
HeadId = tuple[int, int]


def normalize_salience(salience: np.ndarray) -> np.ndarray:
    """Global min-max normalisation to ``[0, 1]`` over all heads (reference); all-equal scores become 1.

    Args:
        salience: ``[layers, heads]`` (any shape) raw salience, e.g. mean ``|dL/dm_h|``.

    Returns:
        float64 array of the same shape.
    """
    salience = np.asarray(salience, dtype=np.float64)
    if salience.size == 0:
        return salience.copy()
    low, high = float(np.min(salience)), float(np.max(salience))
    if not high > low:
        return np.ones_like(salience)
    return (salience - low) / (high - low)


@dataclass(frozen=True)
class HeadSelection:
    """Which heads stay.

    Attributes:
        kept_heads_by_layer: ``{layer: sorted kept heads}`` for every layer (possibly empty lists when
            ``allow_empty_layers``).
        heads_to_prune: ``{layer: sorted removed heads}``, only layers that lose heads (the
            ``prune_heads`` format of Hugging Face).
        representatives: global index of each cluster's chosen head, in cluster order.
        guardrail_heads: ``(layer, head)`` added by the one-head-per-layer guardrail (beyond the budget).
        n_clusters: number of clusters ``k``.
    """

    kept_heads_by_layer: dict[int, list[int]]
    heads_to_prune: dict[int, list[int]]
    representatives: list[int]
    guardrail_heads: list[HeadId] = field(default_factory=list)
    n_clusters: int = 0

    @property
    def n_kept(self) -> int:
        return sum(len(heads) for heads in self.kept_heads_by_layer.values())

    @property
    def n_guardrail_added(self) -> int:
        """Heads kept beyond ``k`` because a layer would otherwise be empty."""
        return len(self.guardrail_heads)

    @property
    def removed_heads(self) -> set[HeadId]:
        return {(layer, head) for layer, heads in self.heads_to_prune.items() for head in heads}


def default_head_ids(n_layers: int, heads_per_layer: int) -> list[HeadId]:
    """``[(0, 0), (0, 1), ..., (L-1, H-1)]``: global index ``g = layer * H + head``."""
    return [(layer, head) for layer in range(n_layers) for head in range(heads_per_layer)]


def select_representatives(
    labels: np.ndarray,
    salience: np.ndarray,
    medoids: np.ndarray | None = None,
    representative: Representative = "salience",
    allow_empty_layers: bool = False,
    head_ids: Sequence[HeadId] | None = None,
) -> HeadSelection:
    """Keep one head per cluster, then make sure no layer is left empty.

    Args:
        labels: ``[N]`` cluster id of each head (global order).
        salience: ``[layers, heads]`` salience; only its order matters. Ties go to the lower global index.
        medoids: ``[k]`` medoid head of each cluster; required for ``representative="medoid"``.
        representative: ``"salience"`` keeps the most salient head of each cluster (CAHP); ``"medoid"``
            keeps the medoid.
        allow_empty_layers: if False (default) a layer with no kept head keeps its most salient head.
        head_ids: ``(layer, head)`` of each of the N rows; default ``divmod(g, salience.shape[1])``.

    Returns:
        A :class:`HeadSelection`.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    salience = np.asarray(salience, dtype=np.float64)
    if salience.ndim != 2:
        raise CahpError(f"salience must be [layers, heads], got shape {salience.shape}.")
    n_heads = labels.shape[0]
    if head_ids is None:
        if n_heads != salience.size:
            raise CahpError(
                f"{n_heads} cluster labels but salience covers {salience.size} heads {salience.shape}; "
                "pass head_ids when the head space is not every (layer, head)."
            )
        head_ids = default_head_ids(*salience.shape)
    head_ids = [(int(layer), int(head)) for layer, head in head_ids]
    if len(head_ids) != n_heads:
        raise CahpError(f"{len(head_ids)} head_ids for {n_heads} cluster labels.")
    scores = np.array([salience[layer, head] for layer, head in head_ids], dtype=np.float64)
    if not np.all(np.isfinite(scores)):
        raise CahpError("salience has non-finite values for some heads; recompute the salience scores.")

    clusters = np.unique(labels)
    representatives: list[int] = []
    if representative == "medoid":
        if medoids is None:
            raise CahpError("representative='medoid' needs the medoids of the clustering.")
        medoids = np.asarray(medoids, dtype=np.int64)
        representatives = [int(m) for m in medoids]
        if sorted(int(labels[m]) for m in medoids) != clusters.tolist():
            raise CahpError("medoids do not match the cluster labels (one medoid per cluster expected).")
    elif representative == "salience":
        for cluster in clusters:
            members = np.flatnonzero(labels == cluster)
            representatives.append(int(members[np.argmax(scores[members])]))
    else:
        raise CahpError(f"unknown representative {representative!r}; use 'salience' or 'medoid'.")

    layers = sorted({layer for layer, _ in head_ids})
    kept: dict[int, set[int]] = {layer: set() for layer in layers}
    for index in representatives:
        layer, head = head_ids[index]
        kept[layer].add(head)

    guardrail: list[HeadId] = []
    if not allow_empty_layers:
        for layer in layers:
            if kept[layer]:
                continue
            in_layer = [g for g, (lay, _) in enumerate(head_ids) if lay == layer]
            best = in_layer[int(np.argmax(scores[in_layer]))]
            kept[layer].add(head_ids[best][1])
            guardrail.append(head_ids[best])

    all_heads: dict[int, set[int]] = {layer: set() for layer in layers}
    for layer, head in head_ids:
        all_heads[layer].add(head)
    kept_by_layer = {layer: sorted(kept[layer]) for layer in layers}
    to_prune = {layer: sorted(all_heads[layer] - kept[layer]) for layer in layers if all_heads[layer] - kept[layer]}
    return HeadSelection(
        kept_heads_by_layer=kept_by_layer,
        heads_to_prune=to_prune,
        representatives=representatives,
        guardrail_heads=guardrail,
        n_clusters=int(clusters.size),
    )
