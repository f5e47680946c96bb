"""``cahp prune``: the end-to-end flow, one call from Python or the command line.

fine-tuned classifier -> accuracy before -> signatures (calibration set) -> salience -> selection
-> physical removal -> accuracy after pruning -> one recovery fine-tune -> accuracy after recovery
-> parameters, FLOPs and measured latency dense vs pruned -> reloadable pruned model, ``report.json``, plots.

Each stage's result is cached in the run's staging folder, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cahp.adapters import get_adapter
from cahp.data import EncodedSplit, TaskData, encode_split
from cahp.errors import CahpError
from cahp.evaluation.accounting import attention_flops, count_parameters, total_flops
from cahp.evaluation.latency import measure_latency, synthetic_batch
from cahp.evaluation.metrics import evaluate_split
from cahp.models import load_classifier
from cahp.outputs import StagedOutput, write_json
from cahp.reporting.plots import plot_head_space, plot_kept_heads, plot_mss_curve
from cahp.scoring.salience import REFERENCE_SALIENCE, check_salience_source, gradient_salience
from cahp.selection.cahp import CAHPSelector, CAHPSettings
from cahp.signatures.collector import collect_signatures
from cahp.signatures.stats import StreamingMoments
from cahp.surgery import heads_to_remove, prune_heads
from cahp.train.finetune import TaskOptions, encode_eval_splits, subsample
from cahp.train.loop import TrainingConfig, set_seed, train_model

#: The reference's recovery recipe: 3 epochs, lr 2e-5, linear schedule, 10% warm-up, weight decay 0.01.
RECOVERY_DEFAULT = TrainingConfig(epochs=3.0, learning_rate=2e-5, warmup_ratio=0.1, weight_decay=0.01)


@dataclass
class PruneConfig:
    """Everything that defines a pruning run (written to ``run_config.json``).

    Attributes:
        model: a fine-tuned classifier (folder, or alias/hub id of one).
        method: ``cahp`` or a registered head scorer (then global top-K at the ``cahp.keep``/``sparsity`` budget).
        scorer_settings: constructor settings of that scorer (for example ``{"steps": 400}`` for ``l0``), or of
            the scorer that gives CAHP its salience (``cahp.salience``); ``seed`` defaults to ``cahp.seed`` and
            ``keep`` is set from the budget for budget-aware scorers.
        calibration_size: examples of the calibration split (``task.calibration_split``: the training split;
            offline MNLI: its held-out share) for signatures (seeded, class-stratified);
            ``None`` = the whole split, as the reference.
        salience_fraction: share of (shuffled) calibration-split batches for gradient salience (reference: 0.25);
            a head scorer named by ``cahp.salience`` scores the calibration examples instead.
        recovery: the recovery fine-tune; ``epochs=0`` gives the retraining-free result.
        recovery_max_examples: train the recovery on a stratified subset (demo settings).
        eval_max_examples: evaluate on a seeded, stratified subset of each split (``None`` = the whole split);
            the subset is the same before pruning, after pruning and after recovery.
        gqa_mode: grouped-query attention only: ``groups`` (keep a key-value group when any of its query
            heads is selected) or ``uniform`` (see :func:`cahp.surgery.prune_heads`).
        latency_batch_size, latency_seq_len: the dense vs pruned latency measurement.
    """

    model: str
    task: TaskOptions = field(default_factory=TaskOptions)
    method: str = "cahp"
    scorer_settings: dict[str, Any] = field(default_factory=dict)
    cahp: CAHPSettings = field(default_factory=CAHPSettings)
    calibration_size: int | None = None
    signature_batch_size: int = 32
    salience_fraction: float = 0.25
    recovery: TrainingConfig = field(default_factory=lambda: copy.deepcopy(RECOVERY_DEFAULT))
    recovery_max_examples: int | None = None
    eval_splits: tuple[str, ...] = ("validation", "test")
    eval_max_examples: int | None = None
    gqa_mode: str = "groups"
    latency_batch_size: int = 32
    latency_seq_len: int = 128
    latency_repeats: int = 10

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Stages:
    """Run a stage once: its JSON (or other) result is cached in the staging folder."""

    def __init__(self, folder: Path, progress: bool):
        self.folder = folder
        self.progress = progress
        self.seconds: dict[str, float] = {}

    def json(self, name: str, compute: Any) -> Any:
        path = self.folder / f"{name}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            self.seconds[name] = cached["seconds"]
            return cached["value"]
        start = time.perf_counter()
        value = compute()
        self.seconds[name] = round(time.perf_counter() - start, 2)
        write_json(path, {"seconds": self.seconds[name], "value": value})
        return value

    def say(self, message: str) -> None:
        if self.progress:
            print(message, flush=True)


def _accuracy(model: Any, tokenizer: Any, splits: dict[str, EncodedSplit], progress: bool) -> dict[str, Any]:
    return {
        name: evaluate_split(model, tokenizer, data, 64, progress, f"evaluate {name}") for name, data in splits.items()
    }


def _check_method(config: PruneConfig) -> None:
    """Refuse a non-positive subset size, an unknown method, a scorer without a budget or an unknown scorer
    setting before anything is written."""
    for name in ("calibration_size", "recovery_max_examples", "eval_max_examples"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise CahpError(f"{name} must be a positive number of examples (or None for the whole split), got {value}")
    if config.method == "cahp":
        check_salience_source(config.cahp.salience)
        if config.scorer_settings and config.cahp.salience == REFERENCE_SALIENCE:
            raise CahpError(
                f"scorer settings {sorted(config.scorer_settings)} apply to head scorers (--method, or cahp's "
                "--salience), not to cahp; use the CAHP options (--metric, --embedding, --poly-degree, ...)"
            )
        if config.scorer_settings:
            _scorer(config, config.cahp.salience)
        return
    from cahp.scoring import available_scorers

    if config.method not in available_scorers():
        raise CahpError(f"unknown method {config.method!r}; available: cahp, {', '.join(available_scorers())}")
    if config.cahp.budget_mode() == "auto":
        raise CahpError(
            f"method {config.method!r} has no automatic head count: give a budget with --keep K or --sparsity S "
            "(only cahp finds k* by itself)"
        )
    _scorer(config, config.method)


def _scorer(config: PruneConfig, name: str, **extra: Any) -> Any:
    """The head scorer ``name`` with the run's ``scorer_settings`` (``seed`` defaults to ``cahp.seed``)."""
    from cahp.scoring import get_scorer

    return get_scorer(name, **{"seed": config.cahp.seed, **config.scorer_settings, **extra})


