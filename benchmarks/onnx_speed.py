"""Does the pruning speedup survive in ONNX Runtime? Dense vs pruned CPU latency, ONNX Runtime next to PyTorch.

For each model, the heads to remove are chosen by the magnitude scorer (data-free, deterministic: global top-K of
per-head weight norms, every layer keeps at least one head) at 25/50/75% of the heads, and removed with
``cahp.surgery.prune_heads``. The dense model and every pruned copy are exported with ``cahp.surgery.export_onnx``
(dynamic batch and sequence axes) and run in ONNX Runtime with its default graph optimizations (ORT_ENABLE_ALL).
In ONE run, all variants of a model in both runtimes are timed interleaved (one call each per round, after
warm-up rounds), per batch size, on a full-length batch of random token ids. Each ONNX graph is checked against
PyTorch first (max abs logit difference).

Reported per variant and batch size: the median latency in PyTorch and in ONNX Runtime, the pruning speedup in
each runtime (dense median / pruned median), the FLOPs-ideal speedup (``total_flops``), each speedup as a share
of the ideal, and ONNX Runtime's speed relative to PyTorch on the same variant.

    nice python benchmarks/onnx_speed.py                      # minilm-l6 and mpnet-base, 25/50/75%, batch 1 and 32
    python benchmarks/onnx_speed.py --models minilm-l6 --fractions 0.5 --batch-sizes 1 --seq-len 32 \\
        --repeats 2 --out /tmp/onnx_smoke                         # a smoke run

Writes ``onnx_speed.json`` and ``onnx_speed.md`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import os

# Idle OpenMP threads must not spin either (ONNX Runtime runs between PyTorch's calls); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import datetime
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
import transformers
from transformers import AutoModelForSequenceClassification

from cahp.adapters import get_adapter
from cahp.evaluation.accounting import count_parameters, total_flops
from cahp.evaluation.latency import synthetic_batch
from cahp.methods.base import get_method
from cahp.methods.plan import Budget, Constraints
from cahp.models import resolve_model_path
from cahp.surgery import export_onnx, heads_to_remove, prune_heads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speedup import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"


def magnitude_variants(dense: Any, fractions: list[float]) -> tuple[dict[str, Any], dict[str, dict[str, list[int]]]]:
    """``{"dense": dense, "25%": pruned copy, ...}`` and the kept heads of each pruned copy."""
    method = get_method("magnitude", seed=0).fit(dense, None)
    variants, kept = {"dense": dense}, {}
    for fraction in fractions:
        label = f"{round(fraction * 100)}%"
        plan = method.plan(Budget.parse(f"sparsity={fraction}"), Constraints())
        variants[label] = prune_heads(copy.deepcopy(dense), heads_to_remove(dense, plan.kept_heads_by_layer))
        kept[label] = {str(layer): heads for layer, heads in sorted(plan.kept_heads_by_layer.items())}
    return variants, kept


def ort_session(model: Any, folder: Path, label: str, example: dict[str, torch.Tensor], threads: int) -> Any:
    """Export ``model`` and open it in ONNX Runtime (default optimizations, ``threads`` intra-op threads)."""
    path = export_onnx(model, folder / f"{label.strip('%')}.onnx", example)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Idle ONNX Runtime threads must not spin: PyTorch runs between its calls on the same cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_medians(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """Time every call once per round, ``warmup`` untimed rounds then ``repeats`` timed; median/min/max seconds."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    return {
        name: {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
        for name, times in samples.items()
    }


