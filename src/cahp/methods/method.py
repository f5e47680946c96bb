"""The method interface: :class:`PruningMethod`, and the helpers every method shares to make its keep-plan.

A pruning method has scikit-learn's shape: ``__init__`` only stores settings, :meth:`PruningMethod.fit` does
the work on ``(model, calibration)`` and returns the method, learned state ends in ``_``, and
:meth:`PruningMethod.plan` turns a :class:`~cahp.methods.plan.Budget` and
:class:`~cahp.methods.plan.Constraints` into a :class:`~cahp.methods.plan.KeepPlan`.

A method written outside cahp uses the public helpers: :meth:`PruningMethod.check_fitted` (the grid, or a clear
error before ``fit``) and :meth:`PruningMethod.plan_from_priority` (the keep-plan from ``[layers, heads]``
priorities under the budget and constraints, with the same selection rule as every built-in method).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ClassVar

from cahp.errors import CahpError
from cahp.methods.plan import Budget, Constraints, HeadGrid, KeepPlan
from cahp.methods.select import select_heads

if TYPE_CHECKING:
    import numpy as np

    from cahp.calibration import Calibration


class PruningMethod:
    """Base class of every method.

    Class attributes:
        name: the registry name (set by :func:`cahp.methods.base.register_method`).
        kind: ``"method"``: what the registry lists it as (a head scorer is a ``"scorer"``).
        finds_own_budget: the method supports ``Budget.auto()`` (it finds its own head count).
        budget_aware: ``fit`` depends on the number of heads to keep (construct it with ``keep=K``).
        deterministic: for a given calibration set the result does not depend on ``seed``.
        needs_classes: ``fit`` compares classes (CAHP's signatures), so it needs a calibration objective with
            groups (classification), not a causal-LM one.

    Learned state (after :meth:`fit`): ``grid_`` (the model's :class:`HeadGrid`), ``fit_seconds_``.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "method"
    finds_own_budget: ClassVar[bool] = False
    budget_aware: ClassVar[bool] = False
    deterministic: ClassVar[bool] = False
    needs_classes: ClassVar[bool] = False

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed

    @classmethod
    def description(cls) -> str:
        """One line: the first line of the class docstring."""
        return (inspect.getdoc(cls) or cls.__name__).splitlines()[0]

    def get_settings(self) -> dict[str, Any]:
        """The constructor arguments as stored (JSON-ready)."""
        parameters = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in parameters if name != "self"}

    def fit(self, model: Any, calibration: Calibration) -> PruningMethod:
        """Learn from an unpruned model on the calibration set; returns ``self``."""
        raise NotImplementedError

    def plan(self, budget: Budget, constraints: Constraints | None = None) -> KeepPlan:
        """The heads to keep for ``budget`` under ``constraints`` (default: at least one head per layer)."""
        raise NotImplementedError

    # ---- helpers for subclasses (public: methods outside cahp use them too) -------------------------------

    def check_fitted(self) -> HeadGrid:
        """The fitted model's head grid.

        Raises:
            CahpError: :meth:`fit` has not run yet.
        """
        grid = getattr(self, "grid_", None)
        if grid is None:
            raise CahpError(f"method {self.name!r} is not fitted: call fit(model, calibration) first")
        return grid

    def budget_heads(self, budget: Budget) -> int:
        """The head count of a ``keep`` or ``sparsity`` budget, for a method that finds no count of its own.

        Raises:
            CahpError: an auto budget (the method has no count of its own), or a cost budget (resolved by
                :func:`cahp.methods.cost.plan_within` before the method plans).
        """
        if budget.is_auto:
            raise CahpError(
                f"method {self.name!r} has no automatic head count: give a budget (--keep, --sparsity, --flops or "
                "--latency); `cahp methods` lists the methods that find their own"
            )
        return budget.heads(self.check_fitted().total)

    def plan_from_priority(
        self,
        priority: np.ndarray,
        heads: int,
        budget: Budget,
        constraints: Constraints | None,
        details: dict[str, Any],
    ) -> KeepPlan:
        """The keep-plan that keeps about ``heads`` heads, best ``priority`` first (see :mod:`cahp.methods.select`).

        Args:
            priority: ``[layers, heads]`` finite keep priorities in original head numbering, higher = keep.
            heads: the head count to keep (made expressible under ``constraints`` before selection).
            budget: the budget asked (recorded in the plan).
            constraints: what the plan must satisfy (``None``: at least one head per layer).
            details: what the method wants to show about its decision (recorded in the plan).
        """
        constraints = constraints or Constraints()
        grid = self.check_fitted()
        selection = select_heads(priority, heads, grid, constraints)
        return KeepPlan(
            method=self.name,
            settings=self.get_settings(),
            grid=grid,
            budget=budget,
            constraints=constraints,
            heads_requested=selection.heads_requested,
            kept_heads_by_layer=selection.kept_heads_by_layer,
            guardrail_heads=selection.guardrail_heads,
            details=details,
        )
