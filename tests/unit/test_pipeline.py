"""`cahp prune` end to end on a tiny model: report, plots, a reloadable pruned model, determinism, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cahp.run
from cahp.pipeline import PruneConfig, prune, summary
from cahp.train import FinetuneConfig, TaskOptions, TrainingConfig, finetune
from tests.conftest import tiny_bert_folder, tiny_task_folder


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TaskOptions]:
    root = tmp_path_factory.mktemp("pipeline")
    model = tiny_bert_folder(root / "tiny", layers=3, heads=4)
    task = TaskOptions(str(tiny_task_folder(root / "task", examples=60)), max_length=16)
    training = TrainingConfig(epochs=1, learning_rate=1e-3, batch_size=8)
    finetune(FinetuneConfig(model=str(model), task=task, training=training), root / "ft", progress=False)
    return root / "ft", task


def _config(model: Path, task: TaskOptions, **fields: object) -> PruneConfig:
    config = PruneConfig(
        model=str(model),
        task=task,
        method_settings={"tsne_iterations": 250} if fields.get("method", "cahp") == "cahp" else {},
        recovery=TrainingConfig(epochs=1, learning_rate=1e-3, batch_size=8),
        latency_repeats=2,
        latency_seq_len=16,
        latency_batch_size=4,
    )
    for key, value in fields.items():
        setattr(config, key, value)
    return config


def test_prune_end_to_end_reloads(finetuned: tuple[Path, TaskOptions], tmp_path: Path) -> None:
    from cahp.models import load_classifier

    model, task = finetuned
    report = prune(_config(model, task), tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert {"report.json", "model", "plots", "run_config.json"} <= {p.name for p in out.iterdir()}
    assert {"README.md", "modeling_cahp.py", "kept_heads.png"} <= {p.name for p in (out / "model").iterdir()}
    assert {p.name for p in (out / "plots").iterdir()} == {
        "mss_curve.png",
        "kept_heads.png",
        "head_space.png",
    }
    saved = json.loads((out / "report.json").read_text())
    kept = {int(layer): heads for layer, heads in saved["kept_heads_by_layer"].items()}
    assert sum(map(len, kept.values())) == saved["heads"]["kept"] == report["heads"]["kept"]
    assert all(kept[layer] for layer in range(3)), "every layer keeps at least one head by default"
    assert saved["selection"]["k"] <= saved["heads"]["kept"] < 12
    assert saved["parameters"]["pruned"] < saved["parameters"]["dense"]
    assert set(saved["accuracy"]) == {"before_pruning", "after_pruning", "after_recovery"}
    assert saved["selection"]["knee"]["ks"][0] == 2
    assert "heads kept:" in summary(saved)

    reloaded, tokenizer = load_classifier(out / "model")
    from cahp.surgery import kept_heads_by_layer

    assert kept_heads_by_layer(reloaded) == kept
    batch = tokenizer(["good plot", "awful music scene"], padding=True, return_tensors="pt")
    logits = reloaded(**batch).logits
    again, _ = load_classifier(out / "model")
    torch.testing.assert_close(again(**batch).logits, logits)


def test_same_seed_same_heads_and_budget_mode(finetuned: tuple[Path, TaskOptions], tmp_path: Path) -> None:
    model, task = finetuned
    config = _config(model, task, budget="keep=5")
    config.recovery.epochs = 0
    first = prune(config, tmp_path / "a", progress=False)
    second = prune(config, tmp_path / "b", progress=False)
    assert first["kept_heads_by_layer"] == second["kept_heads_by_layer"]
    assert first["selection"]["k"] == 5 and first["plan"]["budget"] == {"mode": "keep", "value": 5}
    assert first["accuracy"]["after_recovery"] == first["accuracy"]["after_pruning"]
    assert first["recovery_history"] == []


def test_interrupted_prune_resumes_from_cached_stages(
    finetuned: tuple[Path, TaskOptions], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    model, task = finetuned
    config = _config(model, task)

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cahp.run, "train_model", crash)
    with pytest.raises(KeyboardInterrupt):
        prune(config, tmp_path / "out", progress=False)
    assert not (tmp_path / ".out.lock").exists(), "an interrupted run releases its lock"
    stages = tmp_path / ".out.partial" / "stages"
    assert {"plan.json", "quality_pruned.json"} <= {p.name for p in stages.iterdir()}
    assert len(list((stages / "methods").glob("cahp__*.pkl"))) == 1, "the fitted method is cached"
    monkeypatch.undo()
    calls = {"fit": 0}
    from cahp.methods.cahp import CAHP

    real_fit = CAHP.fit

    def counting_fit(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        calls["fit"] += 1
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(CAHP, "fit", counting_fit)
    report = prune(config, tmp_path / "out", progress=False)
    assert calls["fit"] == 0, "the plan was cached and the method must not be fitted again"
    assert report["recovery_history"] and (tmp_path / "out" / "report.json").is_file()
    assert "plan" in report["stages_cached"] and "quality_before" in report["stage_seconds"]


def test_unreadable_cached_fit_is_recomputed(
    finetuned: tuple[Path, TaskOptions], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fit cache truncated by a hard kill is recomputed (with a message), not a stuck run."""
    from cahp.calibration import Calibration, SequenceClassification
    from cahp.data import encode_split, load_task
    from cahp.engine import Engine
    from cahp.models import load_classifier

    model_folder, task_options = finetuned
    task = load_task(task_options.task)
    model, tokenizer = load_classifier(model_folder, task.num_labels)
    calibration = Calibration(
        encode_split(tokenizer, task.split("train"), 16), tokenizer, SequenceClassification(task.num_labels)
    )
    first = Engine(model, calibration, tmp_path / "fits").fit("magnitude", {"seed": 0})
    [cached] = list((tmp_path / "fits").glob("magnitude__*.pkl"))
    cached.write_bytes(cached.read_bytes()[:20])
    capsys.readouterr()
    again = Engine(model, calibration, tmp_path / "fits").fit("magnitude", {"seed": 0})
    assert "cached fit of magnitude unreadable" in capsys.readouterr().err
    assert (again.scores_ == first.scores_).all()


