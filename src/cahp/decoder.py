"""Earlier names of the causal-LM run, kept so that code written against them keeps working.

``cahp prune-lm`` is now ``cahp prune --objective causal-lm``: one run (:func:`cahp.pipeline.prune`) for every
workload, the causal-LM side of it in :mod:`cahp.workloads.causal_lm`. Here:

- :func:`DecoderPruneConfig` builds that run's :class:`~cahp.pipeline.PruneConfig` from ``prune-lm``'s flat
  settings (its text and measurement settings are the config's ``lm`` object now);
- :func:`prune_lm` is :func:`cahp.pipeline.prune`, :func:`summary` the causal-LM summary;
- the library pieces live where they belong: loading in :mod:`cahp.models`, LoRA in :mod:`cahp.train.lora`, the
  text settings and LM measurement in :mod:`cahp.workloads.causal_lm`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from cahp.models import load_causal_lm
from cahp.pipeline import PruneConfig, prune
from cahp.train.distill import RecoveryObjective
from cahp.train.lora import add_lora, describe_lora, lora_target_modules, merge_lora, require_peft
from cahp.workloads.causal_lm import (
    OFFLINE_CORPUS_NOTE,
    RECOVERY_DEFAULT,
    CausalLMWorkload,
    LMData,
    LMOptions,
    corpus_label,
    lm_loss_fn,
    measure_lm,
)

#: The causal-LM recovery recipe (``prune-lm``'s default): none.
DECODER_RECOVERY_DEFAULT = RECOVERY_DEFAULT

#: ``prune-lm``'s own defaults for the settings ``cahp prune`` defaults otherwise (a causal-LM run needs a method
#: that compares no classes and a head count).
PRUNE_LM_DEFAULTS: dict[str, Any] = {
    "method": "fisher",
    "budget": "sparsity=0.33",
    "latency_repeats": 3,
    "recovery_objective": RecoveryObjective(loss="ce"),
}


def DecoderPruneConfig(**settings: Any) -> PruneConfig:
    """A ``causal-lm`` :class:`~cahp.pipeline.PruneConfig` from ``prune-lm``'s flat settings: the fields of
    :class:`LMOptions` go to ``lm``, the others are the run's; unset, the method is ``fisher``, the budget
    ``sparsity=0.33``, ``latency_repeats`` 3 and the recovery's loss the LM loss (``ce``), as ``prune-lm``'s were."""
    text = {item.name for item in fields(LMOptions)}
    lm = {key: value for key, value in settings.items() if key in text}
    run = {key: value for key, value in settings.items() if key not in text}
    return PruneConfig(**{**PRUNE_LM_DEFAULTS, **run}, objective="causal-lm", lm=LMOptions(**lm))


def prune_lm(config: PruneConfig, out: Any, **options: Any) -> dict[str, Any]:
    """:func:`cahp.pipeline.prune` of a ``causal-lm`` config."""
    return prune(config, out, **options)


summary = CausalLMWorkload.summary

__all__ = [
    "DECODER_RECOVERY_DEFAULT",
    "OFFLINE_CORPUS_NOTE",
    "DecoderPruneConfig",
    "LMData",
    "LMOptions",
    "add_lora",
    "corpus_label",
    "describe_lora",
    "lm_loss_fn",
    "load_causal_lm",
    "lora_target_modules",
    "measure_lm",
    "merge_lora",
    "prune_lm",
    "require_peft",
    "summary",
]
