"""``cahp bench``: every method, every budget, several seeds, one harness.

For each ``(method, seed)`` the heads are scored ONCE (CAHP: signatures and salience once for all seeds, then
t-SNE + the MSS(k) sweep once per seed, each budget being a cluster count) and the scores are cached in
``OUT/scores/``. For each budget a copy of the fine-tuned model is pruned, evaluated, recovered with the same
recipe for every method, and evaluated again; each such cell is one JSON file in ``OUT/cells/``, written
atomically, so a killed run resumes where it stopped (finished cells are skipped). ``OUT/summary.md`` and the
plots in ``OUT/plots/`` are then rebuilt from the files (:mod:`cahp.reporting.bench_report`). Cells run
seed-major (every method and budget of the first seed, then the next seed), so a grid stopped early still
compares every method; methods, budgets and seeds may be added to a config later and only new cells run.

Fairness rules: every method scores the same calibration examples (``calibration_size`` drawn with
``calibration_seed``), selects with the same global top-K and one-head-per-layer guardrail (CAHP: its own
clusters, same guardrail), and is recovered with the same recipe and recovery seed, so the spread over seeds
is the spread of the selection alone. Methods with no randomness of their own (magnitude, entropy, gradient,
hies, attattr, fisher) run only the first ``deterministic_seeds`` seeds (default 1: their std is 0 by
construction). Budget ``"knee"`` is CAHP's own k* (per seed); other methods get the k* of CAHP's run with the
same seed (or the first seed), so they are compared at the same head count.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cahp.adapters import get_adapter
from cahp.data import EncodedSplit, encode_split
from cahp.errors import CahpError
from cahp.evaluation.metrics import evaluate_split
from cahp.models import cahp_home, load_classifier
from cahp.outputs import write_json
from cahp.reporting.bench_report import budget_label, method_seeds, planned_cells, write_bench_report
from cahp.scoring import available_scorers, get_scorer, scorer_class
from cahp.scoring.salience import REFERENCE_SALIENCE, check_salience_source, gradient_salience
from cahp.selection.budget import keep_from_budget, select_top_k
from cahp.selection.cahp import CAHPSelector, CAHPSettings
from cahp.signatures.collector import collect_signatures
from cahp.signatures.stats import StreamingMoments
from cahp.surgery import heads_to_remove, kept_heads_by_layer, prune_heads
from cahp.train.finetune import TaskOptions, encode_eval_splits, subsample
from cahp.train.loop import TrainingConfig, set_seed, train_model

Budget = float | str
KNEE = "knee"

#: Settings that change results: a folder whose cells were computed with other values is refused.
RESULT_KEYS = (
    "model",
    "task",
    "calibration_size",
    "calibration_seed",
    "scorer_settings",
    "cahp",
    "recovery",
    "recovery_max_examples",
    "eval_splits",
    "eval_max_examples",
    "allow_empty_layers",
    "gqa_mode",
)


@dataclass
class BenchConfig:
    """One benchmark grid (read from JSON by :meth:`from_file`).

    Attributes:
        model: a fine-tuned classifier folder (``$VARS`` and ``~`` are expanded; ``$CAHP_HOME`` defaults to
            ``~/.cache/cahp``).
        out: output folder (cells, scores, summary, plots).
        task: the task options (``cahp finetune``'s).
        methods: ``"cahp"`` and/or registered scorer names.
        budgets: fractions of heads KEPT in ``(0, 1]`` and/or ``"knee"`` (CAHP's k*).
        seeds: seeds of the methods that have randomness (random, l0, dsp, cahp).
        deterministic_seeds: how many of ``seeds`` the other methods run (default 1).
        calibration_size, calibration_seed: the scoring examples (stratified subset of the training split;
            ``None`` = all of it), the same for every method and seed.
        scorer_settings: ``{method: {setting: value}}`` passed to :func:`cahp.scoring.get_scorer`.
        cahp: :class:`CAHPSettings` fields (not ``seed``/``keep``/``sparsity``, which the bench sets). With
            ``{"salience": "fisher"}`` (any head scorer that needs no budget) each cluster keeps the head that
            scorer ranks first (with its ``scorer_settings``, and the CAHP seed when it has randomness).
        recovery: the recovery fine-tune of every cell (``epochs: 0`` = retraining-free only).
        recovery_max_examples: recover on a stratified subset of the training split.
        eval_splits: splits evaluated after pruning and after recovery.
        eval_max_examples: evaluate on a stratified subset of each split (``None`` = all).
        allow_empty_layers: let a layer lose every head (else its best head stays, for every method).
        gqa_mode: grouped-query attention only, see :func:`cahp.surgery.prune_heads`.
    """

    model: str
    out: str
    task: TaskOptions = field(default_factory=TaskOptions)
    methods: list[str] = field(default_factory=lambda: ["cahp", "random", "gradient"])
    budgets: list[Budget] = field(default_factory=lambda: [0.9, 0.75, 0.5, 0.3, 0.2, 0.1, KNEE])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    deterministic_seeds: int = 1
    calibration_size: int | None = 512
    calibration_seed: int = 0
    scorer_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    cahp: dict[str, Any] = field(default_factory=dict)
    recovery: TrainingConfig = field(default_factory=lambda: TrainingConfig(epochs=1.0, learning_rate=2e-5))
    recovery_max_examples: int | None = 2000
    eval_splits: list[str] = field(default_factory=lambda: ["validation", "test"])
    eval_max_examples: int | None = None
    allow_empty_layers: bool = False
    gqa_mode: str = "groups"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BenchConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise CahpError(f"unknown bench config key(s) {unknown}; known keys: {sorted(known)}")
        values = dict(raw)
        values["task"] = TaskOptions(**values.get("task", {}))
        values["recovery"] = TrainingConfig(**values["recovery"]) if "recovery" in values else cls().recovery
        config = cls(**values)
        config.model = expand_path(config.model)
        config.out = expand_path(config.out)
        if config.task.data_dir is not None:
            config.task.data_dir = expand_path(config.task.data_dir)
        if config.task.task.startswith(("~", "$")):
            config.task.task = expand_path(config.task.task)
        return config

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BenchConfig:
        """Read a JSON config; see the attributes for the keys."""
        path = Path(expand_path(str(path)))
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as error:
            raise CahpError(f"bench config {path} does not exist") from error
        except json.JSONDecodeError as error:
            raise CahpError(f"bench config {path} is not valid JSON: {error}") from error
        return cls.from_dict(raw)


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
    methods = ["cahp", *available_scorers()]
    unknown = [m for m in config.methods if m not in methods]
    if unknown:
        raise CahpError(f"unknown method(s) {unknown}; available: {', '.join(methods)}")
    for budget in config.budgets:
        if budget == KNEE:
            if "cahp" not in config.methods:
                raise CahpError('budget "knee" is CAHP\'s k*: add "cahp" to methods or drop the budget')
        elif isinstance(budget, str) or not 0.0 < float(budget) <= 1.0:
            raise CahpError(f'budgets are fractions of heads kept in (0, 1] or "knee", got {budget!r}')
    if not config.seeds:
        raise CahpError("seeds must list at least one seed")
    set_by_bench = {"seed", "keep", "sparsity"}
    forbidden = set_by_bench & set(config.cahp)
    if forbidden:
        raise CahpError(f"cahp settings {sorted(forbidden)} are set by the bench (seeds and budgets)")
    unknown_settings = set(config.cahp) - {f.name for f in fields(CAHPSettings)}
    if unknown_settings:
        known = [f.name for f in fields(CAHPSettings) if f.name not in set_by_bench]
        raise CahpError(f"unknown cahp settings {sorted(unknown_settings)}; known: {', '.join(known)}")
    check_salience_source(config.cahp.get("salience", REFERENCE_SALIENCE))


def _check_folder(out: Path, config: BenchConfig) -> None:
    """Refuse a folder holding results of other settings; record this config."""
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


class _Bench:
    """The state of one run: model, data, caches."""

    def __init__(self, config: BenchConfig, progress: bool):
        self.config = config
        self.progress = progress
        self.out = Path(config.out)
        self.task = config.task.load()
        set_seed(config.calibration_seed)
        self.model, self.tokenizer = load_classifier(config.model, self.task.num_labels, self.task.label_names)
        if torch.cuda.is_available():
            self.model.cuda()
        adapter = get_adapter(self.model)
        self.layers, self.heads = adapter.num_layers(self.model), adapter.num_heads(self.model)
        self.n_heads = self.layers * self.heads
        max_length = config.task.max_length
        self.evaluation = encode_eval_splits(
            self.tokenizer, self.task, config.eval_splits, config.eval_max_examples, max_length
        )
        if not self.evaluation:
            raise CahpError(f"none of the eval_splits {config.eval_splits} exists; the task has {self.task.splits}")
        calibration_split = self.task.split(self.task.calibration_split)  # offline MNLI: the held-out share
        calibration = subsample(calibration_split, config.calibration_size, config.calibration_seed)
        self.calibration = encode_split(self.tokenizer, calibration, max_length)
        self._recovery_data: EncodedSplit | None = None

    def say(self, message: str) -> None:
        if self.progress:
            print(message, flush=True)

    @property
    def recovery_data(self) -> EncodedSplit:
        if self._recovery_data is None:
            split = subsample(self.task.split("train"), self.config.recovery_max_examples, self.config.recovery.seed)
            self._recovery_data = encode_split(self.tokenizer, split, self.config.task.max_length)
        return self._recovery_data

    def accuracy(self, model: Any) -> dict[str, Any]:
        return {name: evaluate_split(model, self.tokenizer, data, 64, False) for name, data in self.evaluation.items()}

    def seeds_for(self, method: str) -> list[int]:
        return method_seeds(method, self.config.seeds, self.config.deterministic_seeds)

    # ---- selections --------------------------------------------------------------------------------------

    def scores(self, method: str, seed: int, keep: int | None) -> tuple[np.ndarray, float]:
        """Cached ``[layers, heads]`` scores of a scorer and the seconds they took."""
        budget_aware = scorer_class(method).budget_aware
        suffix = f"__keep{keep}" if budget_aware else ""
        path = self.out / "scores" / f"{method}__seed{seed}{suffix}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            return np.array(cached["scores"]), cached["seconds"]
        settings = {**self.config.scorer_settings.get(method, {}), "seed": seed}
        if budget_aware:
            settings["keep"] = keep
        scorer = get_scorer(method, **settings)
        self.say(f"scoring {method} (seed {seed}{f', keep {keep}' if budget_aware else ''})")
        start = time.perf_counter()
        scores = scorer.score(self.model, self.tokenizer, self.calibration, self.task.num_labels)
        seconds = round(time.perf_counter() - start, 2)
        payload = {"method": method, "seed": seed, "settings": scorer.get_settings(), "seconds": seconds}
        write_json(path, {**payload, "scores": scores.tolist()})
        return scores, seconds

    def _cahp_inputs(self, seed: int) -> tuple[StreamingMoments, np.ndarray]:
        """Signatures and salience on the calibration set. The signatures and the reference gradient salience
        are computed once for every CAHP seed (their time is recorded in ``scores/cahp_shared.json``; a seed's
        scoring time is its head space, sweep and selections). With ``cahp.salience`` naming a head scorer,
        the gradient is not computed: that scorer's scores are the salience, cached and timed in ``scores/``
        like the method's own."""
        signatures = self.out / "scores" / "cahp_signatures.npz"
        shared = self.out / "scores" / "cahp_shared.json"
        source = self.config.cahp.get("salience", REFERENCE_SALIENCE)
        if signatures.is_file() and shared.is_file():
            moments, cached = StreamingMoments.load(signatures), json.loads(shared.read_text())
        else:
            what = "signatures and salience" if source == REFERENCE_SALIENCE else "signatures"
            self.say(f"cahp: {what} on {len(self.calibration)} calibration examples")
            start = time.perf_counter()
            moments = collect_signatures(
                self.model, self.tokenizer, self.calibration, self.task.num_labels, progress=False
            )
            salience = None
            if source == REFERENCE_SALIENCE:
                salience = gradient_salience(
                    self.model,
                    self.tokenizer,
                    self.calibration,
                    fraction=1.0,
                    seed=self.config.calibration_seed,
                    progress=False,
                ).tolist()
            cached = {"seconds": round(time.perf_counter() - start, 2), "salience": salience}
            moments.save(signatures)
            write_json(shared, cached)
        if source == REFERENCE_SALIENCE:
            return moments, np.array(cached["salience"])
        own_seeds = self.seeds_for(source)  # a deterministic scorer runs once, shared by every CAHP seed
        return moments, self.scores(source, seed if seed in own_seeds else own_seeds[0], None)[0]

    def cahp_plan(self, seed: int, keep: int | None) -> dict[str, Any]:
        """CAHP's selection for ``keep`` heads (``None``: its knee), from a per-seed cache of every budget."""
        path = self.out / "scores" / f"cahp__seed{seed}.json"
        cached = json.loads(path.read_text()) if path.is_file() else None
        if cached is not None and (keep is None or str(keep) in cached["selections"]):
            return cached["selections"][str(cached["k_star"] if keep is None else keep)] | {
                "seconds": cached["seconds"],
                "knee": cached["knee"],
            }
        moments, salience = self._cahp_inputs(seed)
        self.say(f"cahp: head space and MSS(k) sweep (seed {seed})")
        start = time.perf_counter()
        settings = CAHPSettings(**self.config.cahp, seed=seed)
        selector = CAHPSelector(settings).fit(moments, salience)
        ks = {selector.k_, *(self.keep_for(b) for b in self.config.budgets if b != KNEE)}
        if keep is not None:
            ks.add(keep)
        selections = dict(cached["selections"]) if cached else {}
        for k in sorted(ks):
            selection = selector.selection_for(k, self.config.allow_empty_layers)
            selections[str(k)] = {
                "kept_heads_by_layer": {str(layer): hs for layer, hs in selection.kept_heads_by_layer.items()},
                "guardrail_heads": [list(map(int, h)) for h in selection.guardrail_heads],
            }
        seconds = cached["seconds"] if cached else round(time.perf_counter() - start, 2)  # a refit adds no cost
        record = {"k_star": int(selector.k_), "knee": selector.knee_.to_dict(), "seconds": seconds}
        write_json(path, {**record, "selections": selections})
        return selections[str(selector.k_ if keep is None else keep)] | {"seconds": seconds, "knee": record["knee"]}

    def knee_keep(self, seed: int) -> int:
        """CAHP's k* for ``seed`` (or for its first seed, when CAHP does not run ``seed``)."""
        cahp_seed = seed if seed in self.seeds_for("cahp") else self.seeds_for("cahp")[0]
        return int(self.cahp_plan(cahp_seed, None)["knee"]["k"])

    def keep_for(self, budget: Budget) -> int:
        return keep_from_budget(self.n_heads, sparsity=1.0 - float(budget))

    def plan(self, method: str, seed: int, budget: Budget) -> dict[str, Any]:
        """``{keep, kept_heads_by_layer, guardrail_heads, scoring_seconds}`` for one cell."""
        if method == "cahp":
            keep = None if budget == KNEE else self.keep_for(budget)
            plan = self.cahp_plan(seed, keep)
            return {
                "keep": int(plan["knee"]["k"]) if keep is None else keep,
                "kept_heads_by_layer": plan["kept_heads_by_layer"],
                "guardrail_heads": plan["guardrail_heads"],
                "scoring_seconds": plan["seconds"],
            }
        keep = self.knee_keep(seed) if budget == KNEE else self.keep_for(budget)
        scores, seconds = self.scores(method, seed, keep)
        kept, guardrail = select_top_k(scores, keep, self.config.allow_empty_layers)
        return {
            "keep": keep,
            "kept_heads_by_layer": {str(layer): hs for layer, hs in kept.items()},
            "guardrail_heads": [list(h) for h in guardrail],
            "scoring_seconds": seconds,
        }

    # ---- cells -------------------------------------------------------------------------------------------

    def run_cell(self, method: str, seed: int, budget: Budget) -> dict[str, Any]:
        start = time.perf_counter()
        plan = self.plan(method, seed, budget)
        planned = time.perf_counter()
        selected = {int(layer): hs for layer, hs in plan["kept_heads_by_layer"].items()}
        model = copy.deepcopy(self.model)
        prune_heads(model, heads_to_remove(model, selected, self.config.gqa_mode), gqa_mode=self.config.gqa_mode)
        kept = kept_heads_by_layer(model)  # with GQA groups, more than selected
        after_pruning = self.accuracy(model)
        pruned = time.perf_counter()
        history: list[dict[str, Any]] = []
        after_recovery = after_pruning
        if self.config.recovery.epochs > 0:
            set_seed(self.config.recovery.seed)
            history = train_model(
                model, self.tokenizer, self.recovery_data, self.config.recovery, desc="recovery", progress=False
            )
            after_recovery = self.accuracy(model)
        end = time.perf_counter()
        return {
            "method": method,
            "seed": seed,
            "budget": budget_label(budget),
            "budget_fraction": None if budget == KNEE else float(budget),
            "keep": plan["keep"],
            "heads_total": self.n_heads,
            "layers": self.layers,
            "heads_per_layer": self.heads,
            "kept": sum(len(hs) for hs in kept.values()),
            "kept_heads_by_layer": {str(layer): hs for layer, hs in kept.items()},
            "selected_heads_by_layer": plan["kept_heads_by_layer"],
            "guardrail_heads": plan["guardrail_heads"],
            "accuracy": {"after_pruning": after_pruning, "after_recovery": after_recovery},
            "recovery_history": history,
            "seconds": {
                "scoring": plan["scoring_seconds"],
                "selection": round(planned - start, 2),
                "prune_and_evaluate": round(pruned - planned, 2),
                "recovery_and_evaluate": round(end - pruned, 2),
            },
        }


def run_bench(config: BenchConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the grid of ``config`` and write ``summary.md`` and the plots.

    Returns:
        ``{"cells": total cells, "computed": cells computed by this call, "summary": path of summary.md}``.
    """
    _validate(config)
    out = Path(config.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    (out / "scores").mkdir(exist_ok=True)
    _check_folder(out, config)
    bench = _Bench(config, progress)
    dense = out / "dense.json"
    if not dense.is_file():
        bench.say(f"{config.model}: evaluating the dense model")
        record = {"accuracy": bench.accuracy(bench.model), "heads_total": bench.n_heads, "task": bench.task.describe()}
        write_json(dense, record)
    else:
        record = json.loads(dense.read_text())
        if "task" not in record:  # what the summary says about the data (folders of earlier versions lack it)
            write_json(dense, {**record, "task": bench.task.describe()})
    planned = planned_cells(config.methods, config.seeds, config.deterministic_seeds, config.budgets)
    computed = 0
    for method, seed, budget in planned:
        label = budget_label(budget)
        path = out / "cells" / f"{method}__seed{seed}__{label}.json"
        if path.is_file():
            continue
        cell = bench.run_cell(method, seed, budget)
        write_json(path, cell)
        computed += 1
        test = next(iter(cell["accuracy"]["after_recovery"]))
        recovered = cell["accuracy"]["after_recovery"][test]["accuracy"]
        bench.say(
            f"{method} seed {seed} budget {label}: {cell['kept']}/{bench.n_heads} heads, "
            f"{test} accuracy {cell['accuracy']['after_pruning'][test]['accuracy']:.4f} pruned"
            + (f", {recovered:.4f} recovered" if config.recovery.epochs > 0 else " (retraining-free)")
        )
    summary = write_bench_report(out)
    return {"cells": len(planned), "computed": computed, "summary": str(summary)}
