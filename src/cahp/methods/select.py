"""Turn per-head priorities into a keep-plan that the model can express: the one selection rule every method uses.

A layer loses heads in *units*: single heads (multi-head attention), whole key-value groups (grouped-query
attention, ``gqa="groups"``) or one query head from every group at once (``gqa="uniform"``: the j-th best
head of each group). A budget of K heads becomes ``round(K / unit)`` units, so it is made expressible BEFORE
selection. The best units over all layers are kept (ties: lower layer, then lower head first); with
``uniform_layers`` every layer keeps the same number of units instead. Finally a layer left with fewer than
``min_heads_per_layer`` heads keeps its best remaining units beyond the budget (the guardrail).

For multi-head attention with the default constraints this is global top-K with CAHP's one-head-per-layer
guardrail: the rule of the benchmark since its first version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cahp.errors import CahpError
from cahp.methods.plan import Constraints, HeadGrid


@dataclass(frozen=True)
class Selection:
    """The result: kept heads by layer, the guardrail additions, and the head count the budget asked for."""

    kept_heads_by_layer: dict[int, list[int]]
    guardrail_heads: list[tuple[int, int]]
    heads_requested: int


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _units(priority: np.ndarray, grid: HeadGrid, constraints: Constraints) -> list[list[tuple[float, list[int]]]]:
    """Per layer, its units best first: ``(unit priority, member heads)``."""
    unit_size = constraints.unit_size(grid)
    layers: list[list[tuple[float, list[int]]]] = []
    for row in priority:
        if unit_size == 1:
            units = [(float(row[h]), [h]) for h in range(grid.heads)]
        elif constraints.gqa == "groups":
            size = grid.group_size
            units = [
                (float(np.mean(row[g * size : (g + 1) * size])), list(range(g * size, (g + 1) * size)))
                for g in range(grid.kv_heads)
            ]
        else:  # uniform within groups: unit j = the j-th best head of every group
            size = grid.group_size
            ranked = [sorted(range(g * size, (g + 1) * size), key=lambda h: (-row[h], h)) for g in range(grid.kv_heads)]
            units = [
                (float(np.mean([row[members[j]] for members in ranked])), sorted(m[j] for m in ranked))
                for j in range(size)
            ]
        if unit_size != 1 and constraints.gqa == "uniform":
            layers.append(units)  # the j-th best heads: already best first, and unit j needs unit j - 1
        else:
            layers.append(sorted(units, key=lambda unit: (-unit[0], unit[1][0])))
    return layers


def select_heads(priority: np.ndarray, heads: int, grid: HeadGrid, constraints: Constraints) -> Selection:
    """Keep about ``heads`` heads, best ``priority`` first, under ``constraints``.

    Args:
        priority: ``[layers, heads]`` finite scores in original head numbering, higher = keep.
        heads: the budget in query heads, ``1 <= heads <= layers * heads``; rounded to whole units.
        grid: the model's original head structure.
        constraints: what the plan must satisfy.

    Returns:
        A :class:`Selection`.

    Raises:
        CahpError: a priority of the wrong shape or with non-finite values, or a budget out of range.
    """
    priority = np.asarray(priority, dtype=np.float64)
    if priority.shape != (grid.layers, grid.heads):
        raise CahpError(
            f"scores must be [layers, heads] = {[grid.layers, grid.heads]}, got shape {list(priority.shape)}"
        )
    if not np.all(np.isfinite(priority)):
        raise CahpError("scores have non-finite values; rescore the model")
    if not 1 <= heads <= grid.total:
        raise CahpError(f"the budget must keep between 1 and the model's {grid.total} heads, got {heads}")
    unit_size = constraints.unit_size(grid)
    per_layer = _units(priority, grid, constraints)
    units_per_layer = grid.heads // unit_size
    wanted = min(max(1, _round_half_up(heads / unit_size)), grid.layers * units_per_layer)
    if constraints.uniform_layers:
        count = min(max(1, _round_half_up(wanted / grid.layers)), units_per_layer)
        taken = [count] * grid.layers
        wanted = count * grid.layers
    else:
        flat = [
            (-units[j][0], layer, units[j][1][0], j) for layer, units in enumerate(per_layer) for j in range(len(units))
        ]
        taken = [0] * grid.layers
        for _, layer, _, _ in sorted(flat)[:wanted]:
            taken[layer] += 1
    minimum_units = math.ceil(constraints.min_heads_per_layer / unit_size)
    guardrail: list[tuple[int, int]] = []
    kept: dict[int, list[int]] = {}
    for layer, units in enumerate(per_layer):
        chosen = [head for _, members in units[: taken[layer]] for head in members]
        if taken[layer] < minimum_units:
            extra = [head for _, members in units[taken[layer] : minimum_units] for head in members]
            guardrail += [(layer, head) for head in sorted(extra)]
            chosen += extra
        kept[layer] = sorted(chosen)
    return Selection(kept, guardrail, wanted * unit_size)
