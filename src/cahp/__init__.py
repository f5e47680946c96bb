"""cahp: Complementary Attention Head Pruning for Hugging Face Transformers.

The main entry points (imported on first use, so ``import cahp`` stays light and does not import torch):

- :func:`cahp.prune` / :class:`cahp.PruneConfig`: prune a fine-tuned classifier with any method, recover, report.
- :func:`cahp.get_method`, :class:`cahp.Budget`, :class:`cahp.Constraints`, :class:`cahp.KeepPlan`: the method
  interface (``get_method(name).fit(model, calibration).plan(budget)``); :func:`cahp.available_methods` lists them.
- :func:`cahp.prune_heads`, :func:`cahp.head_mask`, :func:`cahp.load_pruned`: remove or mask heads, reload a
  pruned model.
- :func:`cahp.finetune` / :class:`cahp.FinetuneConfig`: fine-tune a classifier (the starting point).
- :func:`cahp.evaluate`: accuracy, macro-F1 and throughput of a saved model.
- :func:`cahp.load_classifier`: load an alias, folder or hub id as ``(model, tokenizer)``.
- :func:`cahp.load_task`: SST-5, SST-2, MNLI or any dataset by column mapping.
"""

from __future__ import annotations

import importlib
import sys
from importlib.abc import MetaPathFinder
from typing import TYPE_CHECKING, Any

from cahp.errors import (
    CahpError,
    ConfigError,
    DataError,
    ModelNotFoundError,
    OutputExistsError,
    OutputLockedError,
    PrunedModelError,
    PruningError,
    UnsupportedArchitectureError,
)

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported when the name is first used: PEP 562).
_LAZY_EXPORTS: dict[str, str] = {
    "PruneConfig": "cahp.pipeline",
    "prune": "cahp.pipeline",
    "summary": "cahp.pipeline",
    "Budget": "cahp.methods.plan",
    "Constraints": "cahp.methods.plan",
    "HeadGrid": "cahp.methods.plan",
    "KeepPlan": "cahp.methods.plan",
    "PruningMethod": "cahp.methods.base",
    "available_methods": "cahp.methods.base",
    "get_method": "cahp.methods.base",
    "register_method": "cahp.methods.base",
    "HeadScorer": "cahp.scoring.base",
    "get_scorer": "cahp.scoring.base",
    "register_scorer": "cahp.scoring.base",
    "Calibration": "cahp.calibration",
    "head_mask": "cahp.surgery",
    "kept_heads_by_layer": "cahp.surgery",
    "load_pruned": "cahp.surgery",
    "prune_heads": "cahp.surgery",
    "FinetuneConfig": "cahp.train",
    "TaskOptions": "cahp.train",
    "TrainingConfig": "cahp.train",
    "finetune": "cahp.train",
    "evaluate": "cahp.evaluation.evaluate",
    "load_classifier": "cahp.models",
    "resolve_model": "cahp.models",
    "load_task": "cahp.data",
}

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from cahp.calibration import Calibration
    from cahp.data import load_task
    from cahp.evaluation.evaluate import evaluate
    from cahp.methods.base import PruningMethod, available_methods, get_method, register_method
    from cahp.methods.plan import Budget, Constraints, HeadGrid, KeepPlan
    from cahp.models import load_classifier, resolve_model
    from cahp.pipeline import PruneConfig, prune, summary
    from cahp.scoring.base import HeadScorer, get_scorer, register_scorer
    from cahp.surgery import head_mask, kept_heads_by_layer, load_pruned, prune_heads
    from cahp.train.finetune import FinetuneConfig, TaskOptions, finetune  # not via cahp.train: mypy reads its module
    from cahp.train.loop import TrainingConfig

__all__ = [
    "Budget",
    "CahpError",
    "Calibration",
    "ConfigError",
    "Constraints",
    "DataError",
    "FinetuneConfig",
    "HeadGrid",
    "HeadScorer",
    "KeepPlan",
    "ModelNotFoundError",
    "OutputExistsError",
    "OutputLockedError",
    "PruneConfig",
    "PrunedModelError",
    "PruningError",
    "PruningMethod",
    "TaskOptions",
    "TrainingConfig",
    "UnsupportedArchitectureError",
    "__version__",
    "available_methods",
    "evaluate",
    "finetune",
    "get_method",
    "get_scorer",
    "head_mask",
    "kept_heads_by_layer",
    "load_classifier",
    "load_pruned",
    "load_task",
    "prune",
    "prune_heads",
    "register_method",
    "register_scorer",
    "resolve_model",
    "summary",
]


def __getattr__(name: str) -> Any:
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cahp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))


# ---- pruned folders load with plain from_pretrained --------------------------------------------------------


class _RegisterAutoClasses(MetaPathFinder):
    """Imports :mod:`cahp.surgery` (which registers the pruned-model classes with transformers' ``AutoConfig`` /
    ``AutoModel...``, see docs/loading.md) as soon as transformers is imported, so ``import cahp`` alone makes
    plain ``from_pretrained`` read pruned folders, without importing torch or transformers itself.

    It waits until no cahp, transformers or torch module is half-imported, so registering never meets an
    incomplete module. It finds no module itself; it only watches imports.
    """

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        _register_when_ready()


_WATCHED = ("cahp.", "transformers", "torch")


def _half_imported(module: Any) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _register_when_ready() -> None:
    """Register the pruned-model classes now if transformers is imported and nothing watched is half-imported."""
    transformers = sys.modules.get("transformers")
    if transformers is None or _half_imported(transformers) or _half_imported(sys.modules.get("torch")):
        return  # the cheap checks first: this runs at every import until it has registered
    if any(_half_imported(module) for name, module in list(sys.modules.items()) if name.startswith(_WATCHED)):
        return
    for finder in [finder for finder in sys.meta_path if isinstance(finder, _RegisterAutoClasses)]:
        sys.meta_path.remove(finder)
    try:
        importlib.import_module("cahp.surgery")
    except Exception as error:  # never break the user's unrelated import; say why loading will fail
        import warnings

        warnings.warn(
            f"cahp could not register its pruned-model classes with transformers ({type(error).__name__}: {error}); "
            "import cahp.surgery to see the error. Until then, load pruned folders with cahp.load_pruned.",
            stacklevel=2,
        )


if not any(isinstance(finder, _RegisterAutoClasses) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAutoClasses())
_register_when_ready()
