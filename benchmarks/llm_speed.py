"""Where head and key-value group removal pays in a decoder: long contexts and large batches, in PyTorch and in
llama.cpp. Dense SmolLM2-135M against two prunes of ``gguf_smollm2.py`` (the same folders, made when missing):
``uniform`` (6 of 9 query heads in every layer, every key-value head kept: the KV cache is unchanged) and
``uneven`` (whole key-value groups, 180 of 270 heads: a third of the KV cache goes).

    OMP_NUM_THREADS=2 CAHP_DATA_DIR=../shared/data python benchmarks/llm_speed.py   # --threads 2: both cores

Measured, per model, interleaved (dense, uniform, uneven, dense, ...) so that load changes on the machine hit every
model alike, ``--repeats`` times (one warm-up round first, at the shortest context); each figure is the median
with its range (min-max):

* **prefill**: one forward over ``L - D`` tokens that fills the cache, at ``L`` in ``--contexts`` (batch 1), and
  (PyTorch) over the first context at batch ``--batch``;
* **decode**: then ``D`` (``--decode-tokens``) steps, one token each, ending at ``L`` tokens of context, as
  tokens/s, at batch 1 and (PyTorch) batch ``--batch`` (a copy of the prefilled cache repeated ``--batch`` times);
* **KV cache**: bytes for the context, counted from the kept key-value heads and measured on PyTorch's real
  cache (fp32), and llama.cpp's own size of its default f16 cache with flash attention on and off (without it,
  llama.cpp pads every layer's V cache to the widest layer, so removed key-value heads save only on K).

Next to the measured ratios, the ideal ones: prefill's FLOPs ratio at ``L`` tokens (``total_flops``), and
decode's bytes ratio (the weights plus the KV cache each step reads). llama.cpp runs the f16 GGUF of each model
(``cahp export --format gguf --outtype f16``, checked against transformers when written) through
llama-cpp-python, one sequence (its Python API decodes one sequence: no batch figure there), default settings
(f16 KV cache, flash attention off unless ``--flash-attn``), ``--threads`` threads. PyTorch runs fp32 on ``--threads``
threads with the attention ``load_causal_lm`` gives (recorded). Random token ids (no padding): the speed of a
step does not depend on them.

Writes ``results/llm_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cahp.models import cahp_home
from gguf_smollm2 import PRUNES, ensure_pruned, kv_cache

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODELS = ("dense", "uniform", "uneven")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--batch", type=int, default=16, help="the large batch (PyTorch)")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flash-attn", action="store_true", help="llama.cpp with flash attention (default: off)")
    parser.add_argument("--work", default=str(cahp_home() / "gguf"), help="gguf_smollm2.py's prune folders")
    parser.add_argument("--engines", nargs="+", default=["pytorch", "llama.cpp"], choices=["pytorch", "llama.cpp"])
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args(argv)


def spread(samples: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
        "samples": samples,
    }


def ratio_range(dense: dict[str, Any], pruned: dict[str, Any]) -> tuple[float, float]:
    """The lowest and highest speed-up of one repeat (the two timed back to back) when the samples were kept; for
    a record without them, dense's fastest over the pruned model's slowest and the reverse (a wider bracket)."""
    if "samples" in dense and "samples" in pruned:
        ratios = [d / p for d, p in zip(dense["samples"], pruned["samples"], strict=True)]
        return min(ratios), max(ratios)
    return dense["min"] / pruned["max"], dense["max"] / pruned["min"]


def interleaved(
    jobs: dict[str, Callable[[], dict[str, float]]], repeats: int, warmup: bool = True
) -> dict[str, dict[str, Any]]:
    """Each job once as a warm-up (unless ``warmup`` is false: the shapes before warmed up the same code), then
    ``repeats`` rounds of every job in turn. A job returns the seconds of its phases (``{"prefill": s, "decode":
    s}``); the result is ``{phase: {job: spread}}``."""
    for job in jobs.values() if warmup else ():
        job()
    samples: dict[str, dict[str, list[float]]] = {}
    for _ in range(repeats):
        for name, job in jobs.items():
            for phase, seconds in job().items():
                samples.setdefault(phase, {}).setdefault(name, []).append(seconds)
    return {phase: {name: spread(values) for name, values in by_job.items()} for phase, by_job in samples.items()}


def rows_of(engine: str, length: int, timed: dict[str, dict[str, Any]], shapes: dict[str, tuple[int, int]]) -> list:
    """One row per phase; ``shapes``: each phase's ``(tokens, batch)``."""
    return [
        {
            "engine": engine,
            "phase": phase.split("@")[0],
            "context": length,
            "tokens": shapes[phase][0],
            "batch": shapes[phase][1],
            "seconds": by_model,
        }
        for phase, by_model in timed.items()
    ]


