"""Text-classification tasks: the built-in ones (SST-5, SST-2, MNLI) and any dataset by column mapping.

Where the data comes from, in this order: ``--data-dir`` (``data_dir=``), then ``$CAHP_DATA_DIR``, then the
Hugging Face hub through ``datasets``. A local folder or a hub dataset id also works as a task, with
``text_columns`` and ``label_column`` naming its columns.

Every task exposes the canonical splits ``train``, ``validation`` and ``test``.

MNLI has two protocols: ``standard`` (train split from the hub; validation = validation_matched, test =
validation_mismatched) and ``offline`` (no MNLI train split exists offline: train on validation_matched minus
a seeded, label-stratified 10% held out as validation; test = validation_mismatched). ``auto`` picks
``standard`` when a train split is found and ``offline`` otherwise. The protocol is named in every result.

Labels: integer labels are class ids. String labels are numbered by the model's ``label2id`` when the model
names its labels (``load_task(..., label2id=...)``, or :meth:`TaskData.aligned_to`), otherwise alphabetically;
fine-tuning records the numbering in the saved model's config, so every later command maps them the same way.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cahp.errors import DataError
from cahp.models import label_ids

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
    #: where the examples were read from (a file, or ``hub <id>``), for messages
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> TextSplit:
        indices = np.asarray(indices, dtype=np.int64)
        return TextSplit(name or self.name, [self.texts[i] for i in indices], self.labels[indices], self.source)

    def where(self) -> str:
        """``"<file> (split '<name>')"``, for messages."""
        return f"{self.source or 'the data'} (split {self.name!r})"


def fingerprint_split(split: TextSplit) -> str:
    """SHA-256 of a split's texts and labels (in order), ``"sha256:<hex>"``: equal exactly when the examples
    are; the split's name and source do not count."""
    digest = hashlib.sha256()
    for texts in split.texts:
        digest.update("\x1f".join(texts).encode("utf-8", "surrogatepass"))
        digest.update(b"\x1e")
    digest.update(np.ascontiguousarray(split.labels, dtype=np.int64).tobytes())
    return f"sha256:{digest.hexdigest()}"


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
    #: how the labels in the data became ids: ``ids`` (integers in the data), ``alphabetical`` (string labels
    #: numbered in sorted order) or ``label2id`` (string labels numbered by the model's ``label2id``)
    label_mapping: str = "ids"
    #: whether ``num_labels`` was inferred as the largest integer label + 1 (neither built in nor given)
    num_labels_inferred: bool = False

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
        } | ({"label_mapping": self.label_mapping} if self.label_mapping != "ids" else {})

    def aligned_to(self, model_config: Any) -> TaskData:
        """This task with its label ids made to agree with a model (a ``transformers`` config).

        - A base model (no classification head yet): unchanged; its new head gets this task's labels.
        - String labels and a classifier that names its labels (``label2id`` other than ``LABEL_0 ...``):
          renumbered by the model's ids. A label the model does not know is refused.
        - Integer labels: must lie in the model's ``0..num_labels-1``. An inferred label count (largest
          label + 1) below the model's grows to it (a test split may lack the top class).

        Raises:
            DataError: labels the model does not know, or a label count that differs from the model's.
        """
        from cahp.models import is_classifier_config, named_labels

        if not is_classifier_config(model_config):
            return self
        model_count = int(model_config.num_labels)
        model_names = named_labels(model_config)
        if self.label_mapping in ("alphabetical", "label2id") and model_names is not None:
            unknown = [name for name in self.label_names if name not in model_names]
            if unknown:
                raise DataError(
                    f"labels {unknown[:5]} of {self.source} are not labels of the model (its label2id names "
                    f"{model_names}): evaluate it on data with those labels, or fine-tune a base model on this task"
                )
            if self.label_names == model_names:
                return replace(self, label_mapping="label2id")
            new_ids = np.array([model_names.index(name) for name in self.label_names], dtype=np.int64)
            splits = {
                name: TextSplit(split.name, split.texts, new_ids[split.labels], split.source)
                for name, split in self.splits.items()
            }
            note = f"string labels numbered by the model's label2id: {label_ids(model_names)}"
            return replace(
                self,
                num_labels=model_count,
                label_names=list(model_names),
                splits=splits,
                label_mapping="label2id",
                notes=[*self.notes, note],
            )
        for split in self.splits.values():
            if len(split) and (split.labels.min() < 0 or split.labels.max() >= model_count):
                bad = int(split.labels[(split.labels < 0) | (split.labels >= model_count)][0])
                shown = self.label_names[bad] if 0 <= bad < len(self.label_names) else bad
                raise DataError(
                    f"label {shown!r} in {split.where()} is outside the model's {model_count} labels "
                    f"(0..{model_count - 1}): this model was trained for another label set; fine-tune a base "
                    "model on this task (--num-labels sets its label count), or fix the data"
                )
        if self.num_labels == model_count:
            return self
        if self.num_labels < model_count and self.num_labels_inferred:
            names = model_names or [*self.label_names, *(str(i) for i in range(self.num_labels, model_count))]
            note = f"label count from the model ({model_count}); the data's largest label is {self.num_labels - 1}"
            return replace(self, num_labels=model_count, label_names=list(names), notes=[*self.notes, note])
        raise DataError(
            f"task {self.name!r} has {self.num_labels} labels but the model has {model_count}: pass "
            f"--num-labels {model_count} if the data uses only some of the model's labels, or fine-tune a base "
            "model for this task"
        )


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


