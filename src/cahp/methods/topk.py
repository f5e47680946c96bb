"""Global top-K over any head scorer: the one reusable method that turns scores into a keep-plan."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from cahp.errors import CahpError
from cahp.methods.method import PruningMethod
from cahp.methods.plan import Budget, Constraints, HeadGrid, KeepPlan

if TYPE_CHECKING:
    from cahp.calibration import Calibration
    from cahp.scoring.base import HeadScorer


class TopK(PruningMethod):
    """Keep the heads a scorer ranks highest, over all layers (the selection rule of :mod:`cahp.methods.select`).

    Args:
        scorer: a head scorer (its settings are this method's settings). A budget-aware scorer (L0 gates, DSP)
            is built for one head count (its ``keep`` setting) and plans only that budget.

    Learned state: ``scores_`` ``[layers, heads]``, ``grid_``, ``fit_seconds_``.
    """

    def __init__(self, scorer: HeadScorer) -> None:
        self.scorer = scorer
        self.seed = scorer.seed

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.scorer.name

    @property
    def budget_aware(self) -> bool:  # type: ignore[override]
        return bool(self.scorer.budget_aware)

    @property
    def deterministic(self) -> bool:  # type: ignore[override]
        return bool(self.scorer.deterministic)

    def get_settings(self) -> dict[str, Any]:
        return self.scorer.get_settings()

    def fit(self, model: Any, calibration: Calibration) -> TopK:
        start = time.perf_counter()
        self.grid_ = HeadGrid.of(model)
        self.scores_ = self.scorer.score(model, calibration)
        self.fit_seconds_ = round(time.perf_counter() - start, 2)
        return self

    def plan(self, budget: Budget, constraints: Constraints | None = None) -> KeepPlan:
        heads = self.budget_heads(budget)
        if self.budget_aware and heads != getattr(self.scorer, "keep", heads):
            raise CahpError(
                f"method {self.name!r} was fitted for keep={self.scorer.keep} heads and cannot plan {heads}: "  # type: ignore[attr-defined]
                "fit it again with that budget"
            )
        return self.plan_from_priority(
            self.scores_,
            heads,
            budget,
            constraints,
            {"how": f"global top-k of {self.name} scores", "scores": self.scores_.tolist()},
        )
