"""The workload protocol: what differs between tasks, so that the run around a method is written once.

A run (:mod:`cahp.run`) is the same for every task: plan -> surgery -> post-surgery steps -> recovery ->
evaluation -> measurement -> reports. What it needs from the task is a :class:`Workload`:

- ``model`` / ``tokenizer``: the unpruned model, loaded by the workload (``__init__``), never modified;
- :meth:`Workload.calibration`: the examples and objective every method learns from, for a sample seed;
- :meth:`Workload.evaluate`: the quality of a model (accuracy per split, perplexity, ...), JSON-ready;
- :meth:`Workload.recovery_data` and :meth:`Workload.recovery_loss`: what the recovery trains on, and with which
  loss (``None``: the model's own; distillation from the unpruned model otherwise);
- :meth:`Workload.measure`: dense vs pruned speed, measured in one run (latency, or KV cache and generation);
- :meth:`Workload.describe` and :meth:`Workload.report`: how the task and a run's results are written in reports,
  model cards and summaries.

Two workloads are built in: ``classification`` (:mod:`cahp.workloads.classification`) and ``causal-lm``
(:mod:`cahp.workloads.causal_lm`). Another registers with :func:`cahp.workloads.register_workload` and runs through
``cahp prune --objective NAME`` and ``cahp.pipeline.prune`` unchanged; its own settings come from the run config's
``workload_settings`` object.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from cahp.calibration import Calibration
    from cahp.data.batching import EncodedSplit
    from cahp.train.distill import LossFn, RecoveryObjective
    from cahp.train.finetune import TaskOptions
    from cahp.train.loop import TrainingConfig


class WorkloadConfig(Protocol):
    """The settings a workload reads from a run's config (:class:`cahp.pipeline.PruneConfig` and
    :class:`cahp.bench.BenchConfig` both have them)."""

    model: str
    task: TaskOptions
    workload_settings: dict[str, Any]
    calibration_size: int | None
    calibration_batch_size: int
    recovery: TrainingConfig
    recovery_objective: RecoveryObjective
    recovery_max_examples: int | None
    eval_splits: Any
    eval_max_examples: int | None


class Workload(ABC):
    """One task's side of a run. ``__init__(config, progress)`` loads the model, its tokenizer and the data.

    Class attributes:
        name: the registry name (``--objective NAME``).
        has_classes: calibration examples fall into classes (methods that compare classes, like CAHP, can run).
        description: one line for ``cahp prune --help`` and reports.
        default_recovery: the recovery recipe of a run whose config gives none (``None``: no recovery).

    Attributes:
        model: the unpruned model (eval mode), never modified by the run.
        tokenizer: pads batches (``None`` for workloads without text).
    """

    name: ClassVar[str] = ""
    has_classes: ClassVar[bool] = True
    description: ClassVar[str] = ""
    default_recovery: ClassVar[TrainingConfig | None] = None

    model: PreTrainedModel
    tokenizer: Any

    def __init__(self, config: Any, progress: bool = False) -> None:
        self.config = config
        self.progress = progress

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Refuse settings this workload cannot run, before anything is loaded (default: accept)."""
        return None

    def check_model(self, config: Any) -> None:
        """Refuse what the loaded model cannot do (default: accept)."""
        return None

    @abstractmethod
    def calibration(self, sample_seed: int) -> Calibration:
        """The calibration set of ``sample_seed`` (the run's seed; a bench grid's sample seed)."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, progress: bool = False, extras: bool = True) -> dict[str, Any]:
        """The quality of ``model`` (JSON-ready); ``extras``: also what a report shows beyond the figures."""

    @abstractmethod
    def recovery_data(self) -> EncodedSplit:
        """The examples the recovery trains on."""

    def validation_data(self) -> EncodedSplit | None:
        """Examples evaluated after each recovery epoch (accuracy in the history rows); ``None``: none."""
        return None

    def recovery_loss(self, teacher: torch.nn.Module) -> LossFn | None:
        """The recovery's ``loss_fn`` (``None``: the model's own loss); ``teacher`` is the unpruned model."""
        return None

    def measure(self, dense: PreTrainedModel, pruned: PreTrainedModel) -> dict[str, Any]:
        """Dense vs pruned speed, measured in one run (default: nothing measured)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The task, for reports."""
        return {"task": self.name}

    def data_fingerprints(self) -> dict[str, Any]:
        """Fingerprints of the data the run reads (a resumed run with other data is refused)."""
        return {}

    def report(self, outcome: Any) -> dict[str, Any]:
        """This workload's sections of ``report.json`` for a finished run (:class:`cahp.run.RunOutcome`)."""
        return {"quality": outcome.quality}

    @staticmethod
    def summary(report: dict[str, Any]) -> str:
        """Lines for the terminal from a finished run's report."""
        heads = report["heads"]
        return f"heads kept: {heads['kept']} of {heads['total']} ({report.get('method')})"

    def save(self, model: PreTrainedModel, folder: Any) -> dict[str, Any]:
        """Save the pruned ``model`` (and its tokenizer) to ``folder``; returns how (recorded in the report)."""
        from cahp.surgery.autoload import save_pruned

        save_pruned(model, folder, tokenizer=self.tokenizer, name_or_path=self.shared_name())
        return {"folder": folder.name, "format": "cahp"}

    def shared_name(self) -> str | None:
        """How a saved folder names its base model: the Hub id of an alias; ``None`` (the folder's own name) for
        a local folder, so that no local path is published."""
        from cahp.reporting.model_card import ALIAS_HUB_IDS

        return ALIAS_HUB_IDS.get(self.config.model)
