"""GGUF export of SmolLM2-135M-Instruct, dense and pruned, checked in llama.cpp: the table of docs/decoders.md.

Four models: the dense ``smollm2-135m`` (its Q4_1 GGUF weights de-quantized by transformers) and three
retraining-free magnitude prunes made with ``cahp prune --objective causal-lm`` (:data:`PRUNES`): uniform (6 of 9
query heads in every layer, the 3 key-value heads kept: llama.cpp's ``llama`` architecture), uneven (whole
key-value groups, 180 heads: ``deci``) and uneven with attention-free layers (120 heads, ``--allow-empty-layers``).
Each prune is the folder ``$CAHP_HOME/gguf/<name>`` (``--work``), made when missing and reused when its
``report.json`` names the same command. The prune runs measure little (2 blocks of 64 tokens, no prompted task):
only the saved model matters here.

Per model and outtype (f32, f16, q8_0), :func:`cahp.gguf_export.export_gguf` writes the file and runs its check
(llama.cpp against transformers on the check's prompt and 8 greedy tokens, f32 KV cache) with a tolerance
(``--tolerance``, default 1000) that lets every file through, so that the figures of a file the default tolerance
(:data:`cahp.gguf_export.TOLERANCES`) refuses are recorded too (``accepted_at_default``). Recorded per file: the
largest absolute logit difference, the positions compared, the greedy continuation (ids and text), how many of
its tokens transformers also picks and, where it first does not, how near that tie was; the file size.

Per model, over the check's tokens unless said otherwise:

* llama.cpp's KV cache of the f16 file at ``--context`` tokens (4,096) in its default f16 cache, with flash
  attention on and off, read from llama.cpp's own log line (``llama_kv_cache: size = ... MiB``), beside what the
  kept key-value heads imply;
* what llama.cpp's default f16 cache does to the logits: the f32 file's with that cache against transformers';
* what q8_0's weight rounding alone does (:func:`q8_0_weights_diff`), and the largest absolute logit.

The negative control: the uniform and uneven prunes written with the rope rows NOT interleaved
(:func:`cahp.gguf_export.rope_permutation` replaced by the identity), which the check must refuse at every outtype.

    OMP_NUM_THREADS=1 CAHP_DATA_DIR=../shared/data nice -n 19 python benchmarks/gguf_smollm2.py

Writes ``benchmarks/results/gguf.json`` (the numbers, the commands) and ``gguf.md`` (a view of it) to ``--out``.
Needs the gguf extra (``pip install 'cahp[gguf]'``: gguf and llama-cpp-python). The script is not called
``gguf.py``: a script's folder comes first on ``sys.path``, so that name would hide the ``gguf`` package from every
script in ``benchmarks/`` (transformers reads SmolLM2's GGUF weights with it).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from cahp import gguf_export
from cahp.gguf_export import CHECK_PROMPT, OUTTYPES, TOLERANCES, GgufCheck, GgufExportResult, export_gguf
from cahp.models import cahp_home, load_causal_lm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speedup import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
DENSE = "smollm2-135m"
#: The prune runs' shared arguments: retraining-free magnitude pruning, measured as little as the run allows.
#: ``--reconstruct none``: the refit of ``cahp prune``'s default would solve for every kept width from 128 tokens (an
#: underdetermined fit whose large output weights f16 then rounds visibly), and these are the prunes the published
#: figures were made with (before the refit existed, so their commands do not name it: :func:`made_with`).
COMMON = shlex.split(
    "--reconstruct none "
    "--objective causal-lm --model smollm2-135m --method magnitude --recovery-epochs 0 --calibration-blocks 2 "
    "--eval-blocks 2 --context-length 64 --prompted none --latency-repeats 1 --generation-batch-sizes 1 "
    "--prompt-tokens 8 --new-tokens 2 --continuation-tokens 4"
)
#: Prune name -> (what it is, its own arguments).
PRUNES: dict[str, tuple[str, list[str]]] = {
    "uniform": (
        "6 of 9 query heads in every layer, every key-value head kept",
        ["--budget", "keep=180", "--gqa-mode", "uniform", "--uniform-layers"],
    ),
    "uneven": ("whole key-value groups, layers differ", ["--budget", "keep=180", "--gqa-mode", "groups"]),
    "empty": (
        "whole key-value groups, layers differ, some attention-free",
        ["--budget", "keep=120", "--gqa-mode", "groups", "--allow-empty-layers"],
    ),
}
#: The prunes written with the rope rows left in transformers' order (the negative control).
BROKEN = ("uniform", "uneven")
KV_CACHE_LINE = re.compile(
    r"llama_kv_cache: size =\s*([\d.]+) MiB.*K \(\w+\):\s*([\d.]+) MiB, V \(\w+\):\s*([\d.]+) MiB"
)
FLASH_LINE = re.compile(r"llama_context: flash_attn\s*=\s*(\w+)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(cahp_home() / "gguf"), help="the prune runs' folders")
    parser.add_argument("--context", type=int, default=4096, help="llama.cpp context of the KV-cache measurement")
    parser.add_argument("--tolerance", type=float, default=1000.0, help="the export's tolerance (writes every file)")
    parser.add_argument("--out", default=str(RESULTS), help="where gguf.{json,md} go")
    return parser.parse_args()


def prune_argv(name: str, work: Path) -> list[str]:
    """``cahp prune`` arguments of prune ``name``, its run folder under ``work``."""
    return ["prune", *COMMON, *PRUNES[name][1], "--out", str(work / name)]


def shown(argv: list[str]) -> str:
    """A command as the results show it, with this machine's cache folder written as ``$CAHP_HOME``."""
    text = shlex.join(["cahp", *argv]).replace(str(cahp_home()), "$CAHP_HOME")
    return f"OMP_NUM_THREADS=1 CAHP_DATA_DIR=../shared/data {text}"


