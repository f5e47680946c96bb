"""`cahp bench` on a tiny model: the grid, a kill mid-grid and the resume, the summary; `cahp prune` with a
scorer; the config files."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread

from cahp.bench import BenchConfig, expand_path, run_bench
from cahp.errors import CahpError
from cahp.reporting.bench_report import write_bench_report
from cahp.train import TaskOptions, TrainingConfig
from tests.conftest import tiny_bert_folder, tiny_task_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TaskOptions]:
    """A tiny random 3-label BERT classifier (3 layers x 4 heads) and a toy task."""
    root = tmp_path_factory.mktemp("bench")
    tiny_bert_folder(root / "model", layers=3, heads=4, num_labels=3, intermediate_size=48)
    return root / "model", TaskOptions(str(tiny_task_folder(root / "task", examples=48)), max_length=16)


def _config(classifier: tuple[Path, TaskOptions], out: Path) -> BenchConfig:
    model, task = classifier
    return BenchConfig(
        model=str(model),
        out=str(out),
        task=task,
        methods=["cahp", "random"],
        budgets=[0.5, "knee"],
        seeds=[0],
        calibration_size=None,
        method_settings={"cahp": {"tsne_iterations": 250}},
        resample_calibration=False,
        recovery=TrainingConfig(epochs=1, learning_rate=1e-3, batch_size=8),
        recovery_seeding="fixed",  # the committed grids' rule: a deterministic method runs one seed
        recovery_max_examples=24,
    )


def test_bench_resumes_after_a_kill_and_writes_the_summary(
    classifier: tuple[Path, TaskOptions], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cahp.bench.runner as runner
    import cahp.run

    config = _config(classifier, tmp_path / "bench")
    real_train = cahp.run.train_model
    calls = {"train": 0, "signatures": 0}

    def dies_on_third_recovery(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        calls["train"] += 1
        if calls["train"] == 3:
            raise KeyboardInterrupt("killed")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(cahp.run, "train_model", dies_on_third_recovery)
    with pytest.raises(KeyboardInterrupt):
        run_bench(config, progress=False)
    cells = tmp_path / "bench" / "cells"
    assert sorted(p.name for p in cells.iterdir()) == ["cahp__seed0__0.5.json", "cahp__seed0__knee.json"]
    assert not (tmp_path / "bench" / "summary.md").exists()

    def counting(function):  # type: ignore[no-untyped-def]
        def wrapper(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
            calls[function.__name__] = calls.get(function.__name__, 0) + 1
            return function(*args, **kwargs)

        return wrapper

    from cahp.methods.cahp import CAHP

    calls.clear()
    monkeypatch.setattr(cahp.run, "train_model", counting(real_train))
    monkeypatch.setattr(CAHP, "fit", counting(CAHP.fit))
    result = run_bench(config, progress=False)
    assert result == {"cells": 4, "computed": 2, "summary": str(tmp_path / "bench" / "summary.md")}
    assert calls == {"train_model": 2}, "finished cells and the cached CAHP fit must not be recomputed"

    records = {p.stem: json.loads(p.read_text()) for p in cells.iterdir()}
    assert len(records) == 4
    knee_k = records["cahp__seed0__knee"]["keep"]
    assert records["random__seed0__knee"]["keep"] == knee_k, "other methods use CAHP's k* as the knee budget"
    assert records["cahp__seed0__knee"]["fit_cached"] and not records["cahp__seed0__0.5"]["fit_cached"]
    assert records["random__seed0__0.5"]["keep"] == 6 == records["cahp__seed0__0.5"]["keep"]
    for record in records.values():
        assert record["kept"] >= record["keep"] and all(record["kept_heads_by_layer"][str(i)] for i in range(3))
        assert set(record["accuracy"]) == {"after_pruning", "after_recovery"}
    summary = (tmp_path / "bench" / "summary.md").read_text()
    assert (
        "| cahp |" in summary
        and "| random |" in summary
        and "Gain over the random control" in summary
        and "cahp vs the best other method" in summary
    )
    assert "binomial standard error" in summary
    assert "of the `train` split" in summary
    f1_table = summary.split("## Macro-F1 (mean, after pruning / after recovery)")[1].split("\n\n")[1]
    f1_row = next(line for line in f1_table.splitlines() if line.startswith("| random |"))
    f1_cell = records["random__seed0__0.5"]["accuracy"]
    expected = " / ".join(f"{f1_cell[s]['test']['macro_f1']:.4f}" for s in ("after_pruning", "after_recovery"))
    assert f1_row.split(" | ")[1] == expected, "the first budget column shows the cell's own macro-F1"
    assert {p.name for p in (tmp_path / "bench" / "plots").iterdir()} == {
        "accuracy_vs_heads.png",
        "layer_retention.png",
        "kept_depth.png",
    }
    width = imread(tmp_path / "bench" / "plots" / "accuracy_vs_heads.png").shape[1]
    assert width == 2 * 6 * 120, "after pruning and after recovery side by side"
    assert "A cell = prune, evaluate, recover, evaluate." in summary
    assert run_bench(config, progress=False)["computed"] == 0
    assert "Same heads across seeds" not in (tmp_path / "bench" / "summary.md").read_text()
    assert "Partial grid" not in summary

    # a summary of an unfinished grid says which cells are missing
    knee_cell = cells / "random__seed0__knee.json"
    saved = knee_cell.read_text()
    knee_cell.unlink()
    partial = write_bench_report(tmp_path / "bench").read_text()
    assert "Partial grid: 3 of the 4 cells" in partial and "Not run yet: random (seed 0 at knee)." in partial
    knee_cell.write_text(saved)
    assert "Partial grid" not in write_bench_report(tmp_path / "bench").read_text()

    # a grid grows: a new seed runs only its own cells, CAHP's first (its k* is the knee budget)
    config.seeds, config.methods = [0, 1], ["random", "cahp", "magnitude"]
    order: list[str] = []
    real_run_cell = runner._Bench.run_cell

    def recording(self, method, seed, budget, dense):  # type: ignore[no-untyped-def]
        order.append(f"{method}:{seed}:{budget}")
        return real_run_cell(self, method, seed, budget, dense)

    monkeypatch.setattr(runner._Bench, "run_cell", recording)
    assert run_bench(config, progress=False)["computed"] == 6
    assert order == [
        "magnitude:0:0.5",
        "magnitude:0:knee",
        "cahp:1:0.5",
        "cahp:1:knee",
        "random:1:0.5",
        "random:1:knee",
    ]
    summary_json = json.loads((tmp_path / "bench" / "summary.json").read_text())
    overlap = summary_json["table"]["random"]["0.5"]["seed_overlap"]
    kept = [json.loads((cells / f"random__seed{s}__0.5.json").read_text())["kept_heads_by_layer"] for s in (0, 1)]
    heads = [{(layer, h) for layer, hs in k.items() for h in hs} for k in kept]
    assert overlap["n"] == 1 and overlap["mean"] == pytest.approx(len(heads[0] & heads[1]) / len(heads[0] | heads[1]))
    assert "seed_overlap" not in summary_json["table"]["magnitude"]["0.5"], "deterministic: one seed"
    assert "Same heads across seeds" in (tmp_path / "bench" / "summary.md").read_text()
    record = tmp_path / "bench" / "bench_config.json"
    older = json.loads(record.read_text())
    # a record from before these settings existed
    del older["recovery"]["group_by_length"], older["gqa_mode"], older["recovery_seeding"]
    record.write_text(json.dumps(older))
    assert run_bench(config, progress=False)["computed"] == 0, "missing settings read as their defaults"
    assert json.loads(record.read_text())["recovery_seeding"] == "fixed", "an old grid resumes with a fixed seed"
    assert {json.loads(p.read_text())["recovery_seed"] for p in cells.iterdir()} == {42}
    config.recovery_seeding = "per_seed"
    with pytest.raises(CahpError, match="different recovery_seeding"):
        run_bench(config, progress=False)
    config.recovery_seeding = "fixed"
    config.recovery = TrainingConfig(epochs=2, learning_rate=1e-3, batch_size=8)
    with pytest.raises(CahpError, match="other settings"):
        run_bench(config, progress=False)


def test_prune_with_a_scorer_needs_a_budget(classifier: tuple[Path, TaskOptions], tmp_path: Path) -> None:
    from cahp.pipeline import PruneConfig, prune, summary

    model, task = classifier
    config = PruneConfig(model=str(model), task=task, method="fisher", latency_repeats=1, latency_seq_len=8)
    config.recovery.epochs = 0
    with pytest.raises(CahpError, match="--keep, --sparsity, --flops or --latency"):
        prune(config, tmp_path / "none", progress=False)
    assert not list(tmp_path.glob("*none*")), "refused before anything is written"
    config.budget = "keep=5"
    report = prune(config, tmp_path / "out", progress=False)
    selection = report["selection"]
    assert selection["k"] == 5 and report["plan"]["budget"]["mode"] == "keep" and report["method"] == "fisher"
    assert report["heads"]["kept"] == 5 + len(selection["guardrail_heads"])
    assert len(list((tmp_path / "out" / "stages" / "methods").glob("fisher__*.pkl"))) == 1
    assert "fisher scores" in summary(report)
    assert (tmp_path / "out" / "plots" / "kept_heads.png").is_file()
    config.method_settings = {"max_examples": 8}
    report = prune(config, tmp_path / "eight", progress=False)
    assert report["plan"]["settings"]["max_examples"] == 8
    config.method_settings = {"max_exampels": 8}
    with pytest.raises(CahpError, match=r"no setting\(s\) \['max_exampels'\]"):
        prune(config, tmp_path / "bad", progress=False)
    config.method, config.method_settings = "cahp", {"steps": 3}
    with pytest.raises(CahpError, match=r"no setting\(s\) \['steps'\]"):
        prune(config, tmp_path / "bad", progress=False)
    config.method, config.method_settings = "nope", {}
    with pytest.raises(CahpError, match=r"unknown method 'nope'; available: .*cahp"):
        prune(config, tmp_path / "bad", progress=False)
    config.method, config.eval_max_examples = "fisher", 0
    with pytest.raises(CahpError, match="eval_max_examples must be a positive number"):
        prune(config, tmp_path / "bad", progress=False)
    assert not list(tmp_path.glob("*bad*")), "a refused run writes nothing"
    config.eval_max_examples = 10
    report = prune(config, tmp_path / "ten", progress=False)
    for stage in ("before_pruning", "after_pruning", "after_recovery"):
        assert {r["examples"] for r in report["accuracy"][stage].values()} == {10}
    assert "accuracy (10 examples): before" in summary(report)


def test_cahp_salience_from_a_head_scorer(
    classifier: tuple[Path, TaskOptions], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``salience: fisher`` makes each cluster keep its highest-Fisher head, in prune and in the bench."""
    import numpy as np

    from cahp.engine import task_calibration
    from cahp.models import load_classifier
    from cahp.pipeline import PruneConfig, prune, summary
    from cahp.scoring import get_scorer

    model_dir, task = classifier
    config = PruneConfig(model=str(model_dir), task=task, latency_repeats=1, latency_seq_len=8, budget="keep=5")
    config.recovery.epochs = 0
    for source, message in (("dsp", "depend on how many heads are kept"), ("nope", "unknown salience 'nope'")):
        config.method_settings = {"tsne_iterations": 250, "salience": source}
        with pytest.raises(CahpError, match=message):
            prune(config, tmp_path / "bad", progress=False)
    config.method_settings = {"tsne_iterations": 250, "salience": "fisher"}
    report = prune(config, tmp_path / "out", progress=False)
    assert not list(tmp_path.glob("*bad*")), "a refused salience writes nothing"

    data = task.load()
    model, tokenizer = load_classifier(model_dir)
    calibration = task_calibration(data, tokenizer, None, config.seed, task.max_length)
    fisher = get_scorer("fisher", seed=config.seed).score(model, calibration)
    selection = report["selection"]
    assert selection["settings"]["salience"] == "fisher"
    assert "one head per cluster by fisher scores" in summary(report)
    flat = fisher.reshape(-1)
    np.testing.assert_allclose(
        np.array(selection["salience"]).reshape(-1), (flat - flat.min()) / (flat.max() - flat.min())
    )
    clusters = np.array(selection["clusters"])
    for representative in selection["representatives"]:
        members = np.flatnonzero(clusters == clusters[representative])
        assert flat[representative] == flat[members].max(), "each cluster keeps its highest-Fisher head"

    bench = _config(classifier, tmp_path / "bench")
    bench.methods, bench.budgets, bench.recovery = ["cahp"], [0.5], TrainingConfig(epochs=0)
    bench.method_settings = {"cahp": {"tsne_iterations": 250, "salience": "fisher"}}
    capsys.readouterr()
    run_bench(bench, progress=True)
    printed = capsys.readouterr().out
    assert "cahp seed 0 budget 0.5:" in printed and "pruned (retraining-free)" in printed
    assert "recovered" not in printed, "a retraining-free cell claims no recovered accuracy"
    assert len(list((tmp_path / "bench" / "fitted").glob("cahp__*.pkl"))) == 1
    cell = json.loads((tmp_path / "bench" / "cells" / "cahp__seed0__0.5.json").read_text())
    assert cell["recovery_seed"] is None, "no recovery ran"
    summary_md = (tmp_path / "bench" / "summary.md").read_text()
    assert "this grid is retraining-free" in summary_md and "## Accuracy after pruning (no recovery)" in summary_md
    assert "## Accuracy after recovery" not in summary_md, "no recovery: no after-recovery table"
    assert "## Macro-F1 (mean, after pruning)" in summary_md
    assert "A cell = prune, evaluate." in summary_md, "no recovery step is claimed"
    width = imread(tmp_path / "bench" / "plots" / "accuracy_vs_heads.png").shape[1]
    assert width == 6 * 120, "one panel, not an after-recovery panel that repeats the first"
    for bad, message in (({"salience": "dsp"}, "depend on how many"), ({"salinece": "fisher"}, r"no setting\(s\)")):
        bench.method_settings = {"cahp": bad}
        with pytest.raises(CahpError, match=message):
            run_bench(bench, progress=False)


