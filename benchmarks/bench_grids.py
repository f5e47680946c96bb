"""The method comparison: run the ``cahp bench`` grids of ``configs/`` and publish them under ``results/bench/``.

    python benchmarks/bench_grids.py                          # every config in configs/
    python benchmarks/bench_grids.py --configs minilm_sst5    # one grid
    python benchmarks/bench_grids.py --publish-only           # copy what the grids hold now (partial too)
    python benchmarks/bench_grids.py --resummarize            # rewrite the published summaries from their cells

A grid starts from its fine-tuned baseline (``finetune_baselines.py`` makes it first when missing) and runs
in ``$CAHP_HOME/bench/<name>``, resumable cell by cell. Publishing copies the summary, its plots, the config
and every cell (one small JSON each) to ``results/bench/<name>/``; the cached scores and signatures stay in
``$CAHP_HOME``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_baselines import ensure_finetuned

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
RESULTS = HERE / "results" / "bench"
PUBLISHED = ["summary.md", "summary.json", "bench_config.json", "dense.json"]
#: What a variant grid may change: it runs some methods of a grid (other ones, or with other settings, budgets or
#: seeds) under the same recipe.
VARIANT_KEYS = {"out", "methods", "budgets", "seeds", "method_settings", "focus"}


def run_grid(name: str) -> None:
    from cahp.bench import BenchConfig

    config = BenchConfig.from_file(CONFIGS / f"{name}.json")
    baseline = re.search(r"finetuned/(.+)-(sst5|mnli)$", config.model)
    if baseline:
        ensure_finetuned(baseline.group(1), baseline.group(2))
    command = [str(Path(sys.executable).with_name("cahp")), "bench", "--config", str(CONFIGS / f"{name}.json")]
    print("$ cahp bench --config", f"benchmarks/configs/{name}.json", flush=True)
    subprocess.run(command, check=True)


def publish(name: str) -> Path:
    """Rebuild the summary from the grid's files and copy it, the plots and the cells to ``results/bench``."""
    from cahp.bench import BenchConfig
    from cahp.reporting.bench_report import write_bench_report

    source = Path(BenchConfig.from_file(CONFIGS / f"{name}.json").out)
    if not (source / "dense.json").is_file():
        raise SystemExit(f"{source} holds no grid yet: run `python benchmarks/bench_grids.py --configs {name}`")
    write_bench_report(source)
    target = RESULTS / name
    staging = target.with_name(f".{name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for file in PUBLISHED:
        shutil.copy2(source / file, staging / file)
    shutil.copytree(source / "plots", staging / "plots")
    shutil.copytree(source / "cells", staging / "cells")
    (staging / "COMMAND").write_text(f"python benchmarks/bench_grids.py --configs {name}\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def _variant_label(method: str, config: dict, base: dict) -> str:
    """``cahp (salience: fisher)`` for a grid that reruns a method with settings other than its base grid's; a
    method the base grid does not run keeps its name (its settings are in its grid's summary)."""
    if method not in base["methods"]:
        return method
    settings = config["method_settings"].get(method, {})
    base_settings = base["method_settings"].get(method, {})
    changed = {key: value for key, value in settings.items() if base_settings.get(key) != value}
    return f"{method} ({', '.join(f'{key}: {value}' for key, value in changed.items())})" if changed else method


def overview(names: list[str], max_fraction: float = 0.3) -> Path:
    """``results/bench/overview.md``: accuracy after recovery at budgets of ``max_fraction`` or fewer heads
    (and the knee) for every published grid, the best method of each column in bold. A grid named
    ``<grid>_<suffix>`` whose config differs only in :data:`VARIANT_KEYS` (some methods with other settings)
    adds its rows to ``<grid>``'s table. A grid with repeated cells (a budget that resolved to another budget's
    heads, two seeds that chose the same heads) says how many of its cells are distinct, and a mean over seeds that
    repeat each other how many distinct cells it stands on."""
    import json

    from cahp.bench import BenchConfig
    from cahp.reporting.bench_report import budget_label

    def load(name: str) -> tuple[dict, dict] | None:
        path = RESULTS / name / "summary.json"
        if not path.is_file():
            return None
        record = json.loads((RESULTS / name / "bench_config.json").read_text())
        return json.loads(path.read_text()), BenchConfig.from_dict(record).to_dict()

    grids = {name: grid for name in names if (grid := load(name)) is not None}

    def recipe(name: str) -> dict:
        return {k: v for k, v in grids[name][1].items() if k not in VARIANT_KEYS}

    variants = {name: [v for v in grids if v.startswith(f"{name}_") and recipe(v) == recipe(name)] for name in grids}
    lines = [
        "# Method comparison at high compression",
        "",
        f"Accuracy after recovery (mean over seeds) with {max_fraction:.0%} of the heads or fewer; `knee` is",
        "CAHP's k*. Bold: the best method of the column. Written by `python benchmarks/bench_grids.py`.",
        "Repeated cells (same method, heads and results) count once: see each grid's summary.",
        "",
    ]
    for name, (summary, config) in grids.items():
        if any(name in members for members in variants.values()):
            continue  # shown in its grid's table
        if summary.get("metric", "accuracy") != "accuracy":
            lines += [f"## {name}", "", f"Ranked by {summary['metric']}: see `{name}/summary.md`.", ""]
            continue
        budgets = [budget_label(b) for b in config["budgets"]]
        budgets = [b for b in budgets if b == "knee" or float(b) <= max_fraction]
        if not budgets:
            lines += [
                f"## {name}",
                "",
                f"No budget at {max_fraction:.0%} of the heads or fewer: see `{name}/summary.md`.",
                "",
            ]
            continue
        rows = [(m, summary["table"][m]) for m in config["methods"] if m in summary["table"]]
        for variant in variants[name]:
            variant_summary, variant_config = grids[variant]
            rows += [
                (_variant_label(m, variant_config, config), variant_summary["table"][m])
                for m in variant_config["methods"]
                if m in variant_summary["table"]
            ]
        means = {b: [row[b]["after_recovery"]["mean"] for _, row in rows if b in row] for b in budgets}
        best = {b: max(values, default=None) for b, values in means.items()}
        notes = [f"dense {summary['dense_accuracy']:.4f}"]
        if not config["recovery"]["epochs"]:
            notes.append("retraining-free: accuracy right after pruning")
        if summary.get("cells", 0) < summary.get("cells_planned", 0):
            notes.append(f"partial: {summary['cells']} of {summary['cells_planned']} cells, see its summary")
        if summary.get("cells_distinct", summary.get("cells", 0)) < summary.get("cells", 0):
            notes.append(f"{summary['cells_distinct']} distinct of its {summary['cells']} cells")
        lines += [
            f"## {name} ({'; '.join(notes)})",
            "",
            "| method | " + " | ".join(budgets) + " |",
            "|---" * (len(budgets) + 1) + "|",
        ]
        for label, row in rows:
            cells = []
            for b in budgets:
                if b not in row:
                    cells.append("–")
                    continue
                stats = row[b]["after_recovery"]
                distinct = row[b].get("distinct", stats["n"])
                seeds = f"n={stats['n']}" + (f", {distinct} distinct" if distinct < stats["n"] else "")
                text = f"{stats['mean']:.3f}" + (f" ± {stats['std']:.3f} ({seeds})" if stats["n"] > 1 else "")
                cells.append(f"**{text}**" if stats["mean"] == best[b] else text)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    path = RESULTS / "overview.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=None, help="config names in configs/ (default: all)")
    parser.add_argument("--publish-only", action="store_true", help="do not run; publish what is there")
    parser.add_argument(
        "--resummarize",
        action="store_true",
        help="do not run; rewrite the published grids' summaries from their own cells (after results/noise_floor.json "
        "or the report changed; their plots stay)",
    )
    args = parser.parse_args()
    if args.resummarize:
        from cahp.reporting.bench_report import rebuild_published_summary

        published = sorted(path.name for path in RESULTS.iterdir() if (path / "summary.json").is_file())
        for name in args.configs or published:
            print(f"rewrote {rebuild_published_summary(RESULTS / name)}")
        print(overview(published))
        return
    names = args.configs or sorted(path.stem for path in CONFIGS.glob("*.json"))
    for name in names:
        if not (CONFIGS / f"{name}.json").is_file():
            raise SystemExit(
                f"no config {name!r} in {CONFIGS}; available: {sorted(p.stem for p in CONFIGS.glob('*.json'))}"
            )
        if not args.publish_only:
            run_grid(name)
        print(f"published {publish(name)}")
    published = sorted(path.name for path in RESULTS.iterdir() if (path / "summary.json").is_file())
    print(overview(published).read_text())


if __name__ == "__main__":
    main()
