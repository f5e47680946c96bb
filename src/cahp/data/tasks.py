"""Text-classification tasks: the built-in ones (SST-5, SST-2, MNLI) and any dataset by column mapping.

Where the data comes from, in this order: ``--data-dir`` (``data_dir=``), then ``$CAHP_DATA_DIR``, then the
Hugging Face hub through ``datasets``. A local folder or a hub dataset id also works as a task, with
``text_columns`` and ``label_column`` naming its columns.

Every task exposes the canonical splits ``train``, ``validation`` and ``test``.

MNLI has two protocols: ``standard`` (train split from the hub; validation = validation_matched, test =
validation_mismatched) and ``offline`` (no MNLI train split exists offline: train on validation_matched minus
a seeded, label-stratified 10% held out as validation; test = validation_mismatched). ``auto`` picks
``standard`` when a train split is found and ``offline`` otherwise. The protocol is named in every result.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cahp.errors import DataError

CANONICAL_SPLITS = ("train", "validation", "test")
MNLI_HELDOUT_FRACTION = 0.1
MNLI_HELDOUT_SEED = 0


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: its columns, labels, local file names and hub location."""

    name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    local_splits: dict[str, str]
    hub_path: str
    hub_config: str | None = None
    hub_splits: dict[str, str] = field(default_factory=dict)
    hub_text_columns: tuple[str, ...] | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


TASKS: dict[str, TaskSpec] = {
    "sst5": TaskSpec(
        name="sst5",
        text_columns=("text",),
        label_names=("very negative", "negative", "neutral", "positive", "very positive"),
        local_splits={"train": "train", "validation": "validation", "test": "test"},
        hub_path="SetFit/sst5",
        hub_splits={"train": "train", "validation": "validation", "test": "test"},
    ),
    "sst2": TaskSpec(
        name="sst2",
        text_columns=("text",),
        label_names=("negative", "positive"),
        local_splits={"train": "train", "validation": "validation"},
        hub_path="nyu-mll/glue",
        hub_config="sst2",
        hub_splits={"train": "train", "validation": "validation"},
        hub_text_columns=("sentence",),
    ),
    "mnli": TaskSpec(
        name="mnli",
        text_columns=("premise", "hypothesis"),
        label_names=("entailment", "neutral", "contradiction"),
        local_splits={
            "train": "train",
            "validation_matched": "validation_matched",
            "validation_mismatched": "validation_mismatched",
        },
        hub_path="nyu-mll/glue",
        hub_config="mnli",
        hub_splits={
            "train": "train",
            "validation_matched": "validation_matched",
            "validation_mismatched": "validation_mismatched",
        },
    ),
}


@dataclass
class TextSplit:
    """One labelled split: ``texts[i]`` is a tuple of one or two strings, ``labels[i]`` an int in 0..C-1."""

    name: str
    texts: list[tuple[str, ...]]
    labels: np.ndarray  # [examples], int64

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> TextSplit:
        indices = np.asarray(indices, dtype=np.int64)
        return TextSplit(name or self.name, [self.texts[i] for i in indices], self.labels[indices])


@dataclass
class TaskData:
    """A task's splits, where they came from, and the protocol that produced them."""

    name: str
    num_labels: int
    label_names: list[str]
    text_columns: tuple[str, ...]
    splits: dict[str, TextSplit]
    source: str
    protocol: str = "standard"
    notes: list[str] = field(default_factory=list)
    #: where pruning methods draw calibration data (signatures, salience, head scores): ``train``, except
    #: under the offline MNLI protocol, which reserves its held-out ``validation`` share for this.
    calibration_split: str = "train"

    def split(self, name: str) -> TextSplit:
        if name not in self.splits:
            raise DataError(f"task {self.name!r} has no split {name!r}; available: {', '.join(self.splits)}")
        return self.splits[name]

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary, written into every result."""
        return {
            "task": self.name,
            "protocol": self.protocol,
            "calibration_split": self.calibration_split,
            "source": self.source,
            "num_labels": self.num_labels,
            "label_names": self.label_names,
            "split_sizes": {name: len(split) for name, split in self.splits.items()},
            "notes": self.notes,
        }


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held_out) with ``fraction`` of each label held out, seeded."""
    rng = np.random.default_rng(seed)
    held_out = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        held_out.append(members[: round(len(members) * fraction)])
    held = np.sort(np.concatenate(held_out))
    kept = np.setdiff1d(np.arange(len(labels)), held)
    return kept, held