@dataclass
class RawRows:
    """Records read from one file (or hub split), with where each came from.

    ``lines[i]`` is the file line of ``rows[i]`` (JSON lines and CSV) or ``None`` (a JSON list, the hub).
    """

    rows: list[dict[str, Any]]
    source: str
    lines: list[int | None] | None = None  # None: no line numbers (a JSON list, the hub)

    def __post_init__(self) -> None:
        if self.lines is None:
            self.lines = [None] * len(self.rows)

    def where(self, index: int) -> str:
        line = self.lines[index]  # type: ignore[index]  # never None after __post_init__
        return f"{self.source}, line {line}" if line is not None else f"{self.source}, record {index + 1}"


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig: a byte-order mark (Excel's CSV export) is dropped instead of glued to the first column name
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return path.open("r", encoding="utf-8-sig", newline="")


def read_rows(path: Path) -> RawRows:
    """Read JSON lines, a JSON list, or CSV (optionally gzipped) into records.

    Raises:
        DataError: not UTF-8, not gzip, malformed JSON (naming the line) or CSV, records that are not objects.
    """
    stem = path.name.removesuffix(".gz")
    try:
        with _open_text(path) as handle:
            if stem.endswith(".csv"):
                return _read_csv(handle, path)
            if stem.endswith(".jsonl"):
                return _read_json_lines(handle, path)
            text = handle.read()
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not UTF-8 text (byte {error.object[error.start : error.start + 1]!r} at offset "
            f"{error.start}): re-save it as UTF-8"
        ) from None
    except (gzip.BadGzipFile, EOFError, OSError) as error:
        raise DataError(f"{path} cannot be read ({type(error).__name__}: {error})") from None
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}, line {error.lineno}: not valid JSON ({error.msg}, column {error.colno}); use JSON lines, "
            "a JSON list or CSV"
        ) from None
    if isinstance(content, dict) and "data" in content:
        content = content["data"]
    if not isinstance(content, list):
        raise DataError(f"{path}: expected a list of records in JSON; use JSON lines, a JSON list or CSV")
    for index, row in enumerate(content):
        if not isinstance(row, dict):
            raise DataError(f"{path}, record {index + 1}: expected an object with named columns, got {row!r:.60}")
    return RawRows(content, str(path))


