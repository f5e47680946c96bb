"""The registry of pruning methods: cahp's own and third-party ones in one list, readable without importing them.

Two kinds of class are methods, each one file:

* a :class:`~cahp.methods.method.PruningMethod` subclass (CAHP is one): ``fit`` then ``plan``;
* a head scorer (:class:`cahp.scoring.HeadScorer`: ``[layers, heads]`` scores, higher = keep), which becomes a
  method through :class:`~cahp.methods.topk.TopK` (global top-K).

**Declared as entry points.** Every method, built-in or third-party, is a Python entry point in the group
``cahp.methods`` (``name = "package.module:Class"``); cahp declares its own in its ``pyproject.toml``
(``[project.entry-points."cahp.methods"]``), exactly as a plugin package does. A plugin's entry point wins over a
built-in of the same name.

**Listed without importing.** :func:`available_methods` and :func:`method_info` answer from the *method card* that
the class's module declares at module level, a literal next to the class::

    METHOD_CARD = {
        "class": "FisherScorer",  # the class it describes (the entry point's attribute)
        "kind": "scorer",  # "scorer" (a head scorer: global top-K) or "method" (a PruningMethod)
        "deterministic": False,  # capabilities (absent: False): finds_own_budget, budget_aware,
        "budget_aware": False,  # deterministic, needs_classes (see PruningMethod)
        "settings": {"batch_size": 1, "max_examples": 256, "seed": 0},  # __init__'s settings and defaults
    }

The registry parses the module with :mod:`ast` and never runs it: the card gives the capabilities and settings,
the class docstring gives the description (its first line) and the settings' help (its ``Args:`` section). So
``cahp methods`` imports neither torch nor any scorer. :func:`get_method` and :func:`method_class` import the
implementation. A test checks that every built-in card agrees with its class once imported, so the two cannot
drift. A plugin module without a card (or with a malformed one) still works: it is imported to be listed, and a
module that fails to import is skipped with a notice.

**Registered in the process.** Classes registered while cahp runs (a notebook, a test) with
:func:`register_method` or :func:`cahp.scoring.register_scorer` are listed too, and win over an entry point of
the same name.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from cahp.errors import CahpError, notice
from cahp.methods.method import PruningMethod
from cahp.methods.topk import TopK

ENTRY_POINT_GROUP = "cahp.methods"
#: The module-level literal that describes a method for the registry (see the module docstring).
CARD_NAME = "METHOD_CARD"
#: What a registered class is: a PruningMethod subclass, or a head scorer wrapped in TopK.
KINDS = ("method", "scorer")
CAPABILITIES = ("finds_own_budget", "budget_aware", "deterministic", "needs_classes")
#: The distribution whose entry points are the built-in methods.
BUILTIN_DISTRIBUTION = "cahp"


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows of a method without building it (nor importing it, for a method with a card).

    Attributes:
        name: the registry name.
        description: one line (the first line of the class docstring).
        kind: ``"method"`` or ``"scorer"`` (a head scorer with global top-K).
        finds_own_budget, budget_aware, deterministic, needs_classes: the capabilities of
            :class:`~cahp.methods.method.PruningMethod` (a scorer never finds its own budget nor needs classes).
        settings: the constructor's settings, in order.
        defaults: each setting's default (a setting without one is absent).
        setting_help: each setting's help, from the ``Args:`` section of the class docstring (where it has one).
    """

    name: str
    description: str
    kind: str
    finds_own_budget: bool
    budget_aware: bool
    deterministic: bool
    settings: tuple[str, ...]
    needs_classes: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict, hash=False)
    setting_help: Mapping[str, str] = field(default_factory=dict, hash=False)


# ---- classes registered in this process ------------------------------------------------------------------------

_METHODS: dict[str, type[PruningMethod]] = {}
#: Head-scorer classes (``cahp.scoring.register_scorer`` checks them and calls :func:`register_class`).
_SCORERS: dict[str, type[Any]] = {}
Method = TypeVar("Method", bound=type[PruningMethod])


def register_class(name: str, cls: type[Any]) -> None:
    """Record ``cls`` under ``name`` (later registrations win); its ``kind`` attribute says which kind it is.

    The common step of :func:`register_method` and :func:`cahp.scoring.register_scorer`, which check the class
    first; use those.
    """
    cls.name = name
    (_SCORERS if cls.kind == "scorer" else _METHODS)[name] = cls


