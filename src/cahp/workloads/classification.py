"""The ``classification`` workload: a fine-tuned sequence classifier on a task (``cahp finetune``'s tasks).

Calibration: a seeded, class-stratified sample of the task's calibration split (the training split; offline MNLI:
its held-out share). Quality: accuracy and macro-F1 per evaluated split. Recovery: the training split (or a
stratified subset), with cross-entropy or distillation from the unpruned model (:mod:`cahp.train.distill`).
Speed: dense vs pruned latency of a synthetic batch on the CPU, next to the FLOPs-ideal speedup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from cahp.calibration import Calibration, SequenceClassification
from cahp.data import EncodedSplit, encode_split, fingerprint_split
from cahp.engine import task_calibration
from cahp.errors import CahpError
from cahp.evaluation.accounting import attention_flops, total_flops
from cahp.evaluation.latency import measure_latency, synthetic_batch
from cahp.evaluation.metrics import evaluate_split
from cahp.models import check_max_length, load_classifier, load_model_config
from cahp.train.distill import Distillation, LossFn, RecoveryObjective, build_recovery_loss, objective_loss
from cahp.train.finetune import encode_eval_splits, subsample
from cahp.train.loop import TrainingConfig
from cahp.workloads import RECOVERY_RECIPES, register_workload
from cahp.workloads.base import Workload

#: The recovery recipe of a classification run whose config gives none (:data:`cahp.workloads.RECOVERY_RECIPES`).
RECOVERY_DEFAULT = TrainingConfig(**RECOVERY_RECIPES["classification"])

#: Examples per evaluation batch (and per teacher-logit batch of ``kd``).
EVAL_BATCH_SIZE = 64


@register_workload
class ClassificationWorkload(Workload):
    """A fine-tuned sequence classifier: accuracy on the task's splits, latency dense vs pruned."""

    name = "classification"
    has_classes = True
    description = "a fine-tuned sequence classifier on a task: accuracy, latency"
    default_recovery = RECOVERY_DEFAULT

    def __init__(self, config: Any, progress: bool = False) -> None:
        super().__init__(config, progress)
        check_max_length(config.task.max_length, load_model_config(config.model))  # a bad model fails before data
        self.task = config.task.load(model=config.model)  # labels numbered as the model numbers them
        self.model, self.tokenizer = load_classifier(config.model, self.task.num_labels, self.task.label_names)
        check_max_length(config.task.max_length, self.model, self.tokenizer)
        self.evaluation = encode_eval_splits(
            self.tokenizer, self.task, config.eval_splits, config.eval_max_examples, config.task.max_length
        )
        if not self.evaluation:
            raise CahpError(
                f"none of the eval_splits {list(config.eval_splits)} exists; the task has {self.task.splits}"
            )
        self._recovery_data: EncodedSplit | None = None
        self._distillation: Distillation | None = None

    def check_model(self, config: Any) -> None:
        positions = getattr(self.model.config, "max_position_embeddings", None)
        seq = getattr(config, "latency_seq_len", None)
        if positions is not None and seq is not None and seq > positions:
            raise CahpError(
                f"latency_seq_len {seq} is longer than the model's {positions} positions: "
                f"pass --latency-seq-len {positions} or less"
            )

    def calibration(self, sample_seed: int) -> Calibration:
        config = self.config
        return task_calibration(
            self.task,
            self.tokenizer,
            config.calibration_size,
            sample_seed,
            config.task.max_length,
            config.calibration_batch_size,
            self.progress,
        )

    def evaluate(self, model: torch.nn.Module, progress: bool = False, extras: bool = True) -> dict[str, Any]:
        """``{split: {accuracy, macro_f1, examples, ...}}`` of every evaluated split."""
        return {
            name: evaluate_split(model, self.tokenizer, data, EVAL_BATCH_SIZE, progress, f"evaluate {name}")
            for name, data in self.evaluation.items()
        }

    def recovery_data(self) -> EncodedSplit:
        if self._recovery_data is None:
            config = self.config
            split = subsample(self.task.split("train"), config.recovery_max_examples, config.recovery.seed)
            self._recovery_data = encode_split(self.tokenizer, split, config.task.max_length)
        return self._recovery_data

    def validation_data(self) -> EncodedSplit | None:
        return self.evaluation.get("validation")

    def recovery_loss(self, teacher: torch.nn.Module) -> LossFn | None:
        """``ce``: the calibration objective's loss (cross-entropy on the labels); distillation from ``teacher``
        otherwise (``kd``'s logits are computed once per workload and shared by every run of it: the teacher is
        always the same unpruned model)."""
        objective: RecoveryObjective = self.config.recovery_objective
        if not objective.uses_teacher:
            return objective_loss(SequenceClassification(self.task.num_labels))
        if self._distillation is None:
            self._distillation = build_recovery_loss(
                objective, teacher, self.tokenizer, self.recovery_data(), EVAL_BATCH_SIZE, self.progress
            )
        return self._distillation

    def measure(self, dense: PreTrainedModel, pruned: PreTrainedModel) -> dict[str, Any]:
        """Latency of a synthetic batch, dense vs pruned on the CPU in one run, and FLOPs per sequence."""
        config = self.config
        seq = config.latency_seq_len
        threads = torch.get_num_threads()
        latency = measure_latency(
            {"dense": dense, "pruned": pruned},
            synthetic_batch(pruned, config.latency_batch_size, seq),
            repeats=config.latency_repeats,
        )
        speedup = latency["dense"]["median_seconds"] / latency["pruned"]["median_seconds"]
        ideal = total_flops(dense, seq) / total_flops(pruned, seq)
        return {
            "flops_per_sequence": {
                "seq_len": seq,
                "dense_total": total_flops(dense, seq),
                "pruned_total": total_flops(pruned, seq),
                "dense_attention": attention_flops(dense, seq),
                "pruned_attention": attention_flops(pruned, seq),
            },
            "latency": {
                "device": "cpu",
                "torch_threads": threads,
                "batch_size": config.latency_batch_size,
                "seq_len": seq,
                **latency,
                "measured_speedup": round(speedup, 3),
                "flops_ideal_speedup": round(ideal, 3),
            },
        }

    def save(self, model: PreTrainedModel, folder: Path) -> dict[str, Any]:
        """Save the pruned classifier (the ``cahp_`` config: loads with cahp or trust_remote_code) and its tokenizer,
        its weights in the config's ``save_dtype`` (``auto``: the dtype the model came in,
        :func:`~cahp.surgery.autoload.resolve_save_dtype`) without changing ``model``. The record says the format,
        the dtype and the folder's size."""
        from cahp.surgery.autoload import resolve_save_dtype, save_pruned, saved_dtype_record

        saved = resolve_save_dtype(getattr(self.config, "save_dtype", "auto"), self.config.model)
        save_pruned(model, folder, tokenizer=self.tokenizer, name_or_path=self.shared_name(), dtype=saved.dtype)
        return {"folder": folder.name, "format": "cahp", **saved_dtype_record(folder, saved)}

    def describe(self) -> dict[str, Any]:
        return self.task.describe()

    def data_fingerprints(self) -> dict[str, Any]:
        splits = [*self.evaluation, *(["train"] if self.config.recovery.epochs > 0 else [])]  # what the run reads
        return {split: fingerprint_split(self.task.split(split)) for split in splits}

    def report(self, outcome: Any) -> dict[str, Any]:
        quality = outcome.quality
        recovered = quality["recovered"] if quality["recovered"] is not None else quality["pruned"]
        run = outcome.recovery_run
        return {
            "task": self.describe(),
            "accuracy": {
                "before_pruning": quality["before"],
                "after_pruning": quality["pruned"],
                "after_recovery": recovered,
            },
            "recovery_history": run.get("history", []),
            "recovery": {
                "objective": self.config.recovery_objective.to_dict(),
                "examples": len(self.recovery_data()) if self.config.recovery.epochs > 0 else 0,
                **{key: value for key, value in run.items() if key != "history"},
            },
            **outcome.measurement,
        }

    @staticmethod
    def summary(report: dict[str, Any]) -> str:
        """Heads kept, accuracy before / after pruning / after recovery, and the measured speedup."""
        from cahp.methods.plan import Budget

        accuracy = report["accuracy"]
        split = "test" if "test" in accuracy["before_pruning"] else next(iter(accuracy["before_pruning"]))
        selection = report["selection"]
        if "plan" in report:
            plan = report["plan"]
            budget, how = Budget.from_dict(plan["budget"]).label(), plan["details"].get("how", "global top-k")
        else:  # a report of an earlier version (a cached demo run)
            budget, how = selection.get("budget_mode", "auto"), f"k = {selection['k']}"
        lines = [
            f"heads kept: {report['heads']['kept']} of {report['heads']['total']} ({report.get('method', 'cahp')}, "
            f"budget {budget}: {selection['k']} heads, {how}; guardrail added {len(selection['guardrail_heads'])})",
            f"{split} accuracy ({accuracy['before_pruning'][split]['examples']} examples): "
            f"before {accuracy['before_pruning'][split]['accuracy']:.4f}, "
            f"after pruning {accuracy['after_pruning'][split]['accuracy']:.4f}, "
            f"after recovery {accuracy['after_recovery'][split]['accuracy']:.4f}{_recovery_label(report)}",
            f"parameters: {report['parameters']['dense'] / 1e6:.1f}M -> {report['parameters']['pruned'] / 1e6:.1f}M; "
            f"speedup {report['latency']['measured_speedup']:.2f}x measured on CPU "
            f"(FLOPs-ideal {report['latency']['flops_ideal_speedup']:.2f}x, batch {report['latency']['batch_size']}"
            f" x {report['latency']['seq_len']} tokens)",
        ]
        return "\n".join(lines)


def _recovery_label(report: dict[str, Any]) -> str:
    """`` (recovery: kd (T=2, alpha=0.5), 2000 examples x 1 epochs)`` for the summary; empty without recovery."""
    recovery, config = report.get("recovery"), report.get("config", {})
    epochs = config.get("recovery", {}).get("epochs", 0)
    if not recovery or not epochs:
        return " (no recovery)" if recovery is not None else ""
    objective = RecoveryObjective(**recovery["objective"]).label()
    lora = f", LoRA rank {recovery['lora']['rank']} merged" if "lora" in recovery else ""
    return (
        f" (recovery: {objective}{lora}, {recovery['examples']} examples x {epochs:g} "
        f"epoch{'' if epochs == 1 else 's'})"
    )