def _read_json_lines(handle: io.TextIOBase, path: Path) -> RawRows:
    rows: list[dict[str, Any]] = []
    lines: list[int | None] = []
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}, line {number}: not valid JSON ({error.msg}, column {error.colno}); each line must "
                "hold one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object with named columns, got {row!r:.60}")
        rows.append(row)
        lines.append(number)
    return RawRows(rows, str(path), lines)


def _read_csv(handle: io.TextIOBase, path: Path) -> RawRows:
    reader = csv.DictReader(handle)
    rows: list[dict[str, Any]] = []
    lines: list[int | None] = []
    try:
        for row in reader:
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as error:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({error})") from None
    return RawRows(rows, str(path), lines)


def find_split_file(folder: Path, split: str) -> Path | None:
    """The file of ``split`` in ``folder`` (``<split>.jsonl``, ``.json`` or ``.csv``, gzipped or not), else None."""
    for suffix in (".jsonl.gz", ".jsonl", ".json.gz", ".json", ".csv.gz", ".csv"):
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _check_columns(raw: RawRows, name: str, text_columns: Sequence[str], label_column: str) -> None:
    """Every record must hold every text column and a label.

    Raises:
        DataError: naming the file, the line (or record) and the missing column.
    """
    if not raw.rows:
        raise DataError(f"split {name!r} from {raw.source} is empty: point to a file with examples")
    available = [str(c) for c in raw.rows[0] if c is not None]
    for column in (*text_columns, label_column):
        if column not in raw.rows[0]:
            raise DataError(
                f"column {column!r} not found in {raw.source} (split {name!r}); available columns: "
                f"{', '.join(available)}; set --text-columns / --label-column"
            )
    for index, row in enumerate(raw.rows):
        for column in (*text_columns, label_column):
            if column not in row:
                raise DataError(
                    f"{raw.where(index)} (split {name!r}) has no {column!r} column: every record needs "
                    f"{', '.join(repr(c) for c in (*text_columns, label_column))}"
                )
        label = row[label_column]
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{raw.where(index)} (split {name!r}) has an empty label ({label_column!r}): fix the row")


def _rows_to_split(
    raw: RawRows,
    name: str,
    text_columns: Sequence[str],
    label_column: str,
    label_to_id: Mapping[str, int] | None,
    labels_known_as: str = "the task's labels (those of its train split)",
) -> TextSplit:
    """Records to a :class:`TextSplit`: integer labels as they are, or string labels through ``label_to_id``
    (``labels_known_as`` says where those come from, for the message about an unknown label)."""
    _check_columns(raw, name, text_columns, label_column)
    rows = raw.rows
    texts = [tuple("" if row[c] is None else str(row[c]) for c in text_columns) for row in rows]
    labels = np.empty(len(rows), dtype=np.int64)
    for index, row in enumerate(rows):
        label = row[label_column]
        if label_to_id is not None:
            if str(label) not in label_to_id:
                raise DataError(
                    f"label {str(label)!r} at {raw.where(index)} (split {name!r}) is not one of {labels_known_as} "
                    f"{sorted(label_to_id, key=label_to_id.__getitem__)}"
                )
            labels[index] = label_to_id[str(label)]
        else:
            try:
                labels[index] = _as_int_label(label)
            except (TypeError, ValueError, OverflowError):
                raise DataError(
                    f"label {label!r} at {raw.where(index)} (split {name!r}) is not an integer; labels must be all "
                    "integers or all strings"
                ) from None
    return TextSplit(name, texts, labels, raw.source)


def _as_int_label(label: Any) -> int:
    if isinstance(label, bool | int):
        return int(label)
    if isinstance(label, float) and label.is_integer():
        return int(label)
    if isinstance(label, str) and re.fullmatch(r"-?[0-9]+", label.strip()):  # ASCII digits only
        return int(label.strip())
    raise ValueError(label)