def test_replayed_run_config_gives_the_same_heads(finetuned: tuple[Path, TaskOptions], tmp_path: Path) -> None:
    """``run_config.json`` replays a run: the same config, the same kept heads."""
    model, task = finetuned
    config = _config(model, task, method="gradient", budget="sparsity=0.5")
    config.recovery.epochs = 0
    first = prune(config, tmp_path / "a", progress=False)
    record = json.loads((tmp_path / "a" / "run_config.json").read_text())
    replayed = PruneConfig.from_dict(record)
    assert replayed == config
    second = prune(replayed, tmp_path / "b", progress=False)
    assert second["kept_heads_by_layer"] == first["kept_heads_by_layer"]
    assert first["heads"]["kept"] == 6


def test_earlier_run_config_records_are_upgraded() -> None:
    """A run_config.json written before the method interface replays with the same meaning."""
    old = {
        "command": "prune",
        "model": "m",
        "task": {"task": "sst5"},
        "method": "cahp",
        "scorer_settings": {},
        "cahp": {
            "metric": "jm",
            "salience": "gradient",
            "allow_empty_layers": True,
            "keep": 7,
            "sparsity": None,
            "seed": 3,
        },
        "calibration_size": None,
        "signature_batch_size": 16,
        "salience_fraction": 0.5,
    }
    config = PruneConfig.from_dict(old)
    assert config.budget == "keep=7" and config.seed == 3 and config.allow_empty_layers
    assert config.method_settings == {"metric": "jm", "salience_settings": {"fraction": 0.5}, "batch_size": 16}


def test_bad_budget_is_refused_before_any_work(finetuned: tuple[Path, TaskOptions], tmp_path: Path) -> None:
    """--keep above the head count, --keep 0 or a scorer without a budget: refused, nothing left behind."""
    from cahp.errors import CahpError

    model, task = finetuned
    for fields, message in [
        ({"budget": "keep=13"}, "more than the model's 12 heads"),
        ({"budget": "keep=0"}, "at least 1"),
        ({"budget": "sparsity=1.5"}, "strictly between 0 and 1"),
        ({"method": "gradient"}, "no automatic head count"),
        ({"method": "no-such-method", "budget": "keep=3"}, "unknown method"),
    ]:
        with pytest.raises(CahpError, match=message):
            prune(_config(model, task, **fields), tmp_path / "out", progress=False)
        assert not list(tmp_path.iterdir()), f"{fields} left files behind"


