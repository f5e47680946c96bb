"""GGUF export of Gemma 3 270M, dense and pruned, checked in llama.cpp's ``gemma3`` architecture.

Two models: the dense ``gemma3-270m`` (its Q4_K_M GGUF weights de-quantized by transformers) and a retraining-free
magnitude prune with 2 of 4 query heads in every layer (the one key-value head kept: llama.cpp's gemma3 has no
per-layer head counts, so only a prune with the same heads in every layer runs there), made with ``cahp prune
--objective causal-lm`` in ``$CAHP_HOME/gguf/gemma3-uniform`` when missing (the run measures little: only the saved
model matters). Per model and outtype (f32, f16, q8_0), :func:`cahp.gguf_export.export_gguf` writes the file and
runs its check with a tolerance that lets every file through (``--tolerance``), so that the figures of a file the
default tolerance refuses are recorded too; recorded per file: the largest absolute logit difference, the positions
compared, the greedy continuation, how many of its tokens transformers also picks, the file size.

    OMP_NUM_THREADS=1 CAHP_DATA_DIR=../shared/data python benchmarks/gguf_gemma3.py

Writes ``benchmarks/results/gguf_gemma3.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cahp.gguf_export import ARCHITECTURE_TOLERANCE, CHECK_PROMPT, OUTTYPES, TOLERANCES, export_gguf
from cahp.models import cahp_home, load_causal_lm
from gguf_smollm2 import checked, ensure_run

RESULTS = Path(__file__).resolve().parent / "results"
#: ``--reconstruct weights`` (``cahp prune``'s default, what the committed figures were made with, their command not
#: naming it): refitted on only 256 tokens, an underdetermined fit; the export's check does not depend on it.
PRUNE = shlex.split(
    "--reconstruct weights "
    "--objective causal-lm --model gemma3-270m --method magnitude --budget keep=36 --gqa-mode uniform "
    "--uniform-layers --recovery-epochs 0 --calibration-blocks 4 --eval-blocks 2 --context-length 64 --prompted none "
    "--latency-repeats 1 --generation-batch-sizes 1"
)


def measure(name: str, model: str | Path, scratch: Path, tolerance: float) -> dict[str, Any]:
    causal_lm, tokenizer = load_causal_lm(model)
    prompt = list(tokenizer(CHECK_PROMPT)["input_ids"])
    with torch.no_grad():
        largest = float(causal_lm(input_ids=torch.tensor([prompt])).logits.abs().max())
    rows: dict[str, Any] = {}
    layout = None
    for outtype in OUTTYPES:
        print(f"{name} {outtype}", flush=True)
        result = export_gguf(model, scratch / f"{name}-{outtype}.gguf", outtype=outtype, tolerance=tolerance)
        check = checked(result)
        layout = result.layout
        default = max(TOLERANCES[outtype], ARCHITECTURE_TOLERANCE.get(layout.architecture, 0.0))
        rows[outtype] = {
            "max_abs_diff": check.max_abs_diff,
            "default_tolerance": default,
            "accepted_at_default": check.max_abs_diff <= default,
            "positions": check.tokens,
            "continuation_text": tokenizer.decode(list(check.continuation)),
            "agreed": check.agreed,
            "of": len(check.continuation),
            "texts_tokenized_alike": check.texts,
            "size_bytes": result.size_bytes,
        }
        result.path.unlink()
    assert layout is not None
    return {
        "model": str(model).replace(str(cahp_home()), "$CAHP_HOME"),
        "architecture": layout.architecture,
        "query_heads": layout.query_heads[0],
        "kv_heads": layout.kv_heads[0],
        "head_dim": layout.head_dim,
        "max_abs_logit_of_prompt": largest,
        "outtypes": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Gemma 3 270M in llama.cpp (`cahp export --format gguf`)",
        "",
        f"Command: `{result['command']}`  ",
        f"llama-cpp-python {result['llama_cpp_python']}, {result['date']}. Largest absolute logit of the check's "
        "prompt: " + ", ".join(f"{n} {m['max_abs_logit_of_prompt']:.1f}" for n, m in result["models"].items()) + ".",
        "",
        "| model | heads (query / KV per layer) | outtype | max abs logit diff | default tolerance | greedy tokens "
        "the same | size |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, model in result["models"].items():
        for outtype, row in model["outtypes"].items():
            lines.append(
                f"| {name} | {model['query_heads']} / {model['kv_heads']} | {outtype} | {row['max_abs_diff']:.3g} | "
                f"{row['default_tolerance']:g} ({'accepted' if row['accepted_at_default'] else 'refused'}) | "
                f"{row['agreed']} of {row['of']} | {row['size_bytes'] / 1e6:.0f} MB |"
            )
    lines += ["", "Greedy continuations of the check's prompt (f32 files):", ""]
    for name, model in result["models"].items():
        lines.append(f"- {name}: {model['outtypes']['f32']['continuation_text']!r}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(cahp_home() / "gguf" / "gemma3-uniform"))
    parser.add_argument("--tolerance", type=float, default=1000.0, help="the export's tolerance (writes every file)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    models = {
        "dense": "gemma3-270m",
        "uniform": ensure_run("uniform", ["prune", *PRUNE, "--out", args.work], Path(args.work)),
    }
    result: dict[str, Any] = {
        "command": "OMP_NUM_THREADS=1 CAHP_DATA_DIR=../shared/data python benchmarks/gguf_gemma3.py",
        "prune_command": "cahp " + shlex.join(["prune", *PRUNE, "--out", "$CAHP_HOME/gguf/gemma3-uniform"]),
        "llama_cpp_python": importlib.metadata.version("llama-cpp-python"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "models": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        for name, model in models.items():
            result["models"][name] = measure(name, model, Path(scratch), args.tolerance)
    out = Path(args.out)
    (out / "gguf_gemma3.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (out / "gguf_gemma3.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