# ---- PyTorch ---------------------------------------------------------------------------------------------------


def _ids(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1000, vocab, (batch, length), generator=generator)


@torch.inference_mode()
def _steps(model: Any, cache: Any, token: torch.Tensor, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        output = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache = output.past_key_values
        token = output.logits[:, -1:].argmax(-1)
    return time.perf_counter() - start


@torch.inference_mode()
def torch_job(model: Any, context: torch.Tensor, batch: int, steps: int) -> dict[str, float]:
    """Prefill ``context`` (one row), then ``steps`` one-token steps at batch 1 and, on a copy of the cache
    repeated ``batch`` times, at batch ``batch``: the seconds of each."""
    start = time.perf_counter()
    output = model(input_ids=context, use_cache=True)
    prefill = time.perf_counter() - start
    cache = output.past_key_values
    wide = copy.deepcopy(cache)
    wide.batch_repeat_interleave(batch)
    token = output.logits[:, -1:].argmax(-1)
    one = _steps(model, cache, token, steps)
    many = _steps(model, wide, token.repeat(batch, 1), steps)
    return {"prefill": prefill, "decode@1": one, f"decode@{batch}": many}


@torch.inference_mode()
def torch_prefill(model: Any, ids: torch.Tensor) -> dict[str, float]:
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True)
    return {"prefill@batch": time.perf_counter() - start}


def kv_measured(model: Any, length: int) -> int:
    from cahp.evaluation.generation import _cache_bytes

    with torch.inference_mode():
        cache = model(input_ids=_ids(model.config.vocab_size, 1, length), use_cache=True).past_key_values
    return int(_cache_bytes(cache, torch.float32))