@pytest.mark.parametrize("gqa", [False])
def test_uniform_layers_constraint_keeps_the_same_count_everywhere(
    finetuned: tuple[Path, TaskOptions], tmp_path: Path, gqa: bool
) -> None:
    model, task = finetuned
    config = _config(model, task, method="gradient", budget="keep=7", uniform_layers=True)
    config.recovery.epochs = 0
    report = prune(config, tmp_path / "out", progress=False)
    counts = {len(heads) for heads in report["kept_heads_by_layer"].values()}
    assert counts == {2}, "7 heads over 3 layers under uniform_layers: 2 per layer (round(7 / 3))"
    assert report["heads"]["requested"] == report["heads"]["kept"] == 6


def test_string_labels_follow_the_models_label2id(finetuned: tuple[Path, TaskOptions], tmp_path: Path) -> None:
    """A copy of the task with string labels is numbered by the model's label2id, not alphabetically."""
    import shutil

    model, task = finetuned
    named = tmp_path / "named-model"
    shutil.copytree(model, named)
    names = ["zeta", "alpha", "mid"]  # alphabetical order would number them 1, 2, 0
    config_file = named / "config.json"
    record = json.loads(config_file.read_text())
    record["id2label"] = {str(i): name for i, name in enumerate(names)}
    record["label2id"] = {name: i for i, name in enumerate(names)}
    config_file.write_text(json.dumps(record))
    strings = tmp_path / "named-task"
    strings.mkdir()
    for split in Path(task.task).iterdir():
        rows = [json.loads(line) for line in split.read_text().splitlines()]
        split_copy = strings / split.name
        split_copy.write_text("".join(json.dumps({**row, "label": names[row["label"]]}) + "\n" for row in rows))
    runs = {}
    for name, task_folder in (("integers", task.task), ("strings", str(strings))):
        config = _config(named, TaskOptions(task_folder, max_length=16), method="magnitude", budget="keep=6")
        config.recovery.epochs = 0
        runs[name] = prune(config, tmp_path / name, progress=False)

    def scores(report: dict) -> dict:
        return {
            (stage, split): (result["accuracy"], result["macro_f1"])
            for stage, splits in report["accuracy"].items()
            for split, result in splits.items()
        }

    assert scores(runs["strings"]) == scores(runs["integers"])
    assert runs["strings"]["task"]["label_mapping"] == "label2id"
    assert runs["strings"]["task"]["label_names"] == names


