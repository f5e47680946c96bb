"""Kwon et al. (2022), "A Fast Post-Training Pruning Framework for Transformers", for attention heads: ``kwon``.

The retraining-free framework has three steps; the first two choose the heads and live here, the third is a
post-surgery step of every run:

1. **Mask search.** With a gate ``m_h = 1`` on every head's context and frozen weights, the empirical Fisher
   information of the mask, ``I = sum_x g(x) g(x)^T`` with ``g(x) = dL(x) / dm`` per calibration example (``L``:
   the calibration objective's loss). Under a FLOPs or latency budget the search keeps the masks of highest
   diagonal importance ``I_hh`` within the budget. Kwon et al. search heads and feed-forward neurons together; cahp
   removes heads only, and every head of a layer costs the same, so the search is the global top-K of ``I_hh``
   under the run's constraints (the selection rule of every method), and a ``--flops F`` / ``--latency L`` budget
   becomes that K (:mod:`cahp.methods.cost`).
2. **Mask rearrangement.** The search ignores how heads of a layer interact. Keeping each layer's head count, the
   heads are re-chosen to minimise the second-order loss increase ``(1 - m_l)^T I_l (1 - m_l)`` with the layer's
   full Fisher block ``I_l`` ``[heads, heads]``, by Kwon et al.'s greedy pass: from the search's removed units,
   each kept unit in turn (least important first) joins the removed set and the removed unit whose return lowers
   the objective most goes back. It is a local refinement of the search, never worse by the objective (an exact
   minimisation, every choice of units, picked the same heads on MiniLM-L6 / SST-5). The units are the
   constraints': heads, whole key-value groups (``A^T I_l A`` with ``A`` the group membership), or, in ``uniform``
   grouped-query mode, each group's own heads with the group's count.
3. **Mask tuning** is ``--reconstruct scale``: one least-squares scale per kept head, layer by layer, regularised
   toward 1 (:mod:`cahp.reconstruction`). ``cahp prune --method kwon --flops F --reconstruct scale`` is the whole
   framework for heads.

Seed: it only draws the subset when the calibration set has more than ``max_examples`` examples.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cahp import distributed
from cahp.errors import CahpError
from cahp.methods.base import register_method
from cahp.methods.method import PruningMethod
from cahp.methods.plan import Budget, Constraints, HeadGrid, KeepPlan

if TYPE_CHECKING:
    from cahp.calibration import Calibration

#: What the registry lists without importing this module (read with ``ast``: see :mod:`cahp.methods.base`).
METHOD_CARD = {
    "class": "KwonSearch",
    "kind": "method",
    "finds_own_budget": False,
    "budget_aware": False,
    "deterministic": False,
    "needs_classes": False,
    "settings": {"max_examples": 256, "rearrange": True, "seed": 0},
}


@register_method("kwon")
class KwonSearch(PruningMethod):
    """Kwon et al.'s Fisher mask search with per-layer mask rearrangement (heads; tune with --reconstruct scale).

    Args:
        max_examples: calibration examples (a seeded subset) whose per-example mask gradients make the Fisher
            information; default 256.
        rearrange: re-choose each layer's heads with its full Fisher block (False: the search alone, the top-K of
            the diagonal, which is the ``fisher`` method).
        seed: picks the subset (only when the calibration set is larger than ``max_examples``).

    Learned state: ``fisher_`` ``[layers, heads, heads]`` (the per-layer Fisher blocks), ``scores_`` ``[layers,
    heads]`` (their diagonals), ``grid_``, ``fit_seconds_``.
    """

    def __init__(self, *, max_examples: int | None = 256, rearrange: bool = True, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.max_examples = max_examples
        self.rearrange = rearrange

    def fit(self, model: Any, calibration: Calibration) -> KwonSearch:
        from cahp.scoring.fisher import mask_gradients
        from cahp.signatures.model_state import preserved_model
        from cahp.surgery import is_pruned

        if is_pruned(model):
            raise CahpError("method 'kwon' needs an unpruned model; fit it before pruning")
        start = time.perf_counter()
        grid = HeadGrid.of(model)
        blocks = torch.zeros(grid.layers, grid.heads, grid.heads, dtype=torch.float64)
        with preserved_model(model):
            for gradient in mask_gradients(model, calibration, 1, self.max_examples, self.seed):  # [layers, heads]
                blocks += gradient[:, :, None] * gradient[:, None, :]
        self.fisher_ = distributed.all_reduce_sum(blocks).numpy()
        self.scores_ = np.einsum("lhh->lh", self.fisher_).copy()
        self.grid_ = grid
        self.fit_seconds_ = round(time.perf_counter() - start, 2)
        return self

    def plan(self, budget: Budget, constraints: Constraints | None = None) -> KeepPlan:
        grid = self.check_fitted()
        constraints = constraints or Constraints()
        search = self.plan_from_priority(
            self.scores_, self.budget_heads(budget), budget, constraints, {"how": "top-k of the mask Fisher diagonal"}
        )
        details: dict[str, Any] = {"scores": self.scores_.tolist(), "search_kept_heads_by_layer": {}}
        if not self.rearrange:
            search.details.update(details)
            return search
        kept: dict[int, list[int]] = {}
        changed = []
        for layer, heads in search.kept_heads_by_layer.items():
            kept[layer] = rearranged(self.fisher_[layer], heads, grid, constraints)
            if kept[layer] != heads:
                changed.append(layer)
                details["search_kept_heads_by_layer"][str(layer)] = heads
        guarded = {layer for layer, _ in search.guardrail_heads}
        search.kept_heads_by_layer = kept
        search.guardrail_heads = [(layer, head) for layer in sorted(guarded) for head in kept[layer]]
        search.details.update(
            details, how="top-k of the mask Fisher diagonal, then per-layer rearrangement", rearranged_layers=changed
        )
        return search


def rearranged(fisher: np.ndarray, kept: list[int], grid: HeadGrid, constraints: Constraints) -> list[int]:
    """The heads one layer keeps after Kwon's rearrangement: as many units as ``kept`` holds, chosen to minimise
    ``(1 - m)^T fisher (1 - m)`` (:func:`_best_units`), or ``kept`` itself where that is no worse.

    Args:
        fisher: ``[heads, heads]`` the layer's Fisher block.
        kept: the search's kept heads of the layer (original numbering).
        grid, constraints: the unit of removal (a head, a key-value group, or one head per group).
    """
    size = grid.group_size
    if grid.uses_gqa and constraints.gqa == "uniform":  # every group keeps the same count: rearrange each group
        per_group = sum(1 for head in kept if head // size == 0)
        chosen: list[int] = []
        for group in range(grid.kv_heads):
            members = list(range(group * size, (group + 1) * size))
            units = [[head] for head in members]
            search = [[head] for head in kept if head // size == group]
            chosen += _best_units(fisher, units, per_group, search)
        return sorted(chosen)
    if grid.uses_gqa:
        units = [list(range(g * size, (g + 1) * size)) for g in range(grid.kv_heads)]
    else:
        units = [[head] for head in range(grid.heads)]
    search = [unit for unit in units if unit[0] in kept]
    return sorted(_best_units(fisher, units, len(search), search))


def _best_units(fisher: np.ndarray, units: list[list[int]], count: int, search: list[list[int]]) -> list[int]:
    """The heads of ``count`` of ``units`` after Kwon et al.'s greedy rearrangement of ``search`` (the units the
    search keeps): starting from the search's removed units, each kept unit in turn, least important first (its own
    ``r^T fisher r``), joins the removed set, and the removed unit whose return lowers ``r^T fisher r`` most
    returns (possibly the one that just joined). The objective never rises, and the count is kept."""

    def increase(removed: Iterable[list[int]]) -> float:
        heads = [head for unit in removed for head in unit]
        return float(fisher[np.ix_(heads, heads)].sum()) if heads else 0.0

    removed = [unit for unit in units if unit not in search]
    for unit in sorted(search, key=lambda unit: (increase([unit]), unit[0])):
        removed.append(unit)
        back = min(removed, key=lambda u: (increase([other for other in removed if other is not u]), u[0]))
        removed.remove(back)
    return sorted(head for unit in units if unit not in removed for head in unit)
