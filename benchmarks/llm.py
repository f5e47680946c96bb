"""Decoder benchmark: SmolLM2-135M-Instruct, retraining-free head pruning on the language-modelling objective.

Every cell is measured in ONE process on ONE CPU thread (``torch.set_num_threads(1)``): the dense model, then each
method at each budget. Methods are fitted once on the calibration blocks (:class:`cahp.engine.Engine`) and planned
at every budget. Budgets (SmolLM2: 30 layers x 9 query heads in 3 key-value groups = 270 query / 90 KV heads):

* ``groups`` mode with uniform layers (whole key-value groups, the same number in every layer): 1 of 3 groups
  removed (keep=180) and 2 of 3 removed (keep=90). Without uniform layers the guardrail (every layer keeps a
  group) adds groups beyond the budget, by a different amount for each method, so sizes would not match;
* ``uniform`` mode with uniform layers (the same query heads in every group and layer; the KV cache stays):
  6 of 9 query heads kept per layer (keep=180) and 3 of 9 (keep=90).

Per cell: perplexity on the evaluation blocks (MNLI premises, mismatched: the offline stand-in for WikiText-2),
zero-shot SST-2 accuracy and macro-F1 (validation subset, label words " negative" / " positive"), KV-cache bytes per
token, parameters, and greedy continuations of three fixed prompts. Prefill latency and generation tokens/s
(batch 1 and 8) are measured once per budget on one method's model against the dense one, interleaved (the
structure, not the method, sets the speed).

    OMP_NUM_THREADS=1 CAHP_DATA_DIR=../shared/data nice python benchmarks/llm.py
    OMP_NUM_THREADS=1 CAHP_DATA_DIR=../shared/data nice python benchmarks/llm.py --eval-blocks 8 --sst2-examples 40
    OMP_NUM_THREADS=1 CAHP_DATA_DIR=../shared/data nice python benchmarks/llm.py --methods hies   # one more method

Every registered method but CAHP runs on the LM objective; ``attattr``, ``l0`` and ``dsp`` cost hours at their
default settings (:data:`SLOW`) and run only when ``--methods`` names them. CAHP compares classes: its row says so
and points to the fine-tuned classifier (benchmarks/llm_classifier.py).

Cells are cached in ``benchmarks/results/llm_cells.json`` (rerun to resume; ``--fresh`` to recompute). Writes
``benchmarks/results/llm.json``, ``llm.md`` and ``llm.png``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cahp.calibration import lm_calibration
from cahp.data import load_task
from cahp.data.lm import load_blocks
from cahp.engine import Engine
from cahp.evaluation.accounting import count_parameters
from cahp.evaluation.generation import greedy_continuations, kv_cache_bytes_per_token, measure_generation
from cahp.evaluation.perplexity import perplexity
from cahp.evaluation.prompted import default_prompt, evaluate_prompted
from cahp.methods import Budget, Constraints
from cahp.models import load_causal_lm
from cahp.outputs import write_json
from cahp.surgery import heads_to_remove, kept_heads_by_layer, kept_kv_heads_by_layer, prune_heads
from cahp.train.finetune import subsample
from cahp.workloads.causal_lm import corpus_label

RESULTS = Path(__file__).resolve().parent / "results"

#: (name, gqa mode, uniform layers, heads kept of 270, what it means)
BUDGETS: list[tuple[str, str, bool, int, str]] = [
    ("groups-1of3", "groups", True, 180, "1 of 3 KV groups removed in every layer (60 of 90 KV heads kept)"),
    ("groups-2of3", "groups", True, 90, "2 of 3 KV groups removed in every layer (30 of 90 KV heads kept)"),
    ("uniform-6of9", "uniform", True, 180, "6 of 9 query heads kept per layer (2 per group; all KV heads kept)"),
    ("uniform-3of9", "uniform", True, 90, "3 of 9 query heads kept per layer (1 per group; all KV heads kept)"),
]
METHODS = ("random", "magnitude", "gradient", "fisher", "entropy", "hies", "attattr", "l0", "dsp")
#: Methods that run on the LM objective (tests/unit/test_language_modeling.py) but cost hours here at their default
#: settings, so ``--methods`` leaves them out unless named. Estimates from one fwd+bwd pass over the 16 calibration
#: blocks (~28 s on one thread: fisher's fit, from its cell time minus an evaluation-only cell's).
SLOW: dict[str, str] = {
    "attattr": "integrated gradients: layers x steps = 30 x 20 = 600 fwd+bwd passes over the calibration blocks, "
    "about 4.7 h",
    "l0": "150 gate-training steps of 16 blocks x 256 tokens (one fwd+bwd each), about 70 min",
    "dsp": "150 training steps of 16 blocks (one fwd+bwd each) per head count, two head counts (180, 90): about 2.3 h",
}
#: Methods that cannot run on the LM objective at all.
NOT_APPLICABLE: dict[str, str] = {
    "cahp": "compares classes, and the language-modelling objective has none; see the fine-tuned classifier rows in "
    "llm_classifier.md (CAHP vs random on SmolLM2 with an SST-2 head)",
}
TIMED_METHOD = "fisher"  # whose pruned model is timed against the dense one, per budget

#: Published anchor (different model, corpus and tokenizer: only the shape of the effect compares).
ANCHOR = (
    "LLM-Pruner (Ma et al., 2023), LLaMA-7B, 20% of parameters removed (structured: heads and MLP channels), "
    "no recovery: WikiText-2 perplexity 12.62 -> 19.09"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        default=",".join(m for m in METHODS if m not in SLOW),
        help=f"comma-separated methods (default: all but the slow {', '.join(SLOW)})",
    )
    parser.add_argument("--calibration-blocks", type=int, default=16)
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--context-length", type=int, default=256)
    parser.add_argument("--sst2-examples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of prefill and generation")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--fresh", action="store_true", help="ignore cached cells")
    return parser.parse_args()


def quality(model: Any, tokenizer: Any, blocks: Any, sst2: Any, columns: Any) -> dict[str, Any]:
    """Perplexity, zero-shot SST-2, KV bytes/token, parameters and continuations of one model."""
    ppl = perplexity(model, tokenizer, blocks, batch_size=8)
    prompted = evaluate_prompted(model, tokenizer, sst2, default_prompt("sst2"), columns, batch_size=16)
    kv = kv_cache_bytes_per_token(model)
    return {
        "perplexity": ppl["perplexity"],
        "nll": ppl["nll"],
        "tokens": ppl["tokens"],
        "sst2_accuracy": prompted["accuracy"],
        "sst2_macro_f1": prompted["macro_f1"],
        "sst2_predicted_counts": prompted["predicted_counts"],
        "sst2_label_word_mass": prompted["label_word_mass"],
        "kv_bytes_per_token": kv["bytes_per_token"],
        "kv_heads": kv["kv_heads"],
        "parameters": count_parameters(model),
        "continuations": [c["continuation"] for c in greedy_continuations(model, tokenizer, max_new_tokens=12)],
    }


def main() -> int:
    args = parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells_path = out / "llm_cells.json"
    settings = {key: value for key, value in vars(args).items() if key not in ("out", "fresh")}
    cached: dict[str, Any] = {}
    budget_names = {name for name, *_ in BUDGETS}
    if cells_path.is_file() and not args.fresh:
        stored = json.loads(cells_path.read_text())
        same = {k: v for k, v in stored.get("settings", {}).items() if k != "methods"} == {
            k: v for k, v in settings.items() if k != "methods"
        }
        cached = stored["cells"] if same else {}  # cells of other methods stay (a subset reruns nothing)
        cached = {key: cell for key, cell in cached.items() if key == "dense" or cell.get("budget") in budget_names}

    def save_cells() -> None:
        write_json(cells_path, {"settings": settings, "cells": cached})

    start = time.perf_counter()
    model, tokenizer = load_causal_lm("smollm2-135m")
    calibration_blocks = load_blocks(
        tokenizer, "mnli-premises", "calibration", context_length=args.context_length,
        max_blocks=args.calibration_blocks, data_dir=args.data_dir,
    )  # fmt: skip
    eval_blocks = load_blocks(
        tokenizer, "mnli-premises", "evaluation", context_length=args.context_length,
        max_blocks=args.eval_blocks, data_dir=args.data_dir,
    )  # fmt: skip
    task = load_task("sst2", args.data_dir)
    sst2 = subsample(task.split("validation"), args.sst2_examples, args.seed)
    engine = Engine(model, lm_calibration(calibration_blocks, tokenizer, batch_size=4), say=print)

    if "dense" not in cached:
        t = time.perf_counter()
        cached["dense"] = {**quality(model, tokenizer, eval_blocks, sst2, task.text_columns)}
        cached["dense"]["seconds"] = round(time.perf_counter() - t, 1)
        save_cells()
    print(f"dense: perplexity {cached['dense']['perplexity']:.2f}, sst2 {cached['dense']['sst2_accuracy']:.3f}")

    fit_seconds: dict[str, float] = {}
    for method in args.methods.split(","):
        for name, gqa_mode, uniform_layers, keep, _ in BUDGETS:
            key = f"{method}/{name}"
            if key in cached:
                continue
            t = time.perf_counter()
            plan = engine.plan(
                method,
                {"seed": args.seed},
                Budget.keep(keep),
                Constraints.from_options(False, uniform_layers, gqa_mode),
            )
            fit_seconds.setdefault(method, round(time.perf_counter() - t, 1))
            pruned = copy.deepcopy(model)
            prune_heads(pruned, heads_to_remove(pruned, plan.kept_heads_by_layer, gqa_mode), gqa_mode=gqa_mode)
            cell = quality(pruned, tokenizer, eval_blocks, sst2, task.text_columns)
            cell.update(
                method=method,
                budget=name,
                heads_kept=sum(len(h) for h in kept_heads_by_layer(pruned).values()),
                kv_heads_kept=sum(len(h) for h in kept_kv_heads_by_layer(pruned).values()),
                kept_heads_by_layer={str(k): v for k, v in kept_heads_by_layer(pruned).items()},
                seconds=round(time.perf_counter() - t, 1),
            )
            if method == TIMED_METHOD:
                cell["generation"] = measure_generation(
                    {"dense": model, "pruned": pruned},
                    batch_sizes=(1, 8),
                    prompt_tokens=args.prompt_tokens,
                    new_tokens=args.new_tokens,
                    repeats=args.repeats,
                    pad_token_id=int(tokenizer.pad_token_id),
                )
            cached[key] = cell
            save_cells()
            print(f"{key}: perplexity {cell['perplexity']:.2f}, sst2 {cell['sst2_accuracy']:.3f} ({cell['seconds']} s)")
            del pruned

    result = {
        "model": "smollm2-135m (SmolLM2-135M-Instruct, GGUF Q4_1 de-quantized to fp32)",
        "command": "OMP_NUM_THREADS=1 CAHP_DATA_DIR=../shared/data python "
        + shlex.join(["benchmarks/llm.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1},
        "settings": settings,
        "evaluation_corpus": {**eval_blocks.describe(), "label": corpus_label(eval_blocks.describe())},
        "calibration_corpus": calibration_blocks.describe(),
        "sst2": {"split": "validation", "examples": len(sst2), "prompt": default_prompt("sst2").template},
        "budgets": [
            {"name": n, "gqa_mode": g, "uniform_layers": u, "keep": k, "meaning": m} for n, g, u, k, m in BUDGETS
        ],
        "anchor": ANCHOR,
        "cells": cached,
        "wall_seconds_this_run": round(time.perf_counter() - start, 1),
    }
    write_json(out / "llm.json", result)
    markdown = out / "llm.md"
    analysis = _kept_analysis(markdown.read_text() if markdown.is_file() else "")
    markdown.write_text(render_markdown(result).replace("ANALYSIS_PLACEHOLDER", analysis))
    plot(result, out / "llm.png")
    print(f"wrote {out / 'llm.json'}, {out / 'llm.md'} and {out / 'llm.png'}")
    return 0


def render_markdown(result: dict[str, Any]) -> str:
    """The results table (a view of llm.json)."""
    cells, dense = result["cells"], result["cells"]["dense"]
    lines = [
        "# SmolLM2-135M-Instruct: retraining-free head pruning on the language-modelling objective",
        "",
        f"Command: `{result['command']}` ({result['date']}, CPU, one thread).",
        "",
        f"Perplexity: {result['evaluation_corpus']['blocks']} blocks of {result['evaluation_corpus']['context_length']}"
        f" tokens of {result['evaluation_corpus']['label']}. SST-2: zero-shot on {result['sst2']['examples']} "
        f"validation examples, prompt `{result['sst2']['prompt']!r}`, label words ` negative` / ` positive`. "
        f"Calibration: {result['calibration_corpus']['blocks']} blocks of MNLI premises (matched).",
        "",
        "| method | budget | heads kept | KV heads | KV bytes/token | params (M) | perplexity | SST-2 acc | "
        "SST-2 macro-F1 |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| dense | - | 270 | {dense['kv_heads']} | {dense['kv_bytes_per_token']:,} | "
        f"{dense['parameters'] / 1e6:.1f} | {dense['perplexity']:.2f} | {dense['sst2_accuracy']:.3f} | "
        f"{dense['sst2_macro_f1']:.3f} |",
    ]
    for budget in result["budgets"]:
        for key, cell in cells.items():
            if key == "dense" or cell["budget"] != budget["name"]:
                continue
            lines.append(
                f"| {cell['method']} | {budget['name']} | {cell['heads_kept']} | {cell['kv_heads_kept']} | "
                f"{cell['kv_bytes_per_token']:,} ({cell['kv_bytes_per_token'] / dense['kv_bytes_per_token']:.2f}x) | "
                f"{cell['parameters'] / 1e6:.1f} | {cell['perplexity']:.2f} | {cell['sst2_accuracy']:.3f} | "
                f"{cell['sst2_macro_f1']:.3f} |"
            )
    for method, why in NOT_APPLICABLE.items():
        lines.append(f"| {method} | - | does not apply: {why} | | | | | | |")
    measured = {cell.get("method") for cell in cells.values()}
    for method, cost in SLOW.items():
        if method not in measured:
            lines.append(f"| {method} | - | not run (too slow for this budget at its default settings: {cost}) "
                         "| | | | | | |")  # fmt: skip
    lines += ["", "Budgets:", ""] + [f"- `{b['name']}`: {b['meaning']}" for b in result["budgets"]]
    lines += [
        "",
        f"## Speed ({TIMED_METHOD}'s pruned model vs dense, interleaved in one run, CPU, one thread)",
        "",
        "| budget | prefill b1 (pruned/dense) | prefill b8 | tokens/s b1 (pruned/dense) | tokens/s b8 |",
        "|---|---|---|---|---|",
    ]
    for budget in result["budgets"]:
        cell = cells.get(f"{TIMED_METHOD}/{budget['name']}")
        if not cell or "generation" not in cell:
            continue
        rows = cell["generation"]["by_batch"]
        lines.append(
            f"| {budget['name']} | {rows['1']['prefill_ratio']:.2f} | {rows['8']['prefill_ratio']:.2f} | "
            f"{rows['1']['tokens_per_second_ratio']:.2f} | {rows['8']['tokens_per_second_ratio']:.2f} |"
        )
    any_timed = next((c for k, c in cells.items() if k.startswith(TIMED_METHOD) and "generation" in c), None)
    if any_timed:
        generation = any_timed["generation"]
        dense_rows = generation["by_batch"]
        lines += [
            "",
            f"Prompt {generation['prompt_tokens']} tokens, {generation['new_tokens']} new tokens (greedy), median of "
            f"{generation['repeats']}. Dense absolute: prefill {dense_rows['1']['dense']['prefill_seconds'] * 1e3:.0f}"
            f" ms (b1), {dense_rows['8']['dense']['prefill_seconds'] * 1e3:.0f} ms (b8); generation "
            f"{dense_rows['1']['dense']['tokens_per_second']:.1f} tokens/s (b1), "
            f"{dense_rows['8']['dense']['tokens_per_second']:.1f} tokens/s (b8).",
        ]
    lines += ["", "## Greedy continuations (12 tokens)", ""]
    prompts = ("The capital of France is", "To make a cup of tea, you", "The three primary colors are")
    shown = ["dense", *[f"{TIMED_METHOD}/{b['name']}" for b in result["budgets"]]]
    for index, prompt in enumerate(prompts):
        lines.append(f"- `{prompt}`")
        for key in shown:
            if key in cells:
                lines.append(f"  - {key}: `{cells[key]['continuations'][index]!r}`")
    lines += ["", "## Comparison with published numbers", "", f"Anchor: {result['anchor']}.", ""]
    lines.append("ANALYSIS_PLACEHOLDER")
    return "\n".join(lines) + "\n"


def _kept_analysis(previous: str) -> str:
    """The hand-written analysis of an earlier llm.md (from its ``## Analysis`` heading on), kept on a rerun."""
    marker = "\n## Analysis"
    if marker in previous:
        return previous[previous.index(marker) + 1 :].rstrip()
    return "## Analysis\n\nNot written yet."


def plot(result: dict[str, Any], path: Path) -> None:
    """Perplexity (log scale) and SST-2 accuracy per method and budget, dense as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, dense = result["cells"], result["cells"]["dense"]
    budgets = [b["name"] for b in result["budgets"]]
    methods = sorted({c["method"] for k, c in cells.items() if k != "dense"})
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(len(methods), 1)
    for offset, method in enumerate(methods):
        xs = [i + offset * width for i in range(len(budgets))]
        ppl = [cells.get(f"{method}/{b}", {}).get("perplexity", float("nan")) for b in budgets]
        acc = [cells.get(f"{method}/{b}", {}).get("sst2_accuracy", float("nan")) for b in budgets]
        left.bar(xs, ppl, width, label=method)
        right.bar(xs, acc, width, label=method)
    for axis, value, title in (
        (left, dense["perplexity"], "perplexity (MNLI premises, log scale)"),
        (right, dense["sst2_accuracy"], "SST-2 zero-shot accuracy"),
    ):
        axis.axhline(value, color="black", linestyle="--", label="dense")
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(budgets))], budgets, fontsize=8)
        axis.set_title(title)
    left.set_yscale("log")
    right.axhline(0.5, color="grey", linestyle=":", label="chance")
    right.legend(fontsize=7)
    figure.suptitle("SmolLM2-135M-Instruct, retraining-free head pruning")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