def test_resume_refuses_a_changed_model_or_changed_data(
    finetuned: tuple[Path, TaskOptions], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cached stages belong to the model weights and data they came from: a rerun with either changed is refused."""
    import shutil

    from cahp.errors import OutputExistsError

    model, task = finetuned
    model_copy, task_copy = tmp_path / "model", tmp_path / "task"
    shutil.copytree(model, model_copy)
    shutil.copytree(task.task, task_copy)
    config = _config(model_copy, TaskOptions(str(task_copy), max_length=16), method="magnitude", budget="keep=6")

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cahp.run, "train_model", crash)
    with pytest.raises(KeyboardInterrupt):
        prune(config, tmp_path / "out", progress=False)
    monkeypatch.undo()  # a rerun that is not refused would now finish
    test_file = task_copy / "test.jsonl"
    original = test_file.read_text()
    rows = [json.loads(line) for line in original.splitlines()]
    test_file.write_text("".join(json.dumps({**row, "label": (row["label"] + 1) % 3}) + "\n" for row in rows))
    with pytest.raises(OutputExistsError, match="other data"):
        prune(config, tmp_path / "out", progress=False)
    test_file.write_text(original)
    from cahp.models import load_classifier

    classifier, _ = load_classifier(model_copy)
    with torch.no_grad():
        classifier.classifier.bias.add_(1.0)
    classifier.save_pretrained(model_copy)
    with pytest.raises(OutputExistsError, match="another model"):
        prune(config, tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"task": None}, "task must be the task options"),
        ({"seed": "x"}, "seed must be a whole number"),
        ({"seed": -1}, "seed must be a whole number in 0"),
        ({"method_settings": [1]}, "method_settings an object"),
        ({"eval_splits": "test"}, "eval_splits must list"),
        ({"uniform_layers": "yes"}, "uniform_layers must be true or false"),
        ({"calibration_size": 0}, "calibration_size must be a positive number"),
        ({"recovery": {"epochs": -1}}, "epochs must be a number >= 0"),
    ],
)
def test_a_replayed_config_with_a_bad_value_is_one_clear_error(fields: dict, message: str) -> None:
    """Values read from a run_config.json are checked by type and range when the config is built."""
    from cahp.errors import CahpError

    with pytest.raises(CahpError, match=message):
        PruneConfig.from_dict({"model": "m", **fields})


def test_an_output_folder_with_results_is_refused_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cahp.workloads.classification as classification
    from cahp.errors import OutputExistsError

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(classification, "load_classifier", must_not_load)
    monkeypatch.setattr(classification, "load_model_config", must_not_load)
    config = PruneConfig(model=str(tmp_path / "model"), method="magnitude", budget="keep=2")
    with pytest.raises(OutputExistsError, match="already holds results"):
        prune(config, out, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "nothing written beside it"


def test_prune_recovers_by_distillation_and_says_so(finetuned: tuple[Path, TaskOptions], tmp_path: Path) -> None:
    from cahp.train.distill import RecoveryObjective

    model, task = finetuned
    config = _config(model, task, method="gradient", budget="keep=5")
    config.recovery_objective = RecoveryObjective(loss="kd-relations", relation_layers="last")
    report = prune(config, tmp_path / "kd", progress=False)
    assert report["recovery"]["objective"]["loss"] == "kd-relations"
    examples = report["recovery"]["examples"]
    assert examples > 0 and report["recovery"]["teacher_forwards"] == -(-examples // 8)  # one per step, one epoch
    assert set(report["recovery_history"][0]["loss_parts"]) == {"ce", "kd", "relations"}
    assert "recovery: kd-relations (T=2, alpha=0.5" in summary(report)
    replayed = json.loads((tmp_path / "kd" / "run_config.json").read_text())
    assert PruneConfig.from_dict(replayed).recovery_objective == config.recovery_objective


def test_relation_layers_the_model_lacks_are_refused_before_any_work(
    finetuned: tuple[Path, TaskOptions], tmp_path: Path
) -> None:
    from cahp.errors import ConfigError
    from cahp.train.distill import RecoveryObjective

    model, task = finetuned
    config = _config(model, task, method="random", budget="keep=5")
    config.recovery_objective = RecoveryObjective(loss="kd-relations", relation_layers="0,7")  # 3 layers
    with pytest.raises(ConfigError, match=r"layers 0\.\.2"):
        prune(config, tmp_path / "out", progress=False)
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_replay_from_another_folder_prunes_the_recorded_model_and_says_when_its_weights_changed(
    finetuned: tuple[Path, TaskOptions],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Regression: ``--config`` replayed the model path as typed, relative to the new working folder."""
    import shutil

    from cahp.cli import main

    model, task = finetuned
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    shutil.copytree(model, first / "model")
    tiny_bert_folder(elsewhere / "model", layers=3, heads=4, num_labels=3)  # another model, the same relative name
    monkeypatch.chdir(first)
    argv = ["prune", "--model", "model", "--task", task.task, "--max-length", "16", "--method", "magnitude"]
    argv += ["--keep", "6", "--recovery-epochs", "0", "--latency-repeats", "1", "--latency-seq-len", "16"]
    assert main([*argv, "--out", "run"]) == 0
    recorded = json.loads((first / "run" / "run_config.json").read_text())
    assert recorded["inputs"]["model_path"] == str((first / "model").resolve()), "the resolved folder is recorded"

    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["prune", "--config", str(first / "run"), "--out", "replay"]) == 0
    replay = json.loads((elsewhere / "replay" / "report.json").read_text())
    original = json.loads((first / "run" / "report.json").read_text())
    assert replay["inputs"]["model"] == original["inputs"]["model"], "the recorded model, not ./model here"
    assert _same_figures(replay, original)
    assert "other weights" not in capsys.readouterr().err

    from cahp.models import load_classifier

    classifier, _ = load_classifier(first / "model")
    with torch.no_grad():
        classifier.classifier.bias.add_(1.0)
    classifier.save_pretrained(first / "model")
    assert main(["prune", "--config", str(first / "run"), "--out", "changed"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "other weights" in line]
    assert len(warned) == 1 and "pruning it anyway" in warned[0]
    assert main(["prune", "--config", str(first / "run"), "--strict", "--out", "strict"]) == 1
    err = capsys.readouterr().err
    assert "other weights than the replayed run recorded" in err and "--strict" in err
    assert not (elsewhere / "strict").exists() and not list(elsewhere.glob(".strict*")), "refused before writing"


def _same_figures(first: dict, second: dict) -> bool:
    """The accuracies of two reports, without their timings."""

    def figures(report: dict) -> dict:
        return {
            stage: {split: (r["accuracy"], r["macro_f1"]) for split, r in splits.items()}
            for stage, splits in report["accuracy"].items()
        }

    return figures(first) == figures(second)