def _select(
    config: PruneConfig, stages: _Stages, model: Any, tokenizer: Any, task: TaskData, selection_data: EncodedSplit
) -> dict[str, Any]:
    if config.method != "cahp":  # any registered head scorer, then global top-K with the guardrail
        from cahp.scoring import scorer_class
        from cahp.selection.budget import keep_from_budget, select_top_k

        mode = config.cahp.budget_mode()  # "keep" or "sparsity": _check_method refused "auto"
        adapter = get_adapter(model)
        layers, heads = adapter.num_layers(model), adapter.num_heads(model)
        keep = keep_from_budget(layers * heads, config.cahp.keep, config.cahp.sparsity)
        budget_aware = scorer_class(config.method).budget_aware
        scorer = _scorer(config, config.method, **({"keep": keep} if budget_aware else {}))

        def score() -> list[list[float]]:
            if config.calibration_size is None:
                calibration = selection_data
            else:
                split = subsample(task.split(task.calibration_split), config.calibration_size, config.cahp.seed)
                calibration = encode_split(tokenizer, split, config.task.max_length)
            stages.say(f"scoring heads with {config.method!r} on {len(calibration)} examples")
            return scorer.score(model, tokenizer, calibration, task.num_labels).tolist()

        scores = np.array(stages.json(f"scores_{config.method}", score))
        kept, guardrail = select_top_k(scores, keep, config.cahp.allow_empty_layers)

        def report() -> dict[str, Any]:
            return {
                "method": config.method,
                "scorer_settings": scorer.get_settings(),
                "budget_mode": mode,
                "k": keep,
                "knee": {  # no MSS curve: the budget decides k
                    "k": keep,
                    "method": "budget",
                    "fallback": None,
                    "degree": 0,
                    "ks": [],
                    "mss": [],
                    "fitted": [],
                },
                "guardrail_heads": [list(h) for h in guardrail],
                "scores": scores.tolist(),
                "embedding": [],
                "clusters": [],
                "kept_heads_by_layer": {str(layer): hs for layer, hs in kept.items()},
                "kept_heads": sum(len(hs) for hs in kept.values()),
            }

        return stages.json("selection", report)

    calibration_split = subsample(task.split(task.calibration_split), config.calibration_size, config.cahp.seed)
    signatures_file = stages.folder / "signatures.npz"
    if signatures_file.is_file():
        moments = StreamingMoments.load(signatures_file)
    else:
        stages.say(f"collecting attention signatures on {len(calibration_split)} calibration examples")
        calibration = encode_split(tokenizer, calibration_split, config.task.max_length)
        start = time.perf_counter()
        moments = collect_signatures(
            model,
            tokenizer,
            calibration,
            task.num_labels,
            size=32,
            batch_size=config.signature_batch_size,
            progress=stages.progress,
        )
        stages.seconds["signatures"] = round(time.perf_counter() - start, 2)
        moments.save(signatures_file)

    def salience_scores() -> list[list[float]]:
        if config.cahp.salience == REFERENCE_SALIENCE:
            stages.say("computing gradient salience")
            return gradient_salience(
                model,
                tokenizer,
                selection_data,
                fraction=config.salience_fraction,
                seed=config.cahp.seed,
                progress=stages.progress,
            ).tolist()
        scorer = _scorer(config, config.cahp.salience)
        stages.say(f"salience: scoring heads with {config.cahp.salience!r} on {len(calibration_split)} examples")
        calibration = encode_split(tokenizer, calibration_split, config.task.max_length)
        return scorer.score(model, tokenizer, calibration, task.num_labels).tolist()

    salience = np.array(stages.json("salience", salience_scores))
    stages.say("clustering the head space")
    return stages.json("selection", lambda: CAHPSelector(config.cahp).fit(moments, salience).report())


