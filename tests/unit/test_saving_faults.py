"""Issue 31.3: a disk that fills up while a pruned model is saved gives one line (``no space left on device at ...;
free N MB or choose another --out``), leaves no half-written model folder, and the run resumes once there is room.

The write layer is patched to fail with ``ENOSPC``: ``safe_save_file``, which ``save_pretrained`` writes every
weight file with, the tokenizer's ``save_pretrained`` and the model card's writer.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification, modeling_utils

from cahp.errors import DiskFullError, OutputError
from cahp.surgery import load_pruned, prune_heads
from cahp.surgery.autoload import save_pruned
from tests.unit.tiny_models import build_model, make_inputs, plan_for

ONE_LINE = re.compile(r"no space left on device at \S+ \(the model needs about \d+ MB, \d+ MB free\); free \d+ MB or ")


def _disk_full(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _half_written_then_full(tensors: dict, filename: str, *args: Any, **kwargs: Any) -> None:
    Path(filename).write_bytes(b"\0" * 100)  # what a writer leaves when the disk fills up halfway
    raise OSError(errno.ENOSPC, "No space left on device", filename)


class SafetensorLikeError(Exception):
    """What the Rust writer of safetensors raises: not an OSError, the OS error in its text."""


def _safetensors_full(*args: Any, **kwargs: Any) -> None:
    raise SafetensorLikeError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })'
    )


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**make_inputs("bert")).logits


@pytest.mark.parametrize("writer", [_disk_full, _half_written_then_full, _safetensors_full])
def test_full_disk_while_saving_weights_is_one_line_and_leaves_nothing(
    writer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = prune_heads(build_model("bert"), plan_for("bert"))
    folder = tmp_path / "out" / "model"
    with monkeypatch.context() as patch:
        patch.setattr(modeling_utils, "safe_save_file", writer)
        with pytest.raises(DiskFullError) as refused:
            save_pruned(model, folder)
    message = str(refused.value)
    assert isinstance(refused.value, OutputError) and "\n" not in message
    assert ONE_LINE.match(message) and "choose another --out" in message, message
    assert not folder.exists(), "no model folder that could be taken as complete"
    assert list((tmp_path / "out").iterdir()) == [], "and no staging folder left"
    save_pruned(model, folder)  # room again: the same call succeeds
    torch.testing.assert_close(
        _logits(load_pruned(folder, attn_implementation="eager").eval()), _logits(model), rtol=0, atol=0
    )


def test_full_disk_while_saving_the_tokenizer_leaves_nothing(tmp_path: Path) -> None:
    class FullTokenizer:
        def save_pretrained(self, folder: Any) -> None:
            _disk_full()

    with pytest.raises(DiskFullError, match="no space left on device at"):
        save_pruned(prune_heads(build_model("bert"), plan_for("bert")), tmp_path / "model", tokenizer=FullTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_full_disk_while_replacing_a_saved_model_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = prune_heads(build_model("bert"), plan_for("bert"))
    folder = save_pruned(old, tmp_path / "model")
    (folder / "notes.txt").write_text("mine")
    new = prune_heads(build_model("bert", seed=3), {0: [0]})
    monkeypatch.setattr(modeling_utils, "safe_save_file", _half_written_then_full)
    with pytest.raises(DiskFullError):
        save_pruned(new, folder)
    monkeypatch.undo()
    assert json.loads((folder / "config.json").read_text())["cahp_kept_heads"]["0"] == [0, 2, 3]
    torch.testing.assert_close(
        _logits(load_pruned(folder, attn_implementation="eager").eval()), _logits(old), rtol=0, atol=0
    )
    save_pruned(new, folder)
    assert (folder / "notes.txt").read_text() == "mine", "other files in the folder stay"
    loaded = AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()
    torch.testing.assert_close(_logits(loaded), _logits(new), rtol=0, atol=1e-6)


def test_full_disk_while_writing_the_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cahp.reporting import model_card

    monkeypatch.setattr(model_card, "atomic_write", _disk_full)
    monkeypatch.setattr(model_card, "render_model_card", lambda *args: "card")
    monkeypatch.setattr(model_card, "_place_kept_heads_image", lambda *args: None)
    with pytest.raises(DiskFullError, match=r"no space left on device at .*; free \d+ MB or choose another --out"):
        model_card.write_model_card({}, tmp_path, "cahp prune")


def test_a_prune_run_on_a_full_disk_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cahp prune`` whose model save hits a full disk: one line, the staging folder kept (its settings, no model
    folder), no lock; the same run again finishes once there is room."""
    from cahp.pipeline import PruneConfig, prune
    from cahp.train import TaskOptions, TrainingConfig
    from tests.conftest import tiny_bert_folder, tiny_task_folder

    model = tiny_bert_folder(tmp_path / "tiny", layers=2, heads=4, num_labels=3)
    task = TaskOptions(str(tiny_task_folder(tmp_path / "task", examples=48)), max_length=16)
    config = PruneConfig(
        model=str(model),
        task=task,
        method="magnitude",
        budget="keep=4",
        recovery=TrainingConfig(epochs=0),
        latency_repeats=1,
        latency_seq_len=8,
        latency_batch_size=2,
    )
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(modeling_utils, "safe_save_file", _half_written_then_full)
        with pytest.raises(DiskFullError, match="no space left on device at") as refused:
            prune(config, out, progress=False, command="cahp prune")
    assert "\n" not in str(refused.value)
    staging = tmp_path / ".out.partial"
    assert not out.exists() and (staging / "run_config.json").is_file()
    assert not (staging / "model" / "config.json").exists(), "no half-written model folder in the staging folder"
    assert not (tmp_path / ".out.lock").exists()
    report = prune(config, out, progress=False, command="cahp prune")
    assert (out / "model" / "config.json").is_file() and report["heads"]["kept"] == 4
    assert load_pruned(out / "model") is not None
