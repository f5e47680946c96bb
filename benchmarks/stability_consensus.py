"""How stable are CAHP's head count k* and kept heads? The faithful ``cahp`` against ``cahp-consensus``.

    CAHP_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python benchmarks/stability_consensus.py
    python benchmarks/stability_consensus.py --sizes 1000 --resamples 2 --method-seeds 2    # a quick check

For every calibration size (class-stratified training subsets; ``all`` = the whole training split, drawn once)
and every calibration resample seed ``r``, CAHP is fitted once through :class:`cahp.engine.Engine` (signatures
and salience, cached in ``$CAHP_HOME/stability_consensus/``) with the bench's settings (salience on every
calibration batch, salience seed 0). On those statistics each method seed ``m`` then gives

- the faithful CAHP: its single head-space run with seed ``m`` (t-SNE + FasterPAM MSS(k) sweep + knee), i.e.
  ``cahp`` with seed ``m``: :meth:`CAHPConsensus.from_cahp` with ``runs=1`` is exactly that run, which the script
  checks against the engine's own ``cahp`` fit for ``m = 0``;
- ``cahp-consensus`` with base seed ``m`` (``--runs`` runs, seeds ``m .. m + runs - 1``).

Method seeds therefore vary only the head space (t-SNE, FasterPAM); resamples vary the data. Reported per size
and method: every k*, the kept-head Jaccard between method seeds on the same calibration sample, between all
(resample, seed) selections, and against the reference selection (``--reference``, default ``all``; seed 0),
all at the auto budget. Results: ``benchmarks/results/stability_consensus.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_baselines import cahp_home
from stability import METHOD_SETTINGS

RESULTS = Path(__file__).resolve().parent / "results"
ALL = "all"


def parse_size(text: str) -> int | None:
    """``"all"`` -> ``None`` (the whole split), else a positive number of examples."""
    if text == ALL:
        return None
    size = int(text)
    if size < 1:
        raise argparse.ArgumentTypeError(f"a calibration size is a positive number or 'all', got {text!r}")
    return size


def mean_pairwise_jaccard(selections: list[dict[str, list[int]]]) -> float | None:
    """Mean kept-head Jaccard over every pair of selections (``None`` for fewer than two)."""
    from cahp.reporting.bench_report import jaccard

    pairs = list(itertools.combinations(selections, 2))
    return round(float(np.mean([jaccard(a, b) for a, b in pairs])), 3) if pairs else None


def kept(plan: Any) -> dict[str, list[int]]:
    return {str(layer): list(heads) for layer, heads in plan.kept_heads_by_layer.items()}


def fit_cahp(model: Any, tokenizer: Any, task: Any, size: int | None, resample: int, cache: Path) -> Any:
    """The faithful CAHP fitted on one calibration sample (seed 0, salience seed 0), from the engine's cache."""
    from cahp.engine import Engine, print_line, task_calibration

    calibration = task_calibration(task, tokenizer, size, resample, 128)
    settings = {**METHOD_SETTINGS["cahp"], "seed": 0, "salience_seed": 0}
    return Engine(model, calibration, cache_dir=cache, say=print_line).fit("cahp", settings)


def selections(fitted: Any, method_seeds: int, runs: int) -> dict[str, list[dict[str, Any]]]:
    """For each method seed: the faithful run's and the consensus' k and kept heads at the auto budget."""
    from cahp.methods import Budget
    from cahp.methods.cahp_consensus import CAHPConsensus

    out: dict[str, list[dict[str, Any]]] = {"cahp": [], "cahp-consensus": []}
    for seed in range(method_seeds):
        faithful = CAHPConsensus.from_cahp(fitted, runs=1, seed=seed)
        plan = faithful.plan(Budget.auto())
        if seed == fitted.seed and kept(plan) != kept(fitted.plan(Budget.auto())):
            raise RuntimeError("the single run differs from the engine's own cahp fit: the comparison is not faithful")
        out["cahp"].append({"seed": seed, "k": faithful.k_, "kept": kept(plan)})
        consensus = CAHPConsensus.from_cahp(fitted, runs=runs, seed=seed)
        plan = consensus.plan(Budget.auto())
        out["cahp-consensus"].append(
            {
                "seed": seed,
                "k": consensus.k_,
                "k_star_runs": consensus.k_stars_,
                "pac": round(consensus.pac_, 4),
                "kept": kept(plan),
                "seconds": consensus.consensus_seconds_,
            }
        )
    return out