# ---------------------------------------------------------------------------------------------------- reading


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Read JSON lines, a JSON list, or CSV (optionally gzipped) into a list of dicts."""
    stem = path.name.removesuffix(".gz")
    with _open_text(path) as handle:
        if stem.endswith(".csv"):
            return list(csv.DictReader(handle))
        if stem.endswith(".jsonl"):
            return [json.loads(line) for line in handle if line.strip()]
        content = json.load(handle)
    if isinstance(content, dict) and "data" in content:
        content = content["data"]
    if not isinstance(content, list):
        raise DataError(f"{path}: expected a list of records in JSON; use JSON lines, a JSON list or CSV")
    return content


def _find_split_file(folder: Path, split: str) -> Path | None:
    for suffix in (".jsonl.gz", ".jsonl", ".json.gz", ".json", ".csv.gz", ".csv"):
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _rows_to_split(
    rows: list[dict[str, Any]],
    name: str,
    text_columns: Sequence[str],
    label_column: str,
    label_to_id: dict[Any, int] | None,
    where: str,
) -> TextSplit:
    if not rows:
        raise DataError(f"split {name!r} from {where} is empty: point to a file with examples")
    available = list(rows[0].keys())
    for column in (*text_columns, label_column):
        if column not in rows[0]:
            raise DataError(
                f"column {column!r} not found in {where} (split {name!r}); available columns: "
                f"{', '.join(available)}; set --text-columns / --label-column"
            )
    texts = [tuple("" if row[c] is None else str(row[c]) for c in text_columns) for row in rows]
    raw_labels = [row[label_column] for row in rows]
    if label_to_id is not None:
        unknown = sorted({str(label) for label in raw_labels if label not in label_to_id})
        if unknown:
            raise DataError(
                f"labels {unknown[:5]} in {where} (split {name!r}) are not in the training labels "
                f"{sorted(map(str, label_to_id))}"
            )
        labels = np.array([label_to_id[label] for label in raw_labels], dtype=np.int64)
    else:
        try:
            labels = np.array([int(label) for label in raw_labels], dtype=np.int64)
        except (TypeError, ValueError):
            raise DataError(f"non-integer labels in {where} (split {name!r})") from None
    return TextSplit(name, texts, labels)


def _check_labels(split: TextSplit, num_labels: int, where: str) -> None:
    if len(split) and (split.labels.min() < 0 or split.labels.max() >= num_labels):
        bad = split.labels[(split.labels < 0) | (split.labels >= num_labels)]
        raise DataError(
            f"labels outside 0..{num_labels - 1} in {where} (split {split.name!r}), e.g. {int(bad[0])}: "
            f"fix the data or set --num-labels"
        )


def _data_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir).expanduser())
    if os.environ.get("CAHP_DATA_DIR"):
        dirs.append(Path(os.environ["CAHP_DATA_DIR"]).expanduser())
    return dirs


def _load_local_builtin(spec: TaskSpec, folder: Path) -> dict[str, TextSplit] | None:
    task_folder = folder / spec.name
    if not task_folder.is_dir():
        return None
    splits = {}
    for split, stem in spec.local_splits.items():
        path = _find_split_file(task_folder, stem)
        if path is not None:
            rows = _read_rows(path)
            splits[split] = _rows_to_split(rows, split, spec.text_columns, "label", None, str(path))
    return splits or None


def _load_hub(
    path: str, config: str | None, split_names: dict[str, str], text_columns: Sequence[str], label_column: str
) -> dict[str, TextSplit]:
    try:
        import datasets

        dataset = datasets.load_dataset(path, config)
    except Exception as error:  # offline, unknown id, ... all mean "not found here"
        raise DataError(f"hub dataset {path!r}{f' ({config})' if config else ''}: {error}") from error
    return {
        split: _rows_to_split(dataset[hub_split].to_list(), split, text_columns, label_column, None, f"hub {path}")
        for split, hub_split in split_names.items()
        if hub_split in dataset
    }


# ---------------------------------------------------------------------------------------------------- API


def _finish_mnli(splits: dict[str, TextSplit], protocol: str, source: str) -> TaskData:
    spec = TASKS["mnli"]
    if protocol == "auto":
        protocol = "standard" if "train" in splits else "offline"
    for needed in ("validation_matched", "validation_mismatched"):
        if needed not in splits:
            raise DataError(f"MNLI split {needed!r} not found in {source}")
    notes = []
    if protocol == "standard":
        if "train" not in splits:
            raise DataError(
                f"MNLI train split not found in {source}: use --protocol offline (fine-tune on "
                "validation_matched minus a held-out 10%, report on validation_mismatched)"
            )
        final = {
            "train": splits["train"],
            "validation": splits["validation_matched"],
            "test": splits["validation_mismatched"],
        }
        notes.append("standard MNLI: validation = validation_matched, test = validation_mismatched")
    elif protocol == "offline":
        matched = splits["validation_matched"]
        kept, held = stratified_holdout(matched.labels, MNLI_HELDOUT_FRACTION, MNLI_HELDOUT_SEED)
        final = {
            "train": matched.subset(kept, "train"),
            "validation": matched.subset(held, "validation"),
            "test": splits["validation_mismatched"],
        }
        notes.append(
            "offline MNLI protocol: train = validation_matched minus a label-stratified 10% "
            f"(seed {MNLI_HELDOUT_SEED}), validation = that held-out 10% (matched), "
            "test = validation_mismatched; pruning calibrates on the held-out share (validation)"
        )
    else:
        raise DataError(f"unknown MNLI protocol {protocol!r}: use auto, standard or offline")
    return TaskData(
        "mnli",
        spec.num_labels,
        list(spec.label_names),
        spec.text_columns,
        final,
        source,
        protocol,
        notes,
        calibration_split="validation" if protocol == "offline" else "train",
    )


def _load_builtin(spec: TaskSpec, data_dir: str | os.PathLike[str] | None, protocol: str) -> TaskData:
    looked = []
    splits = None
    source = ""
    for folder in _data_dirs(data_dir):
        looked.append(str(folder / spec.name))
        splits = _load_local_builtin(spec, folder)
        if splits:
            source = str(folder / spec.name)
            break
    if not splits:
        looked.append(f"hub {spec.hub_path}{f' ({spec.hub_config})' if spec.hub_config else ''}")
        try:
            splits = _load_hub(
                spec.hub_path,
                spec.hub_config,
                spec.hub_splits,
                spec.hub_text_columns or spec.text_columns,
                "label",
            )
        except DataError as error:
            raise DataError(
                f"task {spec.name!r} not found; looked in: {'; '.join(looked)}. Pass --data-dir (a folder "
                f"holding {spec.name}/train.jsonl.gz ...) or set CAHP_DATA_DIR. ({error})"
            ) from None
        source = looked[-1]
    for split in splits.values():
        _check_labels(split, spec.num_labels, source)
    if spec.name == "mnli":
        return _finish_mnli(splits, protocol, source)
    return TaskData(spec.name, spec.num_labels, list(spec.label_names), spec.text_columns, splits, source)


def _load_custom(
    task: str,
    text_columns: Sequence[str] | None,
    label_column: str,
    num_labels: int | None,
) -> TaskData:
    folder = Path(task).expanduser()
    if folder.is_dir():
        files = {split: _find_split_file(folder, split) for split in CANONICAL_SPLITS}
        files = {split: path for split, path in files.items() if path is not None}
        if "train" not in files and "test" not in files and "validation" not in files:
            raise DataError(f"folder {folder} holds no train/validation/test file (.jsonl[.gz], .json[.gz], .csv[.gz])")
        raw = {split: _read_rows(path) for split, path in files.items()}
        source = str(folder)
    elif folder.is_file():
        raise DataError(
            f"{folder} is a file: put it in a folder as train.jsonl / validation.jsonl / test.jsonl "
            "(or .csv) and pass the folder as --task"
        )
    else:
        path, _, config = task.partition(":")
        try:
            import datasets

            dataset = datasets.load_dataset(path, config or None)
        except Exception as error:
            raise DataError(
                f"task {task!r} is not a built-in task ({', '.join(TASKS)}), not a local folder, and not "
                f"loadable from the hub ({type(error).__name__}: {error})"
            ) from None
        raw = {split: dataset[split].to_list() for split in dataset}
        source = f"hub {task}"
    first_rows = next((rows for rows in raw.values() if rows), [])
    if not first_rows:
        raise DataError(f"every split of {source} is empty")
    if text_columns is None:
        candidates = [c for c in ("text", "sentence", "content") if c in first_rows[0]]
        if not candidates:
            raise DataError(
                f"no text column found in {source} (columns: {', '.join(first_rows[0])}); set --text-columns"
            )
        text_columns = candidates[:1]
    text_columns = tuple(text_columns)
    label_to_id = None
    train_rows = raw.get("train") or first_rows
    if label_column in train_rows[0] and not all(
        isinstance(row[label_column], int) or str(row[label_column]).lstrip("-").isdigit() for row in train_rows
    ):
        names = sorted({str(row[label_column]) for row in train_rows})
        label_to_id = {name: i for i, name in enumerate(names)}
        raw = {split: [{**row, label_column: str(row[label_column])} for row in rows] for split, rows in raw.items()}
    splits = {
        split: _rows_to_split(rows, split, text_columns, label_column, label_to_id, source)
        for split, rows in raw.items()
    }
    if label_to_id is not None:
        label_names = list(label_to_id)
    else:
        count = num_labels or int(max(s.labels.max() for s in splits.values() if len(s))) + 1
        label_names = [str(i) for i in range(count)]
    for split in splits.values():
        _check_labels(split, len(label_names), source)
    name = folder.name if folder.is_dir() else task
    return TaskData(name, len(label_names), label_names, text_columns, splits, source)


def load_task(
    task: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    protocol: str = "auto",
    text_columns: Sequence[str] | None = None,
    label_column: str = "label",
    num_labels: int | None = None,
) -> TaskData:
    """Load a task's labelled splits.

    Args:
        task: ``sst5``, ``sst2``, ``mnli``, a local folder of split files, or a hub dataset id
            (``name`` or ``name:config``).
        data_dir: a folder holding ``<task>/<split>.jsonl.gz`` for the built-in tasks.
        protocol: MNLI only: ``auto``, ``standard`` or ``offline``.
        text_columns: one or two text columns (custom tasks).
        label_column: the label column (custom tasks).
        num_labels: label count for integer labels (custom tasks; default: largest label + 1).

    Raises:
        DataError: not found (the message lists where it looked), missing column, labels out of range,
            empty split.
    """
    if task.lower() in TASKS:
        return _load_builtin(TASKS[task.lower()], data_dir, protocol)
    return _load_custom(task, text_columns, label_column, num_labels)