def _label_kind(label: Any) -> str:
    """``"integer"`` (a whole number, also as text), ``"string"`` (other text) or ``"other"``."""
    try:
        _as_int_label(label)
        return "integer"
    except (TypeError, ValueError):
        return "string" if isinstance(label, str) else "other"


def _refuse_label_kinds(train: RawRows, label_column: str, kinds: list[str]) -> None:
    """A train split whose labels are not all whole numbers or all strings: name the first of each kind."""
    first = {kind: index for index, kind in reversed(list(enumerate(kinds)))}
    if "other" in first:
        index = first["other"]
        raise DataError(
            f"label {train.rows[index][label_column]!r} at {train.where(index)} is neither a whole number nor a "
            "string; labels must be all integers or all strings"
        )
    examples = ", ".join(f"{train.rows[i][label_column]!r} at {train.where(i)}" for i in sorted(first.values()))
    raise DataError(f"labels mix whole numbers and strings ({examples}); labels must be all integers or all strings")


def _check_labels(split: TextSplit, num_labels: int, where: str) -> None:
    if len(split) and (split.labels.min() < 0 or split.labels.max() >= num_labels):
        bad = split.labels[(split.labels < 0) | (split.labels >= num_labels)]
        raise DataError(
            f"labels outside 0..{num_labels - 1} in {split.source or where} (split {split.name!r}), e.g. "
            f"{int(bad[0])}: fix the data or set --num-labels"
        )


