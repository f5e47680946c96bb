"""``cahp bench``: every method, every budget, several seeds, one harness.

For each ``(method, seed)`` the heads are scored ONCE (CAHP: signatures and salience once for all seeds, then
t-SNE + the MSS(k) sweep once per seed, each budget being a cluster count) and the scores are cached in
``OUT/scores/``. For each budget a copy of the fine-tuned model is pruned, evaluated, recovered with the same
recipe for every method, and evaluated again; each such cell is one JSON file in ``OUT/cells/``, written
atomically, so a killed run resumes where it stopped (finished cells are skipped). ``OUT/summary.md`` and the
plots in ``OUT/plots/`` are then rebuilt from the files (:mod:`cahp.reporting.bench_report`). Cells run
seed-major (every method and budget of the first seed, then the next seed), so a grid stopped early still
compares every method; methods, budgets and seeds may be added to a config later and only new cells run.

Fairness rules: every method runs through the same engine (:class:`cahp.engine.Engine`): it is fitted on the
same calibration examples (per seed: ``calibration_size`` examples drawn with ``calibration_seed + seed`` when
``resample_calibration``, else one sample drawn with ``calibration_seed`` for every seed), selects with the same
rule and constraints (:mod:`cahp.methods.select`), and is recovered with the same recipe and recovery seed. With
``resample_calibration`` every method runs every seed, so a method's spread over seeds includes the spread of
the data it learns from, and "the best baseline" is a mean over seeds like the focus method's. Without it (the
committed grids), methods whose registry entry says ``deterministic`` run only the first ``deterministic_seeds``
seeds, unless each seed recovers with its own seed (below). Budget ``"knee"`` is the auto budget: a method that
finds its own head count uses it; the others are compared at the head count of the first such method in the same
seed (or its first seed).

What a grid seed ``s`` varies: the calibration sample (with ``resample_calibration``), the method's own randomness
(its ``seed`` setting is ``s``) and, with ``recovery_seeding: "per_seed"`` (the default of a config built in code),
the recovery's training seed (``recovery.seed + s``: the order of its batches, dropout; every method of seed ``s``
recovers with the same one). With ``"fixed"`` (a JSON config or record without the key: every committed grid)
every cell recovers with ``recovery.seed``, so a spread over seeds leaves training noise out. Each cell records
the ``recovery_seed`` it used. The subset of training examples a recovery uses (``recovery_max_examples``) is
drawn once per grid with ``recovery.seed``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cahp import distributed
from cahp.config import check_counts, config_from_dict, read_config_file
from cahp.engine import Engine
from cahp.errors import CahpError
from cahp.legacy import upgrade_bench_record
from cahp.methods.base import PruningMethod, available_methods, get_method, method_info
from cahp.methods.plan import Budget, Constraints, HeadGrid, KeepPlan
from cahp.models import cahp_home
from cahp.outputs import write_json
from cahp.reconstruction import MODES as RECONSTRUCT_MODES
from cahp.reconstruction import check_reconstruction, post_surgery_steps
from cahp.reporting.bench_report import (
    Metric,
    budget_label,
    grid_metric,
    method_seeds,
    planned_cells,
    write_bench_report,
)
from cahp.run import RunOutcome, RunSettings, execute
from cahp.runtime import place
from cahp.settings import PRUNE
from cahp.stages import StageCache
from cahp.train.distill import RecoveryObjective
from cahp.train.finetune import TaskOptions
from cahp.train.loop import SEEDS, TrainingConfig, is_seed, set_seed
from cahp.workloads import get_workload
from cahp.workloads.causal_lm import LMOptions

Budget_ = float | str
KNEE = "knee"
#: What a grid's cells are measured on: a fine-tuned classifier's accuracy, or a causal LM's perplexity.
OBJECTIVES = ("classification", "causal-lm")
#: How each cell's recovery is seeded: ``fixed``: ``recovery.seed`` for every cell (the committed grids);
#: ``per_seed``: ``recovery.seed + s`` in grid seed ``s``.
RECOVERY_SEEDINGS = ("fixed", "per_seed")

#: Settings that change results: a folder whose cells were computed with other values is refused.
RESULT_KEYS = (
    "model",
    "objective",
    "lm",
    "task",
    "calibration_size",
    "calibration_seed",
    "resample_calibration",
    "method_settings",
    "recovery",
    "recovery_seeding",
    "recovery_objective",
    "recovery_lora_rank",
    "recovery_max_examples",
    "eval_splits",
    "eval_max_examples",
    "allow_empty_layers",
    "uniform_layers",
    "gqa_mode",
    "reconstruct",
)


@dataclass
class BenchConfig:
    """One benchmark grid (read from JSON by :meth:`from_file`).

    Attributes:
        model: a fine-tuned classifier folder (``$VARS`` and ``~`` are expanded; ``$CAHP_HOME`` defaults to
            ``~/.cache/cahp``).
        out: output folder (cells, fitted methods, summary, plots).
        task: the task options (``cahp finetune``'s); a string is the task name.
        methods: registered methods (``cahp methods``).
        budgets: fractions of heads KEPT in ``(0, 1]``, ``"knee"`` (the auto budget: see the module docs) and/or
            cost budgets ``"flops=F"`` / ``"latency=L"`` (the most heads whose plan costs at most that share of the
            dense model: :mod:`cahp.methods.cost`).
        seeds: the seeds of every method.
        deterministic_seeds: without ``resample_calibration``: how many of ``seeds`` a deterministic method runs.
        calibration_size, calibration_seed: the calibration examples (stratified subset of the calibration split;
            ``None`` = all of it).
        resample_calibration: draw each seed's own calibration sample (seed ``s``: ``calibration_seed + s``).
        method_settings: ``{method: {setting: value}}`` (not ``seed`` and not ``keep``: the bench sets them).
        focus: the method the summary compares with the best other one (default: the first of ``methods``).
        recovery: the recovery fine-tune of every cell (``epochs: 0`` = retraining-free only).
        recovery_seeding: ``per_seed`` (the default here): the cells of grid seed ``s`` recover with training seed
            ``recovery.seed + s``, so the spread over seeds includes training noise; ``fixed``: every cell recovers
            with ``recovery.seed`` (what a JSON config or record without the key reads as: every committed grid,
            :func:`cahp.legacy.upgrade_bench_record`).
        recovery_objective: what every cell's recovery optimises (``ce``, or distillation from the unpruned model:
            :mod:`cahp.train.distill`; default ``ce``, the committed grids' recipe).
        recovery_lora_rank: ``None``: every cell's recovery trains every weight; ``R``: rank-``R`` LoRA adapters,
            merged before the cell is evaluated.
        recovery_max_examples: recover on a stratified subset of the training split.
        fitted_dir: where fitted methods are cached (default ``OUT/fitted``); grids that differ only in their
            recovery can share one (fits are keyed by method, settings, model and calibration data).
        eval_splits: splits evaluated after pruning and after recovery.
        eval_max_examples: evaluate on a stratified subset of each split (``None`` = all).
        allow_empty_layers, uniform_layers, gqa_mode: the constraints of every plan (see ``cahp prune``).
        reconstruct: every cell's post-surgery reconstruction (``cahp prune --reconstruct``), fitted on the cell's
            calibration: ``weights`` (``cahp prune``'s default), ``scale``, ``bias`` or ``none``. A JSON config or
            record without the key reads as ``none``: every grid from before the step existed.
        objective: ``classification`` (the default: ``model`` is a fine-tuned classifier, cells report accuracy) or
            ``causal-lm`` (``model`` is a causal LM: every method is fitted on the language-modelling loss of
            ``lm``'s calibration blocks, cells report perplexity on its evaluation blocks and the zero-shot accuracy
            of its prompted tasks, and the recovery trains on the LM loss of the calibration blocks). A
            ``causal-lm`` grid reads its text from ``lm`` and ignores ``task``, ``calibration_size``,
            ``resample_calibration`` (every seed sees the same blocks, so a method without randomness of its own
            runs its first ``deterministic_seeds`` seeds only), ``recovery_max_examples``,
            ``eval_splits`` and ``eval_max_examples``; it refuses methods that compare classes (CAHP), the
            ``knee`` budget and distillation.
        lm: the text and measurements of a ``causal-lm`` grid (:class:`cahp.workloads.causal_lm.LMOptions`;
            default: its defaults, MNLI premises offline).
        calibration_batch_size: examples per calibration batch of a classification grid (methods that do not set
            their own).
    """

    model: str
    out: str
    task: TaskOptions = field(default_factory=TaskOptions)
    methods: list[str] = field(default_factory=lambda: ["cahp", "random", "gradient"])
    budgets: list[Budget_] = field(default_factory=lambda: [0.9, 0.75, 0.5, 0.3, 0.2, 0.1, KNEE])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    deterministic_seeds: int = 1
    calibration_size: int | None = 512
    calibration_seed: int = 0
    resample_calibration: bool = True
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    focus: str | None = None
    recovery: TrainingConfig = field(default_factory=lambda: TrainingConfig(epochs=1.0, learning_rate=2e-5))
    recovery_seeding: str = "per_seed"
    recovery_objective: RecoveryObjective = field(default_factory=RecoveryObjective)
    recovery_lora_rank: int | None = None
    recovery_max_examples: int | None = 2000
    fitted_dir: str | None = None
    eval_splits: list[str] = field(default_factory=lambda: ["validation", "test"])
    eval_max_examples: int | None = None
    allow_empty_layers: bool = False
    uniform_layers: bool = False
    gqa_mode: str = "groups"
    reconstruct: str = field(default_factory=lambda: str(PRUNE["reconstruct"].default))
    objective: str = "classification"
    lm: LMOptions | None = None
    calibration_batch_size: int = 32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def workload_settings(self) -> dict[str, Any]:
        """A third-party workload's settings (none: a grid runs the built-in workloads)."""
        return {}

    @property
    def sample_seed(self) -> int:
        """The seed of the samples the workload draws once per grid (the prompted tasks' subsets)."""
        return self.calibration_seed

    @property
    def is_lm(self) -> bool:
        return self.objective == "causal-lm"

    def constraints(self) -> Constraints:
        return Constraints.from_options(self.allow_empty_layers, self.uniform_layers, self.gqa_mode)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BenchConfig:
        """A config from JSON (this version's keys, or an earlier record's: see :func:`upgrade_bench_record`)."""
        values = upgrade_bench_record(raw)
        if isinstance(values.get("task"), str):
            values["task"] = {"task": values["task"]}
        config = config_from_dict(cls, values, "bench config")
        config.model = expand_path(config.model)
        config.out = expand_path(config.out)
        if config.fitted_dir is not None:
            config.fitted_dir = expand_path(config.fitted_dir)
        if config.task.data_dir is not None:
            config.task.data_dir = expand_path(config.task.data_dir)
        if config.task.task.startswith(("~", "$")):
            config.task.task = expand_path(config.task.task)
        if config.lm is not None:
            for name in ("data_dir", "corpus"):
                value = getattr(config.lm, name)
                if value is not None and value.startswith(("~", "$")):
                    setattr(config.lm, name, expand_path(value))
        return config

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BenchConfig:
        """Read a JSON config; see the attributes for the keys."""
        return cls.from_dict(read_config_file(expand_path(str(path))))


def expand_path(value: str) -> str:
    """Expand ``~`` and ``$VAR`` / ``${VAR}`` (``$CAHP_HOME`` defaults to ``~/.cache/cahp``).

    Raises:
        CahpError: a variable that is not set.
    """
    defaults = {"CAHP_HOME": str(cahp_home())}

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in os.environ:
            return os.environ[name]
        if name in defaults:
            return defaults[name]
        raise CahpError(f"environment variable ${name} in {value!r} is not set")

    return os.path.expanduser(re.sub(r"\$\{(\w+)\}|\$(\w+)", substitute, value))


def _validate(config: BenchConfig) -> None:
    """Refuse a grid that cannot run, before anything is loaded, with messages that name the key."""
    if config.objective not in OBJECTIVES:
        raise CahpError(f'bench config: "objective" must be one of {", ".join(OBJECTIVES)}, got {config.objective!r}')
    if not config.is_lm and config.lm is not None:
        raise CahpError(
            'bench config: "lm" sets the text of a "causal-lm" grid; give "objective": "causal-lm" or drop "lm"'
        )
    if config.reconstruct not in RECONSTRUCT_MODES:
        raise CahpError(
            f'bench config: "reconstruct" must be one of {", ".join(RECONSTRUCT_MODES)}, got {config.reconstruct!r}'
        )
    if not isinstance(config.methods, list) or not config.methods:
        raise CahpError('bench config: "methods" must list at least one method (`cahp methods` lists them)')
    registered = available_methods()
    unknown = [m for m in config.methods if m not in registered]
    if unknown:
        raise CahpError(f'bench config: unknown method(s) {unknown} in "methods"; available: {", ".join(registered)}')
    if not isinstance(config.budgets, list) or not config.budgets:
        raise CahpError('bench config: "budgets" must list fractions of heads kept in (0, 1], "knee" or "flops=F"')
    for budget in config.budgets:
        if budget == KNEE:
            if not any(registered[m].finds_own_budget for m in config.methods):
                own = [n for n, info in registered.items() if info.finds_own_budget]
                raise CahpError(
                    f'bench config: budget "knee" needs a method that finds its own head count ({", ".join(own)})'
                )
        elif isinstance(budget, str):
            if not Budget.parse(budget).is_cost:
                raise CahpError(f'bench config: a text budget is "knee", "flops=F" or "latency=L", got {budget!r}')
        elif isinstance(budget, bool) or not isinstance(budget, int | float) or not 0.0 < float(budget) <= 1.0:
            raise CahpError(
                f'bench config: "budgets" holds fractions of heads kept in (0, 1], "knee" or "flops=F", got {budget!r}'
            )
    if not isinstance(config.seeds, list) or not config.seeds or not all(isinstance(s, int) for s in config.seeds):
        raise CahpError('bench config: "seeds" must list at least one whole number')
    check_counts(
        config,
        ("calibration_size", "recovery_max_examples", "eval_max_examples"),
        optional=True,
        where="bench config: ",
    )
    for name in ("resample_calibration", "allow_empty_layers", "uniform_layers"):
        if not isinstance(getattr(config, name), bool):
            raise CahpError(f'bench config: "{name}" must be true or false, got {getattr(config, name)!r}')
    if not is_seed(config.calibration_seed):
        raise CahpError(f'bench config: "calibration_seed" must be a whole number in 0..{SEEDS - 1}')
    if not all(is_seed(seed) for seed in config.seeds):
        raise CahpError(f'bench config: "seeds" must be whole numbers in 0..{SEEDS - 1}, got {config.seeds}')
    check_counts(config, ("deterministic_seeds",), optional=False, where="bench config: ")
    _validate_recovery_seeding(config)
    if config.focus is not None and config.focus not in config.methods:
        raise CahpError(f'bench config: "focus" {config.focus!r} is not one of "methods" {config.methods}')
    if not isinstance(config.method_settings, dict):
        raise CahpError('bench config: "method_settings" must be an object {method: {setting: value}}')
    for method, settings in config.method_settings.items():
        if method not in config.methods:
            raise CahpError(f'bench config: "method_settings" names {method!r}, which is not in "methods"')
        if not isinstance(settings, dict):
            raise CahpError(f'bench config: "method_settings"."{method}" must be an object of settings')
        forbidden = {"seed", "keep"} & set(settings)
        if forbidden:
            raise CahpError(f'bench config: "method_settings"."{method}" sets {sorted(forbidden)}: the bench sets them')
        get_method(method, **settings, **({"keep": 1} if registered[method].budget_aware else {}))
    config.constraints()
    if config.is_lm:
        _validate_lm(config)
    get_workload(config.objective).check_config(config)


def _validate_recovery_seeding(config: BenchConfig) -> None:
    """``recovery_seeding`` is one of :data:`RECOVERY_SEEDINGS`, and every cell's recovery seed is a seed."""
    if config.recovery_seeding not in RECOVERY_SEEDINGS:
        raise CahpError(
            f'bench config: "recovery_seeding" must be one of {", ".join(RECOVERY_SEEDINGS)}, '
            f"got {config.recovery_seeding!r}"
        )
    if config.recovery_seeding == "per_seed" and not is_seed(config.recovery.seed + max(config.seeds)):
        raise CahpError(
            f'bench config: with "recovery_seeding": "per_seed" the recovery of seed s trains with seed '
            f"recovery.seed + s, which must stay below {SEEDS}; got {config.recovery.seed} + {max(config.seeds)}"
        )


def recovery_seed(config: BenchConfig, seed: int) -> int:
    """The training seed of the recovery of grid seed ``seed``'s cells (see ``recovery_seeding``)."""
    return config.recovery.seed + (seed if config.recovery_seeding == "per_seed" else 0)


def _validate_lm(config: BenchConfig) -> None:
    """What a ``causal-lm`` grid cannot run: methods that compare classes, the knee."""
    classes = [m for m in config.methods if method_info(m).needs_classes]
    if classes:
        others = [m for m in available_methods() if not method_info(m).needs_classes]
        raise CahpError(
            f"bench config: {classes} compare classes, and the causal-lm objective has none; choose among "
            f"{', '.join(others)}, or bench a fine-tuned classifier head"
        )
    if KNEE in config.budgets:
        raise CahpError('bench config: budget "knee" needs classes; a "causal-lm" grid takes fractions of heads kept')
    if config.lm is None:
        config.lm = LMOptions()


def _check_folder(out: Path, config: BenchConfig) -> dict[str, Any]:
    """Refuse a folder holding results of other settings; record this config and return the record."""
    record = out / "bench_config.json"
    current = json.loads(json.dumps(config.to_dict(), default=str))
    if record.is_file():
        # through BenchConfig, so that a record written before a setting existed gets its default (which keeps
        # the old behaviour) instead of counting as a change
        earlier = json.loads(json.dumps(BenchConfig.from_dict(json.loads(record.read_text())).to_dict(), default=str))
        changed = [key for key in RESULT_KEYS if earlier.get(key) != current.get(key)]
        if changed:
            raise CahpError(
                f"{out} holds results computed with other settings (different {', '.join(changed)}): "
                "use another out folder, or delete it to start over"
            )
    write_json(record, current)
    return current


def _kept_fraction_heads(fraction: float, total: int) -> int:
    """Heads kept for a kept fraction: ``round(fraction * total)`` half up, at least 1 (the bench's rule since v1)."""
    return max(1, min(total, math.floor((1.0 - (1.0 - float(fraction))) * total + 0.5)))


class _Bench:
    """The state of one run: the workload (model, its calibration and evaluation data) and per-seed engines."""

    def __init__(self, config: BenchConfig, record: dict[str, Any], progress: bool):
        self.config = config
        self.record = record
        self.progress = progress
        self.out = Path(config.out)
        set_seed(config.calibration_seed)
        self.work = get_workload(config.objective)(config, progress)
        self.metric = grid_metric(record)  # what the cells record, under which key
        self.model, self.tokenizer = self.work.model, self.work.tokenizer
        check_reconstruction(self.model, config.reconstruct)
        place(self.model)
        self.grid = HeadGrid.of(self.model)
        self.n_heads = self.grid.total
        self.constraints = config.constraints()
        self.settings_ = RunSettings(
            gqa_mode=config.gqa_mode,
            recovery=config.recovery,
            recovery_lora_rank=config.recovery_lora_rank,
            measure=False,
            report_extras=False,
            validate_recovery=False,
        )
        self._engines: dict[int, Engine] = {}

    def say(self, message: str) -> None:
        if self.progress:
            print(message, flush=True)

    def evaluate_dense(self) -> dict[str, Any]:
        """The unpruned model's results, keyed as the cells' (:meth:`_results`)."""
        return self._results(self.work.evaluate(self.model, extras=False))

    def _results(self, quality: dict[str, Any]) -> dict[str, Any]:
        """A workload's evaluation as the cells record it: a causal LM's prompted tasks as ``<task>-zero-shot``
        beside its perplexity (continuations are not recorded); a classifier's splits as they are."""
        if "perplexity" not in quality:
            return quality
        return {
            "perplexity": quality["perplexity"],
            **{f"{name}-zero-shot": result for name, result in quality.get("prompted", {}).items()},
        }

    def engine(self, seed: int) -> Engine:
        """The engine of ``seed``: its calibration sample (shared by every seed without resampling)."""
        sample_seed = self.config.calibration_seed + (seed if self.config.resample_calibration else 0)
        if sample_seed not in self._engines:
            fitted = Path(self.config.fitted_dir) if self.config.fitted_dir else self.out / "fitted"
            self._engines[sample_seed] = Engine(self.model, self.work.calibration(sample_seed), fitted, say=self.say)
        return self._engines[sample_seed]

    def settings(self, method: str, seed: int) -> dict[str, Any]:
        return {**self.config.method_settings.get(method, {}), "seed": seed}

    # ---- plans -------------------------------------------------------------------------------------------

    def auto_heads(self, seed: int) -> int:
        """The head count of the first method that finds its own, in ``seed`` (or in that method's first seed)."""
        method = next(m for m in self.config.methods if method_info(m).finds_own_budget)
        own_seeds = method_seeds(method, self.record)
        plan = self.plan(method, seed if seed in own_seeds else own_seeds[0], KNEE)[0]
        return plan.heads_requested

    def budget_for(self, method: str, seed: int, budget: Budget_) -> Budget:
        if isinstance(budget, str) and budget != KNEE:
            return Budget.parse(budget)
        if budget != KNEE:
            return Budget.keep(_kept_fraction_heads(float(budget), self.n_heads))
        return Budget.auto() if method_info(method).finds_own_budget else Budget.keep(self.auto_heads(seed))

    def plan(self, method: str, seed: int, budget: Budget_) -> tuple[KeepPlan, PruningMethod, bool]:
        """The keep-plan of one cell, the fitted method, and whether the fit came from the cache."""
        engine = self.engine(seed)
        asked = self.budget_for(method, seed, budget)
        plan, method_object = engine.plan_and_method(method, self.settings(method, seed), asked, self.constraints)
        return plan, method_object, engine.last_fit_cached

    def _kv_record(self, outcome: RunOutcome) -> dict[str, Any]:
        """Key-value heads kept and the KV cache's bytes per token of a pruned causal LM."""
        from cahp.evaluation.generation import kv_cache_bytes_per_token

        return {
            "kv_kept": outcome.kv_kept,
            "kv_total": self.grid.layers * self.grid.kv_heads,
            "kv_bytes_per_token": kv_cache_bytes_per_token(outcome.model)["bytes_per_token"],
        }

    # ---- cells -------------------------------------------------------------------------------------------

    def run_cell(self, method: str, seed: int, budget: Budget_, dense: dict[str, Any] | None) -> dict[str, Any]:
        """One cell: the method's plan at ``budget`` in ``seed``, then the run (:func:`cahp.run.execute`);
        ``dense`` is the unpruned model's evaluation (computed once per grid)."""
        start = time.perf_counter()
        plan, fitted, cached = self.plan(method, seed, budget)
        planned = time.perf_counter()
        sample_seed = self.config.calibration_seed + (seed if self.config.resample_calibration else 0)
        recovery = replace(self.config.recovery, seed=recovery_seed(self.config, seed))
        settings = replace(
            self.settings_,
            recovery=recovery,
            post_surgery=post_surgery_steps(self.config.reconstruct, sample_seed),
        )
        outcome = execute(self.work, plan, settings, StageCache(None, progress=False), before=dense)
        end = time.perf_counter()
        recovery_run = outcome.recovery_run
        after_pruning = self._results(outcome.quality["pruned"]) if outcome.quality["pruned"] is not None else None
        recovered = outcome.quality["recovered"]
        after_recovery = self._results(recovered) if recovered is not None else after_pruning
        teacher: dict[str, Any] = {
            key: recovery_run[key] for key in ("teacher_seconds", "teacher_forwards") if key in recovery_run
        }
        if "shared_setup" in recovery_run:  # the classifier teacher's logit pass, once per grid
            teacher["shared_setup"] = recovery_run["shared_setup"]
        record = plan.to_dict()
        details = record.pop("details")
        recovery_seconds = recovery_run.get("seconds", 0.0)
        return {
            "method": method,
            "seed": seed,
            "budget": budget_label(budget),
            "budget_fraction": None if isinstance(budget, str) else float(budget),
            "keep": plan.heads_requested,
            "heads_total": self.n_heads,
            "layers": self.grid.layers,
            "heads_per_layer": self.grid.heads,
            "kept": outcome.kept,
            "kept_heads_by_layer": {str(layer): hs for layer, hs in outcome.kept_heads_by_layer.items()},
            "selected_heads_by_layer": {str(layer): hs for layer, hs in plan.kept_heads_by_layer.items()},
            "guardrail_heads": [list(h) for h in plan.guardrail_heads],
            "budget_cost": details.get("budget_cost"),
            **(self._kv_record(outcome) if self.config.is_lm else {}),
            "plan": record,
            "calibration": self.engine(seed).calibration.description,
            "budget_aware": bool(fitted.budget_aware),
            "fit_cached": bool(cached),
            self.metric.results_key: {"after_pruning": after_pruning, "after_recovery": after_recovery},
            "recovery_history": recovery_run.get("history", []),
            "recovery_objective": self.config.recovery_objective.loss,
            "recovery_seed": recovery.seed if recovery.epochs > 0 else None,
            **({"lora": recovery_run["lora"]} if "lora" in recovery_run else {}),
            "teacher": teacher,
            **({"post_surgery": outcome.post_surgery} if outcome.post_surgery else {}),
            "seconds": {
                "scoring": float(getattr(fitted, "fit_seconds_", 0.0)),
                "selection": round(planned - start, 2),
                "prune_and_evaluate": round(end - planned - recovery_seconds, 2),
                "recovery_and_evaluate": round(recovery_seconds, 2),
            },
        }


def _headline(cell: dict[str, Any], metric: Metric) -> str:
    """``test accuracy 0.4512 pruned, 0.4730 recovered`` (a causal LM: its perplexity)."""
    stages = cell[metric.results_key]
    split = next(iter(stages["after_pruning"]))
    measure = metric.name
    pruned = stages["after_pruning"][split][measure]
    what = measure if split == measure else f"{split} {measure}"
    if not cell["recovery_history"]:
        return f"{what} {pruned:.4f} pruned (retraining-free)"
    return f"{what} {pruned:.4f} pruned, {stages['after_recovery'][split][measure]:.4f} recovered"


def run_bench(config: BenchConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the grid of ``config`` and write ``summary.md`` and the plots.

    Returns:
        ``{"cells": total cells, "computed": cells computed by this call, "summary": path of summary.md}``.
    """
    _validate(config)
    out = Path(config.out)
    main = distributed.is_main()  # several processes: all fit and recover together, the main one alone writes
    if main:
        (out / "cells").mkdir(parents=True, exist_ok=True)
    record = distributed.broadcast_object(_check_folder(out, config) if main else None)
    bench = _Bench(config, record, progress and main)
    dense = out / "dense.json"
    if main and not dense.is_file():
        bench.say(f"{config.model}: evaluating the dense model")
        dense_record = {
            bench.metric.results_key: bench.evaluate_dense(),
            "heads_total": bench.n_heads,
            "task": bench.work.describe(),
        }
        write_json(dense, dense_record)
    dense_quality = json.loads(dense.read_text())[bench.metric.results_key] if main else None
    planned = planned_cells(record)
    computed = 0
    for method, seed, budget in planned:
        label = budget_label(budget)
        path = out / "cells" / f"{method}__seed{seed}__{label}.json"
        if distributed.broadcast_object(path.is_file() if main else None):
            continue
        cell = bench.run_cell(method, seed, budget, dense_quality)
        if main:
            write_json(path, cell)
        computed += 1
        if main:  # the other processes did not evaluate
            heads = f"{cell['kept']}/{bench.n_heads} heads"
            bench.say(f"{method} seed {seed} budget {label}: {heads}, {_headline(cell, bench.metric)}")
    summary = write_bench_report(out) if main else out / "summary.md"
    distributed.barrier()
    return {"cells": len(planned), "computed": computed, "summary": str(summary)}
