"""Tasks and data sources: built-in tasks, custom folders by column mapping, and every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cahp.data import encode_split, iter_batches, load_task, stratified_holdout
from cahp.errors import DataError
from tests.conftest import write_jsonl

ROWS = [{"text": f"example number {i}", "label": i % 3} for i in range(30)]


def test_sst5_from_data_dir(data_dir: Path) -> None:
    task = load_task("sst5", data_dir)
    assert task.num_labels == 5
    assert {name: len(s) for name, s in task.splits.items()} == {
        "train": 8544,
        "validation": 1101,
        "test": 2210,
    }
    assert np.bincount(task.split("test").labels).tolist() == [279, 633, 389, 510, 399]


def test_data_dir_from_environment(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAHP_DATA_DIR", str(data_dir))
    assert load_task("sst2").source == str(data_dir / "sst2")


def test_mnli_offline_protocol(data_dir: Path) -> None:
    task = load_task("mnli", data_dir)
    assert task.protocol == "offline"
    train, validation = task.split("train"), task.split("validation")
    assert len(train) + len(validation) == 9815
    assert len(task.split("test")) == 9832
    assert not set(train.texts) & set(validation.texts) - {t for t in train.texts if train.texts.count(t) > 1}
    assert abs(len(validation) / 9815 - 0.1) < 0.002
    assert task.calibration_split == "validation", "the protocol reserves the held-out share for calibration"
    assert task.describe()["calibration_split"] == "validation"
    assert load_task("sst5", data_dir).calibration_split == "train"
    with pytest.raises(DataError, match="train split not found"):
        load_task("mnli", data_dir, protocol="standard")


def test_stratified_holdout_keeps_label_shares() -> None:
    labels = np.repeat(np.arange(3), [100, 200, 300])
    kept, held = stratified_holdout(labels, 0.1, seed=0)
    assert np.bincount(labels[held]).tolist() == [10, 20, 30]
    assert len(np.intersect1d(kept, held)) == 0 and len(kept) + len(held) == 600
    again, _ = stratified_holdout(labels, 0.1, seed=0)
    assert np.array_equal(kept, again)


def test_custom_folder_with_column_mapping(tmp_path: Path) -> None:
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "gold": ["yes", "no"][i % 2]} for i in range(10)]
    write_jsonl(tmp_path / "pairs" / "train.jsonl", rows)
    write_jsonl(tmp_path / "pairs" / "test.jsonl", rows[:4])
    task = load_task(str(tmp_path / "pairs"), text_columns=["premise", "hypothesis"], label_column="gold")
    assert task.label_names == ["no", "yes"] and task.num_labels == 2
    assert task.split("test").texts[1] == ("p1", "h1")
    assert task.split("train").labels[:2].tolist() == [1, 0]


def test_csv_folder(tmp_path: Path) -> None:
    folder = tmp_path / "csvtask"
    folder.mkdir()
    (folder / "train.csv").write_text("sentence,label\nhello,0\nworld,1\n")
    task = load_task(str(folder))
    assert task.split("train").texts == [("hello",), ("world",)]
    assert task.num_labels == 2


def test_missing_column_names_the_available_ones(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "t" / "train.jsonl", ROWS)
    with pytest.raises(DataError, match=r"column 'review' not found.*available columns: text, label"):
        load_task(str(tmp_path / "t"), text_columns=["review"])


def test_labels_out_of_range(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "t" / "train.jsonl", ROWS)
    with pytest.raises(DataError, match=r"labels outside 0\.\.1"):
        load_task(str(tmp_path / "t"), num_labels=2)


def test_empty_split(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "t" / "train.jsonl", ROWS)
    (tmp_path / "t" / "test.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_task(str(tmp_path / "t"))


def test_unknown_task_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a built-in task"):
        load_task("no-such-dataset-anywhere")
    with pytest.raises(DataError, match=r"looked in: .*nowhere/sst5; hub SetFit/sst5"):
        load_task("sst5", tmp_path / "nowhere")


def test_missing_split_lists_available(data_dir: Path) -> None:
    with pytest.raises(DataError, match="has no split 'test'; available: train, validation"):
        load_task("sst2", data_dir).split("test")


@pytest.mark.parametrize("side", ["right", "left"])
def test_dynamic_padding_on_either_side(side: str) -> None:
    from cahp.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("minilm-l6"))
    tokenizer.padding_side = side
    task_split = load_split_of(["a", "a much longer example sentence here", "mid length one"])
    encoded = encode_split(tokenizer, task_split, max_length=16)
    ((_, batch),) = list(iter_batches(tokenizer, encoded, batch_size=8))
    mask = batch["attention_mask"]
    assert mask.shape[1] == max(encoded.lengths)
    first_real = mask[0].nonzero().flatten()
    assert (first_real[0] == 0) == (side == "right")


def load_split_of(texts: list[str]):
    from cahp.data import TextSplit

    return TextSplit("x", [(t,) for t in texts], np.zeros(len(texts), dtype=np.int64))


def test_length_grouped_batches_cover_the_epoch_and_pad_less() -> None:
    from cahp.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("minilm-l6"))
    rng = np.random.default_rng(0)
    texts = [" ".join(["word"] * int(n)) for n in rng.integers(1, 60, size=1000)]
    encoded = encode_split(tokenizer, load_split_of(texts), max_length=64)

    def epoch(grouped: bool, skip: int = 0) -> list[np.ndarray]:
        return [
            indices
            for indices, _ in iter_batches(
                tokenizer, encoded, 8, shuffle=True, seed=3, epoch=1, group_by_length=grouped, skip_batches=skip
            )
        ]

    grouped = epoch(True)
    assert sorted(np.concatenate(grouped).tolist()) == list(range(1000))  # every example once
    assert [len(b) for b in grouped] == [8] * 125
    padded = {g: sum(encoded.lengths[b].max() * len(b) for b in epoch(g)) for g in (False, True)}
    assert padded[True] < 0.7 * padded[False]
    # the batch order is shuffled (not longest-first) and fixed by (seed, epoch): a resumed epoch matches
    maxima = [encoded.lengths[b].max() for b in grouped]
    assert maxima != sorted(maxima, reverse=True)
    assert all(np.array_equal(a, b) for a, b in zip(epoch(True, skip=40), grouped[40:], strict=True))