def register_method(name: str) -> Callable[[Method], Method]:
    """Class decorator: register a :class:`PruningMethod` subclass under ``name`` (later registrations win)."""

    def register(cls: Method) -> Method:
        if not (isinstance(cls, type) and issubclass(cls, PruningMethod)):
            raise TypeError(f"@register_method({name!r}) needs a PruningMethod subclass, got {cls!r}")
        register_class(name, cls)
        return cls

    return register


# ---- entry points ------------------------------------------------------------------------------------------------

_declared: dict[str, importlib.metadata.EntryPoint] | None = None
_cards: dict[str, MethodInfo | None] = {}  # by entry-point name: the card's info, or None (no card: import it)
_failed: set[str] = set()  # entry points that failed to load (said once)


def forget_entry_points() -> None:
    """Read the entry points again on the next look-up (after installing a plugin in a running process)."""
    global _declared
    _declared = None
    _cards.clear()
    _failed.clear()


def declared_entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Every ``cahp.methods`` entry point by name: cahp's own first, so that a plugin's wins on a shared name."""
    global _declared
    if _declared is None:
        entries = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: not _is_builtin(e))
        _declared = {entry.name: entry for entry in entries}
    return _declared


def builtin_methods() -> list[str]:
    """Names of the methods cahp itself declares (its own entry points), sorted."""
    return sorted(name for name, entry in declared_entry_points().items() if _is_builtin(entry))


def _is_builtin(entry: importlib.metadata.EntryPoint) -> bool:
    distribution = getattr(entry, "dist", None)
    return distribution is not None and distribution.name == BUILTIN_DISTRIBUTION


def _load_entry_point(name: str, entry: importlib.metadata.EntryPoint) -> type[Any] | None:
    """Import the entry point's class and register it under ``name`` (``None``: it fails to load; said once)."""
    if name in _failed:
        return None
    try:
        target = entry.load()
    except Exception as error:  # a broken third-party package must not break cahp: skip it, and say so
        _failed.add(name)
        notice(f"the {ENTRY_POINT_GROUP} entry point {name!r} ({entry.value}) fails to load ({error}); skipped")
        return None
    kind = getattr(target, "kind", None) if isinstance(target, type) else None
    if kind not in KINDS or (kind == "method" and not issubclass(target, PruningMethod)):
        _failed.add(name)
        notice(
            f"the {ENTRY_POINT_GROUP} entry point {name!r} names {target!r}, not a PruningMethod or HeadScorer "
            "subclass; skipped"
        )
        return None
    register_class(name, target)
    return target


# ---- method cards ------------------------------------------------------------------------------------------------


def read_method_card(target: str) -> MethodInfo | None:
    """The info of the class ``"package.module:Class"`` from its module's card, without importing the module.

    Returns ``None`` when the module has no card for that class (or a malformed one, or cannot be found): the
    registry then imports it. The name of the returned info is the class name (the registry sets its own).
    """
    module_name, _, attribute = target.partition(":")
    module_name, attribute = module_name.strip(), attribute.strip()
    if not attribute.isidentifier():
        return None
    try:
        spec = importlib.util.find_spec(module_name)  # imports the parent packages only
    except Exception:  # a broken parent package: the import path says what is wrong
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    card = _card_literal(tree)
    class_node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == attribute), None)
    docstring = None if class_node is None else ast.get_docstring(class_node)
    if card is None or card.get("class") != attribute or docstring is None or not _is_valid_card(card):
        return None
    settings = dict(card.get("settings", {}))
    return _info(attribute, card["kind"], docstring, {c: bool(card.get(c, False)) for c in CAPABILITIES}, settings)


def _card_literal(tree: ast.Module) -> dict[str, Any] | None:
    for node in tree.body:
        if not isinstance(node, ast.Assign | ast.AnnAssign):
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if any(isinstance(t, ast.Name) and t.id == CARD_NAME for t in targets) and node.value is not None:
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


def _is_valid_card(card: dict[str, Any]) -> bool:
    settings = card.get("settings", {})
    return (
        card.get("kind") in KINDS
        and all(isinstance(card.get(c, False), bool) for c in CAPABILITIES)
        and isinstance(settings, dict)
        and all(isinstance(name, str) for name in settings)
    )


