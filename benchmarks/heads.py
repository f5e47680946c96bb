"""What the heads do: sink, special-token and dormant heads, adjacent-layer redundancy, and what CAHP keeps.

Runs ``cahp analyze --cahp`` (the Python API, :func:`cahp.analysis.run.analyze`) on each model below and
tabulates the result in ``benchmarks/results/heads.{json,md}``; each model's full analysis JSON is kept in
``benchmarks/results/heads/<name>.json`` and reused on a rerun (``--fresh`` recomputes).

    OMP_NUM_THREADS=1 CAHP_DATA_DIR=../shared/data python benchmarks/heads.py
    OMP_NUM_THREADS=1 CAHP_DATA_DIR=../shared/data python benchmarks/heads.py --rows minilm-l6-sst5

The encoders are the fine-tuned classifiers of ``finetune_baselines.py`` where they exist, else the shipped
base model with an untrained classification head (attention does not depend on the head; CAHP's salience then
comes from an untrained head's loss, which the table says). SmolLM2 is analysed on SST-2 sentences (its
attention as a language model; the classes only serve CAHP's separability).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

#: name -> (model, task options, calibration examples, max length, what the model is)
ROWS: dict[str, tuple[str, dict[str, Any], int, int, str]] = {
    "minilm-l6-sst5": ("$CAHP_HOME/finetuned/minilm-l6-sst5", {"task": "sst5"}, 512, 128, "fine-tuned on SST-5"),
    "minilm-l6-mnli": (
        "$CAHP_HOME/finetuned/minilm-l6-mnli",
        {"task": "mnli", "protocol": "offline"},
        512,
        128,
        "fine-tuned on MNLI (offline protocol)",
    ),
    "mpnet-base-sst5": ("mpnet-base", {"task": "sst5"}, 256, 128, "base model, untrained classification head"),
    "smollm2-135m-sst2": ("smollm2-135m", {"task": "sst2"}, 128, 64, "base LM, untrained classification head"),
}


def model_location(model: str) -> str:
    from cahp.models import cahp_home

    return model.replace("$CAHP_HOME", str(cahp_home()))


def run_row(name: str, fresh: bool) -> dict[str, Any] | None:
    """The analysis JSON of one row (computed, or read back from an earlier run); ``None`` when its fine-tuned
    model is missing."""
    from cahp.analysis.run import analyze
    from cahp.train.finetune import TaskOptions

    model, task, size, max_length, _ = ROWS[name]
    out = RESULTS / "heads" / f"{name}.json"
    if out.is_file() and not fresh:
        return json.loads(out.read_text())
    location = model_location(model)
    if model.startswith("$CAHP_HOME") and not Path(location).is_dir():
        print(f"{name}: {location} is missing; run benchmarks/finetune_baselines.py first", flush=True)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    command = ["cahp", "analyze", "--model", model, "--out", str(out.relative_to(HERE.parent)), "--cahp"]
    command += ["--calibration-size", str(size), "--max-length", str(max_length)]
    command += [f"--{key}={value}" for key, value in task.items()]
    print("$", shlex.join(command), flush=True)
    start = time.perf_counter()
    payload = analyze(
        location,
        TaskOptions(**task, max_length=max_length),
        out,
        calibration_size=size,
        overwrite=True,
        command=shlex.join(command),
        cahp=True,
    )
    payload["seconds"] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    return payload


def findings(payload: dict[str, Any]) -> dict[str, Any]:
    """Counts per kind and layer, CAHP's keep rate among each kind, and the adjacent-layer profile."""
    heads = payload["heads"]
    kept = np.asarray(payload["cahp"]["kept"], dtype=bool)
    layers = kept.shape[0]
    kinds = {}
    for kind, flag in (("sink", "is_sink"), ("special-token", "is_special_token_head"), ("dormant", "is_dormant")):
        flags = np.asarray(heads[flag], dtype=bool)
        kinds[kind] = {
            "count": int(flags.sum()),
            "per_layer": flags.sum(1).astype(int).tolist(),
            "kept_by_cahp": int((flags & kept).sum()),
        }
    best_js = np.asarray([[np.nan if v is None else v for v in row] for row in heads["best_match_js"]], dtype=float)
    return {
        "model": payload["model"].replace(model_location("$CAHP_HOME"), "$CAHP_HOME"),
        "model_type": payload["model_type"],
        "grid": payload["grid"],
        "examples": payload["examples"],
        "causal": payload["causal"],
        "cahp_k": payload["cahp"]["k"],
        "cahp_kept": int(kept.sum()),
        "kinds": kinds,
        "layer_js": [pair["js"] for pair in payload["adjacent_layers"]],
        "layer_kl": [pair["kl"] for pair in payload["adjacent_layers"]],
        "best_match_js_by_layer": [None] + [round(float(np.nanmean(best_js[layer])), 4) for layer in range(1, layers)],
        "sink_score_by_layer": np.round(np.asarray(heads["sink_score"], dtype=float).mean(1), 3).tolist(),
        "special_share_by_layer": np.round(np.asarray(heads["special_token_share"], dtype=float).mean(1), 3).tolist(),
        "command": payload["command"],
        "seconds": payload.get("seconds"),
    }


