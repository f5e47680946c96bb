"""Fine-tuning a tiny random BERT: metrics written, interrupted runs resume to the same model, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cahp.errors import ModelNotFoundError, OutputExistsError
from cahp.train import FinetuneConfig, TaskOptions, TrainingConfig, finetune
from tests.conftest import tiny_bert_folder, tiny_task_folder


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return tiny_bert_folder(root / "tiny-bert"), tiny_task_folder(root / "task")


def _config(model: Path, task: Path) -> FinetuneConfig:
    return FinetuneConfig(
        model=str(model),
        task=TaskOptions(str(task), max_length=16),
        training=TrainingConfig(epochs=2, learning_rate=1e-3, batch_size=8, checkpoint_every=2),
    )


def test_finetune_writes_model_metrics_and_config(tiny_setup: tuple[Path, Path], tmp_path: Path) -> None:
    model, task = tiny_setup
    out = tmp_path / "run"
    metrics = finetune(_config(model, task), out, progress=False)
    assert {"config.json", "model.safetensors", "metrics.json", "run_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "checkpoint.pt").exists()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["results"]["test"]["examples"] == 16
    # the recorded accuracy is that of the saved model on the test file, computed here independently
    assert saved["results"]["test"]["accuracy"] == pytest.approx(_accuracy_of(out, task / "test.jsonl"))
    assert [row["epoch"] for row in saved["history"]] == [1, 2]
    assert json.loads((out / "run_config.json").read_text())["training"]["learning_rate"] == 1e-3
    assert metrics["task"]["num_labels"] == 3
    with pytest.raises(OutputExistsError):
        finetune(_config(model, task), out, progress=False)


def _accuracy_of(model_folder: Path, test_file: Path) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(line) for line in test_file.read_text().splitlines()]
    model = AutoModelForSequenceClassification.from_pretrained(model_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    correct = 0
    with torch.no_grad():
        for row in rows:  # one at a time: no padding, nothing shared with cahp's batching
            inputs = tokenizer(row["text"], truncation=True, max_length=16, return_tensors="pt")
            correct += int(model(**inputs).logits.argmax(-1).item() == row["label"])
    return correct / len(rows)


def test_interrupted_run_resumes_to_the_same_model(
    tiny_setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, task = tiny_setup
    straight_metrics = finetune(_config(model, task), tmp_path / "straight", progress=False)

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def interrupting_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 9:  # mid second epoch, after the checkpoint at step 8
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupting_step)
    with pytest.raises(KeyboardInterrupt):
        finetune(_config(model, task), tmp_path / "resumed", progress=False)
    assert not (tmp_path / "resumed").exists()
    assert (tmp_path / ".resumed.partial" / "checkpoint.pt").is_file()
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed_metrics = finetune(_config(model, task), tmp_path / "resumed", progress=False)

    # the loss of the interrupted epoch covers all its steps (not only those after the resume) ...
    assert [row["train_loss"] for row in resumed_metrics["history"]] == [
        row["train_loss"] for row in straight_metrics["history"]
    ]
    assert [row["train_loss_steps"] for row in resumed_metrics["history"]] == [6, 6]
    # ... and the run says what it did itself: steps 9-12 of 12 (the checkpoint was at step 8)
    assert [row["steps_this_run"] for row in resumed_metrics["history"]] == [0, 4]
    assert resumed_metrics["steps_this_run"] == 4 and resumed_metrics["total_steps"] == 12
    assert resumed_metrics["resumed"] and straight_metrics["steps_this_run"] == 12

    from safetensors.torch import load_file

    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6)


def test_fractional_epochs_and_subset(tiny_setup: tuple[Path, Path], tmp_path: Path) -> None:
    model, task = tiny_setup
    config = _config(model, task)
    config.training.epochs = 0.5
    config.max_train_examples = 24
    metrics = finetune(config, tmp_path / "half", progress=False)
    assert metrics["train_examples"] == 24
    assert metrics["history"][-1]["step"] == 2  # ceil(0.5 * 24 / 8)


def test_unknown_model_alias_is_a_clear_error(tmp_path: Path) -> None:
    from cahp.models import resolve_model

    with pytest.raises(ModelNotFoundError, match="neither an alias"):
        resolve_model("./no/such/folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"holds no config\.json"):
        resolve_model(tmp_path / "empty")


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cahp.cli import main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("1")
    code = main(
        [
            "finetune",
            "--model",
            "minilm-l6",
            "--task",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and "DataError" in err  # exit 1: an error cahp explains
    code = main(["evaluate", "--model", str(tmp_path / "nothing-here"), "--task", "sst5"])
    assert code == 1 and "ModelNotFoundError" in capsys.readouterr().err


def test_group_by_length_reaches_the_loop_from_both_commands(tiny_setup: tuple[Path, Path], tmp_path: Path) -> None:
    from cahp.cli import build_parser
    from cahp.commands.finetune import finetune_config
    from cahp.commands.prune import prune_config

    model, task = tiny_setup
    parser = build_parser()
    common = ["--task", str(task), "--out", str(tmp_path / "x"), "--group-by-length"]
    finetune_args = parser.parse_args(["finetune", "--model", str(model), *common])
    prune_args = parser.parse_args(["prune", "--model", str(model), *common])
    assert finetune_config(finetune_args).training.group_by_length
    assert prune_config(prune_args).recovery.group_by_length
    plain = parser.parse_args(["finetune", "--task", str(task), "--out", "y"])
    assert not finetune_config(plain).training.group_by_length

    config = _config(model, task)
    config.training.group_by_length = True
    metrics = finetune(config, tmp_path / "grouped", progress=False)
    saved = json.loads((tmp_path / "grouped" / "run_config.json").read_text())
    assert saved["training"]["group_by_length"] is True
    assert metrics["history"][-1]["step"] == 2 * 6  # 48 examples in batches of 8, two epochs
