"""Budgets, constraints and the keep-plan every method returns.

* :class:`Budget`: how many heads to keep — ``auto`` (a method that finds its own count, like CAHP's knee),
  ``keep=K``, ``sparsity=S`` (share of heads removed), or a cost: ``flops=F`` / ``latency=L`` (the most heads whose
  plan costs at most that share of the unpruned model's FLOPs or measured latency; :mod:`cahp.methods.cost`).
* :class:`Constraints`: what shapes of pruning are allowed — at least ``min_heads_per_layer`` heads per
  layer (default 1; 0 lets a layer lose every head), the same count in every layer (``uniform_layers``),
  and for grouped-query attention whole key-value groups (``gqa="groups"``) or the same count in every
  group (``gqa="uniform"``).
* :class:`HeadGrid`: the ORIGINAL ``[layers, heads]`` grid and key-value heads of a model.
* :class:`KeepPlan`: the heads to keep, by layer in original numbering, with the budget asked and obtained,
  the heads the guardrail added, and the method with its settings. It round-trips to JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from cahp.errors import CahpError

BudgetMode = Literal["auto", "keep", "sparsity", "flops", "latency"]
#: Budgets given as a share of a cost of the unpruned model, resolved to a head count by :mod:`cahp.methods.cost`.
COST_MODES = ("flops", "latency")
GqaConstraint = Literal["groups", "uniform"]


@dataclass(frozen=True)
class HeadGrid:
    """The original attention structure: ``layers x heads`` query heads, ``kv_heads`` key-value heads per layer."""

    layers: int
    heads: int
    kv_heads: int

    @property
    def total(self) -> int:
        return self.layers * self.heads

    @property
    def group_size(self) -> int:
        """Query heads per key-value head (1 without grouped-query attention)."""
        return self.heads // self.kv_heads

    @property
    def uses_gqa(self) -> bool:
        return self.kv_heads != self.heads

    @classmethod
    def of(cls, model: Any) -> HeadGrid:
        """The grid of a model with a registered adapter."""
        from cahp.adapters import get_adapter

        adapter = get_adapter(model)
        return cls(adapter.num_layers(model), adapter.num_heads(model), adapter.num_kv_heads(model))


@dataclass(frozen=True)
class Budget:
    """How many heads to keep. Build with :meth:`auto`, :meth:`keep`, :meth:`sparsity`, :meth:`cost` or
    :meth:`parse`."""

    mode: BudgetMode = "auto"
    value: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "keep", "sparsity", *COST_MODES):
            raise CahpError(f"a budget is auto, keep=K, sparsity=S, flops=F or latency=L, got mode {self.mode!r}")
        if self.mode == "auto" and self.value is not None:
            raise CahpError("an auto budget takes no value")
        if self.mode == "keep" and (self.value is None or int(self.value) != self.value or self.value < 1):
            raise CahpError(f"keep=K needs a whole number of heads of at least 1, got {self.value!r}")
        if self.mode == "sparsity" and (self.value is None or not 0.0 < float(self.value) < 1.0):
            raise CahpError(f"sparsity=S is the share of heads removed, strictly between 0 and 1, got {self.value!r}")
        if self.mode in COST_MODES and (
            isinstance(self.value, bool) or not isinstance(self.value, int | float) or not 0.0 < self.value <= 1.0
        ):
            raise CahpError(
                f"{self.mode}=F is the share of the unpruned model's {self.mode} to keep, in (0, 1], got {self.value!r}"
            )

    @classmethod
    def auto(cls) -> Budget:
        return cls("auto")

    @classmethod
    def keep(cls, heads: int) -> Budget:
        return cls("keep", heads)

    @classmethod
    def sparsity(cls, share_removed: float) -> Budget:
        return cls("sparsity", float(share_removed))

    @classmethod
    def cost(cls, mode: str, share: float) -> Budget:
        """``flops=F`` or ``latency=L``: keep the most heads whose plan costs at most ``share`` of the dense model's."""
        return cls(mode, float(share))  # type: ignore[arg-type]

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``"auto"``, ``"keep=K"``, ``"sparsity=S"``, ``"flops=F"`` or ``"latency=L"``."""
        mode, _, raw = text.strip().partition("=")
        if mode == "auto" and not raw:
            return cls.auto()
        try:
            if mode == "keep":
                return cls.keep(int(raw))
            if mode == "sparsity":
                return cls.sparsity(float(raw))
            if mode in COST_MODES:
                return cls.cost(mode, float(raw))
        except ValueError:
            pass
        raise CahpError(f"a budget is 'auto', 'keep=K', 'sparsity=S', 'flops=F' or 'latency=L', got {text!r}")

    @classmethod
    def from_options(
        cls,
        keep: int | None = None,
        sparsity: float | None = None,
        flops: float | None = None,
        latency: float | None = None,
    ) -> Budget:
        """The budget of ``--keep`` / ``--sparsity`` / ``--flops`` / ``--latency`` (none of them: auto)."""
        options = {"keep": keep, "sparsity": sparsity, "flops": flops, "latency": latency}
        given = {name: float(value) for name, value in options.items() if value is not None}
        if len(given) > 1:
            raise CahpError(f"give one budget, not {' and '.join('--' + name for name in given)}")
        if not given:
            return cls.auto()
        ((mode, value),) = given.items()
        if mode == "keep":
            return cls.keep(int(value))
        return cls.sparsity(value) if mode == "sparsity" else cls.cost(mode, value)

    @property
    def is_auto(self) -> bool:
        return self.mode == "auto"

    @property
    def is_cost(self) -> bool:
        """A ``flops=F`` or ``latency=L`` budget: its head count depends on the model and the method's plans."""
        return self.mode in COST_MODES

    def heads(self, total: int) -> int:
        """Heads to keep out of ``total`` (``sparsity``: ``round((1 - S) * total)`` half up, at least 1).

        Raises:
            CahpError: an auto budget (the method decides), or ``keep`` above ``total``.
        """
        if self.mode == "auto":
            raise CahpError("an auto budget has no head count of its own: the method finds it")
        if self.is_cost:
            raise CahpError(
                f"a {self.mode} budget has no head count of its own: cahp.methods.cost.plan_within finds it from the "
                "method's plans"
            )
        if self.mode == "keep":
            if int(self.value) > total:  # type: ignore[arg-type]
                raise CahpError(f"keep={int(self.value)} is more than the model's {total} heads")  # type: ignore[arg-type]
            return int(self.value)  # type: ignore[arg-type]
        return max(1, min(total, math.floor((1.0 - float(self.value)) * total + 0.5)))  # type: ignore[arg-type]

    def label(self) -> str:
        return "auto" if self.mode == "auto" else f"{self.mode}={self.value:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "value": None if self.value is None else self.value}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Budget:
        return cls(raw.get("mode", "auto"), raw.get("value"))


