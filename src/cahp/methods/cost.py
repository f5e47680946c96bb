"""Budgets in FLOPs and latency: the most heads whose plan costs at most a share of the unpruned model.

A ``flops=F`` or ``latency=L`` budget (``--flops F`` / ``--latency L``) is resolved to a head count from the
method's own plans, so it works for every method and every constraint:

* **FLOPs** (:class:`FlopsCost`): forward FLOPs of one sequence of the task's typical length (the calibration
  examples' mean token count, padding excluded: :func:`typical_length`), counted exactly as
  :mod:`cahp.evaluation.accounting` counts a pruned model, but from a plan, before any surgery. Per layer the q and
  o projections and the ``Q K^T`` / ``P V`` products scale with the query heads kept, the k and v projections with
  the key-value heads kept (a fused q/k/v projection with the query heads); everything else (feed-forward,
  embeddings, classifier) is fixed, so head removal alone cannot go below the share of FLOPs outside attention.
* **Latency** (:class:`LatencyCost`): a lookup table measured once per model, constraints and batch shape (Kwon et
  al. 2022 measure one per layer type; our layers share a shape, so one table serves every layer). The model is
  pruned to ``u`` units in EVERY layer, ``u = 0 .. U`` (a unit: one head, one key-value group, or one head per
  group), each copy is timed on the same synthetic batch, interleaved, median of the repeats; a layer keeping ``u``
  units then costs ``t(u) = (T(u) - T(0)) / layers`` and the rest of the model ``T(0)``. A plan's predicted
  latency is ``T(0) + sum_l t(u_l)``, as a share of ``T(U)`` (the dense model). ``T`` is made non-decreasing in
  ``u`` (a running maximum) so that noise cannot make more heads look cheaper. Under several processes the main
  process measures and the others use its table.
* **Resolution** (:func:`plan_within`): the largest head count, in whole units, whose plan's cost is at most the
  budget, by bisection over ``plan_at(heads)`` (a plan's cost does not fall when it keeps more heads). The plan
  keeps the method's choice of heads at that count; its ``budget`` is the cost budget asked and its details say
  the cost obtained. A budget below what the smallest plan costs is refused with the floor in the message.
  A budget-aware method (its fit depends on the count) gets the count at which any placement fits
  (:func:`placement_plan`): exact for models whose layers share a shape, as every unpruned model does.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from cahp import distributed
from cahp.adapters import get_adapter
from cahp.errors import CahpError
from cahp.methods.plan import Budget, Constraints, HeadGrid, KeepPlan
from cahp.methods.select import select_heads

#: Timed forwards per pruned copy when the latency table is measured (after two warm-up forwards).
LATENCY_REPEATS = 10


def typical_length(model: Any, calibration: Any) -> int:
    """The task's typical sequence length: the calibration examples' mean token count (padding excluded), or for
    examples without token ids (images) the sequence length the first layer sees on one calibration batch."""
    features = calibration.examples.features
    lengths = [len(feature["input_ids"]) for feature in features if "input_ids" in feature]
    if lengths:
        return max(1, round(float(np.mean(lengths))))
    return _first_layer_length(model, calibration)


class _Seen(Exception):
    pass


@torch.no_grad()
def _first_layer_length(model: Any, calibration: Any) -> int:
    seen: list[int] = []

    def read(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(int(hidden.shape[1]))
        raise _Seen

    layer = get_adapter(model).layer_modules(model)[0]
    handle = layer.register_forward_pre_hook(read, with_kwargs=True)
    try:
        batch = next(iter(calibration.batches()))
        with contextlib.suppress(_Seen):
            calibration.forward(model, batch)
    finally:
        handle.remove()
    if not seen:
        raise CahpError("the first layer was not called on a calibration batch: no sequence length to budget with")
    return seen[0]


def kv_heads_kept(kept_heads: list[int], grid: HeadGrid) -> int:
    """Key-value heads a layer keeps: those with at least one of their query heads kept."""
    return len({head // grid.group_size for head in kept_heads})


class FlopsCost:
    """Forward FLOPs of one sequence of ``seq_len`` tokens, for a plan, as a share of the unpruned model's.

    Args:
        model: the unpruned model (its current shapes are the reference).
        seq_len: tokens per sequence.
    """

    kind = "flops"

    def __init__(self, model: Any, seq_len: int) -> None:
        from cahp.evaluation.accounting import attention_flops, total_flops
        from cahp.surgery.removal import layer_geometries

        adapter = get_adapter(model)
        self.seq_len = seq_len
        self.grid = HeadGrid.of(model)
        self.dense = total_flops(model, seq_len)
        self.fixed = self.dense - attention_flops(model, seq_len)
        #: per layer, the FLOPs of one query head and of one key-value head
        self.per_head: list[tuple[float, float]] = []
        for layer, geometry in zip(adapter.layer_modules(model), layer_geometries(model), strict=True):
            weights = sum(
                cast(torch.Tensor, projection.weight).numel() for projection in adapter.attention_projections(layer)
            )
            widths = 2 * geometry.query_heads + 2 * geometry.kv_heads  # q and o per query head, k and v per kv head
            per_width = 2 * seq_len * weights / widths if widths else 0.0  # one head's share of one projection
            products = 2 * 2 * seq_len * seq_len * geometry.head_dim  # Q K^T and P V
            self.per_head.append((2 * per_width + products, 2 * per_width))

    def flops(self, kept_heads_by_layer: dict[int, list[int]]) -> float:
        """Forward FLOPs of the model that keeps ``kept_heads_by_layer`` (original numbering)."""
        total = float(self.fixed)
        for layer, (query_cost, kv_cost) in enumerate(self.per_head):
            kept = kept_heads_by_layer.get(layer, [])
            total += len(kept) * query_cost + kv_heads_kept(kept, self.grid) * kv_cost
        return total

    def share(self, plan: KeepPlan) -> float:
        return self.flops(plan.kept_heads_by_layer) / self.dense

    def describe(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "dense_flops": self.dense, "floor": round(self.fixed / self.dense, 4)}


class LatencyCost:
    """Predicted forward latency of a plan, as a share of the unpruned model's, from a measured lookup table.

    Args:
        model: the unpruned model (copied, never modified).
        constraints: the unit a layer loses (one head, a key-value group, one head per group).
        batch_size, seq_len: the synthetic batch timed.
        repeats: timed forwards per copy.
    """

    kind = "latency"

    def __init__(
        self, model: Any, constraints: Constraints, batch_size: int, seq_len: int, repeats: int = LATENCY_REPEATS
    ) -> None:
        self.grid = HeadGrid.of(model)
        self.constraints = constraints
        self.unit = constraints.unit_size(self.grid)
        self.batch_size, self.seq_len, self.repeats = batch_size, seq_len, repeats
        measured = distributed.broadcast_object(self._measure(model) if distributed.is_main() else None)
        self.seconds: list[float] = list(np.maximum.accumulate(np.asarray(measured, dtype=np.float64)))
        self.measured_seconds: list[float] = list(measured)

    def _units(self, count: int) -> list[int]:
        """The heads of a layer that keeps its first ``count`` units."""
        grid = self.grid
        if self.unit == 1 or self.constraints.gqa == "groups":
            return list(range(count * self.unit))
        return [group * grid.group_size + j for group in range(grid.kv_heads) for j in range(count)]

    def _measure(self, model: Any) -> list[float]:
        from cahp.evaluation.latency import measure_latency, synthetic_batch
        from cahp.runtime import model_device
        from cahp.surgery import prune_heads

        copies: dict[str, nn.Module] = {}
        for count in range(self.grid.heads // self.unit + 1):
            kept = set(self._units(count))
            removed = {layer: [h for h in range(self.grid.heads) if h not in kept] for layer in range(self.grid.layers)}
            copies[str(count)] = prune_heads(copy.deepcopy(model), removed, gqa_mode=self.constraints.gqa)
        batch = synthetic_batch(model, self.batch_size, self.seq_len)
        batch = {key: value.to(model_device(model)) for key, value in batch.items()}
        timings = measure_latency(copies, batch, repeats=self.repeats)
        return [timings[str(count)]["median_seconds"] for count in range(len(copies))]

    def seconds_of(self, kept_heads_by_layer: dict[int, list[int]]) -> float:
        """Predicted seconds per batch of the model that keeps ``kept_heads_by_layer``."""
        base = self.seconds[0]
        per_layer = [(seconds - base) / self.grid.layers for seconds in self.seconds]
        units = [math.ceil(len(kept_heads_by_layer.get(layer, [])) / self.unit) for layer in range(self.grid.layers)]
        return base + sum(per_layer[count] for count in units)

    def share(self, plan: KeepPlan) -> float:
        return self.seconds_of(plan.kept_heads_by_layer) / self.seconds[-1]

    def describe(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "unit_heads": self.unit,
            "table_seconds": [round(seconds, 6) for seconds in self.measured_seconds],
            "floor": round(self.seconds[0] / self.seconds[-1], 4),
        }


Cost = FlopsCost | LatencyCost


def placement_plan(heads: int, grid: HeadGrid, constraints: Constraints) -> KeepPlan:
    """A plan of ``heads`` heads with no preference among them (every head scored alike): what a budget-aware
    method's count is resolved with, before its fit."""
    selection = select_heads(np.zeros((grid.layers, grid.heads)), heads, grid, constraints)
    return KeepPlan(
        "placement", {}, grid, Budget.keep(heads), constraints, selection.heads_requested, selection.kept_heads_by_layer
    )