def settings(argv: list[str]) -> list[tuple[str, ...]]:
    """The options of a ``cahp prune`` command (each flag with its values), sorted, without ``--out``."""
    options: list[list[str]] = []
    for token in argv[1:]:
        if token.startswith("--"):
            options.append([token])
        else:
            options[-1].append(token)
    return sorted(tuple(option) for option in options if option[0] != "--out")


def made_with(report: dict[str, Any]) -> list[str]:
    """The ``cahp prune`` arguments of a finished run, ``--reconstruct`` added from its record where the command
    line did not name it (a run made before the flag existed, or one that took the default)."""
    argv = shlex.split(report["command"])[1:]
    if "--reconstruct" not in argv:
        mode = ((report.get("post_surgery") or {}).get("reconstruction") or {}).get("mode", "none")
        argv += ["--reconstruct", mode]
    return argv


def ensure_pruned(name: str, work: Path) -> Path:
    """Run prune ``name`` unless its folder holds a finished run of the same command; return its ``model/``.

    Raises:
        SystemExit: the folder holds a run of another command, or the run failed.
    """
    return ensure_run(name, prune_argv(name, work), work / name)


def ensure_run(name: str, argv: list[str], folder: Path) -> Path:
    """Run ``cahp <argv>`` (one thread) unless ``folder`` (its ``--out``) holds a finished run of the same command
    (:func:`made_with`, :func:`settings`); return the run's ``model/``.

    Raises:
        SystemExit: the folder holds a run of another command, or the run failed.
    """
    report = folder / "report.json"
    if report.is_file():
        made_by = made_with(json.loads(report.read_text()))
        if settings(made_by) != settings(argv):
            raise SystemExit(f"{folder} was made by `cahp {shlex.join(made_by)}`, not this script's: remove it")
        print(f"{name}: reusing {folder}", flush=True)
        return folder / "model"
    print(f"{name}: {shown(argv)}", flush=True)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    if subprocess.run([sys.executable, "-m", "cahp", *argv], env=env).returncode != 0:
        raise SystemExit(f"the prune run {name} failed; rerun to resume it")
    return folder / "model"


# ---- llama.cpp -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def llama_cpp_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines (nothing is printed); llama-cpp-python's own callback is restored after."""
    llama_cpp = importlib.import_module("llama_cpp")
    default_callback = importlib.import_module("llama_cpp._logger").llama_log_callback
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(default_callback, ctypes.c_void_p(0))


def kv_cache(path: Path, context: int, flash_attention: bool) -> dict[str, Any]:
    """llama.cpp's KV cache of ``path`` at ``context`` tokens (its default f16 cache), from its log."""
    from llama_cpp import Llama

    with llama_cpp_log() as lines:
        llm = Llama(model_path=str(path), n_ctx=context, flash_attn=flash_attention, n_threads=1, verbose=False)
        llm.close()
    sizes = [match for line in lines if (match := KV_CACHE_LINE.search(line))]
    flash = [match.group(1) for line in lines if (match := FLASH_LINE.search(line))]
    if len(sizes) != 1 or not flash:
        raise SystemExit(f"llama.cpp's log of {path.name} has no single KV-cache size line: {''.join(lines)[-2000:]}")
    total, keys, values = (float(group) for group in sizes[0].groups())
    return {"mib": total, "k_mib": keys, "v_mib": values, "flash_attn": flash[0]}