def data_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Where local task data is looked for, in order: ``data_dir``, then ``$CAHP_DATA_DIR``."""
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
        path = find_split_file(task_folder, stem)
        if path is not None:
            splits[split] = _rows_to_split(read_rows(path), split, spec.text_columns, "label", None)
    return splits or None


def hub_dataset(path: str, config: str | None) -> Any:
    """``datasets.load_dataset(path, config)``; when the hub cannot be reached, only the local cache is read
    (at once, instead of after ~30 s of retries).

    Raises:
        DataError: not loadable (the message says why).
    """
    import datasets  # before the offline switch: datasets copies the hub's offline flag when first imported

    from cahp.models import offline_when_hub_unreachable

    with offline_when_hub_unreachable() as offline:
        try:
            return datasets.load_dataset(path, config)
        except Exception as error:  # offline, unknown id, ... all mean "not found here"
            reason = f"{type(error).__name__}: {error}"
            raise DataError(f"{reason}{f'; the hub cannot be used: {offline}' if offline else ''}") from None


def _load_hub(
    path: str, config: str | None, split_names: dict[str, str], text_columns: Sequence[str], label_column: str
) -> dict[str, TextSplit]:
    try:
        dataset = hub_dataset(path, config)
    except DataError as error:
        raise DataError(f"hub dataset {path!r}{f' ({config})' if config else ''}: {error}") from None
    splits = {}
    for split, hub_split in split_names.items():
        if hub_split in dataset:
            rows = dataset[hub_split].to_list()
            raw = RawRows(rows, f"hub {path}")
            splits[split] = _rows_to_split(raw, split, text_columns, label_column, None)
    return splits


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
    for folder in data_dirs(data_dir):
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
    label2id: Mapping[str, int] | None,
) -> TaskData:
    folder = Path(task).expanduser()
    if folder.is_dir():
        found = {split: find_split_file(folder, split) for split in CANONICAL_SPLITS}
        files = {split: path for split, path in found.items() if path is not None}
        if "train" not in files and "test" not in files and "validation" not in files:
            raise DataError(f"folder {folder} holds no train/validation/test file (.jsonl[.gz], .json[.gz], .csv[.gz])")
        raw = {split: read_rows(path) for split, path in files.items()}
        source = str(folder)
    elif folder.is_file():
        raise DataError(
            f"{folder} is a file: put it in a folder as train.jsonl / validation.jsonl / test.jsonl "
            "(or .csv) and pass the folder as --task"
        )
    else:
        path, _, config = task.partition(":")
        try:
            dataset = hub_dataset(path, config or None)
        except DataError as error:
            raise DataError(
                f"task {task!r} is not a built-in task ({', '.join(TASKS)}), not a local folder, and not "
                f"loadable from the hub ({error})"
            ) from None
        raw = {}
        for split in dataset:
            rows = dataset[split].to_list()
            raw[split] = RawRows(rows, f"hub {task} ({split})")
        source = f"hub {task}"
    first = next((rows for rows in raw.values() if rows.rows), None)
    if first is None:
        raise DataError(f"every split of {source} is empty")
    if text_columns is None:
        candidates = [c for c in ("text", "sentence", "content") if c in first.rows[0]]
        if not candidates:
            raise DataError(
                f"no text column found in {source} (columns: {', '.join(map(str, first.rows[0]))}); set --text-columns"
            )
        text_columns = candidates[:1]
    text_columns = tuple(text_columns)
    for split, rows in raw.items():
        _check_columns(rows, split, text_columns, label_column)
    train = raw.get("train") or first
    label_to_id: Mapping[str, int] | None = None
    label_mapping = "ids"
    kinds = [_label_kind(row[label_column]) for row in train.rows]
    if "other" in kinds or len(set(kinds)) > 1:
        _refuse_label_kinds(train, label_column, kinds)
    if kinds and kinds[0] == "string":
        if label2id:
            label_to_id, label_mapping = {str(k): int(v) for k, v in label2id.items()}, "label2id"
            if sorted(label_to_id.values()) != list(range(len(label_to_id))):
                raise DataError(f"label2id {dict(label2id)} does not number its labels 0..{len(label2id) - 1}")
        else:
            names = sorted({str(row[label_column]) for row in train.rows})
            label_to_id, label_mapping = label_ids(names), "alphabetical"
    known_as = (
        "the model's labels (its config.label2id; fine-tune a base model to train on other labels)"
        if label_mapping == "label2id"
        else "the task's labels (those of its train split)"
    )
    splits = {
        split: _rows_to_split(rows, split, text_columns, label_column, label_to_id, known_as)
        for split, rows in raw.items()
    }
    inferred = False
    if label_to_id is not None:
        label_names = sorted(label_to_id, key=label_to_id.__getitem__)
    else:
        inferred = num_labels is None
        count = num_labels or int(max(s.labels.max() for s in splits.values() if len(s))) + 1
        if count < 2:
            raise DataError(
                f"every label in {source} is 0: a classifier needs at least two classes; fix the data, or set "
                "--num-labels to the number of classes"
            )
        label_names = [str(i) for i in range(count)]
    for split in splits.values():
        _check_labels(split, len(label_names), source)
    name = folder.name if folder.is_dir() else task
    notes = []
    if label_mapping == "alphabetical":
        notes.append(f"string labels numbered alphabetically: {label_ids(label_names)}")
    return TaskData(
        name,
        len(label_names),
        label_names,
        text_columns,
        splits,
        source,
        notes=notes,
        label_mapping=label_mapping,
        num_labels_inferred=inferred,
    )


def load_task(
    task: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    protocol: str = "auto",
    text_columns: Sequence[str] | None = None,
    label_column: str = "label",
    num_labels: int | None = None,
    label2id: Mapping[str, int] | None = None,
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
        label2id: how to number string labels (custom tasks), e.g. a fine-tuned model's ``config.label2id``
            (see :func:`cahp.models.named_labels`); default: alphabetically. Ignored for integer labels.

    Raises:
        DataError: not found (the message lists where it looked), unreadable file (naming file and line),
            missing column (naming file and row), a label not in ``label2id``, labels out of range, empty split.
    """
    if task.lower() in TASKS:
        return _load_builtin(TASKS[task.lower()], data_dir, protocol)
    return _load_custom(task, text_columns, label_column, num_labels, label2id)