#: (grid with the analysis scorers, grid with the methods they are compared with) under results/bench
OVERLAP_GRIDS = {"sst5": ("minilm_sst5_analysis", "minilm_sst5"), "mnli": ("minilm_mnli_analysis", "minilm_mnli")}
OVERLAP_METHODS = ("cahp", "gradient", "random")


def _removed(cell: dict[str, Any]) -> set[tuple[int, int]]:
    kept = {(int(layer), head) for layer, heads in cell["kept_heads_by_layer"].items() for head in heads}
    return {(layer, head) for layer in range(cell["layers"]) for head in range(cell["heads_per_layer"])} - kept


def removal_overlap() -> dict[str, Any]:
    """Jaccard overlap of the heads ``sink`` / ``redundancy`` remove with those CAHP, gradient importance and
    random (seed 0) remove at the same budget, from the published grids' cells, with the overlap two independent
    random removals of those sizes would have in expectation."""
    tables: dict[str, Any] = {}
    for task, (analysis, base) in OVERLAP_GRIDS.items():
        folder, base_folder = (
            HERE / "results" / "bench" / analysis / "cells",
            HERE / "results" / "bench" / base / "cells",
        )
        if not folder.is_dir() or not base_folder.is_dir():
            continue
        rows = []
        for path in sorted(folder.glob("*__seed0__*.json")):
            cell = json.loads(path.read_text())
            if cell["budget"] == "knee":
                continue
            removed = _removed(cell)
            total = cell["heads_total"]
            row = {"method": cell["method"], "budget": cell["budget"], "removed": len(removed), "overlap": {}}
            for other in OVERLAP_METHODS:
                other_path = base_folder / f"{other}__seed0__{cell['budget']}.json"
                if not other_path.is_file():
                    continue
                theirs = _removed(json.loads(other_path.read_text()))
                expected_shared = len(removed) * len(theirs) / total
                row["overlap"][other] = {
                    "jaccard": round(len(removed & theirs) / len(removed | theirs), 3),
                    "random_expectation": round(expected_shared / (len(removed) + len(theirs) - expected_shared), 3),
                }
            rows.append(row)
        tables[task] = rows
    return tables