def test_config_files_paths_and_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cahp.cli import build_parser

    monkeypatch.setenv("CAHP_HOME", "/data/cahp")
    assert expand_path("$CAHP_HOME/finetuned/x") == "/data/cahp/finetuned/x"
    assert expand_path("${CAHP_HOME}/y") == "/data/cahp/y"
    assert expand_path("~/z") == str(Path("~/z").expanduser())
    monkeypatch.delenv("CAHP_HOME")
    assert expand_path("$CAHP_HOME/a") == str(Path("~/.cache/cahp/a").expanduser())
    with pytest.raises(CahpError, match="NO_SUCH_VARIABLE"):
        expand_path("$NO_SUCH_VARIABLE/a")
    for name in ("minilm_sst5.json", "minilm_mnli.json"):
        config = BenchConfig.from_file(REPO / "benchmarks" / "configs" / name)
        assert config.model.endswith(f"finetuned/{name.removesuffix('.json').replace('_', '-l6-')}")
        assert "cahp" in config.methods and "random" in config.methods and "knee" in config.budgets
        variant = BenchConfig.from_file(REPO / "benchmarks" / "configs" / name.replace(".json", "_cahp_fisher.json"))
        assert variant.method_settings["cahp"]["salience"] == "fisher" and variant.out == f"{config.out}-cahp-fisher"
        differing = {k for k, v in variant.to_dict().items() if config.to_dict()[k] != v}
        assert differing == {"out", "methods", "budgets", "method_settings"}, "the same recipe as the compared grid"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "m", "out": "o", "methodz": []}))
    with pytest.raises(CahpError, match="methodz"):
        BenchConfig.from_file(bad)
    from cahp.commands.options import UsageError
    from cahp.commands.prune import key_values, prune_config

    parser = build_parser()
    args = parser.parse_args(["prune", "--model", "m", "--out", "o", "--method", "l0", "--sparsity", "0.5"])
    assert args.method == "l0" and prune_config(args).method_settings == {}, "the method's own defaults"
    args = parser.parse_args(["prune", "--model", "m", "--out", "o", "--salience", "fisher"])
    assert prune_config(args).method_settings == {"salience": "fisher"}
    args = parser.parse_args(
        ["prune", "--model", "m", "--out", "o", "--scorer-setting", "steps=400", "--scorer-setting", "anneal=false"]
    )
    assert key_values(args.method_setting) == {"steps": 400, "anneal": False}
    assert key_values(["name=fast mode", "x=null"]) == {"name": "fast mode", "x": None}
    with pytest.raises(UsageError, match="KEY=VALUE"):
        key_values(["steps"])
    assert parser.parse_args(["bench", "--config", "c.json"]).config == "c.json"