def f16_cache_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits of ``path`` at every position of ``ids`` with its default (f16) KV cache."""
    from llama_cpp import Llama

    with llama_cpp_log():
        llm = Llama(model_path=str(path), n_ctx=len(ids) + 8, logits_all=True, n_threads=1, verbose=False)
        try:
            llm.eval(ids)
            return np.array(llm.scores[: llm.n_tokens], dtype=np.float64)
        finally:
            llm.close()


# ---- one model -----------------------------------------------------------------------------------------------


def checked(result: GgufExportResult) -> GgufCheck:
    """The check of an export (llama-cpp-python is needed)."""
    if result.check is None:
        raise SystemExit("llama-cpp-python is not installed: pip install 'cahp[gguf]'")
    return result.check


def file_row(result: GgufExportResult, tokenizer: Any) -> dict[str, Any]:
    """What the check of one written file says."""
    check = checked(result)
    return {
        "max_abs_diff": check.max_abs_diff,
        "default_tolerance": TOLERANCES[result.outtype],
        "accepted_at_default": check.max_abs_diff <= TOLERANCES[result.outtype],
        "positions": check.tokens,
        "continuation": list(check.continuation),
        "continuation_text": tokenizer.decode(list(check.continuation)),
        "agreed": check.agreed,
        "runner_up_gap": check.runner_up_gap,
        "size_bytes": result.size_bytes,
    }


def q8_0_weights_diff(causal_lm: Any, ids: list[int], reference: np.ndarray) -> float:
    """The largest absolute logit difference to ``reference`` once transformers' matrices are rounded as the q8_0
    file holds them (Q8_0 blocks of 32; f16 where a row is not a whole number of blocks): the share of the q8_0
    difference that the weights alone make (llama.cpp rounds the activations to 8 bits too). Rounds
    ``causal_lm`` in place."""
    import gguf

    q8_0 = gguf.GGMLQuantizationType.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[q8_0]
    with torch.no_grad():
        for parameter in causal_lm.parameters():
            if parameter.ndim == 2 and parameter.numel():  # an attention-free layer has empty projections
                array = parameter.detach().float().numpy()
                if array.shape[-1] % block == 0:
                    array = gguf.quants.dequantize(gguf.quants.quantize(array, q8_0), q8_0)
                else:
                    array = array.astype(np.float16).astype(np.float32)
                parameter.copy_(torch.from_numpy(np.ascontiguousarray(array).reshape(parameter.shape)))
        rounded = causal_lm(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    return float(np.abs(rounded - reference).max())


def measure_model(name: str, model: str | Path, scratch: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every outtype's check, the KV cache, the f16 cache's effect and q8_0 weight rounding's for one model."""
    causal_lm, tokenizer = load_causal_lm(model)
    files, row = {}, {}
    for outtype in OUTTYPES:
        print(f"{name} {outtype}", flush=True)
        result = export_gguf(model, scratch / f"{name}-{outtype}.gguf", outtype=outtype, tolerance=args.tolerance)
        files[outtype] = result
        row[outtype] = file_row(result, tokenizer)
    layout = files["f32"].layout
    prompt = list(tokenizer(CHECK_PROMPT)["input_ids"])
    ids = prompt + row["f32"]["continuation"][:-1]
    with torch.no_grad():
        reference = causal_lm(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    cache_diff = float(np.abs(f16_cache_logits(files["f32"].path, ids) - reference).max())
    weights_diff = q8_0_weights_diff(causal_lm, ids, reference)
    kv_bytes = 2 * 2 * sum(layout.kv_heads) * layout.head_dim * args.context  # K and V, 2 bytes (f16) each
    return {
        "model": str(model),
        "architecture": layout.architecture,
        "head_dim": layout.head_dim,
        "query_heads": list(layout.query_heads),
        "kv_heads": list(layout.kv_heads),
        "placeholder_layers": list(layout.placeholder_layers),
        "max_abs_logit": float(np.abs(reference).max()),
        "outtypes": row,
        "f16_cache_max_abs_diff": cache_diff,
        "q8_0_weights_max_abs_diff": weights_diff,
        "kv_cache": {
            "context": args.context,
            "from_kept_heads_mib": kv_bytes / 2**20,
            "flash_attn": kv_cache(files["f16"].path, args.context, True),
            "no_flash_attn": kv_cache(files["f16"].path, args.context, False),
        },
    }


def broken_control(name: str, model: Path, scratch: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The check's figures of files whose rope rows are not interleaved."""
    row = {}
    with mock.patch.object(gguf_export, "rope_permutation", lambda weight, heads: weight):
        for outtype in OUTTYPES:
            print(f"{name} {outtype}, rope rows not interleaved", flush=True)
            path = scratch / f"{name}-broken-{outtype}.gguf"
            check = checked(export_gguf(model, path, outtype=outtype, tolerance=args.tolerance))
            path.unlink()
            row[outtype] = {
                "max_abs_diff": check.max_abs_diff,
                "accepted_at_default": check.max_abs_diff <= TOLERANCES[outtype],
                "agreed": check.agreed,
            }
    return row


# ---- report --------------------------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    """A view of the results."""
    lines = [
        "# GGUF export of SmolLM2-135M-Instruct, checked in llama.cpp",
        "",
        f"Script: `{result['script']}` ({result['date']}; llama-cpp-python {result['versions']['llama-cpp-python']},"
        f" gguf {result['versions']['gguf']}; {result['machine']['cpu']}). Prune runs:",
        "",
        *(f"- {name}: `{command}`" for name, command in result["commands"].items()),
        "",
        "Largest absolute logit difference, llama.cpp against transformers, over the check's positions (the prompt "
        "and 8 greedy tokens, f32 KV cache); `refused` where the default tolerance "
        f"({', '.join(f'{key} {value:g}' for key, value in TOLERANCES.items())}) refuses the file. Greedy: tokens "
        "of llama.cpp's continuation that transformers also picks (then the near tie's gap). f16 cache: the f32 "
        "file's difference with llama.cpp's default f16 KV cache. q8_0 weights alone: transformers with its "
        "matrices rounded as the q8_0 file holds them, against transformers.",
        "",
        "| model | architecture | largest abs logit | f32 | f16 | q8_0 | greedy f32 / f16 / q8_0 "
        "| f16 cache (f32 file) | q8_0 weights alone |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, model in result["models"].items():
        cells, greedy = [], []
        for outtype in OUTTYPES:
            row = model["outtypes"][outtype]
            cells.append(f"{row['max_abs_diff']:.3g}{'' if row['accepted_at_default'] else ' (refused)'}")
            gap = f" (gap {row['runner_up_gap']:.2g})" if row["runner_up_gap"] is not None else ""
            greedy.append(f"{row['agreed']}/{len(row['continuation'])}{gap}")
        lines.append(
            f"| {name} | {model['architecture']} | {model['max_abs_logit']:.1f} | {' | '.join(cells)} | "
            f"{' / '.join(greedy)} | {model['f16_cache_max_abs_diff']:.3g} | {model['q8_0_weights_max_abs_diff']:.3g} |"
        )
    for name, control in result["broken_rope"].items():
        cells = [f"{control[outtype]['max_abs_diff']:.3g}" for outtype in OUTTYPES]
        agreed = " / ".join(str(control[outtype]["agreed"]) for outtype in OUTTYPES)
        lines.append(f"| {name}, rope rows not interleaved | | | {' | '.join(cells)} | {agreed} | | |")
    context = next(iter(result["models"].values()))["kv_cache"]["context"]
    lines += [
        "",
        f"llama.cpp's KV cache at {context:,} tokens (default f16 cache; MiB, from its log):",
        "",
        "| model | kept key-value heads | from the kept heads | flash attention | without |",
        "|---|---|---|---|---|",
    ]
    for name, model in result["models"].items():
        kv = model["kv_cache"]
        lines.append(
            f"| {name} | {sum(model['kv_heads'])} | {kv['from_kept_heads_mib']:g} | {kv['flash_attn']['mib']:g} | "
            f"{kv['no_flash_attn']['mib']:g} |"
        )
    lines += ["", "Continuations (f32):", ""]
    lines += [
        f"- {name}: {model['outtypes']['f32']['continuation_text']!r}" for name, model in result["models"].items()
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    work = Path(args.work).expanduser()
    folders: dict[str, str | Path] = {"dense": DENSE}
    folders.update({name: ensure_pruned(name, work) for name in PRUNES})
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="cahp_gguf_") as scratch:
        models = {}
        for name, model in folders.items():
            models[name] = measure_model(name, model, Path(scratch), args)
            for file in Path(scratch).iterdir():
                file.unlink()
        broken = {name: broken_control(name, Path(folders[name]), Path(scratch), args) for name in BROKEN}
    result = {
        "model": "SmolLM2-135M-Instruct (smollm2-135m)",
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": cpu_name(), "python": platform.python_version(), "threads": 1},
        "versions": {
            package: importlib.metadata.version(package)
            for package in ("llama-cpp-python", "gguf", "torch", "transformers")
        },
        "script": "OMP_NUM_THREADS=1 CAHP_DATA_DIR=../shared/data nice -n 19 python benchmarks/gguf_smollm2.py",
        "commands": {name: shown(prune_argv(name, work)) for name in PRUNES},
        "prunes": {name: description for name, (description, _) in PRUNES.items()},
        "default_tolerances": TOLERANCES,
        "models": models,
        "broken_rope": broken,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gguf.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gguf.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
