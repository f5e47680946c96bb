"""Shared fixtures: offline hub settings, the shared data folder, a tiny classifier folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    candidates = [os.environ.get("CAHP_DATA_DIR"), REPO.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "sst5" / "train.jsonl.gz").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = shared_data_dir()
    if found is None:
        pytest.skip("shared benchmark data (../shared/data) not found")
    return found


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own cache folder and no ambient data folder."""
    monkeypatch.setenv("CAHP_HOME", str(tmp_path / "cahp_home"))
    monkeypatch.delenv("CAHP_DATA_DIR", raising=False)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


WORDS = ["good", "great", "fine", "bad", "awful", "dull", "plot", "actor", "scene", "music"]


def tiny_bert_folder(
    folder: Path,
    layers: int = 2,
    heads: int = 4,
    *,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    intermediate_size: int = 64,
) -> Path:
    """A tiny random BERT (8 dimensions per head) saved with MiniLM's tokenizer: a base model (no task head),
    or with ``num_labels`` / ``label_names`` (index = id, recorded as its label2id) a classifier."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from cahp.models import load_tokenizer, resolve_model

    torch.manual_seed(0)
    tokenizer = load_tokenizer(resolve_model("minilm-l6"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=8 * heads,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=64,
    )
    if label_names is not None:
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
    elif num_labels is not None:
        config.num_labels = num_labels
    model_class = BertModel if label_names is None and num_labels is None else BertForSequenceClassification
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_task_folder(folder: Path, examples: int = 48) -> Path:
    """A 3-class toy task: train (all), validation (first 16), test (next 16) as JSON lines."""
    rows = [
        {
            "text": " ".join(WORDS[(i * 7 + j) % 10] for j in range(3 + i % 5)),
            "label": int(i % 10 < 5) + i % 2,
        }
        for i in range(examples)
    ]
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "validation.jsonl", rows[:16])
    write_jsonl(folder / "test.jsonl", rows[16:32])
    return folder
