"""``cahp analyze``: load a model and a task, measure every head on a calibration set, write one JSON file and
the same results as one HTML page beside it (:mod:`cahp.reporting.html_report`).

The file's schema is documented in ``docs/analysis.md``; both files are written atomically (a killed run leaves
the earlier file or none).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cahp import __version__
from cahp.analysis.heads import analyze_heads
from cahp.errors import OutputError, OutputExistsError
from cahp.outputs import write_json
from cahp.reporting.html_report import analysis_html_path, write_analysis_html

#: ``format`` and ``version`` of the JSON file (the version changes when a field changes meaning).
FORMAT = "cahp-head-analysis"
VERSION = 1


def check_output_file(out: str | os.PathLike[str], overwrite: bool) -> Path:
    """The absolute path of ``out`` after refusing, before any work, a file the run could not or must not write.

    Raises:
        OutputError: ``out`` is a folder, or its folder does not exist.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
    """
    path = Path(out).expanduser().absolute()
    if path.is_dir():
        raise OutputError(f"--out {path} is a folder: give a file name such as {path / 'analysis.json'}")
    if not path.parent.is_dir():
        raise OutputError(f"--out {path}: the folder {path.parent} does not exist; create it first")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists: pass --overwrite to replace it or choose another --out")
    if analysis_html_path(path).exists() and not overwrite:
        raise OutputExistsError(
            f"{analysis_html_path(path)} (the page written beside --out) exists: pass --overwrite or choose "
            "another --out"
        )
    return path


def analyze(
    model: str,
    task: Any,
    out: str | os.PathLike[str],
    *,
    calibration_size: int | None = 256,
    batch_size: int = 32,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
    cahp: bool = False,
    objective: str = "classification",
    lm: Any = None,
) -> dict[str, Any]:
    """Measure the heads of ``model`` on ``task``'s calibration split (a causal LM: on ``lm``'s calibration blocks)
    and write the result to ``out`` (JSON).

    Args:
        model: an alias, a folder or a hub id of an unpruned classifier or base model (a base model gets an
            untrained classification head, which does not change the attention).
        task: :class:`cahp.train.finetune.TaskOptions` (task, data folder, max length, ...).
        out: the JSON file to write.
        calibration_size: examples of the calibration split, class-stratified (``None``: all of it).
        batch_size: examples per forward.
        seed: picks the calibration subset.
        overwrite: replace an existing ``out``.
        progress: show progress.
        command: the command line, recorded in the file.
        cahp: also fit CAHP (its default settings) on the same calibration set and record each head's cluster
            and whether CAHP keeps it at its knee (``cahp`` object of the file; needs two or more classes).
        objective: the workload that loads the model and draws the calibration set (:mod:`cahp.workloads`):
            ``classification`` (``task``) or ``causal-lm`` (``lm``: :class:`cahp.workloads.causal_lm.LMOptions`,
            its calibration blocks; ``calibration_size`` and ``batch_size`` do not apply, ``lm`` sets them).

    Returns:
        The JSON object written.
    """
    from cahp.engine import task_calibration
    from cahp.models import check_max_length, load_classifier, load_model_config, resolve_model
    from cahp.runtime import place

    path = check_output_file(out, overwrite)
    if objective != "classification":
        return _analyze_workload(model, path, objective, lm, seed, progress, command, cahp)
    check_max_length(task.max_length, load_model_config(model))
    task_data = task.load(model=model)
    loaded, tokenizer = load_classifier(model, task_data.num_labels, task_data.label_names, attn_implementation="eager")
    check_max_length(task.max_length, loaded, tokenizer)
    place(loaded)
    calibration = task_calibration(task_data, tokenizer, calibration_size, seed, task.max_length, batch_size)
    return _write(
        path,
        loaded,
        calibration,
        progress,
        cahp,
        {
            "command": command,
            "model": resolve_model(model).location,
            "task": task.task,
            "task_name": task_data.name,  # as cahp prune's report names it (task.name)
            "num_labels": task_data.num_labels,
            "max_length": task.max_length,
        },
    )


def _analyze_workload(
    model: str, path: Path, objective: str, lm: Any, seed: int, progress: bool, command: str | None, cahp: bool
) -> dict[str, Any]:
    """:func:`analyze` on a workload other than classification: it loads the model and draws the calibration."""
    from cahp.errors import CahpError
    from cahp.models import resolve_model
    from cahp.pipeline import PruneConfig
    from cahp.runtime import place
    from cahp.workloads import get_workload

    workload_class = get_workload(objective)
    if cahp and not workload_class.has_classes:
        raise CahpError(f"--cahp fits CAHP, which compares classes; the {objective} objective has none: drop --cahp")
    config = PruneConfig(model=model, objective=objective, lm=lm, seed=seed)
    workload = workload_class(config, progress)
    place(workload.model)
    calibration = workload.calibration(seed)
    description = workload.describe()
    return _write(
        path,
        workload.model,
        calibration,
        progress,
        cahp,
        {
            "command": command,
            "model": resolve_model(model).location,
            "task": description.get("task", objective),
            "task_name": description.get("task", objective),
            "num_labels": 0,
            "max_length": getattr(lm, "context_length", None),
        },
    )


def _write(
    path: Path, model: Any, calibration: Any, progress: bool, cahp: bool, described: dict[str, Any]
) -> dict[str, Any]:
    """Measure the heads, write the JSON file and its page; returns the JSON object."""
    analysis = analyze_heads(model, calibration, progress=progress)
    cahp_heads = cahp_clusters(model, calibration, progress) if cahp else None
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "cahp_version": __version__,
        "command": described["command"],
        "model": described["model"],
        "model_type": model.config.model_type,
        "task": described["task"],
        "task_name": described["task_name"],
        "num_labels": described["num_labels"],
        "max_length": described["max_length"],
        "calibration": calibration.description,
        **analysis.to_dict(),
        "cahp": cahp_heads,
    }
    write_json(path, payload)
    write_analysis_html(payload, analysis_html_path(path))  # the same results as one page, beside it
    return payload


def cahp_clusters(model: Any, calibration: Any, progress: bool = False) -> dict[str, Any]:
    """CAHP (default settings) fitted on ``calibration``: each head's cluster at the knee's k* and the heads it
    keeps there.

    Returns:
        ``{"k": k*, "cluster": [layers][heads] int, "kept": [layers][heads] bool, "representatives": [head
        index, ...]}``; head index = layer * heads + head.

    Raises:
        CahpError: the calibration has fewer than two classes (CAHP compares classes).
    """
    from cahp.engine import Engine
    from cahp.methods.plan import Budget

    plan = Engine(model, calibration, say=print if progress else None).plan("cahp", {}, Budget.auto())
    layers, heads = plan.grid.layers, plan.grid.heads
    kept = [[head in plan.kept_heads_by_layer.get(layer, []) for head in range(heads)] for layer in range(layers)]
    clusters = plan.details["clusters"]
    return {
        "k": int(plan.details["k"]),
        "cluster": [clusters[layer * heads : (layer + 1) * heads] for layer in range(layers)],
        "kept": kept,
        "representatives": plan.details["representatives"],
    }


def summary(payload: dict[str, Any]) -> str:
    """A few lines for the terminal: the grid and the heads of each kind."""
    grid = payload["grid"]
    found = payload["summary"]
    lines = [
        f"{payload['model']}: {grid['layers']} layers x {grid['heads']} heads, {payload['examples']} examples "
        f"({'causal' if payload['causal'] else 'bidirectional'} attention)"
    ]
    for kind in ("sink_heads", "special_token_heads", "dormant_heads"):
        heads = found[kind]
        shown = ", ".join(f"L{layer}H{head}" for layer, head in heads[:12]) + (" ..." if len(heads) > 12 else "")
        lines.append(f"  {kind.replace('_', ' ')}: {len(heads)}{'  ' + shown if heads else ''}")
    if payload.get("cahp"):
        kept = payload["cahp"]["kept"]
        counts = [
            f"{sum(kept[layer][head] for layer, head in found[kind])}/{len(found[kind])} {label}"
            for kind, label in (
                ("sink_heads", "sink"),
                ("special_token_heads", "special-token"),
                ("dormant_heads", "dormant"),
            )
            if found[kind]
        ]
        lines.append(
            f"  CAHP keeps {sum(map(sum, kept))} heads in {payload['cahp']['k']} clusters"
            + (f"; of the flagged heads it keeps {', '.join(counts)}" if counts else "")
        )
    js = [pair["js"] for pair in payload["adjacent_layers"]]
    if js:
        lines.append("  adjacent-layer JS divergence: " + " ".join("-" if v is None else f"{v:.3f}" for v in js))
    return "\n".join(lines)
