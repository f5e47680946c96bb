"""Calibration cost of CAHP: each stage of ``CAHP.fit`` as a ratio to a plain forward pass over the same examples.

Section ``stages`` (one run, one process): on the calibration examples of a task it times

- a plain forward pass: eval mode, ``inference_mode``, the model's default attention implementation, batches of
  ``--batch-size`` sorted by length (the batches of the signature pass);
- ``CAHP(sweep="separate")`` (the reference: signatures, then the gradient salience's own forward+backward over
  its seeded 25% of shuffled batches) and ``CAHP(sweep="shared")`` (the salience's gradient taken inside the
  signature pass), each stage from the fitted method's ``stage_seconds_``;
- and, to judge whether the shared salience changes results, how both fits agree (salience rank correlation,
  k*, kept heads) next to how the reference agrees with itself under another salience seed.

With ``--converge-tol`` a section ``convergence`` fits ``CAHP(sweep="shared", converge_tol=...)`` and records
the examples it needed and its kept heads against the full shared fit.

    OMP_NUM_THREADS=2 CAHP_DATA_DIR=../shared/data python benchmarks/calibration.py            # whole split
    CAHP_DATA_DIR=../shared/data python benchmarks/calibration.py --examples 2000 --converge-tol 0.02

Writes ``benchmarks/results/calibration.json`` and ``benchmarks/results/calibration.md`` (with the command).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from cahp.engine import task_calibration
from cahp.methods import Budget, get_method
from cahp.models import cahp_home
from cahp.outputs import atomic_write, write_json

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODEL = Path.home() / ".cache" / "cahp" / "finetuned" / "minilm-l6-sst5"


def plain_forward_seconds(model: Any, calibration: Any, batch_size: int) -> float:
    """Wall time of one forward over every calibration batch (sorted by length, no hooks, no gradients)."""
    model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in calibration.batches(batch_size, sort_by_length=True):
            calibration.forward(model, batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def kept_heads(method: Any) -> set[tuple[int, int]]:
    """The heads the auto budget (the knee) keeps."""
    plan = method.plan(Budget.auto())
    return {(int(layer), int(head)) for layer, heads in plan.kept_heads_by_layer.items() for head in heads}


def with_salience(method: Any, salience: np.ndarray) -> Any:
    """A copy of a fitted CAHP whose plans pick representatives by another raw ``salience`` (same clusters)."""
    from cahp.selection.representatives import normalize_salience

    other = copy.copy(method)
    other.selector_ = copy.copy(method.selector_)
    other.selector_.salience_ = normalize_salience(salience)
    return other


def jaccard(a: set[Any], b: set[Any]) -> float:
    return len(a & b) / max(1, len(a | b))


def fit_cahp(model: Any, calibration: Any, settings: dict[str, Any], progress: bool) -> tuple[Any, float]:
    start = time.perf_counter()
    method = get_method("cahp", **settings).fit(model, calibration, progress=progress)
    return method, time.perf_counter() - start


def stages(model: Any, calibration: Any, args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """Section ``stages``: per-stage seconds of both sweeps as ratios to a plain forward, and their agreement.

    Returns:
        ``(section, shared)``: the section and the fitted shared-sweep CAHP.
    """
    from cahp.scoring.base import get_scorer

    print(f"stages: {len(calibration)} examples, batch size {args.batch_size}", flush=True)
    plain_forward_seconds(model, calibration.subset(min(len(calibration), 4 * args.batch_size), 0), args.batch_size)
    forward = plain_forward_seconds(model, calibration, args.batch_size)
    print(f"  plain forward: {forward:.1f} s", flush=True)
    fits: dict[str, Any] = {}
    rows: dict[str, Any] = {}
    for sweep in ("separate", "shared"):
        method, seconds = fit_cahp(
            model, calibration, {"sweep": sweep, "batch_size": args.batch_size, "seed": args.seed}, args.progress
        )
        fits[sweep] = method
        stage = dict(method.stage_seconds_)
        rows[sweep] = {
            "stage_seconds": stage,
            "fit_seconds": round(seconds, 2),
            "ratio_to_forward": {name: round(value / forward, 3) for name, value in stage.items()},
            "signatures_and_salience_ratio": round((stage["signatures"] + stage["salience"]) / forward, 3),
            "k_star": int(method.k_star_),
            "calibration": method.calibration_,
        }
        print(f"  {sweep}: {stage} (x forward: {rows[sweep]['ratio_to_forward']})", flush=True)
    # the reference's own seed-to-seed variation: its salience with another seed
    other_seed = get_scorer("gradient", normalize_layers=False, fraction=0.25, seed=args.seed + 1)
    other_salience = other_seed.score(model, calibration)
    separate, shared = fits["separate"], fits["shared"]
    kept = {name: kept_heads(method) for name, method in fits.items()}
    agreement = {
        "salience_spearman_shared_vs_separate": float(
            spearmanr(shared.salience_.ravel(), separate.salience_.ravel())[0]
        ),
        "salience_spearman_separate_seed_vs_seed_plus_1": float(
            spearmanr(other_salience.ravel(), separate.salience_.ravel())[0]
        ),
        "profiles_max_abs_difference": float(np.abs(shared.selector_.profiles_ - separate.selector_.profiles_).max()),
        "same_k_star": bool(shared.k_star_ == separate.k_star_),
        "kept_heads_jaccard_shared_vs_separate": round(jaccard(kept["shared"], kept["separate"]), 3),
        "kept_heads_jaccard_separate_seed_vs_seed_plus_1": round(
            jaccard(kept_heads(with_salience(separate, other_salience)), kept["separate"]), 3
        ),
    }
    print(f"  agreement: {agreement}", flush=True)
    return {"plain_forward_seconds": round(forward, 2), "sweeps": rows, "agreement": agreement}, shared


def convergence(model: Any, calibration: Any, args: argparse.Namespace, full: Any | None) -> dict[str, Any]:
    """Section ``convergence``: a shared sweep that stops when the JM profiles settle, against the full shared
    fit ``full`` (fitted here when ``None``)."""
    settings = {
        "sweep": "shared",
        "batch_size": args.batch_size,
        "seed": args.seed,
        "converge_tol": args.converge_tol,
        "converge_window": args.converge_window,
        "converge_min_examples": args.converge_min_examples,
    }
    method, seconds = fit_cahp(model, calibration, settings, args.progress)
    record = dict(method.calibration_)
    print(f"  convergence: {record['examples']} of {record['examples_total']} examples", flush=True)
    if full is None:
        full, _ = fit_cahp(
            model, calibration, {"sweep": "shared", "batch_size": args.batch_size, "seed": args.seed}, args.progress
        )
    return {
        "settings": settings,
        "fit_seconds": round(seconds, 2),
        "stage_seconds": method.stage_seconds_,
        "calibration": record,
        "k_star": int(method.k_star_),
        "k_star_full_shared": int(full.k_star_),
        "kept_heads_jaccard_vs_full_shared": round(jaccard(kept_heads(method), kept_heads(full)), 3),
    }


def markdown(payload: dict[str, Any]) -> str:
    model = payload["model"].replace(str(cahp_home()), "$CAHP_HOME")
    lines = [
        "# Calibration cost of CAHP",
        "",
        f"Command: `{payload['command']}`  ",
        f"Model: `{model}`, task {payload['task']}, {payload['examples']} calibration examples, "
        f"{payload['threads']} threads, {payload['device']} ({payload['machine']}), {payload['date']}.",
        "",
    ]
    stage = payload.get("stages")
    if stage:
        lines += [
            "## Stages (ratio to a plain forward pass over the same examples)",
            "",
            f"Plain forward (eval, inference_mode, default attention): {stage['plain_forward_seconds']} s.",
            "",
            "| sweep | signatures | salience | selection | signatures + salience | k* |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in stage["sweeps"].items():
            seconds, ratio = row["stage_seconds"], row["ratio_to_forward"]
            lines.append(
                f"| {name} | {seconds['signatures']} s ({ratio['signatures']}x) | {seconds['salience']} s "
                f"({ratio['salience']}x) | {seconds['selection']} s ({ratio['selection']}x) | "
                f"{row['signatures_and_salience_ratio']}x | {row['k_star']} |"
            )
        lines += ["", "Agreement of the shared sweep with the reference:", ""]
        lines += [f"- {key}: {value}" for key, value in stage["agreement"].items()]
        lines.append("")
    converged = payload.get("convergence")
    if converged:
        record = converged["calibration"]
        lines += [
            "## Convergence",
            "",
            f"`converge_tol={converged['settings']['converge_tol']}`, window {converged['settings']['converge_window']}"
            f" batches: {record['examples']} of {record['examples_total']} examples ({record['batches']} batches), "
            f"converged: {record['converged']}; fit {converged['fit_seconds']} s; k* {converged['k_star']} (full: "
            f"{converged['k_star_full_shared']}); kept heads "
            f"Jaccard vs the full shared fit: {converged['kept_heads_jaccard_vs_full_shared']}.",
            "",
            "| batches | examples | relative change of the JM profiles |",
            "|---|---|---|",
        ]
        lines += [
            f"| {h['batches']} | {h['examples']} | {'-' if h['change'] is None else format(h['change'], '.4g')} |"
            for h in record["change_history"]
        ]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=str(DEFAULT_MODEL), help="fine-tuned classifier folder (default: %(default)s)"
    )
    parser.add_argument("--task", default="sst5", help="task whose calibration split is used (default: %(default)s)")
    parser.add_argument("--data-dir", default=None, help="folder of the shared data (default: $CAHP_DATA_DIR)")
    parser.add_argument(
        "--examples", type=int, default=None, help="seeded stratified subset (default: the whole split)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="calibration batch size (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="subset, salience and selection seed (default: 42)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--sections", nargs="+", default=["stages"], choices=["stages", "convergence"])
    parser.add_argument("--converge-tol", type=float, default=None, help="adds the convergence section")
    parser.add_argument("--converge-window", type=int, default=8, help="batches per convergence check")
    parser.add_argument("--converge-min-examples", type=int, default=512, help="never stop before this many")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    parser.add_argument("--out", default=str(RESULTS / "calibration"), help="output stem (default: %(default)s)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from cahp.data import load_task
    from cahp.models import load_classifier

    model, tokenizer = load_classifier(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    task = load_task(args.task, args.data_dir or os.environ.get("CAHP_DATA_DIR"))
    calibration = task_calibration(task, tokenizer, args.examples, args.seed, args.max_length, args.batch_size)
    payload: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/calibration.py", *sys.argv[1:]]),
        "model": args.model,
        "task": args.task,
        "examples": len(calibration),
        "threads": torch.get_num_threads(),
        "device": device,
        "machine": platform.processor() or platform.machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    sections = set(args.sections) | ({"convergence"} if args.converge_tol is not None else set())
    shared = None
    if "stages" in sections:
        payload["stages"], shared = stages(model, calibration, args)
    if "convergence" in sections:
        if args.converge_tol is None:
            parser.error("the convergence section needs --converge-tol")
        payload["convergence"] = convergence(model, calibration, args, shared)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), payload)
    text = markdown(payload)
    atomic_write(out.with_suffix(".md"), lambda temporary: temporary.write_text(text + "\n"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
