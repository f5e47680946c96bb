"""Regression tests for issue "Reliability": labels mapped by the model, atomic caches, locked output folders,
fingerprints, clear errors on bad data and settings, fast offline failures, subsets that keep every class."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cahp.data import TextSplit, load_task
from cahp.data.tasks import fingerprint_split
from cahp.errors import (
    ConfigError,
    DataError,
    ModelNotFoundError,
    OutputLockedError,
    UnsupportedArchitectureError,
)
from cahp.outputs import StagedOutput, atomic_save_npz, read_cache, write_json
from cahp.signatures.stats import StreamingMoments
from cahp.train import FinetuneConfig, TaskOptions, TrainingConfig, finetune, subsample
from tests.conftest import tiny_bert_folder, write_jsonl

# --------------------------------------------------------------------------------------------- helpers


def tiny_classifier_folder(folder: Path, label_names: list[str] | None, num_labels: int = 3) -> Path:
    """A tiny random 1-layer BERT classifier; ``label_names`` (index = id) become its label2id, or the defaults."""
    return tiny_bert_folder(
        folder, layers=1, heads=2, num_labels=num_labels, label_names=label_names, intermediate_size=32
    )


def string_label_rows(labels: list[str]) -> list[dict[str, str]]:
    return [{"text": f"example {i} {label}", "label": label} for i, label in enumerate(labels)]


# --------------------------------------------------------------------------------------------- 1. labels

#: The model's order differs from the alphabetical one (negative, neutral, positive).
MODEL_LABELS = ["positive", "negative", "neutral"]


def test_string_labels_follow_the_models_label2id(tmp_path: Path) -> None:
    model = tiny_classifier_folder(tmp_path / "model", MODEL_LABELS)
    labels = ["negative", "neutral", "positive", "positive", "negative"]
    write_jsonl(tmp_path / "data" / "test.jsonl", string_label_rows(labels))
    alphabetical = load_task(str(tmp_path / "data"))
    assert alphabetical.split("test").labels.tolist() == [0, 1, 2, 2, 0]  # the old (wrong) numbering

    task = TaskOptions(str(tmp_path / "data")).load(model=model)
    assert task.split("test").labels.tolist() == [MODEL_LABELS.index(label) for label in labels]
    assert task.label_names == MODEL_LABELS and task.label_mapping == "label2id"
    # the same, after the fact, from a task loaded alphabetically
    from cahp.models import load_model_config

    aligned = alphabetical.aligned_to(load_model_config(model))
    assert aligned.split("test").labels.tolist() == task.split("test").labels.tolist()


def test_evaluate_scores_string_labels_by_the_models_ids(tmp_path: Path) -> None:
    from cahp.evaluation.evaluate import evaluate
    from cahp.models import load_classifier

    model = tiny_classifier_folder(tmp_path / "model", MODEL_LABELS)
    labels = ["negative", "neutral", "positive"] * 4
    write_jsonl(tmp_path / "data" / "test.jsonl", string_label_rows(labels))
    report = evaluate(str(model), TaskOptions(str(tmp_path / "data"), max_length=16), progress=False)

    classifier, tokenizer = load_classifier(model)
    rows = string_label_rows(labels)
    with torch.no_grad():
        batch = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=16, return_tensors="pt")
        predicted = classifier(**batch).logits.argmax(-1).numpy()
    names = [classifier.config.id2label[int(p)] for p in predicted]
    expected = float(np.mean([name == label for name, label in zip(names, labels, strict=True)]))
    assert report["results"]["test"]["accuracy"] == pytest.approx(expected)
    assert report["task"]["label_names"] == MODEL_LABELS


def test_labels_the_model_does_not_know_are_refused(tmp_path: Path) -> None:
    model = tiny_classifier_folder(tmp_path / "model", MODEL_LABELS)
    write_jsonl(tmp_path / "data" / "test.jsonl", string_label_rows(["negative", "great", "positive"]))
    with pytest.raises(DataError, match=r"label 'great' at .*test\.jsonl, line 2 .*not one of the model's labels"):
        TaskOptions(str(tmp_path / "data")).load(model=model)


def test_finetune_records_its_label_numbering_for_later_commands(tmp_path: Path) -> None:
    base = tiny_bert_folder(tmp_path / "base", layers=1, heads=2)
    names = ["yes", "no", "maybe"]
    write_jsonl(tmp_path / "data" / "train.jsonl", string_label_rows([names[i % 3] for i in range(24)]))
    config = FinetuneConfig(
        model=str(base),
        task=TaskOptions(str(tmp_path / "data"), max_length=16),
        training=TrainingConfig(epochs=1, batch_size=8, learning_rate=1e-3),
        eval_splits=(),
    )
    finetune(config, tmp_path / "tuned", progress=False)
    saved = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert saved["label2id"] == {"maybe": 0, "no": 1, "yes": 2}
    # a later split without "maybe" would be numbered no=0, yes=1 alphabetically: the model's ids win
    write_jsonl(tmp_path / "later" / "test.jsonl", string_label_rows(["yes", "no", "yes"]))
    task = TaskOptions(str(tmp_path / "later")).load(model=tmp_path / "tuned")
    assert task.split("test").labels.tolist() == [2, 1, 2] and task.num_labels == 3


def test_integer_label_outside_the_model_says_which_where_and_num_labels(tmp_path: Path) -> None:
    model = tiny_classifier_folder(tmp_path / "model", None, num_labels=3)
    write_jsonl(tmp_path / "data" / "test.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 5}])
    with pytest.raises(DataError, match=r"label '5' in .*test\.jsonl \(split 'test'\).*3 labels.*--num-labels"):
        TaskOptions(str(tmp_path / "data")).load(model=model)
    # fewer classes in the data than the model has is fine: the count comes from the model
    write_jsonl(tmp_path / "few" / "test.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    assert TaskOptions(str(tmp_path / "few")).load(model=model).num_labels == 3


def test_classifier_with_another_label_count_mentions_num_labels(tmp_path: Path) -> None:
    from cahp.models import load_classifier

    model = tiny_classifier_folder(tmp_path / "model", None, num_labels=3)
    with pytest.raises(ModelNotFoundError, match=r"3 labels but the task has 5.*--num-labels 3"):
        load_classifier(model, num_labels=5)


# --------------------------------------------------------------------------------------------- 3. atomic caches


def _moments() -> StreamingMoments:
    return StreamingMoments(2).add_batch(torch.arange(12.0).reshape(6, 2), torch.tensor([0, 1, 0, 1, 0, 1]))


def test_killed_save_leaves_the_earlier_signatures_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "signatures.npz"
    _moments().save(path)

    def killed_savez(file, **arrays):  # type: ignore[no-untyped-def]
        handle = file if hasattr(file, "write") else open(file, "wb")  # noqa: SIM115
        handle.write(b"PK\x03\x04 truncated")
        handle.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", killed_savez)
    with pytest.raises(KeyboardInterrupt):
        StreamingMoments(2).add_batch(torch.ones(2, 2), torch.tensor([0, 1])).save(path)
    monkeypatch.undo()
    np.testing.assert_array_equal(StreamingMoments.load(path).mean_, _moments().mean_)
    assert [p.name for p in tmp_path.iterdir()] == ["signatures.npz"]  # no temporary file left


def test_unreadable_cache_is_moved_aside_and_recomputed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "signatures.npz"
    _moments().save(path)
    path.write_bytes(path.read_bytes()[:100])  # what a hard kill during a non-atomic write left behind
    assert read_cache(path, StreamingMoments.load, "signatures") is None
    assert "cached signatures unreadable" in capsys.readouterr().err
    assert not path.exists() and (tmp_path / "signatures.npz.unreadable").exists()
    assert read_cache(path, StreamingMoments.load, "signatures") is None  # missing: no notice
    assert capsys.readouterr().err == ""
    _moments().save(path)
    loaded = read_cache(path, StreamingMoments.load, "signatures")
    assert loaded is not None and loaded.count_.tolist() == [3, 3]


def test_atomic_helpers_write_complete_files(tmp_path: Path) -> None:
    atomic_save_npz(tmp_path / "a.npz", x=np.arange(3))
    with np.load(tmp_path / "a.npz") as data:
        assert data["x"].tolist() == [0, 1, 2]
    write_json(tmp_path / "b.json", {"k": 1})
    assert read_cache(tmp_path / "b.json", lambda p: json.loads(p.read_text()), "stage") == {"k": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.json"]


# --------------------------------------------------------------------------------------------- 6. locks


def _other_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_second_run_to_the_same_output_is_refused_naming_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = StagedOutput(out, {"a": 1}, command="cahp prune --out out").prepare()
    lock = tmp_path / ".out.lock"
    holder = json.loads(lock.read_text())
    other = _other_process()
    try:
        lock.write_text(json.dumps({**holder, "pid": other.pid}))  # as if another live process held it
        with pytest.raises(OutputLockedError, match=rf"pid {other.pid} on host .*command 'cahp prune --out out'"):
            StagedOutput(out, {"a": 1}).prepare()
    finally:
        other.kill()
        other.wait()
    lock.write_text(json.dumps(holder))
    first.commit()
    assert not lock.exists() and (out / "run_config.json").is_file()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    dead = _other_process()
    dead.kill()
    dead.wait()
    (tmp_path / ".out.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "x"}))
    with StagedOutput(tmp_path / "out", {"a": 1}) as staged:
        assert staged.path.is_dir()
        assert json.loads((tmp_path / ".out.lock").read_text())["pid"] != dead.pid
    assert "no longer running" in capsys.readouterr().err
    assert not (tmp_path / ".out.lock").exists()  # released on leaving the block


def test_lock_is_released_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), StagedOutput(tmp_path / "out", {"a": 1}):
        raise RuntimeError("failed mid-run")
    assert not (tmp_path / ".out.lock").exists() and (tmp_path / ".out.partial").is_dir()


def test_two_processes_cannot_share_an_output_folder(tmp_path: Path) -> None:
    script = (
        "import sys, time; from cahp.outputs import StagedOutput; "
        "StagedOutput(sys.argv[1], {'a': 1}, command='first run').prepare(); print('locked', flush=True); "
        "time.sleep(60)"
    )
    first = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=r"in use by another run.*command 'first run'"):
            StagedOutput(tmp_path / "out", {"a": 1}).prepare()
    finally:
        first.kill()
        first.wait()


def test_a_run_that_exits_without_releasing_frees_the_lock(tmp_path: Path) -> None:
    script = "import sys; from cahp.outputs import StagedOutput; StagedOutput(sys.argv[1], {'a': 1}).prepare()"
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], check=True)
    assert (tmp_path / ".out.partial").is_dir() and not (tmp_path / ".out.lock").exists()


def test_output_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    from cahp.errors import OutputError

    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(OutputError, match="is a file"):
        StagedOutput(tmp_path / "out", {"a": 1}).prepare()
    assert not (tmp_path / ".out.lock").exists()


# --------------------------------------------------------------------------------------------- 7. fingerprints


def test_model_folders_resolve_to_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cahp.models import resolve_model

    model = tiny_classifier_folder(tmp_path / "model", MODEL_LABELS)
    monkeypatch.chdir(tmp_path)
    source = resolve_model("model")
    assert source.location == str(model.resolve()) and Path(source.location).is_absolute()


def test_split_fingerprint_covers_texts_and_labels() -> None:
    split = TextSplit("train", [("a",), ("b", "c")], np.array([0, 1]))
    same = TextSplit("other name", [("a",), ("b", "c")], np.array([0, 1]))
    assert fingerprint_split(split) == fingerprint_split(same)
    assert fingerprint_split(split) != fingerprint_split(TextSplit("t", [("a",), ("b", "c")], np.array([1, 1])))
    assert fingerprint_split(split) != fingerprint_split(TextSplit("t", [("a",), ("bc",)], np.array([0, 1])))


# --------------------------------------------------------------------------------------------- 9/10. bad data


def test_non_utf8_file_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.csv").write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"train\.csv is not UTF-8 text"):
        load_task(str(tmp_path / "t"))


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.jsonl").write_text('{"text": "a", "label": 0}\n\n{"text": "b", "label": 1\n')
    with pytest.raises(DataError, match=r"train\.jsonl, line 3: not valid JSON"):
        load_task(str(tmp_path / "t"))


def test_row_without_label_names_file_and_line(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "t" / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c"}])
    with pytest.raises(DataError, match=r"train\.jsonl, line 3 \(split 'train'\) has no 'label' column"):
        load_task(str(tmp_path / "t"))
    write_jsonl(tmp_path / "u" / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": None}])
    with pytest.raises(DataError, match=r"line 2 .*empty label"):
        load_task(str(tmp_path / "u"))


def test_labels_must_be_all_whole_numbers_or_all_strings(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "mixed" / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": "pos"}])
    with pytest.raises(DataError, match=r"labels mix whole numbers and strings \(0 at .*line 1, 'pos' at .*line 2\)"):
        load_task(str(tmp_path / "mixed"))
    write_jsonl(tmp_path / "float" / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1.5}])
    with pytest.raises(DataError, match=r"label 1\.5 at .*line 2 is neither a whole number nor a string"):
        load_task(str(tmp_path / "float"))
    write_jsonl(
        tmp_path / "arabic" / "train.jsonl", [{"text": "a", "label": "\u0661"}, {"text": "b", "label": "\u0663"}]
    )
    task = load_task(str(tmp_path / "arabic"))
    assert task.label_mapping == "alphabetical", "only ASCII digits are whole numbers; other text is a label name"
    write_jsonl(tmp_path / "huge" / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2**70}])
    with pytest.raises(DataError, match="is not an integer"):
        load_task(str(tmp_path / "huge"))


def test_a_single_inferred_class_is_refused(tmp_path: Path) -> None:
    """All labels 0 would infer one label: a regression head, trained without a word. Refused."""
    write_jsonl(tmp_path / "t" / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 0}])
    with pytest.raises(DataError, match=r"every label in .* is 0: a classifier needs at least two classes"):
        load_task(str(tmp_path / "t"))
    assert load_task(str(tmp_path / "t"), num_labels=2).num_labels == 2, "--num-labels says how many there are"


def test_csv_byte_order_mark_is_stripped(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.csv").write_bytes("\ufefftext,label\nhello,0\nworld,1\n".encode())
    task = load_task(str(tmp_path / "t"))
    assert task.text_columns == ("text",) and task.split("train").texts == [("hello",), ("world",)]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
        ({"epochs": -1}, "epochs must be a number >= 0"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"warmup_ratio": 1.0}, r"warmup_ratio must be in \[0, 1\)"),
        ({"checkpoint_every": 0}, "checkpoint_every must be a whole number >= 1"),
        ({"epochs": float("nan")}, "epochs must be a number"),
    ],
)
def test_training_settings_are_checked(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainingConfig(**settings)


def test_zero_epochs_means_no_training_for_recovery_but_is_refused_by_finetune(tmp_path: Path) -> None:
    from cahp.data import encode_split
    from cahp.models import load_classifier
    from cahp.train import train_model

    assert TrainingConfig(epochs=0).epochs == 0  # prune's "no recovery"
    with pytest.raises(ConfigError, match="--epochs must be > 0 to fine-tune, got 0"):
        FinetuneConfig(training=TrainingConfig(epochs=0))
    model, tokenizer = load_classifier(tiny_classifier_folder(tmp_path / "m", MODEL_LABELS))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = encode_split(tokenizer, TextSplit("train", [("a b",), ("c",)], np.array([0, 1])), 8)
    assert train_model(model, tokenizer, data, TrainingConfig(epochs=0), progress=False) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not even one step


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_length": 0}, "max_length must be a whole number of tokens >= 1"),
        ({"max_length": -5}, "max_length must be"),
        ({"text_columns": ["a", "b", "c"]}, r"one column or two .*got 3"),
        ({"text_columns": []}, r"one column or two .*got 0"),
        ({"num_labels": 1}, "num_labels must be a whole number >= 2"),
        ({"protocol": "matched"}, "protocol must be one of auto, standard, offline"),
    ],
)
def test_task_options_are_checked(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TaskOptions(**settings)


def test_max_length_above_the_models_limit_is_refused(tmp_path: Path) -> None:
    from cahp.evaluation.evaluate import evaluate
    from cahp.models import check_max_length, load_model_config

    model = tiny_classifier_folder(tmp_path / "model", MODEL_LABELS)  # 64 positions
    check_max_length(64, load_model_config(model))
    with pytest.raises(ConfigError, match=r"--max-length 65 is above what this model accepts \(64 tokens\)"):
        check_max_length(65, load_model_config(model))
    write_jsonl(tmp_path / "data" / "test.jsonl", string_label_rows(["positive", "negative"]))
    with pytest.raises(ConfigError, match="--max-length 100"):
        evaluate(str(model), TaskOptions(str(tmp_path / "data"), max_length=100), progress=False)


# --------------------------------------------------------------------------------------------- 11. messages


def test_unknown_model_type_is_unsupported_architecture(tmp_path: Path) -> None:
    from cahp.models import load_classifier

    model = tiny_classifier_folder(tmp_path / "model", MODEL_LABELS)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "no-such-arch"}))
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type 'no-such-arch'.*supported"):
        load_classifier(model)


def _go_offline_without_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """No offline environment variable, and no network: every connection fails at once."""
    import socket

    from cahp import models

    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setattr(models, "_HUB_PROBE", {})

    def no_network(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)


@pytest.mark.parametrize("flagged", [True, False])
def test_unknown_model_fails_fast_offline_and_lists_aliases(monkeypatch: pytest.MonkeyPatch, flagged: bool) -> None:
    from cahp.models import resolve_model

    if flagged:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        _go_offline_without_flags(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match=r"not in the local hub cache.*minilm-l6, mpnet-base, smollm2-135m"):
        resolve_model("nosuchowner/nosuchmodel")
    assert time.perf_counter() - start < 5


def test_unknown_task_name_fails_fast_offline_and_lists_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    _go_offline_without_flags(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"not a built-in task \(sst5, sst2, mnli\).*cannot be reached"):
        load_task("no-such-dataset-anywhere")
    assert time.perf_counter() - start < 15  # includes importing datasets; the hub client alone retries ~30 s


# --------------------------------------------------------------------------------------------- 12. subsets


def test_subset_keeps_a_class_with_a_single_example() -> None:
    labels = np.array([0] * 50 + [1] * 49 + [2])
    split = TextSplit("train", [(str(i),) for i in range(100)], labels)
    subset = subsample(split, 10, seed=0)
    assert len(subset) == 10 and sorted(set(subset.labels.tolist())) == [0, 1, 2]
    # where the quotas keep every class, the choice is unchanged: 5 / 5 of a balanced 2-class split
    balanced = TextSplit("train", [(str(i),) for i in range(20)], np.repeat([0, 1], 10))
    assert np.bincount(subsample(balanced, 10, seed=0).labels).tolist() == [5, 5]


def test_subset_too_small_for_every_class_says_which_are_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    split = TextSplit("train", [(str(i),) for i in range(30)], np.repeat([0, 1, 2], 10), "data/train.jsonl")
    subset = subsample(split, 2, seed=0, label_names=["neg", "neu", "pos"])
    assert len(subset) == 2
    err = capsys.readouterr().err
    missing = sorted({"neg", "neu", "pos"} - {["neg", "neu", "pos"][i] for i in subset.labels})
    assert "data/train.jsonl" in err and f"class(es) {missing}" in err
