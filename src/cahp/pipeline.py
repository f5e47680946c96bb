"""``cahp prune``: the end-to-end flow, one call from Python or the command line.

fine-tuned classifier -> accuracy before -> the method's keep-plan (:class:`cahp.engine.Engine`: fit on the
calibration set, plan the budget under the constraints) -> physical removal -> accuracy after pruning -> one
recovery fine-tune -> accuracy after recovery -> parameters, FLOPs and measured latency dense vs pruned ->
reloadable pruned model, ``report.json``, plots.

Each stage's result is cached in the run's staging folder, so an interrupted run resumes where it stopped.

Under several processes (``torchrun`` / ``accelerate launch``, :mod:`cahp.distributed`) every process fits the
method and runs the recovery together (sharded batches, reduced statistics, summed gradients); the main process
alone evaluates, decides from its cache what to resume, hands the keep-plan to the others, and writes.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cahp import distributed
from cahp.config import check_counts, config_from_dict
from cahp.data import EncodedSplit, encode_split, fingerprint_split
from cahp.engine import Engine, print_line, task_calibration
from cahp.errors import CahpError
from cahp.evaluation.accounting import attention_flops, count_parameters, total_flops
from cahp.evaluation.latency import measure_latency, synthetic_batch
from cahp.evaluation.metrics import evaluate_split
from cahp.methods.base import get_method, method_info
from cahp.methods.plan import Budget, Constraints, HeadGrid, KeepPlan
from cahp.models import check_max_length, load_classifier, load_model_config, resolve_model
from cahp.outputs import StagedOutput, check_output_target, read_cache, write_json
from cahp.reporting.html_report import write_prune_html
from cahp.reporting.model_card import write_model_card
from cahp.reporting.plots import plot_head_space, plot_kept_heads, plot_mss_curve
from cahp.surgery import heads_to_remove, kept_heads_by_layer, prune_heads
from cahp.surgery.autoload import save_pruned
from cahp.train.distill import RecoveryObjective, build_recovery_loss
from cahp.train.finetune import TaskOptions, encode_eval_splits, subsample
from cahp.train.loop import SEEDS, TrainingConfig, is_seed, set_seed, train_model

#: The reference's recovery recipe (3 epochs, lr 2e-5, linear schedule, 10% warm-up, weight decay 0.01) on
#: length-grouped batches (same examples per epoch, far less padding; records of earlier runs keep their own).
RECOVERY_DEFAULT = TrainingConfig(
    epochs=3.0, learning_rate=2e-5, warmup_ratio=0.1, weight_decay=0.01, group_by_length=True
)


@dataclass
class PruneConfig:
    """Everything that defines a pruning run (written to ``run_config.json``; ``cahp prune --config`` replays it).

    Attributes:
        model: a fine-tuned classifier (folder, or alias/hub id of one).
        task: the task options (``cahp finetune``'s).
        method: a registered method (``cahp methods`` lists them): ``cahp`` or any head scorer (global top-K).
        method_settings: that method's settings (for example ``{"steps": 400}`` for ``l0``, ``{"metric":
            "bhattacharyya"}`` for ``cahp``); ``seed`` defaults to :attr:`seed`.
        budget: ``"auto"`` (the method finds its own head count, like CAHP's knee), ``"keep=K"`` or
            ``"sparsity=S"`` (share of heads removed).
        allow_empty_layers: let a layer lose every head (else every layer keeps at least one).
        uniform_layers: keep the same number of heads in every layer.
        gqa_mode: grouped-query attention: ``groups`` (whole key-value groups) or ``uniform`` (the same number
            of query heads in every group); the budget is made expressible before selection.
        seed: the method's seed (and the calibration subset's).
        calibration_size: examples of the calibration split (``task.calibration_split``: the training split;
            offline MNLI: its held-out share), a seeded class-stratified subset; ``None`` = the whole split.
        calibration_batch_size: examples per batch for methods that do not set their own.
        recovery: the recovery fine-tune; ``epochs=0`` gives the retraining-free result.
        recovery_objective: what the recovery optimises: ``ce``, or distillation from the unpruned model
            (``kd``, ``kd-relations``; :mod:`cahp.train.distill`). Default ``kd``: level with ``kd-relations``
            and ahead of ``ce`` in ``benchmarks/results/recovery.md``, at one teacher pass per recovery.
        recovery_max_examples: train the recovery on a stratified subset (demo settings).
        eval_splits: splits evaluated before pruning, after pruning and after recovery.
        eval_max_examples: evaluate on a seeded, stratified subset of each split (``None`` = the whole split).
        latency_batch_size, latency_seq_len, latency_repeats: the dense vs pruned latency measurement.
    """

    model: str
    task: TaskOptions = field(default_factory=TaskOptions)
    method: str = "cahp"
    method_settings: dict[str, Any] = field(default_factory=dict)
    budget: str = "auto"
    allow_empty_layers: bool = False
    uniform_layers: bool = False
    gqa_mode: str = "groups"
    seed: int = 42
    calibration_size: int | None = None
    calibration_batch_size: int = 32
    recovery: TrainingConfig = field(default_factory=lambda: copy.deepcopy(RECOVERY_DEFAULT))
    recovery_objective: RecoveryObjective = field(default_factory=lambda: RecoveryObjective(loss="kd"))
    recovery_max_examples: int | None = None
    eval_splits: tuple[str, ...] = ("validation", "test")
    eval_max_examples: int | None = None
    latency_batch_size: int = 32
    latency_seq_len: int = 128
    latency_repeats: int = 10

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> PruneConfig:
        """Check every setting's type and range (not the method's own settings: :func:`check_config` builds the
        method for that); returns self.

        Raises:
            CahpError: the first bad setting, named.
        """
        if not isinstance(self.model, str) or not self.model:
            raise CahpError(f"model must name a model (an alias, a folder or a hub id), got {self.model!r}")
        if not isinstance(self.task, TaskOptions):
            raise CahpError(f"task must be the task options (an object with at least 'task'), got {self.task!r}")
        self.task.validate()
        if not isinstance(self.recovery, TrainingConfig):
            raise CahpError(f"recovery must be the recovery's training settings (an object), got {self.recovery!r}")
        self.recovery.validate()
        if not isinstance(self.recovery_objective, RecoveryObjective):
            raise CahpError(
                f'recovery_objective must be an object like {{"loss": "kd"}}, got {self.recovery_objective!r}'
            )
        self.recovery_objective.validate()
        if not isinstance(self.method, str) or not isinstance(self.method_settings, dict):
            raise CahpError("method must be a method's name and method_settings an object {setting: value}")
        if not is_seed(self.seed):
            raise CahpError(f"seed must be a whole number in 0..{SEEDS - 1}, got {self.seed!r}")
        if (
            isinstance(self.eval_splits, str)
            or not self.eval_splits
            or not all(isinstance(s, str) for s in self.eval_splits)
        ):
            raise CahpError(f"eval_splits must list at least one split name, got {self.eval_splits!r}")
        for name in ("allow_empty_layers", "uniform_layers"):
            if not isinstance(getattr(self, name), bool):
                raise CahpError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.budget, str):
            raise CahpError(f"budget must be 'auto', 'keep=K' or 'sparsity=S', got {self.budget!r}")
        check_counts(self, ("calibration_size", "recovery_max_examples", "eval_max_examples"), optional=True)
        check_counts(
            self, ("calibration_batch_size", "latency_batch_size", "latency_seq_len", "latency_repeats"), optional=False
        )
        return self

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PruneConfig:
        """The config of a ``run_config.json``, this version's or an earlier one's (:func:`upgrade_prune_record`)."""
        return config_from_dict(cls, upgrade_prune_record(raw), "prune config")

    def parsed_budget(self) -> Budget:
        return Budget.parse(self.budget)

    def constraints(self) -> Constraints:
        return Constraints.from_options(self.allow_empty_layers, self.uniform_layers, self.gqa_mode)

    def settings(self) -> dict[str, Any]:
        """The method's settings with the run's seed."""
        return {"seed": self.seed, **self.method_settings}


def upgrade_prune_record(raw: dict[str, Any]) -> dict[str, Any]:
    """A ``run_config.json`` written before methods had one interface, in today's keys (others pass unchanged).

    Then CAHP's options were a ``cahp`` block (with the budget, the guardrail and the seed), head scorers' a
    ``scorer_settings`` block, and the gradient salience had its own ``salience_fraction``. A run's record (it
    has a ``command`` key) without a ``recovery_objective`` was written before recovery objectives existed: it
    recovered with cross-entropy.
    """
    if "command" in raw and "recovery_objective" not in raw:
        raw = {**raw, "recovery_objective": {"loss": "ce"}}
    if "cahp" not in raw:
        return raw
    record = {
        key: value
        for key, value in raw.items()
        if key not in ("cahp", "scorer_settings", "salience_fraction", "signature_batch_size")
    }
    old = dict(raw["cahp"])
    record["seed"] = old.pop("seed", 42)
    record["allow_empty_layers"] = old.pop("allow_empty_layers", False)
    keep, sparsity = old.pop("keep", None), old.pop("sparsity", None)
    record["budget"] = Budget.from_options(keep, sparsity).label() if (keep or sparsity) else "auto"
    scorer_settings = dict(raw.get("scorer_settings", {}))
    if raw.get("method", "cahp") == "cahp":
        settings = {key: value for key, value in old.items() if key != "salience" or value != "gradient"}
        if old.get("salience", "gradient") == "gradient":
            scorer_settings.setdefault("fraction", raw.get("salience_fraction", 0.25))
        if scorer_settings:
            settings["salience_settings"] = scorer_settings
        settings["batch_size"] = raw.get("signature_batch_size", 32)
        record["method_settings"] = settings
    else:
        record["method_settings"] = scorer_settings
    return record


class StageCache:
    """Run a stage once: its JSON result is cached in the staging folder, with its seconds (``folder`` ``None``:
    a non-main process, which keeps no cache and follows the main process's in :meth:`shared`)."""

    def __init__(self, folder: Path | None, progress: bool):
        self.folder = folder
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self.cached: list[str] = []

    def json(self, name: str, compute: Any) -> Any:
        cached = read_cache(self.folder / f"{name}.json", _read_stage, f"stage {name}")
        if cached is not None:
            self.seconds[name] = cached["seconds"]
            self.cached.append(name)
            return cached["value"]
        start = time.perf_counter()
        value = compute()
        self.seconds[name] = round(time.perf_counter() - start, 2)
        write_json(self.folder / f"{name}.json", {"seconds": self.seconds[name], "value": value})
        return value

    def shared(self, name: str, compute: Any) -> Any:
        """A stage every process computes together (collectives inside): the main process's cache decides
        whether it is resumed, and its value is every process's. :meth:`json` in a single process."""
        if not distributed.is_distributed():
            return self.json(name, compute)
        cached = read_cache(self.folder / f"{name}.json", _read_stage, f"stage {name}") if self.folder else None
        cached = distributed.broadcast_object(cached)
        if cached is not None:
            self.seconds[name] = cached["seconds"]
            self.cached.append(name)
            return cached["value"]
        start = time.perf_counter()
        value = distributed.broadcast_object(compute())
        self.seconds[name] = round(time.perf_counter() - start, 2)
        if self.folder is not None:
            write_json(self.folder / f"{name}.json", {"seconds": self.seconds[name], "value": value})
        return value

    def say(self, message: str) -> None:
        if self.progress:
            print(message, flush=True)


def _read_stage(path: Path) -> dict[str, Any]:
    """A cached stage: ``{"seconds": ..., "value": ...}`` (a file without both keys is unreadable)."""
    record = json.loads(path.read_text())
    if not isinstance(record, dict) or not {"seconds", "value"} <= set(record):
        raise ValueError("not a stage record")
    return record


def _accuracy(model: Any, tokenizer: Any, splits: dict[str, EncodedSplit], progress: bool) -> dict[str, Any]:
    return {
        name: evaluate_split(model, tokenizer, data, 64, progress, f"evaluate {name}") for name, data in splits.items()
    }


def check_config(config: PruneConfig) -> tuple[Budget, Constraints]:
    """Refuse a bad setting before anything is loaded or written: every field (:meth:`PruneConfig.validate`), the
    method, its settings, the budget and the constraints. Returns the parsed budget and constraints."""
    config.validate()
    budget, constraints = config.parsed_budget(), config.constraints()
    info = method_info(config.method)
    if budget.is_auto and not info.finds_own_budget:
        raise CahpError(
            f"method {config.method!r} has no automatic head count: give a budget with --keep K or --sparsity S "
            "(`cahp methods` says which methods find their own)"
        )
    settings = config.settings()
    if info.budget_aware and not budget.is_auto:
        settings["keep"] = 1  # the real count needs the model; here only the names and values are checked
    get_method(config.method, **settings)
    return budget, constraints


def check_fits_model(config: PruneConfig, budget: Budget, grid: HeadGrid, model: Any) -> None:
    """Refuse what the loaded model cannot do, before any work: ``keep=K`` above its head count, relation layers
    it does not have, or a latency sequence longer than its position embeddings."""
    if not budget.is_auto:
        budget.heads(grid.total)
    if config.recovery_objective.loss == "kd-relations" and config.recovery.epochs > 0:
        config.recovery_objective.layers(grid.layers)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and config.latency_seq_len > positions:
        raise CahpError(
            f"latency_seq_len {config.latency_seq_len} is longer than the model's {positions} positions: "
            f"pass --latency-seq-len {positions} or less"
        )


def prune(
    config: PruneConfig,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Prune ``config.model`` with ``config.method``, recover, and write the pruned model, ``report.json`` and plots.

    Every setting is checked before any work, and nothing is written on a refusal.

    Returns:
        The report (also written to ``out/report.json``).
    """
    budget, constraints = check_config(config)
    progress = progress and distributed.is_main()
    check_output_target(out, overwrite)
    check_max_length(config.task.max_length, load_model_config(config.model))  # a bad model fails before the data
    task = config.task.load(model=config.model)  # labels numbered as the model numbers them
    set_seed(config.seed)
    model, tokenizer = load_classifier(config.model, task.num_labels, task.label_names)
    check_max_length(config.task.max_length, model, tokenizer)
    grid = HeadGrid.of(model)
    check_fits_model(config, budget, grid, model)
    if torch.cuda.is_available():
        model.cuda()
    max_length = config.task.max_length
    calibration = task_calibration(
        task, tokenizer, config.calibration_size, config.seed, max_length, config.calibration_batch_size, progress
    )
    evaluation = encode_eval_splits(tokenizer, task, config.eval_splits, config.eval_max_examples, max_length)
    engine = Engine(model, calibration, say=print_line if progress else None)
    if not distributed.is_main():
        return _follow_main(config, model, tokenizer, engine, budget, constraints, task.split("train"))
    data_splits = [*evaluation, *(["train"] if config.recovery.epochs > 0 else [])]  # what the stages read
    inputs = {
        "model_path": resolve_model(config.model).location,
        **engine.fingerprints,
        "data": {split: fingerprint_split(task.split(split)) for split in data_splits},
    }
    record = {"command": "prune", **config.to_dict(), "inputs": inputs}
    with StagedOutput(out, record, overwrite, command=command) as staged:  # locked; released on exit
        (staged.path / "stages").mkdir(exist_ok=True)
        stages = StageCache(staged.path / "stages", progress)
        engine.cache_dir = stages.folder / "methods"
        if staged.resumed:
            stages.say(f"resuming the unfinished run in {staged.path}")

        stages.say(f"{config.model}: {grid.layers} layers x {grid.heads} heads; evaluating the dense model")
        before = stages.json("accuracy_before", lambda: _accuracy(model, tokenizer, evaluation, progress))
        plan = KeepPlan.from_dict(
            stages.shared("plan", lambda: engine.plan(config.method, config.settings(), budget, constraints).to_dict())
        )
        dense = copy.deepcopy(model)
        dense_params = count_parameters(dense)
        prune_heads(model, heads_to_remove(model, plan.kept_heads_by_layer, config.gqa_mode), gqa_mode=config.gqa_mode)
        kept = kept_heads_by_layer(model)
        kept_total = sum(len(hs) for hs in kept.values())
        stages.say(f"removed {grid.total - kept_total} of {grid.total} heads; evaluating before recovery")
        pruned_accuracy = stages.json("accuracy_pruned", lambda: _accuracy(model, tokenizer, evaluation, progress))

        recovery_examples = 0
        if config.recovery.epochs > 0:
            recovery_split = subsample(task.split("train"), config.recovery_max_examples, config.recovery.seed)
            recovery_data = encode_split(tokenizer, recovery_split, max_length)
            recovery_examples = len(recovery_data)

            def recover() -> dict[str, Any]:
                checkpoint = stages.folder / "recovery_checkpoint.pt"
                validation = evaluation.get("validation")
                return _recover(config, model, dense, tokenizer, recovery_data, validation, checkpoint, progress)

            recovery_run = stages.shared("recovery_run", recover)
            recovery_history = recovery_run["history"]
            if (stages.folder / "recovery_checkpoint.pt").is_file():
                state = torch.load(stages.folder / "recovery_checkpoint.pt", weights_only=False)
                model.load_state_dict(state["model"])
            recovered = stages.json("accuracy_recovered", lambda: _accuracy(model, tokenizer, evaluation, progress))
        else:
            recovery_history, recovered, recovery_run = [], pruned_accuracy, {}

        seq = config.latency_seq_len
        dense.cpu()
        model.cpu()
        torch_threads = torch.get_num_threads()
        latency = measure_latency(
            {"dense": dense, "pruned": model},
            synthetic_batch(model, config.latency_batch_size, seq),
            repeats=config.latency_repeats,
        )
        speedup = latency["dense"]["median_seconds"] / latency["pruned"]["median_seconds"]
        ideal = total_flops(dense, seq) / total_flops(model, seq)
        report = {
            "model": config.model,
            "method": config.method,
            "task": task.describe(),
            "calibration": {**calibration.description, "fingerprint": engine.fingerprints["calibration"]},
            "heads": {
                "layers": grid.layers,
                "heads_per_layer": grid.heads,
                "kv_heads_per_layer": grid.kv_heads,
                "total": grid.total,
                "requested": plan.heads_requested,
                "kept": kept_total,
            },
            "kept_heads_by_layer": {str(k): v for k, v in sorted(kept.items())},
            "plan": plan.to_dict(),
            "selection": _selection_view(plan),
            "accuracy": {"before_pruning": before, "after_pruning": pruned_accuracy, "after_recovery": recovered},
            "recovery_history": recovery_history,
            "recovery": {
                "objective": config.recovery_objective.to_dict(),
                "examples": recovery_examples,
                **{key: value for key, value in recovery_run.items() if key != "history"},
            },
            "parameters": {"dense": dense_params, "pruned": count_parameters(model)},
            "flops_per_sequence": {
                "seq_len": seq,
                "dense_total": total_flops(dense, seq),
                "pruned_total": total_flops(model, seq),
                "dense_attention": attention_flops(dense, seq),
                "pruned_attention": attention_flops(model, seq),
            },
            "latency": {
                "device": "cpu",
                "torch_threads": torch_threads,
                "batch_size": config.latency_batch_size,
                "seq_len": seq,
                **latency,
                "measured_speedup": round(speedup, 3),
                "flops_ideal_speedup": round(ideal, 3),
            },
            "stage_seconds": stages.seconds,
            "stages_cached": stages.cached,
            "config": config.to_dict(),
            "inputs": inputs,
            "command": command,
        }
        save_pruned(model, staged.path / "model")
        tokenizer.save_pretrained(staged.path / "model")
        plots = staged.path / "plots"
        plots.mkdir(exist_ok=True)
        plot_mss_curve(report["selection"], plots / "mss_curve.png")
        plot_kept_heads(
            report["kept_heads_by_layer"],
            grid.heads,
            plots / "kept_heads.png",
            f"{Path(config.model).name} ({task.name})",
        )
        plot_head_space(report["selection"], grid.heads, plots / "head_space.png")
        write_model_card(report, staged.path / "model", command)
        write_json(staged.path / "report.json", report)
        write_prune_html(report, staged.path / "report.html", plots)
        (stages.folder / "recovery_checkpoint.pt").unlink(missing_ok=True)
        staged.commit()
    return distributed.broadcast_object(report)  # the other processes wait for the main one to write


def _recover(
    config: PruneConfig,
    model: Any,
    dense: Any,
    tokenizer: Any,
    data: EncodedSplit,
    validation: EncodedSplit | None,
    checkpoint: Path | None,
    progress: bool,
) -> dict[str, Any]:
    """The recovery fine-tune of the pruned ``model`` (``dense`` is the distillation teacher): its history,
    seconds and teacher costs."""
    if torch.cuda.is_available():
        model.cuda()
    start = time.perf_counter()
    objective, batch_size = config.recovery_objective, config.recovery.eval_batch_size
    loss = build_recovery_loss(objective, dense, tokenizer, data, batch_size, progress)
    history = train_model(
        model,
        tokenizer,
        data,
        config.recovery,
        validation=validation,
        checkpoint_path=checkpoint,
        desc="recovery",
        progress=progress,
        loss_fn=loss,
    )
    seconds = time.perf_counter() - start
    costs = loss.costs() if loss is not None else {"teacher_seconds": 0.0, "teacher_forwards": 0}
    return {"history": history, "seconds": round(seconds, 2), **costs}


def _follow_main(
    config: PruneConfig,
    model: Any,
    tokenizer: Any,
    engine: Engine,
    budget: Budget,
    constraints: Constraints,
    train_split: Any,
) -> dict[str, Any]:
    """A non-main process of a multi-process ``cahp prune``: the stages every process computes together (the
    method's fit, the recovery), in the main process's order, writing nothing; returns the main process's report."""
    stages = StageCache(None, progress=False)
    plan = KeepPlan.from_dict(
        stages.shared("plan", lambda: engine.plan(config.method, config.settings(), budget, constraints).to_dict())
    )
    if config.recovery.epochs > 0:
        dense = copy.deepcopy(model)
        prune_heads(model, heads_to_remove(model, plan.kept_heads_by_layer, config.gqa_mode), gqa_mode=config.gqa_mode)
        split = subsample(train_split, config.recovery_max_examples, config.recovery.seed)
        data = encode_split(tokenizer, split, config.task.max_length)
        stages.shared("recovery_run", lambda: _recover(config, model, dense, tokenizer, data, None, None, False))
    return distributed.broadcast_object(None)


def _selection_view(plan: KeepPlan) -> dict[str, Any]:
    """What the plots and the summary read: the plan's details plus the common keys."""
    return {
        **plan.details,
        "method": plan.method,
        "budget": plan.budget.label(),
        "k": plan.heads_requested,
        "kept_heads_by_layer": {str(layer): heads for layer, heads in sorted(plan.kept_heads_by_layer.items())},
        "guardrail_heads": [list(head) for head in plan.guardrail_heads],
    }


def summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: heads kept, accuracy before/after, speedup."""
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
    return f" (recovery: {objective}, {recovery['examples']} examples x {epochs:g} epoch{'' if epochs == 1 else 's'})"