def perturbation_stability(fitted: Any, draws: int, runs: int, scale: float = 1e-6) -> dict[str, list[float]]:
    """Kept-head Jaccard after multiplying the fitted profiles by ``1 + scale * N(0, 1)`` (seeded draws), seed 0.

    Uses the functions the method runs on its profiles (:func:`consensus_of_runs`, then CAHP's representatives and
    guardrail), at the auto budget; ``cahp`` is the single run with seed 0.
    """
    from cahp.methods.cahp_consensus import consensus_of_runs
    from cahp.reporting.bench_report import jaccard
    from cahp.selection.representatives import select_representatives

    profiles, salience = fitted.selector_.profiles_, fitted.selector_.salience_

    def kept_heads(values: np.ndarray, seeds: list[int]) -> dict[str, list[int]]:
        labels = consensus_of_runs(values, fitted, seeds).clustering.labels
        chosen = select_representatives(labels, salience, representative=fitted.representative)
        return {str(layer): heads for layer, heads in chosen.kept_heads_by_layer.items()}

    out: dict[str, list[float]] = {}
    for method, seeds in (("cahp", [0]), ("cahp-consensus", list(range(runs)))):
        base = kept_heads(profiles, seeds)
        out[method] = [
            round(
                jaccard(
                    base,
                    kept_heads(profiles * (1 + scale * np.random.default_rng(d).normal(size=profiles.shape)), seeds),
                ),
                3,
            )
            for d in range(draws)
        ]
    return out


def summarise(samples: dict[str, dict[int, dict[str, list[dict[str, Any]]]]], reference: dict[str, Any]) -> list[dict]:
    """One row per (size, method): k values and the three Jaccard views."""
    from cahp.reporting.bench_report import jaccard

    rows = []
    for size, by_resample in samples.items():
        for method in ("cahp", "cahp-consensus"):
            per_resample = [by_resample[r][method] for r in sorted(by_resample)]
            flat = [entry for entries in per_resample for entry in entries]
            within = [mean_pairwise_jaccard([e["kept"] for e in entries]) for entries in per_resample]
            within = [value for value in within if value is not None]
            against = [jaccard(e["kept"], reference[method]) for e in flat]
            row = {
                "size": size,
                "method": method,
                "k_by_resample": [[e["k"] for e in entries] for entries in per_resample],
                "jaccard_across_seeds": round(float(np.mean(within)), 3) if within else None,
                "jaccard_across_all": mean_pairwise_jaccard([e["kept"] for e in flat]),
                "jaccard_vs_reference_mean": round(float(np.mean(against)), 3),
                "jaccard_vs_reference_min": round(float(np.min(against)), 3),
            }
            perturbed = [value for e in flat for value in e.get("perturbed_jaccard", [])]
            if perturbed:
                row["jaccard_under_1e-6_mean"] = round(float(np.mean(perturbed)), 3)
                row["jaccard_under_1e-6_min"] = round(float(np.min(perturbed)), 3)
            if method == "cahp-consensus":
                row["pac_mean"] = round(float(np.mean([e["pac"] for e in flat])), 3)
                row["k_star_runs_range"] = [
                    min(min(e["k_star_runs"]) for e in flat),
                    max(max(e["k_star_runs"]) for e in flat),
                ]
            rows.append(row)
    return rows