def run_pytorch(models: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from cahp.evaluation.accounting import count_parameters, total_flops
    from cahp.evaluation.generation import kv_cache_bytes

    vocab = next(iter(models.values())).config.vocab_size
    steps, batch = args.decode_tokens, args.batch
    rows: list[dict[str, Any]] = []
    for length in args.contexts:
        context = _ids(vocab, 1, length - steps)  # the decode steps end at ``length`` tokens
        print(f"pytorch: prefill {length - steps} tokens, decode {steps} at batch 1 and {batch}", flush=True)
        jobs = {n: (lambda m=m, c=context: torch_job(m, c, batch, steps)) for n, m in models.items()}
        shapes = {"prefill": (length - steps, 1), "decode@1": (steps, 1), f"decode@{batch}": (steps, batch)}
        warm = length == args.contexts[0]  # one warm-up, at the shortest context: a long one costs minutes
        rows += rows_of("pytorch", length, interleaved(jobs, args.repeats, warm), shapes)
    first = args.contexts[0]
    ids = _ids(vocab, batch, first)
    print(f"pytorch: prefill {batch} x {first}", flush=True)
    jobs = {n: (lambda m=m: torch_prefill(m, ids)) for n, m in models.items()}
    rows += rows_of("pytorch", first, interleaved(jobs, args.repeats), {"prefill@batch": (first, batch)})
    weights = {name: count_parameters(model) * 4 for name, model in models.items()}
    memory = {
        str(length): {
            name: {"counted": kv_cache_bytes(model, length), "measured": kv_measured(model, length)}
            for name, model in models.items()
        }
        for length in args.contexts
    }
    flops = {str(n): {name: total_flops(m, n) for name, m in models.items()} for n in {r["tokens"] for r in rows}}
    return {"rows": rows, "weights_bytes": weights, "kv_bytes_fp32": memory, "flops": flops}


# ---- llama.cpp -------------------------------------------------------------------------------------------------


def gguf_file(name: str, folder: Path | str, work: Path) -> Path:
    """The f16 GGUF of one model, exported (and checked) once under ``work/llm_speed``."""
    from cahp.gguf_export import export_gguf

    target = work / "llm_speed" / f"{name}-f16.gguf"
    if not target.is_file():
        print(f"export {name} -> {target}", flush=True)
        export_gguf(folder, target, outtype="f16")
    return target


def run_llama_cpp(files: dict[str, Path], args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    from llama_cpp import Llama

    steps = args.decode_tokens
    rows: list[dict[str, Any]] = []
    for length in args.contexts:
        engines = {
            name: Llama(
                model_path=str(path),
                n_ctx=length,
                n_batch=512,
                n_threads=args.threads,
                n_threads_batch=args.threads,
                flash_attn=args.flash_attn,
                verbose=False,
            )
            for name, path in files.items()
        }
        tokens = _ids(vocab, 1, length - steps).tolist()[0]

        def job(engine: Any, tokens: list[int] = tokens) -> dict[str, float]:
            engine.reset()
            start = time.perf_counter()
            engine.eval(tokens)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            for step in range(steps):
                engine.eval([1000 + step])
            return {"prefill": prefill, "decode@1": time.perf_counter() - start}

        print(f"llama.cpp: prefill {length - steps} tokens, decode {steps}", flush=True)
        timed = interleaved(
            {n: (lambda e=e: job(e)) for n, e in engines.items()}, args.repeats, length == args.contexts[0]
        )
        rows += rows_of("llama.cpp", length, timed, {"prefill": (length - steps, 1), "decode@1": (steps, 1)})
        for engine in engines.values():
            engine.close()
    memory = {
        str(length): {
            name: {"flash_on": kv_cache(path, length, True), "flash_off": kv_cache(path, length, False)}
            for name, path in files.items()
        }
        for length in args.contexts
    }
    return {"rows": rows, "kv_cache": memory, "file_bytes": {name: path.stat().st_size for name, path in files.items()}}


# ---- ideal ratios, the report ----------------------------------------------------------------------------------


def add_ratios(result: dict[str, Any]) -> None:
    """Per row: each pruned model's median over dense's (seconds for prefill; tokens/s for decode, so > 1 is
    faster in both) and the ideal: FLOPs for prefill, bytes read per step (weights + KV cache) for decode."""
    torch_part = result.get("pytorch", {})
    for engine in ("pytorch", "llama.cpp"):
        for row in result.get(engine, {}).get("rows", []):
            dense = row["seconds"]["dense"]["median"]
            if row["phase"] == "decode":
                row["tokens_per_second"] = {
                    n: row["batch"] * row["tokens"] / t["median"] for n, t in row["seconds"].items()
                }
            row["speedup"] = {n: dense / t["median"] for n, t in row["seconds"].items() if n != "dense"}
            ideal: dict[str, float] = {}
            if torch_part:
                length = str(row["context"])
                for name in row["speedup"]:
                    if row["phase"] == "prefill" and str(row["tokens"]) in torch_part["flops"]:
                        flops = torch_part["flops"][str(row["tokens"])]
                        ideal[name] = flops["dense"] / flops[name]
                    elif row["phase"] == "decode" and length in torch_part["kv_bytes_fp32"]:
                        kv = torch_part["kv_bytes_fp32"][length]
                        weights = torch_part["weights_bytes"]
                        batch = row["batch"]
                        dense_bytes = weights["dense"] + batch * kv["dense"]["counted"]
                        ideal[name] = dense_bytes / (weights[name] + batch * kv[name]["counted"])
            row["ideal_speedup"] = ideal


def markdown(result: dict[str, Any]) -> str:
    setup = result["setup"]
    lines = [
        "# Decoder speed where pruning pays: long contexts and large batches",
        "",
        f"Command: `{result['command']}`  ",
        f"{setup['machine']}, {setup['threads']} threads, torch {setup['torch']}, llama-cpp-python "
        f"{setup.get('llama_cpp_python', '-')}, {setup['date']}. Models: dense SmolLM2-135M-Instruct, "
        + "; ".join(f"`{name}`: {PRUNES[name][0]}" for name in MODELS[1:])
        + " (retraining-free magnitude prunes of `benchmarks/gguf_smollm2.py`).",
        "",
        "Speed-up = dense time / pruned time (decode: pruned tokens/s over dense), medians of "
        f"{setup['repeats']} interleaved repeats; in brackets the lowest and highest speed-up of one repeat (a record "
        "made before the repeats were kept: dense's fastest over the pruned model's slowest and the reverse, a wider "
        "bracket). Ideal: prefill's FLOPs ratio, decode's ratio of bytes read per step (weights + KV cache).",
    ]
    for engine in ("pytorch", "llama.cpp"):
        part = result.get(engine)
        if not part:
            continue
        lines += ["", f"## {engine}", ""]
        header = ["phase", "context", "tokens", "batch", "dense"]
        for name in MODELS[1:]:
            header += [f"{name} speed-up", f"{name} ideal"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in part["rows"]:
            dense = row["seconds"]["dense"]
            if row["phase"] == "decode":
                cell = f"{row['tokens_per_second']['dense']:.1f} tok/s"
            else:
                cell = f"{dense['median']:.3f} s"
            values = [row["phase"], str(row["context"]), str(row["tokens"]), str(row["batch"]), cell]
            for name in MODELS[1:]:
                low, high = ratio_range(dense, row["seconds"][name])
                values.append(f"{row['speedup'][name]:.2f}x [{low:.2f}, {high:.2f}]")
                ideal = row["ideal_speedup"].get(name)
                values.append(f"{ideal:.2f}x" if ideal else "-")
            lines.append("| " + " | ".join(values) + " |")
    torch_part = result.get("pytorch")
    if torch_part:
        lines += ["", "## KV cache for one sequence (PyTorch fp32: counted = measured; llama.cpp f16: half)", ""]
        lines += ["| context | " + " | ".join(MODELS) + " |", "|---|" + "---|" * len(MODELS)]
        for length, by_model in torch_part["kv_bytes_fp32"].items():
            cells = []
            for name in MODELS:
                entry = by_model[name]
                mark = "" if entry["counted"] == entry["measured"] else f" (measured {entry['measured'] / 2**20:.1f})"
                cells.append(f"{entry['counted'] / 2**20:.1f} MiB{mark}")
            lines.append(f"| {length} | " + " | ".join(cells) + " |")
    cpp = result.get("llama.cpp")
    if cpp:
        lines += ["", "## llama.cpp's KV cache (f16, its log), flash attention on / off", ""]
        lines += ["| context | " + " | ".join(MODELS) + " |", "|---|" + "---|" * len(MODELS)]
        for length, by_model in cpp["kv_cache"].items():
            cells = [
                f"{by_model[n]['flash_on']['mib']:.1f} / {by_model[n]['flash_off']['mib']:.1f} MiB" for n in MODELS
            ]
            lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from cahp.models import load_causal_lm

    work = Path(args.work)
    folders: dict[str, Any] = {"dense": "smollm2-135m"}
    for name in MODELS[1:]:
        folders[name] = ensure_pruned(name, work)
    result: dict[str, Any] = {
        "command": f"OMP_NUM_THREADS={args.threads} CAHP_DATA_DIR=../shared/data python benchmarks/llm_speed.py"
        + "".join(f" {part}" for part in (sys.argv[1:] if argv is None else argv)),
        "setup": {
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
            "threads": args.threads,
            "repeats": args.repeats,
            "decode_tokens": args.decode_tokens,
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
        "models": {name: str(folder).replace(str(cahp_home()), "$CAHP_HOME") for name, folder in folders.items()},
    }
    vocab = 49152
    if "pytorch" in args.engines:
        models = {}
        for name, folder in folders.items():
            models[name] = load_causal_lm(folder)[0]
        result["setup"]["attention"] = {n: m.config._attn_implementation for n, m in models.items()}
        vocab = models["dense"].config.vocab_size
        result["pytorch"] = run_pytorch(models, args)
        del models
        write(result, Path(args.out))  # kept if the llama.cpp part fails
    if "llama.cpp" in args.engines:
        import importlib.metadata

        result["setup"]["llama_cpp_python"] = importlib.metadata.version("llama-cpp-python")
        files = {name: gguf_file(name, folder, work) for name, folder in folders.items()}
        result["llama.cpp"] = run_llama_cpp(files, args, vocab)
    write(result, Path(args.out))


def write(result: dict[str, Any], out: Path) -> None:
    add_ratios(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "llm_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "llm_speed.md").write_text(markdown(result))
    print(f"wrote {out / 'llm_speed.json'} and llm_speed.md", flush=True)


if __name__ == "__main__":
    main()
