"""Workloads: what differs between tasks (:mod:`cahp.workloads.base`), and their registry.

The built-in workloads are named here by module, so listing them imports nothing heavy; a workload's module is
imported when it is first asked for. Others register with :func:`register_workload`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cahp.errors import ConfigError

if TYPE_CHECKING:
    from cahp.workloads.base import Workload

#: name -> "module:Class" of the built-in workloads.
BUILTIN_WORKLOADS = {
    "classification": "cahp.workloads.classification:ClassificationWorkload",
    "causal-lm": "cahp.workloads.causal_lm:CausalLMWorkload",
}

#: The recovery recipe of each built-in workload (``TrainingConfig`` fields), used when a run's config gives none.
#: Plain values, so that ``cahp prune --help`` shows them without importing torch.
RECOVERY_RECIPES: dict[str, dict[str, Any]] = {
    # the reference's recipe (3 epochs, lr 2e-5, linear schedule, 10% warm-up, weight decay 0.01) on length-grouped
    # batches (same examples per epoch, far less padding; records of earlier runs keep their own)
    "classification": {
        "epochs": 3.0,
        "learning_rate": 2e-5,
        "warmup_ratio": 0.1,
        "weight_decay": 0.01,
        "group_by_length": True,
    },
    # none (retraining-free); with epochs: the LM loss of the calibration blocks at lr 5e-5, 4 blocks a step
    "causal-lm": {
        "epochs": 0.0,
        "learning_rate": 5e-5,
        "batch_size": 4,
        "warmup_ratio": 0.1,
        "weight_decay": 0.0,
        "checkpoint_every": 50,
    },
}

_REGISTERED: dict[str, type[Workload]] = {}


def register_workload(cls: type[Workload]) -> type[Workload]:
    """Register a :class:`~cahp.workloads.base.Workload` subclass under its ``name`` (usable as a decorator)."""
    if not cls.name:
        raise ConfigError(f"workload {cls.__name__} has no name: set its class attribute `name`")
    _REGISTERED[cls.name] = cls
    return cls


def available_workloads() -> list[str]:
    """The names ``--objective`` accepts."""
    return sorted({*BUILTIN_WORKLOADS, *_REGISTERED})


def get_workload(name: str) -> type[Workload]:
    """The workload class registered as ``name``.

    Raises:
        ConfigError: no such workload (naming the ones there are).
    """
    if name not in _REGISTERED and name in BUILTIN_WORKLOADS:
        module, attribute = BUILTIN_WORKLOADS[name].split(":")
        _REGISTERED[name] = getattr(importlib.import_module(module), attribute)
    if name not in _REGISTERED:
        raise ConfigError(f"objective {name!r} is not a registered workload; choose one of {available_workloads()}")
    return _REGISTERED[name]


__all__ = ["BUILTIN_WORKLOADS", "RECOVERY_RECIPES", "available_workloads", "get_workload", "register_workload"]