def _overlap_markdown(tables: dict[str, Any]) -> list[str]:
    lines = [
        "## Do `sink` and `redundancy` remove the heads CAHP and gradient importance remove?",
        "",
        "Jaccard overlap of the removed heads at the same budget (seed 0 cells of the `cahp bench` grids), next to",
        "what two independent random removals of those sizes overlap in expectation.",
        "",
    ]
    for task, rows in tables.items():
        lines += [
            f"**MiniLM-L6, {task.upper()}**",
            "",
            "| scorer | kept | removed | " + " | ".join(f"vs {m} (random: expected)" for m in OVERLAP_METHODS) + " |",
            "|---|---:|---:|" + "---|" * len(OVERLAP_METHODS),
        ]
        for row in sorted(rows, key=lambda r: (r["method"], -float(r["budget"]))):
            cells = [
                f"{row['overlap'][m]['jaccard']:.2f} ({row['overlap'][m]['random_expectation']:.2f})"
                if m in row["overlap"]
                else "–"
                for m in OVERLAP_METHODS
            ]
            lines.append(f"| {row['method']} | {row['budget']} | {row['removed']} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _numbers(values: list[Any], digits: int = 3) -> str:
    return " ".join("-" if value is None else f"{value:.{digits}f}" for value in values)


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "# What the heads do",
        "",
        "Written by `python benchmarks/heads.py` (`cahp analyze --cahp` on each model; thresholds: sink score > 0.3,",
        "special-token share > 0.5, dormant = output norm < 0.1 x its layer's mean; definitions in",
        "`docs/analysis.md`). CAHP: default settings on the same calibration examples, kept heads at its knee.",
        "",
        "| model | what | heads | examples | sink | special-token | dormant | CAHP keeps "
        "| CAHP keeps of sink / special / dormant |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, row in rows.items():
        grid = row["grid"]
        kinds = row["kinds"]
        kept_of = " / ".join(
            f"{kinds[kind]['kept_by_cahp']}/{kinds[kind]['count']}" for kind in ("sink", "special-token", "dormant")
        )
        lines.append(
            f"| {name} | {ROWS[name][4]} | {grid['layers']}x{grid['heads']} | {row['examples']} | "
            f"{kinds['sink']['count']} | {kinds['special-token']['count']} | {kinds['dormant']['count']} | "
            f"{row['cahp_kept']} ({row['cahp_kept'] / (grid['layers'] * grid['heads']):.0%}) | {kept_of} |"
        )
    lines += ["", *_overlap_markdown(removal_overlap()), "## By layer", ""]
    for name, row in rows.items():
        lines += [
            f"**{name}** (layers 0..{row['grid']['layers'] - 1})",
            "",
            f"- sink heads per layer: {' '.join(map(str, row['kinds']['sink']['per_layer']))}",
            f"- special-token heads per layer: {' '.join(map(str, row['kinds']['special-token']['per_layer']))}",
            f"- dormant heads per layer: {' '.join(map(str, row['kinds']['dormant']['per_layer']))}",
            f"- mean sink score per layer: {_numbers(row['sink_score_by_layer'], 2)}",
            f"- mean special-token share per layer: {_numbers(row['special_share_by_layer'], 2)}",
            f"- JS divergence of adjacent layers (l-1, l), l = 1..: {_numbers(row['layer_js'])}",
            f"- KL divergence of adjacent layers: {_numbers(row['layer_kl'])}",
            f"- mean JS of each head to its best-matched head of the previous layer: "
            f"{_numbers(row['best_match_js_by_layer'])}",
            f"- command: `{row['command']}` ({row['seconds']} s)"
            if row.get("seconds")
            else f"- command: `{row['command']}`",
            "",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), default=list(ROWS), help="models to analyse")
    parser.add_argument("--fresh", action="store_true", help="recompute analyses that are already there")
    args = parser.parse_args()
    rows = {}
    for name in ROWS:
        payload = run_row(name, args.fresh) if name in args.rows else None
        if payload is None and (RESULTS / "heads" / f"{name}.json").is_file():
            payload = json.loads((RESULTS / "heads" / f"{name}.json").read_text())
        if payload is not None:
            rows[name] = findings(payload)
    (RESULTS / "heads.json").write_text(json.dumps({**rows, "removal_overlap": removal_overlap()}, indent=1) + "\n")
    (RESULTS / "heads.md").write_text(markdown(rows))
    print(f"wrote {RESULTS / 'heads.md'} ({len(rows)} models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