def benchmark_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    dense = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(name), num_labels=2).eval()
    adapter = get_adapter(dense)
    variants, kept = magnitude_variants(dense, args.fractions)
    example = synthetic_batch(dense, 2, 16, seed=args.seed)  # export example; timing uses other shapes
    started = time.time()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="onnx_speed_") as scratch, torch.inference_mode():
        sessions = {
            label: ort_session(model, Path(scratch), label, example, args.threads) for label, model in variants.items()
        }
        for batch_size in args.batch_sizes:
            batch = synthetic_batch(dense, batch_size, args.seq_len, seed=args.seed)
            feed = {key: value.numpy() for key, value in batch.items()}
            differences = {
                label: float(np.abs(sessions[label].run(None, feed)[0] - model(**batch).logits.numpy()).max())
                for label, model in variants.items()
            }
            calls: dict[str, Callable[[], Any]] = {}
            for label, model in variants.items():
                calls[f"torch {label}"] = lambda model=model, batch=batch: model(**batch)
                calls[f"ort {label}"] = lambda session=sessions[label], feed=feed: session.run(None, feed)
            timing = interleaved_medians(calls, args.repeats, args.warmup)
            dense_flops = total_flops(dense, args.seq_len)
            for label, model in variants.items():
                ideal = dense_flops / total_flops(model, args.seq_len)
                torch_s, ort_s = timing[f"torch {label}"]["median_s"], timing[f"ort {label}"]["median_s"]
                torch_speedup = timing["torch dense"]["median_s"] / torch_s
                ort_speedup = timing["ort dense"]["median_s"] / ort_s
                rows.append(
                    {
                        "variant": label,
                        "batch_size": batch_size,
                        "heads_kept": sum(map(len, kept.get(label, {}).values()))
                        or adapter.num_layers(dense) * adapter.num_heads(dense),
                        "parameters": count_parameters(model),
                        "total_flops_per_sequence": total_flops(model, args.seq_len),
                        "ideal_speedup": ideal,
                        "torch": timing[f"torch {label}"],
                        "ort": timing[f"ort {label}"],
                        "torch_speedup": torch_speedup,
                        "ort_speedup": ort_speedup,
                        "torch_over_ideal": torch_speedup / ideal,
                        "ort_over_ideal": ort_speedup / ideal,
                        "ort_vs_torch": torch_s / ort_s,
                        "max_abs_logit_diff": differences[label],
                    }
                )
    return {
        "model": name,
        "model_type": dense.config.model_type,
        "layers": adapter.num_layers(dense),
        "heads_per_layer": adapter.num_heads(dense),
        "kept_heads_by_layer": kept,
        "timing_seconds": round(time.time() - started, 1),
        "rows": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    setup = report["setup"]
    lines = [
        "# Pruning speedup in ONNX Runtime next to PyTorch (CPU)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{setup['threads']} threads in each runtime, {setup['seq_len']} tokens, median of {setup['repeats']} "
        f"interleaved rounds after {setup['warmup']} warm-up rounds, all variants and both runtimes in one run; "
        f"torch {setup['torch']}, onnxruntime {setup['onnxruntime']} (ORT_ENABLE_ALL), transformers "
        f"{setup['transformers']}, {setup['cpu']}; load average at start {setup['load_average_at_start']}. "
        "Heads removed by the magnitude scorer (global top-K of weight norms, every layer keeps one). "
        "Speedup = dense median / pruned median in the same runtime; ideal = dense FLOPs / pruned FLOPs.",
        "",
        "| model | removed | batch | PyTorch (ms) | ORT (ms) | ideal | PyTorch speedup | ORT speedup "
        "| PyTorch / ideal | ORT / ideal | ORT vs PyTorch | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in report["results"]:
        for row in result["rows"]:
            cells = [
                result["model"],
                row["variant"],
                str(row["batch_size"]),
                f"{row['torch']['median_s'] * 1000:.1f}",
                f"{row['ort']['median_s'] * 1000:.1f}",
                f"{row['ideal_speedup']:.3f}",
                f"{row['torch_speedup']:.3f}",
                f"{row['ort_speedup']:.3f}",
                f"{row['torch_over_ideal']:.2f}",
                f"{row['ort_over_ideal']:.2f}",
                f"{row['ort_vs_torch']:.2f}x",
                f"{row['max_abs_logit_diff']:.1e}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "ORT vs PyTorch: PyTorch median / ONNX Runtime median on the same variant (above 1: ONNX Runtime is faster).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm-l6", "mpnet-base"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    transformers.logging.set_verbosity_error()
    setup = {
        "threads": args.threads,
        "batch_sizes": args.batch_sizes,
        "seq_len": args.seq_len,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    command = shlex.join(["python", "benchmarks/onnx_speed.py", *sys.argv[1:]])
    results = []
    for name in args.models:
        print(f"{name}: exporting and timing dense and {len(args.fractions)} pruned copies ...", flush=True)
        results.append(benchmark_model(name, args))
    report = {"command": command, "setup": setup, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onnx_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "onnx_speed.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