@dataclass(frozen=True)
class Constraints:
    """Which keep-plans are allowed.

    Attributes:
        min_heads_per_layer: every layer keeps at least this many heads (default 1: the guardrail adds a
            layer's best heads beyond the budget when the selection leaves it short); 0 allows empty layers.
        uniform_layers: every layer keeps the same number of heads.
        gqa: grouped-query attention only: ``"groups"`` keeps or removes whole key-value groups (the only way
            to shrink k/v and the KV cache), ``"uniform"`` keeps the same number of query heads in every group
            of a layer (all key-value heads stay). Ignored for models without GQA.
    """

    min_heads_per_layer: int = 1
    uniform_layers: bool = False
    gqa: GqaConstraint = "groups"

    def __post_init__(self) -> None:
        if self.min_heads_per_layer < 0:
            raise CahpError(f"min_heads_per_layer must be 0 or more, got {self.min_heads_per_layer}")
        if self.gqa not in ("groups", "uniform"):
            raise CahpError(f"the grouped-query constraint is 'groups' or 'uniform', got {self.gqa!r}")

    @classmethod
    def from_options(
        cls, allow_empty_layers: bool = False, uniform: bool = False, gqa_mode: str = "groups"
    ) -> Constraints:
        return cls(0 if allow_empty_layers else 1, uniform, gqa_mode)  # type: ignore[arg-type]

    @property
    def allow_empty_layers(self) -> bool:
        return self.min_heads_per_layer == 0

    def unit_size(self, grid: HeadGrid) -> int:
        """Query heads in the smallest unit a layer can lose: 1, a key-value group, or one head per group."""
        if not grid.uses_gqa:
            return 1
        return grid.group_size if self.gqa == "groups" else grid.kv_heads

    def to_dict(self) -> dict[str, Any]:
        return {"min_heads_per_layer": self.min_heads_per_layer, "uniform_layers": self.uniform_layers, "gqa": self.gqa}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Constraints:
        return cls(**raw)


@dataclass
class KeepPlan:
    """Which heads stay: the result of ``method.plan(budget)``, ready for :func:`cahp.surgery.prune_heads`.

    Attributes:
        method: the registry name of the method that made the plan.
        settings: the method's settings (JSON-ready).
        grid: the model's original head structure.
        budget: the budget asked.
        constraints: the constraints the plan satisfies.
        heads_requested: heads the budget asked for once made expressible under the constraints (for an
            auto budget: the count the method found).
        kept_heads_by_layer: ``{layer: sorted heads}`` for every layer, original numbering.
        guardrail_heads: ``(layer, head)`` pairs added beyond the budget so that a layer keeps its minimum.
        details: what the method wants to show about its decision (CAHP: knee, clusters, salience, ...).
    """

    method: str
    settings: dict[str, Any]
    grid: HeadGrid
    budget: Budget
    constraints: Constraints
    heads_requested: int
    kept_heads_by_layer: dict[int, list[int]]
    guardrail_heads: list[tuple[int, int]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def heads_kept(self) -> int:
        """Heads the plan keeps (the budget obtained)."""
        return sum(len(heads) for heads in self.kept_heads_by_layer.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "settings": self.settings,
            "grid": {"layers": self.grid.layers, "heads": self.grid.heads, "kv_heads": self.grid.kv_heads},
            "budget": self.budget.to_dict(),
            "constraints": self.constraints.to_dict(),
            "heads_requested": self.heads_requested,
            "heads_kept": self.heads_kept,
            "kept_heads_by_layer": {
                str(layer): list(heads) for layer, heads in sorted(self.kept_heads_by_layer.items())
            },
            "guardrail_heads": [list(head) for head in self.guardrail_heads],
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> KeepPlan:
        try:
            grid = HeadGrid(**raw["grid"])
            kept = {int(layer): [_head_number(h) for h in heads] for layer, heads in raw["kept_heads_by_layer"].items()}
            return cls(
                method=raw["method"],
                settings=dict(raw.get("settings", {})),
                grid=grid,
                budget=Budget.from_dict(raw.get("budget", {})),
                constraints=Constraints.from_dict(raw.get("constraints", {})),
                heads_requested=int(raw["heads_requested"]),
                kept_heads_by_layer=kept,
                guardrail_heads=[(int(layer), int(head)) for layer, head in raw.get("guardrail_heads", [])],
                details=dict(raw.get("details", {})),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CahpError(f"not a keep-plan: {error}; write one with KeepPlan.to_json") from error

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> KeepPlan:
        return cls.from_dict(json.loads(text))


def _head_number(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"head numbers are whole numbers, got {value!r}")
    return value
