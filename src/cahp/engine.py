"""The run engine: the one place where a method is built, fitted (once, cached) and asked for a keep-plan.

``cahp prune``, ``cahp bench`` and every benchmark script go through :class:`Engine`, so the flow
``method -> fit(model, calibration) -> plan(budget, constraints)`` exists once. A fitted method is cached as one
file per (method, settings, calibration, model weights), written atomically; an unreadable cache file is
recomputed. Budget-aware methods (their fit depends on the head count: L0 gates, DSP) are fitted once per
budget; every other method is fitted once and serves every budget.

Under several processes (:mod:`cahp.distributed`) every process fits (the calibration batches are sharded and
the methods reduce their statistics), the main process alone reads and writes the cache and hands a cached fit
to the others, and a run whose processes hold different weights or calibration examples is refused.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cahp import distributed
from cahp.calibration import Calibration
from cahp.errors import CahpError
from cahp.methods.base import PruningMethod, get_method, method_info
from cahp.methods.plan import Budget, Constraints, HeadGrid, KeepPlan
from cahp.outputs import atomic_write, read_cache

#: Bumped when a cached fitted method of an earlier version must not be reused.
CACHE_VERSION = 2


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of every parameter and buffer (names, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def calibration_fingerprint(calibration: Calibration) -> str:
    """A short hash of the calibration examples (token ids or other features, labels), the objective and the batch
    size."""
    digest = hashlib.sha256()
    for features in calibration.examples.features:
        arrays = {key: value for key, value in features.items() if isinstance(value, torch.Tensor | np.ndarray)}
        if not arrays:  # token ids: hashed as they always were
            digest.update(json.dumps(features, sort_keys=True).encode())
            continue
        for key in sorted(features):  # pixel values, say
            digest.update(key.encode())
            if key in arrays:
                array = np.ascontiguousarray(torch.as_tensor(arrays[key]).detach().cpu().numpy())
                digest.update(f"{array.dtype}{array.shape}".encode() + array.tobytes())
            else:
                digest.update(json.dumps(features[key]).encode())
    digest.update(np.asarray(calibration.examples.labels, dtype=np.int64).tobytes())
    digest.update(f"{calibration.objective!r}|{calibration.batch_size}".encode())
    return digest.hexdigest()[:16]


def task_calibration(
    task: Any,
    tokenizer: Any,
    size: int | None,
    seed: int,
    max_length: int,
    batch_size: int = 32,
    progress: bool = False,
) -> Calibration:
    """The calibration set of a classification task: its calibration split (the training split; offline MNLI:
    the held-out share), a seeded class-stratified subset of ``size`` examples (``None``: all of it)."""
    from cahp.calibration import SequenceClassification
    from cahp.data import encode_split
    from cahp.train.finetune import subsample

    split = subsample(task.split(task.calibration_split), size, seed)
    return Calibration(
        encode_split(tokenizer, split, max_length),
        tokenizer,
        SequenceClassification(task.num_labels),
        batch_size,
        description={"split": task.calibration_split, "examples": len(split), "size": size, "seed": seed},
        progress=progress,
    )


def method_budget_settings(
    name: str, settings: dict[str, Any], budget: Budget | None, grid: HeadGrid
) -> dict[str, Any]:
    """``settings`` with ``keep`` set from the budget for a budget-aware method (its fit depends on it).

    Raises:
        CahpError: a budget-aware method without a head count.
    """
    if not method_info(name).budget_aware:
        return dict(settings)
    if budget is None or budget.is_auto:
        raise CahpError(
            f"method {name!r} is fitted for a number of heads: give a budget (--keep, --sparsity, --flops or --latency)"
        )
    return {**settings, "keep": budget.heads(grid.total)}


class Engine:
    """Fit methods on one model and one calibration set, and plan budgets.

    Args:
        model: an unpruned model with a registered adapter (never modified).
        calibration: the examples and objective every method learns from.
        cache_dir: where fitted methods are cached (``None``: no cache).
        say: where one-line progress messages go (``None``: silent).
    """

    def __init__(
        self,
        model: Any,
        calibration: Calibration,
        cache_dir: str | Path | None = None,
        say: Any = None,
    ) -> None:
        self.model = model
        self.calibration = calibration
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.say = say or (lambda message: None)
        self.grid = HeadGrid.of(model)
        self._model_fingerprint: str | None = None
        self._calibration_fingerprint: str | None = None
        self._fitted: dict[str, PruningMethod] = {}
        self._processes_checked = False
        self._costs: dict[tuple[str, str | None], Any] = {}
        self._typical_length: int | None = None
        #: whether the last :meth:`fit` reused a fit (from memory or the cache) instead of computing it
        self.last_fit_cached = False

    @property
    def fingerprints(self) -> dict[str, str]:
        """``{"model": ..., "calibration": ...}`` short hashes (computed once)."""
        if self._model_fingerprint is None:
            self._model_fingerprint = model_fingerprint(self.model)
            self._calibration_fingerprint = calibration_fingerprint(self.calibration)
        return {"model": self._model_fingerprint, "calibration": str(self._calibration_fingerprint)}

    def build(self, name: str, settings: dict[str, Any], budget: Budget | None = None) -> PruningMethod:
        """The unfitted method, with ``keep`` set from ``budget`` for budget-aware methods."""
        return get_method(name, **method_budget_settings(name, settings, budget, self.grid))

    def fit(self, name: str, settings: dict[str, Any], budget: Budget | None = None) -> PruningMethod:
        """The fitted method (from the cache when it holds it).

        Args:
            name: a registered method.
            settings: its settings (``seed`` among them).
            budget: needed for budget-aware methods (their fit depends on it); ignored by the others.
        """
        method = self.build(name, settings, budget)
        key = self._key(name, method.get_settings())
        self.last_fit_cached = True
        if key in self._fitted:
            return self._fitted[key]
        path = self.cache_dir / f"{name}__{key}.pkl" if self.cache_dir is not None else None
        if distributed.is_distributed():
            self._check_processes_agree()
        # the main process reads the cache and hands its fit to the others, so that all of them fit (collectively)
        # or none does
        cached = (
            read_cache(path, _load_method, f"fit of {name}") if path is not None and distributed.is_main() else None
        )
        cached = distributed.broadcast_object(cached)
        if cached is not None:
            self._fitted[key] = cached
            return cached
        self.last_fit_cached = False
        self.say(f"fitting {name} on {len(self.calibration)} calibration examples")
        method.fit(self.model, self.calibration)
        if path is not None and distributed.is_main():
            _save_method(path, method)
        self._fitted[key] = method
        return method

    def _check_processes_agree(self) -> None:
        """Refuse to fit when the processes hold different weights or calibration examples (checked once)."""
        if not self._processes_checked:
            distributed.check_same(self.fingerprints, "model weights and calibration examples (fingerprints)")
            self._processes_checked = True

    def plan(
        self, name: str, settings: dict[str, Any], budget: Budget, constraints: Constraints | None = None
    ) -> KeepPlan:
        """Fit ``name`` (or reuse it) and return its keep-plan for ``budget`` under ``constraints``."""
        return self.plan_and_method(name, settings, budget, constraints)[0]

    def plan_and_method(
        self, name: str, settings: dict[str, Any], budget: Budget, constraints: Constraints | None = None
    ) -> tuple[KeepPlan, PruningMethod]:
        """The keep-plan of :meth:`plan` and the fitted method that made it.

        A ``flops=F`` / ``latency=L`` budget becomes the most heads whose plan costs at most that share
        (:func:`cahp.methods.cost.plan_within`); a budget-aware method is fitted for the count at which any placement
        fits. Every plan's details give its FLOPs share at the task's typical length (``budget_cost``), so a
        report states the budget both as heads and as FLOPs (and as predicted latency under a latency budget).
        """
        from cahp.methods.cost import cost_shares, placement_plan, plan_within

        constraints = constraints or Constraints()
        if not budget.is_cost:
            method = self.fit(name, settings, budget)
            plan = method.plan(budget, constraints)
            plan.details["budget_cost"] = cost_shares(plan, self.cost("flops", constraints))
            return plan, method
        cost = self.cost(budget.mode, constraints)
        if method_info(name).budget_aware:
            placed = plan_within(
                budget, lambda k: placement_plan(k, self.grid, constraints), self.grid, constraints, cost
            )
            heads = Budget.keep(placed.heads_requested)
            method = self.fit(name, settings, heads)
            plan = method.plan(heads, constraints)
            plan.budget = budget
        else:
            method = self.fit(name, settings, budget)
            plan = plan_within(budget, lambda k: method.plan(Budget.keep(k), constraints), self.grid, constraints, cost)
        extra = () if cost.kind == "flops" else (cost,)
        plan.details["budget_cost"] = {
            "kind": cost.kind,
            "asked": budget.value,
            **cost_shares(plan, self.cost("flops", constraints), *extra),
        }
        return plan, method

    def cost(self, kind: str, constraints: Constraints) -> Any:
        """The model's :class:`~cahp.methods.cost.FlopsCost` at the calibration's typical length, or its
        :class:`~cahp.methods.cost.LatencyCost` at the calibration batch size (measured once per constraints)."""
        from cahp.methods.cost import FlopsCost, LatencyCost, typical_length

        key = (kind, constraints.gqa if kind == "latency" else None)
        if key not in self._costs:
            if self._typical_length is None:
                self._typical_length = typical_length(self.model, self.calibration)
            if kind == "flops":
                self._costs[key] = FlopsCost(self.model, self._typical_length)
            else:
                batch, length = self.calibration.batch_size, self._typical_length
                self.say(f"measuring the latency table (batches of {batch} x {length} tokens)")
                self._costs[key] = LatencyCost(self.model, constraints, batch, length)
        return self._costs[key]

    def _key(self, name: str, settings: dict[str, Any]) -> str:
        payload = json.dumps(
            {"version": CACHE_VERSION, "method": name, "settings": settings, **self.fingerprints},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _load_method(path: Path) -> PruningMethod:
    with path.open("rb") as handle:
        method = pickle.load(handle)
    if not isinstance(method, PruningMethod):
        raise TypeError(f"not a fitted method: {type(method).__name__}")
    return method


def _save_method(path: Path, method: PruningMethod) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temporary: temporary.write_bytes(pickle.dumps(method, protocol=pickle.HIGHEST_PROTOCOL)))


def print_line(message: str) -> None:
    print(message, flush=True)