def test_summaries_show_cache_paths_as_cahp_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cahp.reporting.bench_report import _shown

    monkeypatch.setenv("CAHP_HOME", str(tmp_path / "cache"))
    assert _shown(str(tmp_path / "cache" / "finetuned" / "m")) == "$CAHP_HOME/finetuned/m"
    assert _shown(str(tmp_path / "cache-other" / "m")) == str(tmp_path / "cache-other" / "m")
    assert _shown("/data/model") == "/data/model"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("uniform_layers", "x", '"uniform_layers" must be true or false'),
        ("resample_calibration", 1, '"resample_calibration" must be true or false'),
        ("seeds", [0, -1], '"seeds" must be whole numbers'),
        ("deterministic_seeds", 0, "deterministic_seeds must be a positive whole number"),
        ("method_settings", {"random": {"seed": 3}}, "the bench sets them"),
        ("budgets", [0.3, 1.5], "fractions of heads kept"),
        ("recovery_seeding", "random", '"recovery_seeding" must be one of fixed, per_seed'),
    ],
)
def test_bad_bench_config_values_are_named(
    classifier: tuple[Path, TaskOptions], tmp_path: Path, key: str, value: object, message: str
) -> None:
    config = _config(classifier, tmp_path / "bench")
    setattr(config, key, value)
    with pytest.raises(CahpError, match=re.escape(message)):
        run_bench(config, progress=False)
    assert not (tmp_path / "bench").exists(), "refused before anything is written"