def info_of_class(name: str, cls: type[Any]) -> MethodInfo:
    """The info of an imported method or head-scorer class registered as ``name``."""
    parameters = [
        parameter
        for parameter in inspect.signature(cls.__init__).parameters.values()
        if parameter.name != "self"
        and parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    settings = {p.name: p.default for p in parameters}
    capabilities = {c: bool(getattr(cls, c, False)) for c in CAPABILITIES}
    return _info(name, cls.kind, inspect.getdoc(cls) or name, capabilities, settings)


def _info(name: str, kind: str, docstring: str, capabilities: dict[str, bool], settings: dict[str, Any]) -> MethodInfo:
    if kind == "scorer":  # global top-K needs a budget, and no scorer compares classes
        capabilities = {**capabilities, "finds_own_budget": False, "needs_classes": False}
    help_by_setting = setting_help(docstring)
    return MethodInfo(
        name=name,
        description=docstring.splitlines()[0],
        kind=kind,
        finds_own_budget=capabilities["finds_own_budget"],
        budget_aware=capabilities["budget_aware"],
        deterministic=capabilities["deterministic"],
        settings=tuple(settings),
        needs_classes=capabilities["needs_classes"],
        defaults={s: d for s, d in settings.items() if d is not inspect.Parameter.empty},
        setting_help={s: help_by_setting[s] for s in settings if s in help_by_setting},
    )


def setting_help(docstring: str) -> dict[str, str]:
    """Each setting's help from the ``Args:`` section of a Google-style docstring, joined on one line.

    ``a, b: text`` gives ``text`` to both; the section ends at a blank line or a line indented less than its
    first entry.
    """
    helps: dict[str, str] = {}
    names: list[str] = []
    entry_indent: int | None = None
    in_args = False
    for line in docstring.splitlines():
        stripped = line.strip()
        if not in_args:
            in_args = stripped == "Args:"
            continue
        indent = len(line) - len(line.lstrip())
        if not stripped or (entry_indent is not None and indent < entry_indent):
            break
        if entry_indent is None or indent == entry_indent:
            entry_indent = indent
            head, colon, text = stripped.partition(":")
            if not colon:
                break
            names = [part.strip().lstrip("*") for part in head.split(",")]
            helps.update(dict.fromkeys(names, text.strip()))
        else:
            helps.update({n: f"{helps[n]} {stripped}".strip() for n in names})
    return helps


# ---- look-ups ----------------------------------------------------------------------------------------------------


def available_methods() -> dict[str, MethodInfo]:
    """Every method by name, sorted: methods and head scorers, built-in and third-party (imports none with a card)."""
    infos: dict[str, MethodInfo] = {}
    for name, entry in declared_entry_points().items():
        if name in _METHODS or name in _SCORERS:
            continue  # registered in this process: listed from its class below
        if name not in _cards:
            _cards[name] = read_method_card(entry.value)
        card = _cards[name]
        if card is not None:
            infos[name] = replace(card, name=name)
        elif (cls := _load_entry_point(name, entry)) is not None:
            infos[name] = info_of_class(name, cls)
    for registered in (_SCORERS, _METHODS):
        infos.update({name: info_of_class(name, cls) for name, cls in registered.items()})
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


def method_class(name: str) -> type[Any]:
    """The class registered as ``name``, imported: a :class:`PruningMethod` or a head-scorer subclass.

    Raises:
        CahpError: no method has that name, or its entry point fails to load.
    """
    method_info(name)
    cls = _METHODS.get(name) or _SCORERS.get(name)
    if cls is None and (entry := declared_entry_points().get(name)) is not None:
        cls = _load_entry_point(name, entry)
    if cls is None:
        raise CahpError(f"method {name!r} fails to load; reinstall the package that declares it")
    return cls


def get_method(name: str, **settings: Any) -> PruningMethod:
    """A new, unfitted method ``name`` built with ``settings`` (unknown settings raise :class:`CahpError`).

    A head scorer comes wrapped in :class:`~cahp.methods.topk.TopK`.
    """
    cls = method_class(name)
    info = info_of_class(name, cls)
    unknown = sorted(set(settings) - set(info.settings))
    if unknown:
        raise CahpError(f"{info.kind} {name!r} has no setting(s) {unknown}; its settings are {sorted(info.settings)}")
    if info.kind == "scorer":
        return TopK(cls(**settings))
    try:
        return cls(**settings)
    except (TypeError, ValueError) as error:
        raise CahpError(f"method {name!r}: bad settings {settings}: {error}") from error