def prune(
    config: PruneConfig,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Prune ``config.model`` with CAHP, recover, and write the pruned model, ``report.json`` and plots.

    Returns:
        The report (also written to ``out/report.json``).
    """
    _check_method(config)
    task = config.task.load()
    staged = StagedOutput(out, {"command": "prune", **config.to_dict()}, overwrite).prepare()
    (staged.path / "stages").mkdir(exist_ok=True)
    stages = _Stages(staged.path / "stages", progress)
    if staged.resumed:
        stages.say(f"resuming the unfinished run in {staged.path}")
    set_seed(config.cahp.seed)
    model, tokenizer = load_classifier(config.model, task.num_labels, task.label_names)
    if torch.cuda.is_available():
        model.cuda()
    adapter = get_adapter(model)
    layers, heads = adapter.num_layers(model), adapter.num_heads(model)
    max_length = config.task.max_length
    # calibration data of every selection method: the training split (offline MNLI: its held-out share)
    selection_data = encode_split(tokenizer, task.split(task.calibration_split), max_length)
    evaluation = encode_eval_splits(tokenizer, task, config.eval_splits, config.eval_max_examples, max_length)

    stages.say(f"{config.model}: {layers} layers x {heads} heads; evaluating the dense model")
    before = stages.json("accuracy_before", lambda: _accuracy(model, tokenizer, evaluation, progress))
    selection = _select(config, stages, model, tokenizer, task, selection_data)
    kept = {int(layer): hs for layer, hs in selection["kept_heads_by_layer"].items()}

    dense = copy.deepcopy(model)
    dense_params = count_parameters(dense)
    prune_heads(model, heads_to_remove(model, kept, config.gqa_mode), gqa_mode=config.gqa_mode)
    kept_total = sum(len(hs) for hs in kept.values())
    stages.say(f"removed {layers * heads - kept_total} of {layers * heads} heads; evaluating before recovery")
    pruned_accuracy = stages.json("accuracy_pruned", lambda: _accuracy(model, tokenizer, evaluation, progress))

    if config.recovery.epochs > 0:
        recovery_split = subsample(task.split("train"), config.recovery_max_examples, config.recovery.seed)
        recovery_data = encode_split(tokenizer, recovery_split, max_length)

        def recover() -> list[dict[str, Any]]:
            if torch.cuda.is_available():
                model.cuda()
            return train_model(
                model,
                tokenizer,
                recovery_data,
                config.recovery,
                validation=evaluation.get("validation"),
                checkpoint_path=stages.folder / "recovery_checkpoint.pt",
                desc="recovery",
                progress=progress,
            )

        recovery_history = stages.json("recovery", recover)
        if (stages.folder / "recovery_checkpoint.pt").is_file():
            state = torch.load(stages.folder / "recovery_checkpoint.pt", weights_only=False)
            model.load_state_dict(state["model"])
        recovered = stages.json("accuracy_recovered", lambda: _accuracy(model, tokenizer, evaluation, progress))
    else:
        recovery_history, recovered = [], pruned_accuracy

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
        "heads": {"layers": layers, "heads_per_layer": heads, "total": layers * heads, "kept": kept_total},
        "kept_heads_by_layer": {str(k): v for k, v in sorted(kept.items())},
        "selection": selection,
        "accuracy": {"before_pruning": before, "after_pruning": pruned_accuracy, "after_recovery": recovered},
        "recovery_history": recovery_history,
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
        "config": config.to_dict(),
        "command": command,
    }
    model.save_pretrained(staged.path / "model")
    tokenizer.save_pretrained(staged.path / "model")
    plots = staged.path / "plots"
    plots.mkdir(exist_ok=True)
    plot_mss_curve(selection, plots / "mss_curve.png")
    plot_kept_heads(
        report["kept_heads_by_layer"], heads, plots / "kept_heads.png", f"{Path(config.model).name} ({task.name})"
    )
    plot_head_space(selection, heads, plots / "head_space.png")
    write_json(staged.path / "report.json", report)
    (stages.folder / "recovery_checkpoint.pt").unlink(missing_ok=True)
    staged.commit()
    return report


def summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: heads kept, accuracy before/after, speedup."""
    accuracy = report["accuracy"]
    split = "test" if "test" in accuracy["before_pruning"] else next(iter(accuracy["before_pruning"]))
    knee = report["selection"]["knee"]
    how = "knee of MSS(k)" if knee["method"] == "kneedle" else f"fallback ({knee['fallback']})"
    if report["selection"]["budget_mode"] != "auto":
        how = f"budget ({report['selection']['budget_mode']})"
    if report.get("method", "cahp") != "cahp":
        how = f"{report['method']} scores, top-k {how}"
    elif report["selection"].get("settings", {}).get("salience", REFERENCE_SALIENCE) != REFERENCE_SALIENCE:
        how += f"; one head per cluster by {report['selection']['settings']['salience']} scores"
    lines = [
        f"heads kept: {report['heads']['kept']} of {report['heads']['total']} (k = {report['selection']['k']}, "
        f"{how}; guardrail added {len(report['selection']['guardrail_heads'])})",
        f"{split} accuracy ({accuracy['before_pruning'][split]['examples']} examples): "
        f"before {accuracy['before_pruning'][split]['accuracy']:.4f}, "
        f"after pruning {accuracy['after_pruning'][split]['accuracy']:.4f}, "
        f"after recovery {accuracy['after_recovery'][split]['accuracy']:.4f}",
        f"parameters: {report['parameters']['dense'] / 1e6:.1f}M -> {report['parameters']['pruned'] / 1e6:.1f}M; "
        f"speedup {report['latency']['measured_speedup']:.2f}x measured on CPU "
        f"(FLOPs-ideal {report['latency']['flops_ideal_speedup']:.2f}x, batch {report['latency']['batch_size']}"
        f" x {report['latency']['seq_len']} tokens)",
    ]
    return "\n".join(lines)