def test_a_short_bench_config_gets_defaults_and_a_task_name() -> None:
    """No "recovery" key: the default recovery; "task": "sst5" is the task's name (both were TypeErrors)."""
    config = BenchConfig.from_dict({"model": "m", "out": "o", "task": "sst5"})
    assert config.recovery == BenchConfig(model="m", out="o").recovery and config.task.task == "sst5"
    with pytest.raises(CahpError, match=r"bench config\.task must be a JSON object, got int"):
        BenchConfig.from_dict({"model": "m", "out": "o", "task": 5})


def test_every_committed_grid_config_is_valid_and_each_recovery_study_varies_only_the_objective() -> None:
    import importlib.util

    from cahp.bench.runner import _validate

    configs = sorted((REPO / "benchmarks" / "configs").glob("*.json"))
    assert len(configs) > 20
    for path in configs:
        _validate(BenchConfig.from_file(path))
    spec = importlib.util.spec_from_file_location("recovery_script", REPO / "benchmarks" / "recovery.py")
    assert spec is not None and spec.loader is not None
    recovery = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recovery)
    for study, grids in recovery.STUDIES.items():
        records = {
            label: BenchConfig.from_file(REPO / "benchmarks" / "configs" / f"{grid}.json").to_dict()
            for label, grid in grids.items()
        }
        first = records["ce"]
        for label, record in records.items():
            differing = {key for key, value in record.items() if first[key] != value} - {"out"}
            # a column may change one more setting, and then its label names it ("kd at lr 2e-5")
            allowed = {"recovery_objective"} | ({"recovery"} if " at " in label else set())
            assert differing <= allowed, (study, label, differing)
            assert record["recovery_objective"]["loss"] == label.split(" ")[0], (study, label)