def plan_within(
    budget: Budget, plan_at: Callable[[int], KeepPlan], grid: HeadGrid, constraints: Constraints, cost: Cost
) -> KeepPlan:
    """The plan of the most heads (whole units) whose cost is at most ``budget.value`` of the dense model's.

    Args:
        budget: a ``flops=F`` or ``latency=L`` budget.
        plan_at: the method's plan for a head count (``method.plan(Budget.keep(k), constraints)``).
        grid, constraints: the model's heads and the plan's constraints.
        cost: a :class:`FlopsCost` or :class:`LatencyCost` of the same model.

    Returns:
        That plan with ``budget`` set to the cost budget and ``details["budget_cost"]`` saying what it costs.

    Raises:
        CahpError: not a cost budget, or a budget below the cost of the smallest plan.
    """
    if not budget.is_cost or budget.value is None:
        raise CahpError(f"plan_within needs a flops or latency budget, got {budget.label()}")
    unit = constraints.unit_size(grid)
    low, high = 1, grid.total // unit
    smallest = plan_at(low * unit)
    if cost.share(smallest) > budget.value + 1e-12:
        raise CahpError(
            f"{budget.label()} is below what removing heads can reach: the smallest plan allowed ({smallest.heads_kept}"
            f" heads) costs {cost.share(smallest):.3f} of the dense model's {cost.kind} "
            f"({_what_stays(cost)}); give a larger share, or --allow-empty-layers"
        )
    plans = {low: smallest}
    while low < high:
        middle = (low + high + 1) // 2
        plans[middle] = plan_at(middle * unit)
        if cost.share(plans[middle]) <= budget.value + 1e-12:
            low = middle
        else:
            high = middle - 1
    chosen = plans[low]
    details = {**chosen.details, "budget_cost": {"kind": cost.kind, "asked": budget.value, **cost_shares(chosen, cost)}}
    return replace(chosen, budget=budget, details=details)


def cost_shares(plan: KeepPlan, *costs: Cost) -> dict[str, Any]:
    """``{"<kind>_share": share of the dense model's cost, ...}`` plus each cost's description."""
    shares: dict[str, Any] = {}
    for cost in costs:
        shares[f"{cost.kind}_share"] = round(cost.share(plan), 4)
        shares[cost.kind] = cost.describe()
    return shares


def _what_stays(cost: Cost) -> str:
    floor = cost.describe()["floor"]
    if cost.kind == "flops":
        return f"at {cost.seq_len} tokens, {floor:.3f} of the FLOPs lie outside attention and stay"
    return f"the model without attention heads takes {floor:.3f} of the dense latency"
