"""Budgeted selection from per-head scores: global top-K with CAHP's one-head-per-layer guardrail.

Any scorer (``[layers, heads]``, higher = keep) becomes a keep-plan here, so the methods compared in a
benchmark differ only in their scores: the same K, the same tie rule (lower global index ``layer * heads +
head`` first), and the same guardrail as :func:`cahp.selection.representatives.select_representatives`
(a layer left without heads keeps its best head, beyond the budget, unless ``allow_empty_layers``).
"""

from __future__ import annotations

import numpy as np

from cahp.errors import CahpError
from cahp.selection.representatives import HeadId, clusters_for_keep, clusters_for_sparsity


def keep_from_budget(n_heads: int, keep: int | None = None, sparsity: float | None = None) -> int:
    """Heads to keep for a budget given as a count (``keep``) or a share removed (``sparsity``).

    Uses CAHP's rules (:func:`clusters_for_keep`, :func:`clusters_for_sparsity`: ``round((1 - S) N)``
    rounded half up, at least 1).

    Raises:
        CahpError: neither or both given, or a value out of range.
    """
    if keep is not None and sparsity is not None:
        raise CahpError("give either keep or sparsity, not both")
    if keep is not None:
        return clusters_for_keep(n_heads, int(keep))
    if sparsity is not None:
        return clusters_for_sparsity(n_heads, float(sparsity))
    raise CahpError("a budget is needed: pass keep (heads to keep) or sparsity (share of heads removed)")


def select_top_k(
    scores: np.ndarray, keep: int, allow_empty_layers: bool = False
) -> tuple[dict[int, list[int]], list[HeadId]]:
    """Keep the ``keep`` best heads over all layers, then make sure no layer is left empty.

    Args:
        scores: ``[layers, heads]`` finite scores, higher = keep.
        keep: heads to keep, ``1 <= keep <= layers * heads``.
        allow_empty_layers: if False (default) a layer with no kept head keeps its best head in addition.

    Returns:
        ``(kept_heads_by_layer, guardrail_heads)``: ``{layer: sorted heads}`` for every layer (empty lists
        only with ``allow_empty_layers``), and the ``(layer, head)`` pairs the guardrail added.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.size == 0:
        raise CahpError(f"scores must be a non-empty [layers, heads] array, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise CahpError("scores have non-finite values; rescore the model")
    layers, heads = scores.shape
    keep = clusters_for_keep(layers * heads, int(keep))
    order = np.argsort(-scores.ravel(), kind="stable")  # ties: lower global index first
    kept: dict[int, set[int]] = {layer: set() for layer in range(layers)}
    for index in order[:keep]:
        layer, head = divmod(int(index), heads)
        kept[layer].add(head)
    guardrail: list[HeadId] = []
    if not allow_empty_layers:
        for layer in range(layers):
            if not kept[layer]:
                best = int(np.argmax(scores[layer]))  # first maximum: lowest head on ties
                kept[layer].add(best)
                guardrail.append((layer, best))
    return {layer: sorted(hs) for layer, hs in kept.items()}, guardrail
