"""`cahp prune` end to end on a tiny model: report, plots, a reloadable pruned model, determinism, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


def _config(model: Path, task: TaskOptions, **cahp: object) -> PruneConfig:
    config = PruneConfig(
        model=str(model),
        task=task,
        recovery=TrainingConfig(epochs=1, learning_rate=1e-3, batch_size=8),
        latency_repeats=2,
        latency_seq_len=16,
        latency_batch_size=4,
    )
    config.cahp.tsne_iterations = 250
    for key, value in cahp.items():
        setattr(config.cahp, key, value)
    return config


def test_prune_end_to_end_reloads(finetuned: tuple[Path, TaskOptions], tmp_path: Path) -> None:
    from cahp.models import load_classifier

    model, task = finetuned
    report = prune(_config(model, task), tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert {"report.json", "model", "plots", "run_config.json"} <= {p.name for p in out.iterdir()}
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
    config = _config(model, task, keep=5)
    config.recovery.epochs = 0
    first = prune(config, tmp_path / "a", progress=False)
    second = prune(config, tmp_path / "b", progress=False)
    assert first["kept_heads_by_layer"] == second["kept_heads_by_layer"]
    assert first["selection"]["k"] == 5 and first["selection"]["budget_mode"] == "keep"
    assert first["accuracy"]["after_recovery"] == first["accuracy"]["after_pruning"]
    assert first["recovery_history"] == []


def test_interrupted_prune_resumes_from_cached_stages(
    finetuned: tuple[Path, TaskOptions], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cahp.pipeline as pipeline

    model, task = finetuned
    config = _config(model, task)

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train_model", crash)
    with pytest.raises(KeyboardInterrupt):
        prune(config, tmp_path / "out", progress=False)
    stages = tmp_path / ".out.partial" / "stages"
    assert {"signatures.npz", "salience.json", "selection.json", "accuracy_pruned.json"} <= {
        p.name for p in stages.iterdir()
    }
    monkeypatch.undo()
    calls = {"signatures": 0}
    real_collect = pipeline.collect_signatures

    def counting_collect(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        calls["signatures"] += 1
        return real_collect(*args, **kwargs)

    monkeypatch.setattr(pipeline, "collect_signatures", counting_collect)
    report = prune(config, tmp_path / "out", progress=False)
    assert calls["signatures"] == 0, "signatures were cached and must not be collected again"
    assert report["recovery_history"] and (tmp_path / "out" / "report.json").is_file()
