"""``cahp prune``: the end-to-end run, one call from Python or the command line, for every workload.

A model (a fine-tuned classifier, a causal LM, or any registered workload's: :mod:`cahp.workloads`) -> the
method's keep-plan (:class:`cahp.engine.Engine`: fit on the workload's calibration set, plan the budget under the
constraints) -> the run (:func:`cahp.run.execute`: surgery, post-surgery steps, recovery, evaluation before and
after, dense vs pruned speed) -> reloadable pruned model, ``report.json``, plots, model card, HTML report.

Each stage's result is cached in the run's staging folder (:class:`cahp.stages.StageCache`), so an interrupted
run resumes where it stopped; the output folder appears only when everything is written.

Under several processes (``torchrun`` / ``accelerate launch``, :mod:`cahp.distributed`) every process fits the
method and runs the recovery together (sharded batches, reduced statistics, summed gradients); the main process
alone evaluates, decides from its cache what to resume, hands the keep-plan to the others, and writes.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cahp import distributed
from cahp.calibration import Calibration
from cahp.config import check_counts, config_from_dict
from cahp.engine import Engine, print_line
from cahp.errors import CahpError, notice
from cahp.legacy import upgrade_prune_record
from cahp.methods.base import available_methods, get_method, method_info
from cahp.methods.plan import Budget, Constraints, HeadGrid, KeepPlan
from cahp.models import resolve_model
from cahp.outputs import StagedOutput, check_output_target, write_json
from cahp.reconstruction import check_reconstruction, post_surgery_steps
from cahp.reporting.html_report import write_prune_html
from cahp.reporting.model_card import write_model_card
from cahp.reporting.plots import plot_head_space, plot_kept_heads, plot_mss_curve
from cahp.run import RunOutcome, RunSettings, execute
from cahp.runtime import place
from cahp.settings import PRUNE, PRUNE_RECOVERY_OBJECTIVE
from cahp.stages import StageCache
from cahp.train.distill import RecoveryObjective
from cahp.train.finetune import TaskOptions
from cahp.train.loop import SEEDS, TrainingConfig, is_seed, set_seed
from cahp.workloads import available_workloads, get_workload
from cahp.workloads.causal_lm import LMOptions
from cahp.workloads.classification import RECOVERY_DEFAULT

__all__ = ["RECOVERY_DEFAULT", "PruneConfig", "StageCache", "check_config", "prune", "summary"]


@dataclass
class PruneConfig:
    """Everything that defines a pruning run (written to ``run_config.json``; ``cahp prune --config`` replays it).

    Attributes:
        model: the model to prune: a folder, an alias or a hub id (a fine-tuned classifier for ``classification``,
            a causal LM for ``causal-lm``).
        objective: the workload (:mod:`cahp.workloads`): ``classification`` (default), ``causal-lm``, or a
            registered one.
        task: ``classification``'s task options (``cahp finetune``'s).
        lm: ``causal-lm``'s text and measurements (:class:`cahp.workloads.causal_lm.LMOptions`; set to its defaults
            for that objective when not given).
        workload_settings: the settings of a registered third-party workload (read by that workload only).
        method: a registered method (``cahp methods`` lists them): ``cahp`` or any head scorer (global top-K).
        method_settings: that method's settings (for example ``{"steps": 400}`` for ``l0``, ``{"metric":
            "bhattacharyya"}`` for ``cahp``); ``seed`` defaults to :attr:`seed`.
        budget: ``"auto"`` (the method finds its own head count, like CAHP's knee), ``"keep=K"``,
            ``"sparsity=S"`` (share of heads removed), ``"flops=F"`` or ``"latency=L"`` (the most heads whose plan
            costs at most that share of the unpruned model: :mod:`cahp.methods.cost`).
        allow_empty_layers: let a layer lose every head.
        uniform_layers: keep the same number of heads in every layer.
        gqa_mode: grouped-query attention: ``groups`` (whole key-value groups) or ``uniform`` (the same number of
            query heads in every group); the budget is made expressible before selection.
        reconstruct: the post-surgery reconstruction (:mod:`cahp.reconstruction`): ``weights`` (the default),
            ``scale``, ``bias`` or ``none`` (no step), fitted on the method's calibration.
        seed: the method's seed (and the calibration subset's; ``cahp prune --seed`` seeds the recovery too).
        calibration_size: ``classification``: examples of the calibration split (``task.calibration_split``: the
            training split; offline MNLI: its held-out share), a seeded class-stratified subset; ``None`` = all.
        calibration_batch_size: examples per batch for methods that do not set their own (``causal-lm``: ``lm``'s).
        recovery: the recovery fine-tune; ``epochs=0`` gives the retraining-free result. Not given: the
            workload's recipe (``classification``: 3 epochs at lr 2e-5 on length-grouped batches; ``causal-lm``:
            none).
        recovery_objective: what the recovery optimises: ``ce`` (the task's own loss), or distillation from the
            unpruned model (``kd``, ``kd-relations``; :mod:`cahp.train.distill`). Default ``kd``: level with
            ``kd-relations`` and ahead of ``ce`` in ``benchmarks/results/recovery.md``.
        recovery_lora_rank: ``None``: the recovery trains every weight; ``R``: rank-``R`` LoRA adapters on every
            linear projection, merged into the weights before anything is measured or saved (``pip install
            'cahp[lora]'``; the saved model does not need peft).
        recovery_max_examples: ``classification``: recover on a stratified subset of the training split.
        eval_splits: ``classification``: splits evaluated before pruning, after pruning and after recovery.
        eval_max_examples: evaluate on a seeded, stratified subset of each split (``None`` = the whole split).
        latency_batch_size, latency_seq_len: the dense vs pruned latency measurement of ``classification``.
        latency_repeats: timed repeats of every speed measurement.
        save_dtype: the dtype the pruned model is saved in (``cahp prune --dtype``): ``auto`` (the dtype the model
            came in; float32 for a quantized GGUF source), ``float32``, ``float16`` or ``bfloat16``; the run itself
            is not cast (:func:`cahp.surgery.autoload.resolve_save_dtype`).
    """

    model: str = PRUNE.field("model")
    objective: str = PRUNE.field("objective")
    task: TaskOptions = field(default_factory=TaskOptions)
    lm: LMOptions | None = None
    workload_settings: dict[str, Any] = field(default_factory=dict)
    method: str = PRUNE.field("method")
    method_settings: dict[str, Any] = field(default_factory=dict)
    budget: str = PRUNE.field("budget")
    allow_empty_layers: bool = PRUNE.field("allow_empty_layers")
    uniform_layers: bool = PRUNE.field("uniform_layers")
    gqa_mode: str = PRUNE.field("gqa_mode")
    reconstruct: str = PRUNE.field("reconstruct")
    seed: int = PRUNE.field("seed")
    calibration_size: int | None = PRUNE.field("calibration_size")
    calibration_batch_size: int = PRUNE.field("calibration_batch_size")
    recovery: TrainingConfig | None = None
    recovery_objective: RecoveryObjective = field(default_factory=lambda: RecoveryObjective(**PRUNE_RECOVERY_OBJECTIVE))
    recovery_lora_rank: int | None = PRUNE.field("recovery_lora_rank")
    recovery_max_examples: int | None = PRUNE.field("recovery_max_examples")
    eval_splits: tuple[str, ...] = PRUNE.field("eval_splits")
    eval_max_examples: int | None = PRUNE.field("eval_max_examples")
    latency_batch_size: int = PRUNE.field("latency_batch_size")
    latency_seq_len: int = PRUNE.field("latency_seq_len")
    latency_repeats: int = PRUNE.field("latency_repeats")
    save_dtype: str = PRUNE.field("save_dtype")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __post_init__(self) -> None:
        if isinstance(self.objective, str) and self.objective in available_workloads():
            if self.recovery is None:
                recipe = get_workload(self.objective).default_recovery
                self.recovery = copy.deepcopy(recipe) if recipe is not None else TrainingConfig(epochs=0.0)
            if self.lm is None and self.objective == "causal-lm":
                self.lm = LMOptions()
        self.validate()

    @property
    def sample_seed(self) -> int:
        """The seed of the data samples a workload draws (a bench grid's is its ``calibration_seed``)."""
        return self.seed

    @property
    def training(self) -> TrainingConfig:
        """The recovery's settings (resolved on construction)."""
        assert self.recovery is not None
        return self.recovery

    def validate(self) -> PruneConfig:
        """Check every setting's type and range (not the method's own settings: :func:`check_config` builds the
        method for that); returns self.

        Raises:
            CahpError: the first bad setting, named.
        """
        if not isinstance(self.model, str) or not self.model:
            raise CahpError(f"model must name a model (an alias, a folder or a hub id), got {self.model!r}")
        if not isinstance(self.objective, str) or self.objective not in available_workloads():
            raise CahpError(f"objective must be one of {available_workloads()}, got {self.objective!r}")
        if not isinstance(self.task, TaskOptions):
            raise CahpError(f"task must be the task options (an object with at least 'task'), got {self.task!r}")
        self.task.validate()
        if self.lm is not None:
            if not isinstance(self.lm, LMOptions):
                raise CahpError(f"lm must be the causal-lm text settings (an object), got {self.lm!r}")
            self.lm.validate()
        if not isinstance(self.workload_settings, dict):
            raise CahpError(f"workload_settings must be an object {{setting: value}}, got {self.workload_settings!r}")
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
        if self.gqa_mode not in ("groups", "uniform"):
            raise CahpError(f"gqa_mode must be 'groups' or 'uniform', got {self.gqa_mode!r}")
        if self.reconstruct not in PRUNE["reconstruct"].choices:  # type: ignore[operator]
            raise CahpError(f"reconstruct must be one of none, bias, scale, weights, got {self.reconstruct!r}")
        if self.save_dtype not in PRUNE["save_dtype"].choices:  # type: ignore[operator]
            raise CahpError(f"save_dtype must be one of auto, float32, float16, bfloat16, got {self.save_dtype!r}")
        if not isinstance(self.budget, str):
            raise CahpError(f"budget must be auto, keep=K, sparsity=S, flops=F or latency=L, got {self.budget!r}")
        check_counts(
            self,
            ("calibration_size", "recovery_max_examples", "eval_max_examples", "recovery_lora_rank"),
            optional=True,
        )
        check_counts(
            self, ("calibration_batch_size", "latency_batch_size", "latency_seq_len", "latency_repeats"), optional=False
        )
        if self.recovery_lora_rank is not None and self.recovery.epochs == 0:
            raise CahpError(
                f"recovery_lora_rank {self.recovery_lora_rank} trains LoRA adapters in the recovery, which has 0 "
                "epochs: give --recovery-epochs above 0, or drop --recovery-lora-rank"
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


def check_config(config: PruneConfig) -> tuple[Budget, Constraints]:
    """Refuse a bad setting before anything is loaded or written: every field (:meth:`PruneConfig.validate`), the
    method, its settings, the budget, the constraints, and what the workload cannot run (a method that compares
    classes on an objective without them; LoRA without peft). Returns the parsed budget and constraints."""
    config.validate()
    budget, constraints = config.parsed_budget(), config.constraints()
    workload = get_workload(config.objective)
    info = method_info(config.method)
    if info.needs_classes and not workload.has_classes:
        alternatives = [name for name in available_methods() if not method_info(name).needs_classes]
        raise CahpError(
            f"method {config.method!r} compares classes, and the {config.objective} objective has none; choose one "
            f"of {', '.join(alternatives)}, or fine-tune a classifier head and prune it with `cahp prune` (the "
            "classification objective)"
        )
    if budget.is_auto and not info.finds_own_budget:
        raise CahpError(
            f"method {config.method!r} has no automatic head count: give a budget with --keep, --sparsity, --flops or "
            "--latency (`cahp methods` says which methods find their own)"
        )
    settings = config.settings()
    if info.budget_aware and not budget.is_auto:
        settings["keep"] = 1  # the real count needs the model; here only the names and values are checked
    get_method(config.method, **settings)
    if config.recovery_lora_rank is not None:
        from cahp.train.lora import require_peft

        require_peft()
    workload.check_config(config)
    return budget, constraints


def check_fits_model(config: PruneConfig, budget: Budget, grid: HeadGrid) -> None:
    """Refuse what the loaded model cannot do, before any work: ``keep=K`` above its head count, or relation
    layers it does not have."""
    if not budget.is_auto and not budget.is_cost:
        budget.heads(grid.total)
    if config.recovery_objective.loss == "kd-relations" and config.training.epochs > 0:
        config.recovery_objective.layers(grid.layers)


def run_settings(config: PruneConfig, measure: bool = True) -> RunSettings:
    """How :func:`cahp.run.execute` prunes and recovers for ``config``."""
    return RunSettings(
        gqa_mode=config.gqa_mode,
        recovery=config.training,
        recovery_lora_rank=config.recovery_lora_rank,
        measure=measure,
        post_surgery=post_surgery_steps(config.reconstruct, config.sample_seed),
    )


def prune(
    config: PruneConfig,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
    replayed: dict[str, Any] | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Prune ``config.model`` with ``config.method`` on ``config.objective``, recover, and write the pruned model,
    ``report.json``, plots and (for the workloads that have them) the model card and HTML report.

    Every setting is checked before any work, and nothing is written on a refusal.

    Args:
        replayed: the ``inputs`` record of the run this one replays (``cahp prune --config``): a model whose weights
            differ from the ones recorded there is said in one line (``strict``: refused).

    Returns:
        The report (also written to ``out/report.json``).
    """
    progress = progress and distributed.is_main()
    # several processes: the same settings everywhere, and an early failure on one is every process's error
    distributed.check_same_settings(json.loads(json.dumps(config.to_dict(), default=str)))

    def setup() -> tuple[Budget, Constraints, Any, Calibration]:
        budget, constraints = check_config(config)
        check_output_target(out, overwrite)
        set_seed(config.seed)
        workload = get_workload(config.objective)(config, progress)
        check_fits_model(config, budget, HeadGrid.of(workload.model))
        workload.check_model(config)
        check_reconstruction(workload.model, config.reconstruct)
        place(workload.model)
        return budget, constraints, workload, workload.calibration(config.sample_seed)

    budget, constraints, workload, calibration = distributed.together(setup)
    model = workload.model
    grid = HeadGrid.of(model)
    engine = Engine(model, calibration, say=print_line if progress else None)
    settings = run_settings(config)
    if replayed is not None:  # rank 0 says it (or refuses, and every process stops with it)
        fingerprint = engine.fingerprints["model"]
        distributed.together(
            lambda: check_replayed_model(replayed, fingerprint, strict) if distributed.is_main() else None
        )

    def plan_stage(stages: StageCache) -> KeepPlan:
        return KeepPlan.from_dict(
            stages.shared("plan", lambda: engine.plan(config.method, config.settings(), budget, constraints).to_dict())
        )

    if not distributed.is_main():  # the stages every process computes together, writing nothing
        stages = StageCache(None, progress=False)
        execute(workload, plan_stage(stages), settings, stages)
        return distributed.broadcast_object(None)
    inputs = {
        "model_path": _resolved_location(config.model),
        **engine.fingerprints,
        "data": workload.data_fingerprints(),
    }
    record = {"command": "prune", **config.to_dict(), "inputs": inputs}
    with StagedOutput(out, record, overwrite, command=command) as staged:  # locked; released on exit
        folder = staged.path / "stages"
        folder.mkdir(exist_ok=True)
        stages = StageCache(folder, progress)
        engine.cache_dir = folder / "methods"
        if staged.resumed:
            stages.say(f"resuming the unfinished run in {staged.path}")
        heads = (
            f"{grid.heads} heads" if grid.kv_heads == grid.heads else f"{grid.heads} query / {grid.kv_heads} KV heads"
        )
        stages.say(f"{config.model}: {grid.layers} layers x {heads}; planning {config.method} at {budget.label()}")
        plan = plan_stage(stages)
        outcome = execute(workload, plan, settings, stages)
        outcome.calibration, outcome.fingerprints = calibration, engine.fingerprints
        export = workload.save(outcome.model, staged.path / "model")
        report = build_report(config, workload, outcome, stages, inputs, command)
        report["export"] = export
        _write_views(report, staged.path, workload)
        write_json(staged.path / "report.json", report)
        for leftover in ("recovery_checkpoint.pt", "recovery_merged.pt"):
            (folder / leftover).unlink(missing_ok=True)
        staged.commit()
    return distributed.broadcast_object(report)  # the other processes wait for the main one to write


def _resolved_location(model: str) -> str:
    """Where the model was read from: a local folder as an absolute path (a replay from another working folder
    finds it), else the alias's location or the hub id."""
    location = resolve_model(model).location
    return str(Path(location).resolve()) if Path(location).exists() else str(location)


def check_replayed_model(replayed: dict[str, Any], fingerprint: str, strict: bool) -> None:
    """Say (``strict``: refuse) when the model of a replayed run has other weights than the run recorded.

    Raises:
        CahpError: ``strict`` and the fingerprints differ.
    """
    recorded = replayed.get("model")
    if recorded is None or recorded == fingerprint:
        return
    message = (
        f"the model {replayed.get('model_path', '')} has other weights than the replayed run recorded (fingerprint "
        f"{fingerprint}, recorded {recorded}): it was changed, or another model has the same name"
    )
    if strict:
        raise CahpError(f"{message}; drop --strict to prune it anyway, or point --model at the recorded one")
    notice(f"{message}; pruning it anyway (--strict refuses)")


def build_report(
    config: PruneConfig,
    workload: Any,
    outcome: RunOutcome,
    stages: StageCache,
    inputs: dict[str, Any],
    command: str | None,
) -> dict[str, Any]:
    """``report.json``: what every run records, then the workload's own sections (:meth:`Workload.report`)."""
    grid, plan = outcome.grid, outcome.plan
    calibration = outcome.calibration
    report: dict[str, Any] = {
        "model": config.model,
        "method": config.method,
        "objective": config.objective,
        "calibration": {
            **(calibration.description if calibration is not None else {}),
            "fingerprint": outcome.fingerprints.get("calibration"),
        },
        "heads": {
            "layers": grid.layers,
            "heads_per_layer": grid.heads,
            "kv_heads_per_layer": grid.kv_heads,
            "total": grid.total,
            "requested": plan.heads_requested,
            "kept": outcome.kept,
            "budget": plan.budget.label(),
            "flops_share": plan.details.get("budget_cost", {}).get("flops_share"),
            "kv_total": grid.layers * grid.kv_heads,
            "kv_kept": outcome.kv_kept,
            "gqa_mode": config.gqa_mode,
            "uniform_layers": config.uniform_layers,
        },
        "kept_heads_by_layer": {str(layer): heads for layer, heads in sorted(outcome.kept_heads_by_layer.items())},
        "plan": plan.to_dict(),
        "selection": _selection_view(plan),
        "parameters": outcome.parameters,
    }
    report.update(workload.report(outcome))
    report.setdefault("recovery", outcome.recovery_run)
    for key, value in outcome.measurement.items():
        report.setdefault(key, value)
    if outcome.post_surgery:
        report["post_surgery"] = outcome.post_surgery
    report.update(
        {
            "stage_seconds": {**stages.seconds, **outcome.seconds},
            "stages_cached": stages.cached,
            "config": config.to_dict(),
            "inputs": inputs,
            "command": command,
        }
    )
    return report


def _write_views(report: dict[str, Any], folder: Path, workload: Any) -> None:
    """The plots, and the model card and HTML page of the workloads they describe (the built-in ones)."""
    plots = folder / "plots"
    plots.mkdir(exist_ok=True)
    plot_mss_curve(report["selection"], plots / "mss_curve.png")
    title = f"{Path(report['model']).name} ({report.get('task', {}).get('task', report['objective'])})"
    plot_kept_heads(report["kept_heads_by_layer"], report["heads"]["heads_per_layer"], plots / "kept_heads.png", title)
    plot_head_space(report["selection"], report["heads"]["heads_per_layer"], plots / "head_space.png")
    if "accuracy" in report or report["objective"] == "causal-lm":
        write_model_card(report, folder / "model", report["command"])
        write_prune_html(report, folder / "report.html", plots)


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
    """A few lines for the terminal, by the report's workload (heads kept, quality before / after, speed)."""
    return get_workload(report.get("objective", "classification")).summary(report)
