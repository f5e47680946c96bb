"""Pruning methods behind one interface: ``get_method(name, **settings).fit(model, calibration).plan(budget)``.

* :class:`PruningMethod` — the interface (scikit-learn shape: settings in ``__init__``, ``fit``, learned state
  ending in ``_``); :class:`KeepPlan` — what ``plan`` returns (JSON round-trip);
* :class:`Budget` (``auto``, ``keep=K``, ``sparsity=S``) and :class:`Constraints` (minimum heads per layer,
  same count per layer, grouped-query groups);
* :class:`TopK` — global top-K over any head scorer; CAHP (``"cahp"``) — clusters and the knee;
* one registry for built-ins and third-party methods (entry-point group ``cahp.methods``), which lists them and
  their capabilities without importing them (:mod:`cahp.methods.base`).

Imports are lazy, so ``import cahp.methods`` stays light.
"""

from typing import Any

from cahp.methods.plan import Budget, Constraints, HeadGrid, KeepPlan

_LAZY = {
    "PruningMethod": "cahp.methods.method",
    "MethodInfo": "cahp.methods.base",
    "available_methods": "cahp.methods.base",
    "get_method": "cahp.methods.base",
    "method_class": "cahp.methods.base",
    "method_info": "cahp.methods.base",
    "register_method": "cahp.methods.base",
    "ENTRY_POINT_GROUP": "cahp.methods.base",
    "TopK": "cahp.methods.topk",
    "CAHP": "cahp.methods.cahp",
    "select_heads": "cahp.methods.select",
}

__all__ = ["Budget", "Constraints", "HeadGrid", "KeepPlan", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cahp.methods' has no attribute {name!r}")