# ---- what a grid seed varies ------------------------------------------------------------------------------------


def test_each_grid_seed_recovers_with_its_own_training_seed(
    classifier: tuple[Path, TaskOptions], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``per_seed``: the cells of seed s recover with ``recovery.seed + s`` (recorded in each cell), so a method
    without randomness of its own runs every seed too and its seeds differ; ``fixed``: every cell recovers with
    ``recovery.seed`` and such a method runs its first seed only."""
    import cahp.run

    real_train = cahp.run.train_model
    trained: list[int] = []

    def recording(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        trained.append(args[3].seed)  # type: ignore[attr-defined]  # the recovery's TrainingConfig
        return real_train(*args, **kwargs)

    monkeypatch.setattr(cahp.run, "train_model", recording)
    config = _config(classifier, tmp_path / "per_seed")
    config.methods, config.budgets, config.seeds = ["magnitude", "random"], [0.5], [0, 2]
    config.method_settings = {}
    config.recovery_seeding = "per_seed"
    assert run_bench(config, progress=False)["computed"] == 4, "magnitude runs both seeds: its recoveries differ"
    cells = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "per_seed" / "cells").iterdir()}
    assert {name: cell["recovery_seed"] for name, cell in cells.items()} == {
        "magnitude__seed0__0.5": 42,
        "random__seed0__0.5": 42,
        "magnitude__seed2__0.5": 44,
        "random__seed2__0.5": 44,
    }
    assert sorted(trained) == [42, 42, 44, 44], "the recorded seed is the one the recovery trained with"
    first, third = cells["magnitude__seed0__0.5"], cells["magnitude__seed2__0.5"]
    assert first["kept_heads_by_layer"] == third["kept_heads_by_layer"], "the same heads (deterministic)"
    assert first["recovery_history"][0]["train_loss"] != third["recovery_history"][0]["train_loss"]
    summary = json.loads((tmp_path / "per_seed" / "summary.json").read_text())
    assert summary["repeated_cells"] == [] and summary["recovery_seeding"] == "per_seed"
    assert "Each seed s recovers with training seed 42 + s" in (tmp_path / "per_seed" / "summary.md").read_text()
    assert json.loads((tmp_path / "per_seed" / "bench_config.json").read_text())["recovery_seeding"] == "per_seed"

    trained.clear()
    config.out, config.recovery_seeding = str(tmp_path / "fixed"), "fixed"
    assert run_bench(config, progress=False)["computed"] == 3, "magnitude runs its first seed only"
    assert trained == [42, 42, 42]
    seeds = {json.loads(p.read_text())["recovery_seed"] for p in (tmp_path / "fixed" / "cells").iterdir()}
    assert seeds == {42}
    assert "Every cell recovers with training seed 42" in (tmp_path / "fixed" / "summary.md").read_text()


def test_recovery_seeding_of_new_configs_and_of_committed_grids(tmp_path: Path) -> None:
    """A config built in code seeds each recovery from its grid seed; a JSON config or record without the key (the
    committed grids before the key existed, and their bench_config.json) replays with a fixed seed; a published grid
    records what its config asked."""
    from cahp.bench.runner import _validate, recovery_seed
    from cahp.legacy import upgrade_bench_record

    assert BenchConfig(model="m", out="o").recovery_seeding == "per_seed"
    assert BenchConfig.from_dict({"model": "m", "out": "o"}).recovery_seeding == "fixed"
    given = BenchConfig.from_dict({"model": "m", "out": "o", "recovery_seeding": "per_seed"})
    assert given.recovery_seeding == "per_seed" and given.to_dict()["recovery_seeding"] == "per_seed"
    assert [recovery_seed(given, seed) for seed in (0, 1, 2)] == [given.recovery.seed + s for s in (0, 1, 2)]
    fixed = BenchConfig.from_dict({"model": "m", "out": "o", "recovery": {"seed": 7}})
    assert [recovery_seed(fixed, seed) for seed in (0, 1, 2)] == [7, 7, 7]
    earlier = {"model": "m", "out": "o", "methods": ["cahp"], "cahp": {"seed": 3}}  # before methods had one interface
    upgraded = upgrade_bench_record(earlier)
    assert upgraded["recovery_seeding"] == "fixed" and upgraded["resample_calibration"] is False
    assert upgrade_bench_record({"recovery_seeding": "per_seed"})["recovery_seeding"] == "per_seed"
    for path in sorted((REPO / "benchmarks" / "configs").glob("*.json")):  # those that do not name it
        expected = json.loads(path.read_text()).get("recovery_seeding", "fixed")
        assert BenchConfig.from_file(path).recovery_seeding == expected, path.name
    assert BenchConfig(model="m", out="o").reconstruct == "weights", "a config built in code: cahp prune's default"
    assert BenchConfig.from_dict({"model": "m", "out": "o"}).reconstruct == "none", "a grid from before the step"
    for path in sorted((REPO / "benchmarks" / "results" / "bench").glob("*/bench_config.json")):
        source = REPO / "benchmarks" / "configs" / f"{path.parent.name}.json"  # a published grid: as its config says
        expected = json.loads(source.read_text()).get("recovery_seeding", "fixed") if source.is_file() else "fixed"
        assert BenchConfig.from_dict(json.loads(path.read_text())).recovery_seeding == expected, path.parent.name
    too_far = BenchConfig.from_dict(
        {"model": "m", "out": "o", "recovery_seeding": "per_seed", "recovery": {"seed": 2**32 - 2}, "seeds": [0, 2]}
    )
    with pytest.raises(CahpError, match=r"recovery\.seed \+ s, which must stay below"):
        _validate(too_far)


def _noise_floor_script():  # type: ignore[no-untyped-def]
    import importlib.util

    spec = importlib.util.spec_from_file_location("noise_floor_script", REPO / "benchmarks" / "noise_floor.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_noise_floor_script_fine_tunes_one_model_per_seed(classifier: tuple[Path, TaskOptions], tmp_path: Path) -> None:
    """benchmarks/noise_floor.py on the tiny classifier: one fine-tune per seed, the test accuracies, their mean and
    sample sd, in a file the bench summary reads; the real rows' commands are the baselines' with ``--seed``."""
    import statistics

    from cahp.reporting.bench_report import grid_noise_floor
    from cahp.train.finetune import FinetuneConfig, finetune

    script = _noise_floor_script()
    model, task = classifier
    folders: dict[int, Path] = {}

    def tiny_finetune(seed: int) -> dict[str, Any]:
        training = TrainingConfig(epochs=1, learning_rate=1e-3, batch_size=8, seed=seed)
        folders[seed] = tmp_path / f"tiny-toy-seed{seed}"
        finetune(FinetuneConfig(model=str(model), task=task, training=training), folders[seed], progress=False)
        return script.folder_result(folders[seed], seed)

    measured = script.measure([0, 1], tiny_finetune)
    assert sorted(folders) == [0, 1]
    for row in measured["per_seed"]:
        metrics = json.loads((folders[row["seed"]] / "metrics.json").read_text())
        assert row["test_accuracy"] == metrics["results"]["test"]["accuracy"] and row["source"] == "fine-tuned"
        assert row["train_loss"] == metrics["history"][-1]["train_loss"] is not None
    histories = [json.loads((f / "metrics.json").read_text())["history"] for f in folders.values()]
    assert histories[0][0]["train_loss"] != histories[1][0]["train_loss"], "the seeds trained differently"
    assert measured["n"] == 2 and measured["split"] == "test"
    assert measured["mean"] == pytest.approx(statistics.mean(measured["accuracies"]))
    assert measured["sd"] == pytest.approx(statistics.stdev(measured["accuracies"]))

    # a folder of the same recipe with another seed is reused; one of another recipe or seed is refused
    script.check_same_recipe(folders[1], folders[0], 1)
    with pytest.raises(SystemExit, match="trained with seed 1, not 2"):
        script.check_same_recipe(folders[1], folders[0], 2)
    other = json.loads((folders[1] / "run_config.json").read_text())
    other["training"]["learning_rate"] = 5e-3
    (folders[1] / "run_config.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match=r"another recipe .*\(training differ\)"):
        script.check_same_recipe(folders[1], folders[0], 1)

    results = tmp_path / "noise_floor.json"
    script.store_result(results, "finetuned/tiny-toy", {"model": "tiny", "task": "toy", **measured})
    grid = {"model": str(tmp_path / "finetuned" / "tiny-toy"), "task": {"task": "toy"}}
    floor = grid_noise_floor(grid, results)
    assert floor is not None and floor["measured"] and floor["sd"] == pytest.approx(measured["sd"])

    # the table: per-seed values, and which published grids print the row (their own, or as a stand-in)
    bench = tmp_path / "bench"
    for grid, folder in {"on_it": "finetuned/tiny-toy", "grouped": "finetuned/tiny-toy-grouped"}.items():
        (bench / grid).mkdir(parents=True)
        config = {"model": str(tmp_path / folder), "task": {"task": "toy"}}
        (bench / grid / "bench_config.json").write_text(json.dumps(config))
    # the grid on the row pruned another fine-tune: its dense model scores otherwise on the whole test split
    checkpoint = measured["per_seed"][0]["test_accuracy"]
    dense: dict[str, Any] = {"accuracy": {"test": {"accuracy": checkpoint + 0.01, "examples": 40}}}
    dense["task"] = {"split_sizes": {"test": 40}}
    (bench / "on_it" / "dense.json").write_text(json.dumps(dense))
    record = {"model": "tiny", "task": "toy", **measured, "command": "python benchmarks/noise_floor.py --rows x"}
    record["finetune_commands"] = {"0": "cahp finetune A", "1": "cahp finetune B"}
    table = script.write_table({"finetuned/tiny-toy": record}, tmp_path / "noise_floor.md", bench).read_text()
    values = ", ".join(f"{row['seed']}: {row['test_accuracy']:.4f}" for row in measured["per_seed"])
    assert f"| `finetuned/tiny-toy` | tiny | toy | test | {values} | {measured['mean']:.4f} |" in table
    assert "| 1 on it, 1 as stand-in |" in table and "- stand-in for: grouped" in table
    assert "- seed 1 (fine-tuned): `cahp finetune B`" in table
    other = f"seed 0's checkpoint as measured: {checkpoint:.4f}): on_it ({checkpoint + 0.01:.4f}). They pruned another"
    assert other in table
    # a dense accuracy on a subset of the split, or equal to the checkpoint's, is no sign of another fine-tune
    for accuracy, examples in ((checkpoint + 0.01, 20), (checkpoint, 40)):
        dense["accuracy"]["test"] = {"accuracy": accuracy, "examples": examples}
        (bench / "on_it" / "dense.json").write_text(json.dumps(dense))
        readers = script.grids_reading({"finetuned/tiny-toy": record}, bench)
        assert readers["finetuned/tiny-toy"]["other_fine_tune"] == []

    assert script.seeds_of(3) == [42, 43, 44]
    baseline = script.recipe_of("finetuned/minilm-l6-sst5")
    assert baseline.command(42) == script.finetune_command("minilm-l6", "sst5")
    command = baseline.command(43)
    assert command[-2:] == ["--seed", "43"] and "--epochs" in command
    assert command[command.index("--out") + 1].endswith("noise_floor/minilm-l6-sst5-seed43")
    with pytest.raises(SystemExit, match=r"neither a row of finetune_baselines\.py"):
        script.main(["--rows", "finetuned/tiny-toy"])
    with pytest.raises(SystemExit, match="at least 2"):
        script.main(["--rows", "finetuned/minilm-l6-sst5", "--num-seeds", "1"])
