"""One run, written once: plan -> surgery -> post-surgery steps -> recovery -> evaluation -> measurement.

:func:`execute` is the run of every workload (:mod:`cahp.workloads`) and every caller: ``cahp prune`` (with its
staging folder, lock and resume: :func:`cahp.pipeline.prune`), each cell of a ``cahp bench`` grid, and the
benchmark scripts through either. What a caller decides is only what to keep (the :class:`KeepPlan`) and where
stages are cached (:class:`cahp.stages.StageCache`); what differs between tasks is the workload's.

The unpruned model is never modified: the pruned model is a copy. Under several processes
(:mod:`cahp.distributed`) every process runs the recovery together (sharded batches, summed gradients); the main
process alone evaluates and measures, and the others get ``None`` for what only it computes.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedModel

from cahp import distributed
from cahp.calibration import Calibration
from cahp.evaluation.accounting import count_parameters
from cahp.methods.plan import HeadGrid, KeepPlan
from cahp.outputs import atomic_write, read_cache
from cahp.runtime import on_cpu, place
from cahp.stages import StageCache
from cahp.surgery import heads_to_remove, kept_heads_by_layer, kept_kv_heads_by_layer, prune_heads
from cahp.surgery.removal import GqaMode
from cahp.train.loop import TrainingConfig, set_seed, train_model
from cahp.train.lora import add_lora, describe_lora, merge_lora
from cahp.workloads.base import Workload

#: A step between surgery and recovery (reconstruction): ``step(dense, pruned, workload) -> record``; it may
#: change the pruned model's weights in place, and its JSON-ready record goes to the report under its name.
PostSurgeryStep = Callable[[torch.nn.Module, torch.nn.Module, Workload], dict[str, Any]]


@dataclass
class RunSettings:
    """How a run prunes and recovers (the plan itself comes from the caller).

    Attributes:
        gqa_mode: grouped-query attention: ``groups`` removes whole key-value groups, ``uniform`` query heads.
        recovery: the recovery's training settings (``epochs=0``: none).
        recovery_lora_rank: ``None``: every weight trains; ``R``: rank-``R`` LoRA adapters, merged afterwards.
        measure: measure dense vs pruned speed (the workload's :meth:`~Workload.measure`).
        report_extras: evaluate what a report shows beyond the figures (a causal LM's greedy continuations);
            a bench cell records the figures only.
        validate_recovery: evaluate the workload's validation data after each recovery epoch (history rows).
        post_surgery: named steps run after surgery, before the pruned model is evaluated.
    """

    gqa_mode: str = "groups"
    recovery: TrainingConfig = field(default_factory=lambda: TrainingConfig(epochs=0.0))
    recovery_lora_rank: int | None = None
    measure: bool = True
    report_extras: bool = True
    validate_recovery: bool = True
    post_surgery: Sequence[tuple[str, PostSurgeryStep]] = ()


@dataclass
class RunOutcome:
    """What a run produced (the main process's; quality and measurement are ``None`` / empty elsewhere).

    Attributes:
        plan: the keep-plan that was applied.
        model: the pruned (and recovered) model.
        grid: the unpruned model's head grid.
        kept_heads_by_layer: the heads the pruned model has, per layer.
        kept_kv_heads_by_layer: its key-value heads, per layer (the query heads without grouped-query attention).
        quality: ``{"before", "pruned", "recovered"}``: the workload's evaluation of the unpruned model, right
            after surgery (and post-surgery steps), and after recovery (``None`` without recovery).
        recovery_run: the recovery's record (history, seconds, teacher costs, LoRA), empty without recovery.
        post_surgery: each post-surgery step's record, by name.
        measurement: the workload's speed measurement (empty when not measured).
        parameters: ``{"dense", "pruned"}`` parameter counts.
        calibration: the calibration the plan was fitted on (its description goes to the report).
        fingerprints: ``{"model", "calibration"}`` short hashes.
        seconds: wall time of each step of this run (cached stages count their original time).
    """

    plan: KeepPlan
    model: PreTrainedModel
    grid: HeadGrid
    kept_heads_by_layer: dict[int, list[int]]
    kept_kv_heads_by_layer: dict[int, list[int]]
    quality: dict[str, Any]
    recovery_run: dict[str, Any]
    post_surgery: dict[str, Any]
    measurement: dict[str, Any]
    parameters: dict[str, int]
    calibration: Calibration | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return sum(len(heads) for heads in self.kept_heads_by_layer.values())

    @property
    def kv_kept(self) -> int:
        return sum(len(heads) for heads in self.kept_kv_heads_by_layer.values())


def execute(
    workload: Workload,
    plan: KeepPlan,
    settings: RunSettings,
    stages: StageCache,
    *,
    before: dict[str, Any] | None = None,
) -> RunOutcome:
    """Apply ``plan`` to a copy of ``workload.model``, then post-surgery steps, recovery, evaluation, measurement.

    Args:
        workload: the task, with the unpruned model (on its run device).
        plan: the heads to keep.
        settings: how to prune and recover.
        stages: where each stage is cached (``StageCache(None, ...)``: nothing cached).
        before: the unpruned model's quality when the caller has it (a bench grid evaluates it once); else it is
            evaluated here (stage ``quality_before``).
    """
    main = distributed.is_main()
    progress = stages.progress and main
    dense = workload.model
    grid = HeadGrid.of(dense)
    if before is None and main:
        stages.say("evaluating the unpruned model")
        before = stages.json("quality_before", lambda: workload.evaluate(dense, progress, settings.report_extras))

    start = time.perf_counter()
    pruned = copy.deepcopy(dense)
    gqa_mode = cast(GqaMode, settings.gqa_mode)  # prune_heads refuses any other
    prune_heads(pruned, heads_to_remove(pruned, plan.kept_heads_by_layer, gqa_mode), gqa_mode=gqa_mode)
    kept = kept_heads_by_layer(pruned)
    kept_total = sum(len(heads) for heads in kept.values())
    seconds = {"surgery": round(time.perf_counter() - start, 2)}
    stages.say(f"removed {grid.total - kept_total} of {grid.total} heads")
    post_records = {}
    for name, step in settings.post_surgery:
        step_start = time.perf_counter()
        post_records[name] = step(dense, pruned, workload)
        seconds[name] = round(time.perf_counter() - step_start, 2)

    def evaluate() -> dict[str, Any]:
        return workload.evaluate(pruned, progress, settings.report_extras)

    pruned_quality = stages.json("quality_pruned", evaluate) if main else None

    recovery_run: dict[str, Any] = {}
    recovered_quality = None
    if settings.recovery.epochs > 0:
        stages.say("recovering")
        recovery_run = _recover(workload, dense, pruned, settings, stages, progress)
        if main:
            recovered_quality = stages.json("quality_recovered", evaluate)

    measurement: dict[str, Any] = {}
    if settings.measure and main:
        stages.say("measuring dense vs pruned (one run)")
        on_cpu(dense, pruned)
        measurement = workload.measure(dense, pruned)
    return RunOutcome(
        plan=plan,
        model=pruned,
        grid=grid,
        kept_heads_by_layer=kept,
        kept_kv_heads_by_layer=kept_kv_heads_by_layer(pruned),
        quality={"before": before, "pruned": pruned_quality, "recovered": recovered_quality},
        recovery_run=recovery_run,
        post_surgery=post_records,
        measurement=measurement,
        parameters={"dense": count_parameters(dense), "pruned": count_parameters(pruned)},
        seconds=seconds,
    )


def _recover(
    workload: Workload,
    dense: torch.nn.Module,
    pruned: torch.nn.Module,
    settings: RunSettings,
    stages: StageCache,
    progress: bool,
) -> dict[str, Any]:
    """The recovery of ``pruned`` in place (a stage every process computes together): its record. A resumed run
    restores the recovered weights from the stage folder's checkpoint (LoRA: the merged weights' own file)."""
    checkpoint = stages.file("recovery_checkpoint.pt")
    merged = stages.file("recovery_merged.pt")
    rank = settings.recovery_lora_rank

    def recover() -> dict[str, Any]:
        place(pruned)
        set_seed(settings.recovery.seed)
        start = time.perf_counter()
        loss = workload.recovery_loss(dense)
        costs = getattr(loss, "costs", None)  # a distillation loss reports what its teacher cost
        before = costs() if costs is not None else {}
        trained = pruned if rank is None else add_lora(pruned, rank)
        history = train_model(
            trained,
            workload.tokenizer,
            workload.recovery_data(),
            settings.recovery,
            validation=workload.validation_data() if settings.validate_recovery else None,
            checkpoint_path=checkpoint,
            desc="recovery" if rank is None else f"recovery (LoRA rank {rank})",
            progress=progress,
            loss_fn=loss,
        )
        record: dict[str, Any] = {"history": history}
        if rank is not None:
            record["lora"] = describe_lora(trained)
            merge_lora(trained)  # the LoRA layers become plain projections of `pruned` again
            if merged is not None and distributed.is_main():
                # the training checkpoint (LoRA keys, optimiser) stays as it is: a run killed before the stage
                # is recorded retrains from it to the same end and merges again
                atomic_write(merged, lambda path: torch.save({"model": pruned.state_dict()}, path))
        pruned.eval()
        record["seconds"] = round(time.perf_counter() - start, 2)
        if costs is not None:  # this run's teacher work, and the one-time setup shared by every run of the loss
            record.update({key: round(value - before.get(key, 0), 2) for key, value in costs().items()})
            setup = getattr(loss, "setup_costs", None)
            if setup:
                record["shared_setup"] = setup
        return record

    record = stages.shared("recovery_run", recover)
    if "recovery_run" in stages.cached:  # resumed: the recovered weights come from the stage folder
        recovered = merged if rank is not None else checkpoint
        state = distributed.broadcast_object(
            read_cache(recovered, _read_weights, "recovered weights") if recovered is not None else None
        )
        if state is None:  # missing or damaged: the recovery runs again
            stages.forget("recovery_run")
            record = stages.shared("recovery_run", recover)
        else:
            pruned.load_state_dict(state)
    pruned.eval()
    return record


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a training checkpoint or of the merged LoRA weights."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ValueError("no model weights")
    return state["model"]
