"""Ranking stability: how much does each method's choice of heads move from one run to the next?

    python benchmarks/stability.py                                  # MiniLM-L6 on SST-5 and MNLI
    python benchmarks/stability.py --rows minilm-l6:sst5 --runs 3 --budget 0.3

Run ``r`` (``r = 0 .. runs-1``) scores the fine-tuned baseline of ``finetune_baselines.py`` on its own
calibration sample (``calibration_size`` training examples, class-stratified, drawn with seed ``r``) with the
method's seed ``r``: the variation a user sees when rerunning a method on other data. Methods without
randomness of their own (gradient, hies, fisher, ...) vary through the data only.

For every pair of runs the script reports
- Spearman's rank correlation of the ``[layers, heads]`` scores (head scorers; CAHP has no ranking), and
- the Jaccard overlap of the heads kept at the budget (top-K with the one-head-per-layer guardrail; CAHP:
  its representatives with K clusters), and for CAHP the adjusted Rand index of its K clusters,
averaged over the pairs. Scores are cached per run in ``$CAHP_HOME/stability/<model>-<task>/``, the table
goes to ``benchmarks/results/stability.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_baselines import cahp_home, ensure_finetuned

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = [("minilm-l6", "sst5"), ("minilm-l6", "mnli")]
#: Settings as in the bench grids (CAHP's salience on every calibration batch), the seed being the run's.
METHOD_SETTINGS = {"cahp": {"salience_settings": {"fraction": 1.0}}}
METHODS = ["cahp", "random", "magnitude", "entropy", "gradient", "hies", "attattr", "fisher", "l0", "dsp"]


def score_run(model, tokenizer, task, method: str, run: int, keep: int, calibration_size: int) -> dict:
    """One run of ``method`` through the engine: its scores (head scorers) and the heads it keeps at ``keep``."""
    from cahp.engine import Engine, task_calibration
    from cahp.methods import Budget

    calibration = task_calibration(task, tokenizer, calibration_size, run, 128)
    start = time.perf_counter()
    settings = {**METHOD_SETTINGS.get(method, {}), "seed": run}
    fitted = Engine(model, calibration).fit(method, settings, Budget.keep(keep))
    plan = fitted.plan(Budget.keep(keep))
    seconds = time.perf_counter() - start
    if hasattr(fitted, "scores_"):
        return {"scores": fitted.scores_.tolist(), "kept": plan.kept_heads_by_layer, "seconds": seconds}
    clusters = plan.details["clusters"]
    return {
        "scores": None,
        "kept": plan.kept_heads_by_layer,
        "clusters": clusters,
        "k_star": fitted.k_star_,
        "seconds": seconds,
    }


def run_row(model_name: str, task_name: str, methods: list[str], runs: int, budget: float, size: int) -> dict:
    from cahp.data import load_task
    from cahp.methods import Budget
    from cahp.models import load_classifier

    folder = ensure_finetuned(model_name, task_name)
    task = load_task(task_name, protocol="offline") if task_name == "mnli" else load_task(task_name)
    model, tokenizer = load_classifier(str(folder), task.num_labels, task.label_names)
    n_heads = int(model.config.num_hidden_layers * model.config.num_attention_heads)
    keep = Budget.sparsity(1.0 - budget).heads(n_heads)
    cache = cahp_home() / "stability" / f"{model_name}-{task_name}"
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in methods:
        results = []
        for run in range(runs):
            path = cache / f"{method}__keep{keep}__size{size}__run{run}.json"
            if not path.is_file():
                print(f"{model_name} {task_name}: {method} run {run + 1}/{runs}", flush=True)
                result = score_run(model, tokenizer, task, method, run, keep, size)
                result["kept"] = {str(layer): heads for layer, heads in result["kept"].items()}
                path.write_text(json.dumps(result))
            results.append(json.loads(path.read_text()))
        from scipy.stats import spearmanr
        from sklearn.metrics import adjusted_rand_score

        from cahp.reporting.bench_report import jaccard

        pairs = list(itertools.combinations(range(runs), 2))
        overlaps = [jaccard(results[a]["kept"], results[b]["kept"]) for a, b in pairs]
        row = {
            "method": method,
            "jaccard_mean": round(float(np.mean(overlaps)), 3),
            "jaccard_min": round(float(np.min(overlaps)), 3),
            "seconds_per_run": round(float(np.mean([r["seconds"] for r in results])), 1),
        }
        if results[0]["scores"] is not None:
            rhos = [
                spearmanr(np.ravel(results[a]["scores"]), np.ravel(results[b]["scores"])).statistic for a, b in pairs
            ]
            row["spearman_mean"] = round(float(np.mean(rhos)), 3)
        else:
            row["k_star"] = [r["k_star"] for r in results]
            rand = [adjusted_rand_score(results[a]["clusters"], results[b]["clusters"]) for a, b in pairs]
            row["cluster_ari_mean"] = round(float(np.mean(rand)), 3)
        rows.append(row)
    return {
        "model": model_name,
        "task": task_name,
        "protocol": task.protocol if task.name == "mnli" else None,
        "heads_total": n_heads,
        "keep": keep,
        "budget": budget,
        "runs": runs,
        "calibration_size": size,
        "methods": rows,
    }


def write_table(results: dict) -> None:
    lines = [
        "# Ranking stability across runs",
        "",
        "Each run scores the fine-tuned model on its own class-stratified calibration sample, with its own",
        "seed. The table reports the mean over pairs of runs. Spearman is the rank correlation of the head",
        "scores. Jaccard is the overlap of the kept heads at the budget: 1 means the same heads every time;",
        "random choices give about K / (2N - K). CAHP ranks nothing; its row gives the agreement of its",
        "K clusters between runs instead (adjusted Rand index: 1 = the same partition, 0 = chance).",
        "",
    ]
    for row in results["rows"]:
        protocol = f", {row['protocol']} protocol" if row["protocol"] else ""
        lines += [
            f"## {row['model']} on {row['task']}{protocol}: keep {row['keep']} of {row['heads_total']} heads, "
            f"{row['runs']} runs x {row['calibration_size']} examples",
            "",
            "| method | Spearman, mean | Jaccard of kept heads, mean | Jaccard, worst pair | seconds per run |",
            "|---|---:|---:|---:|---:|",
        ]
        for m in row["methods"]:
            if "spearman_mean" in m:
                spearman = f"{m['spearman_mean']:.3f}"
            else:
                spearman = f"— (clusters: adjusted Rand {m['cluster_ari_mean']:.2f}; k* per run {m['k_star']})"
            lines.append(
                f"| {m['method']} | {spearman} | {m['jaccard_mean']:.3f} | {m['jaccard_min']:.3f} | "
                f"{m['seconds_per_run']} |"
            )
        lines += ["", f"Command: `{row['command']}`", ""]
    (RESULTS / "stability.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=None, help="model:task pairs (default: all)")
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.3, help="share of heads kept")
    parser.add_argument("--calibration-size", type=int, default=512)
    args = parser.parse_args()
    rows = [tuple(r.split(":")) for r in args.rows] if args.rows else ROWS
    path = RESULTS / "stability.json"
    previous = json.loads(path.read_text())["rows"] if path.is_file() else []
    results = {r["model"] + ":" + r["task"]: r for r in previous}
    options = [  # the options given other than their defaults, for each row's command
        f"--{name.replace('_', '-')} {' '.join(map(str, value)) if isinstance(value, list) else value}"
        for name in ("methods", "runs", "budget", "calibration_size")
        if (value := getattr(args, name)) != parser.get_default(name)
    ]
    for model_name, task_name in rows:
        row = run_row(model_name, task_name, args.methods, args.runs, args.budget, args.calibration_size)
        row["command"] = " ".join([f"python benchmarks/stability.py --rows {model_name}:{task_name}", *options])
        results[f"{model_name}:{task_name}"] = row
    payload = {"rows": list(results.values())}
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    write_table(payload)
    print((RESULTS / "stability.md").read_text())


if __name__ == "__main__":
    main()
