"""The method interface and its registry.

A pruning method has scikit-learn's shape: ``__init__`` only stores settings, :meth:`PruningMethod.fit` does
the work on ``(model, calibration)`` and returns the method, learned state ends in ``_``, and
:meth:`PruningMethod.plan` turns a :class:`~cahp.methods.plan.Budget` and
:class:`~cahp.methods.plan.Constraints` into a :class:`~cahp.methods.plan.KeepPlan`.

Two ways to add a method, each one file:

* a head scorer (``[layers, heads]`` scores, higher = keep) registered with
  :func:`cahp.scoring.register_scorer`: it becomes a method through :class:`~cahp.methods.topk.TopK`;
* a :class:`PruningMethod` subclass registered with :func:`register_method` (CAHP is one).

Packages outside cahp register either kind under the Python entry-point group ``cahp.methods``
(``name = "package.module:Class"``); the registry loads them on first look-up, so ``cahp prune --method``
and ``cahp methods`` see them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from cahp.errors import CahpError, notice

if TYPE_CHECKING:
    import numpy as np

    from cahp.calibration import Calibration
    from cahp.methods.plan import Budget, Constraints, HeadGrid, KeepPlan

ENTRY_POINT_GROUP = "cahp.methods"

#: Modules of the built-in methods that are not head scorers.
BUILTIN_METHOD_MODULES = ("cahp.methods.cahp", "cahp.methods.cahp_consensus")


class PruningMethod:
    """Base class of every method.

    Class attributes:
        name: the registry name (set by :func:`register_method`).
        finds_own_budget: the method supports ``Budget.auto()`` (it finds its own head count).
        budget_aware: ``fit`` depends on the number of heads to keep (construct it with ``keep=K``).
        deterministic: for a given calibration set the result does not depend on ``seed``.
        needs_classes: ``fit`` compares classes (CAHP's signatures), so it needs a calibration objective with
            groups (classification), not a causal-LM one.

    Learned state (after :meth:`fit`): ``grid_`` (the model's :class:`HeadGrid`), ``fit_seconds_``.
    """

    name: ClassVar[str] = ""
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

    # ---- helpers for subclasses -------------------------------------------------------------------------

    def _check_fitted(self) -> HeadGrid:
        grid = getattr(self, "grid_", None)
        if grid is None:
            raise CahpError(f"method {self.name!r} is not fitted: call fit(model, calibration) first")
        return grid

    def _plan_from_priority(
        self,
        priority: np.ndarray,
        heads: int,
        budget: Budget,
        constraints: Constraints | None,
        details: dict[str, Any],
    ) -> KeepPlan:
        """The keep-plan that keeps about ``heads`` heads, best ``priority`` first (see :mod:`cahp.methods.select`)."""
        from cahp.methods.plan import Constraints, KeepPlan
        from cahp.methods.select import select_heads

        constraints = constraints or Constraints()
        grid = self._check_fitted()
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


# ---- registry ------------------------------------------------------------------------------------------------

_METHODS: dict[str, type[PruningMethod]] = {}
Method = TypeVar("Method", bound=type[PruningMethod])


def register_method(name: str) -> Callable[[Method], Method]:
    """Class decorator: register a :class:`PruningMethod` subclass under ``name`` (later registrations win)."""

    def register(cls: Method) -> Method:
        if not (isinstance(cls, type) and issubclass(cls, PruningMethod)):
            raise TypeError(f"@register_method({name!r}) needs a PruningMethod subclass, got {cls!r}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return register


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows of a method without building it."""

    name: str
    description: str
    kind: str  # "method" or "scorer" (a head scorer with global top-K)
    finds_own_budget: bool
    budget_aware: bool
    deterministic: bool
    settings: tuple[str, ...]
    needs_classes: bool = False


_loaded = False


def _load() -> None:
    """Import the built-ins and the entry points (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from cahp.scoring.base import _load_builtins

    _load_builtins()
    for module in BUILTIN_METHOD_MODULES:
        importlib.import_module(module)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        _register_entry_point(entry)


def _register_entry_point(entry: importlib.metadata.EntryPoint) -> None:
    from cahp.scoring.base import HeadScorer, register_scorer

    try:
        target = entry.load()
    except Exception as error:  # a broken third-party package must not break cahp: skip it, and say so
        notice(f"the {ENTRY_POINT_GROUP} entry point {entry.name!r} ({entry.value}) fails to load ({error}); skipped")
        return
    if isinstance(target, type) and issubclass(target, PruningMethod):
        register_method(entry.name)(target)
    elif isinstance(target, type) and issubclass(target, HeadScorer):
        register_scorer(entry.name)(target)
    else:
        notice(
            f"the {ENTRY_POINT_GROUP} entry point {entry.name!r} names {target!r}, not a PruningMethod or HeadScorer "
            "subclass; skipped"
        )


def _scorer_classes() -> dict[str, Any]:
    from cahp.scoring.base import _SCORERS

    return dict(_SCORERS)


def available_methods() -> dict[str, MethodInfo]:
    """Every registered method by name, sorted: methods and head scorers (built-in and entry points)."""
    _load()
    infos: dict[str, MethodInfo] = {}
    for name, cls in _scorer_classes().items():
        infos[name] = MethodInfo(
            name,
            (inspect.getdoc(cls) or name).splitlines()[0],
            "scorer",
            False,
            bool(cls.budget_aware),
            bool(cls.deterministic),
            _settings_of(cls),
        )
    for name, cls in _METHODS.items():
        infos[name] = MethodInfo(
            name,
            cls.description(),
            "method",
            cls.finds_own_budget,
            cls.budget_aware,
            cls.deterministic,
            _settings_of(cls),
            cls.needs_classes,
        )
    return dict(sorted(infos.items()))


def method_info(name: str) -> MethodInfo:
    """The registry's entry for ``name``.

    Raises:
        CahpError: no method has that name (the message lists them).
    """
    methods = available_methods()
    if name not in methods:
        raise CahpError(f"unknown method {name!r}; available: {', '.join(methods)} (list them with `cahp methods`)")
    return methods[name]


def get_method(name: str, **settings: Any) -> PruningMethod:
    """A new, unfitted method ``name`` built with ``settings`` (unknown settings raise :class:`CahpError`).

    A head scorer comes wrapped in :class:`~cahp.methods.topk.TopK`.
    """
    info = method_info(name)
    if info.kind == "scorer":
        from cahp.methods.topk import TopK
        from cahp.scoring.base import get_scorer

        return TopK(get_scorer(name, **settings))
    cls = _METHODS[name]
    unknown = sorted(set(settings) - set(info.settings))
    if unknown:
        raise CahpError(f"method {name!r} has no setting(s) {unknown}; its settings are {sorted(info.settings)}")
    try:
        return cls(**settings)
    except (TypeError, ValueError) as error:
        raise CahpError(f"method {name!r}: bad settings {settings}: {error}") from error


def _settings_of(cls: type) -> tuple[str, ...]:
    return tuple(name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "args", "kwargs"))