def write_markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# CAHP stability: faithful `cahp` against `cahp-consensus`",
        "",
        f"{payload['model']} on {payload['task']}, auto budget (the knee). Each calibration sample (size x resample "
        "seed) is fitted once; method seeds vary the head space only (t-SNE, FasterPAM). `cahp` is the faithful single "
        f"run; `cahp-consensus` takes {payload['runs']} runs per seed. Jaccard: overlap of the kept heads (1 = same "
        "heads). Across seeds: between method seeds on the same sample (mean over samples); across all: between "
        "every (resample, seed) selection of the size; vs reference: against the reference selection (default: the "
        "whole split) of the same "
        "method with seed 0. Under 1e-6: the kept heads after multiplying the fitted profiles by 1 + 1e-6 N(0, 1) "
        "(seed 0; mean and worst over samples and draws) against the unperturbed ones. PAC: share of head pairs the "
        "consensus runs disagree on (0.1 < C < 0.9).",
        "",
        "| size | method | k per resample (by seed) | Jaccard across seeds | Jaccard across all | vs reference, "
        "mean | vs reference, worst | under 1e-6, mean | under 1e-6, worst | consensus PAC |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in payload["rows"]:
        ks = "; ".join(",".join(map(str, ks)) for ks in row["k_by_resample"])
        across = "—" if row["jaccard_across_seeds"] is None else f"{row['jaccard_across_seeds']:.3f}"
        across_all = "—" if row["jaccard_across_all"] is None else f"{row['jaccard_across_all']:.3f}"
        pac = f"{row['pac_mean']:.3f}" if "pac_mean" in row else "—"
        perturbed = (
            f"{row['jaccard_under_1e-6_mean']:.3f} | {row['jaccard_under_1e-6_min']:.3f}"
            if "jaccard_under_1e-6_mean" in row
            else "— | —"
        )
        lines.append(
            f"| {row['size']} | {row['method']} | {ks} | {across} | {across_all} | "
            f"{row['jaccard_vs_reference_mean']:.3f} | {row['jaccard_vs_reference_min']:.3f} | {perturbed} | {pac} |"
        )
    lines += [
        "",
        f"Reference ({payload['reference_size']} examples, seed 0) k: {payload['reference_k']}. "
        f"Took {payload['seconds']} s.",
        "",
    ]
    lines += [f"Command: `{payload['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="fine-tuned model (default: MiniLM-L6 on SST-5)")
    parser.add_argument("--task", default="sst5")
    parser.add_argument("--sizes", nargs="+", default=["1000", "2000", "4000", ALL], help="examples, or 'all'")
    parser.add_argument("--resamples", type=int, default=3, help="calibration resample seeds 0 .. R-1")
    parser.add_argument("--method-seeds", type=int, default=3, help="method seeds 0 .. M-1")
    parser.add_argument("--runs", type=int, default=11, help="cahp-consensus runs")
    parser.add_argument("--perturbations", type=int, default=3, help="1e-6 profile perturbations per sample")
    parser.add_argument("--reference", default=ALL, help="calibration size of the reference selection (resample 0)")
    parser.add_argument("--out", type=Path, default=RESULTS / "stability_consensus")
    args = parser.parse_args(argv)
    for text in [*args.sizes, args.reference]:
        parse_size(text)
    from cahp.data import load_task
    from cahp.errors import CahpError
    from cahp.models import load_classifier
    from cahp.outputs import atomic_write, write_json

    model_dir = args.model_dir or cahp_home() / "finetuned" / f"minilm-l6-{args.task}"
    if not (model_dir / "config.json").is_file():
        raise CahpError(f"no fine-tuned model in {model_dir}: run benchmarks/finetune_baselines.py or pass --model-dir")
    start = time.perf_counter()
    task = load_task(args.task)
    model, tokenizer = load_classifier(str(model_dir), task.num_labels, task.label_names)
    model.eval()
    cache = cahp_home() / "stability_consensus" / f"{model_dir.name}"
    samples: dict[str, dict[int, dict[str, list[dict[str, Any]]]]] = {}
    jobs = [(text, r) for text in args.sizes for r in (range(1) if text == ALL else range(args.resamples))]
    if args.reference not in args.sizes:
        jobs.append((args.reference, 0))
    for number, (text, resample) in enumerate(jobs, 1):
        print(f"[{number}/{len(jobs)}] size {text}, resample {resample}", flush=True)
        fitted = fit_cahp(model, tokenizer, task, parse_size(text), resample, cache)
        if text == args.reference and resample == 0:
            reference_fit = fitted
        if text in args.sizes:
            samples.setdefault(text, {})[resample] = selections(fitted, args.method_seeds, args.runs)
            if args.perturbations:
                jaccards = perturbation_stability(fitted, args.perturbations, args.runs)
                for method, values in jaccards.items():
                    samples[text][resample][method][0]["perturbed_jaccard"] = values
    reference = selections(reference_fit, 1, args.runs)
    reference_kept = {method: entries[0]["kept"] for method, entries in reference.items()}
    payload = {
        "model": model_dir.name,
        "task": args.task,
        "runs": args.runs,
        "resamples": args.resamples,
        "method_seeds": args.method_seeds,
        "sizes": args.sizes,
        "reference_size": args.reference,
        "reference_k": {method: entries[0]["k"] for method, entries in reference.items()},
        "reference_heads_kept": {method: sum(map(len, kept.values())) for method, kept in reference_kept.items()},
        "heads_total": int(reference_fit.grid_.total),
        "rows": summarise(samples, reference_kept),
        "samples": samples,
        "seconds": round(time.perf_counter() - start, 1),
        "command": "".join(
            f"{name}={os.environ[name]} " for name in ("CAHP_DATA_DIR", "OMP_NUM_THREADS") if name in os.environ
        )
        + shlex.join(["python", "benchmarks/stability_consensus.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), payload)
    markdown = write_markdown(payload)
    atomic_write(args.out.with_suffix(".md"), lambda temporary: temporary.write_text(markdown))
    print(markdown)
    return payload


if __name__ == "__main__":
    main()
