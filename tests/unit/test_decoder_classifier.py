"""A classifier head on a decoder (tiny random Llama, Mistral and Qwen2: 3 layers, 4 query / 2 key-value heads),
fine-tuned with ``cahp finetune`` and pruned with ``cahp prune`` (CAHP and a scorer, grouped-query constraints).

transformers' decoder classifiers read each row at the rightmost token whose id is not ``config.pad_token_id``;
these tests check that cahp gives a tokenizer without a pad token one, makes the config's pad id the tokenizer's,
and that an example's logits then do not depend on how much padding its batch adds, nor on which side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

from cahp.cli import main
from cahp.models import align_pad_token, load_classifier, pools_last_token
from cahp.surgery import kept_heads_by_layer, kept_kv_heads_by_layer
from tests.conftest import WORDS, tiny_task_folder
from tests.unit.test_language_modeling import GQA_FAMILIES, causal_lm
from tests.unit.tiny_models import HEADS, LAYERS, build_model

EOS_ID = 2
MAX_LENGTH = 48  # Qwen2's tokenizer here is character-level: the toy task's texts fit


def tokenizer_without_pad(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over the toy task's words with BOS/EOS but NO pad token (like Llama's)."""
    vocab = {"<unused>": 0, "<bos>": 1, "<eos>": EOS_ID, "<unk>": 3}
    vocab.update({word: 4 + i for i, word in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.padding_side = padding_side
    return tokenizer


def qwen2_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE without merges (one token per character) over the toy task's letters: transformers
    loads a folder of model_type ``qwen2`` with its own Qwen2 tokenizer class, whatever tokenizer was saved. It pads
    with ``<|endoftext|>`` (id 1), not the tiny config's pad id 0."""
    vocab = {"<unused>": 0, "<|endoftext|>": 1}
    for character in ["\u0120", *sorted(set("".join(WORDS)))]:  # \u0120: byte-level BPE's space
        vocab[character] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[])


def family_tokenizer(family: str) -> Any:
    return qwen2_tokenizer() if family == "qwen2" else tokenizer_without_pad()


def padded_logits(model: Any, tokenizer: Any, text: str, others: list[str], side: str) -> torch.Tensor:
    """The logits ``[labels]`` of ``text`` in a batch with ``others`` (longer texts pad it), padded on ``side``."""
    tokenizer.padding_side = side
    batch = tokenizer([text, *others], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits[0]


def check_padding_invariance(model: Any, tokenizer: Any) -> None:
    """The logits of one example alone, and padded by a few or many tokens on the right or the left, are the
    same."""
    text = "good plot awful"
    with torch.no_grad():
        alone = model(**tokenizer([text], return_tensors="pt")).logits[0]
    for side in ("right", "left"):
        pads = set()
        for others in (["good plot awful music"], ["good plot awful music scene actor dull"]):
            batch = tokenizer([text, *others], padding=True, return_tensors="pt")
            pads.add(int((batch["attention_mask"][0] == 0).sum()))
            torch.testing.assert_close(padded_logits(model, tokenizer, text, others, side), alone, atol=1e-5, rtol=0)
        assert len(pads) == 2 and 0 not in pads, "the text is padded, by two different amounts"


@pytest.fixture(scope="module")
def base_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per GQA family, a saved tiny causal LM whose config pads with id 0 and whose tokenizer has no pad token;
    plus the toy 3-class task."""
    root = tmp_path_factory.mktemp("decoder_classifier")
    folders = {"task": tiny_task_folder(root / "task", examples=48)}
    for family in GQA_FAMILIES:
        folder = root / family
        causal_lm(family).save_pretrained(folder)  # config.pad_token_id = 0: not the tokenizer's padding
        family_tokenizer(family).save_pretrained(folder)
        folders[family] = folder
    return folders


@pytest.fixture(scope="module")
def finetuned(base_folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``cahp finetune`` of each family's base model on the toy task."""
    root = tmp_path_factory.mktemp("finetuned")
    folders = {}
    for family in GQA_FAMILIES:
        out = root / family
        argv = ["finetune", "--model", str(base_folders[family]), "--task", str(base_folders["task"])]
        argv += ["--max-train-examples", "40", "--max-length", str(MAX_LENGTH), "--epochs", "1", "--batch-size", "8"]
        argv += ["--learning-rate", "1e-3", "--eval-splits", "validation", "--out", str(out)]
        assert main(argv) == 0
        folders[family] = out
    return folders


# ---------------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_a_stock_classifier_with_the_tokenizers_pad_id_reads_the_last_real_token(family: str) -> None:
    model, tokenizer = build_model(family), family_tokenizer(family)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # what load_tokenizer does for a tokenizer without one
    assert pools_last_token(model) and model.config.pad_token_id == 0 != tokenizer.pad_token_id
    # without alignment, a right-padded row is read at a pad token (the config's pad id is another token)
    alone = model(**tokenizer(["good plot awful"], return_tensors="pt")).logits[0].detach()
    misread = padded_logits(model, tokenizer, "good plot awful", ["good plot awful music scene"], "right")
    assert not torch.allclose(misread, alone, atol=1e-3), "the unaligned classifier reads a pad token"
    align_pad_token(model, tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id not in (None, 0)
    check_padding_invariance(model, tokenizer)


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_a_base_decoder_loads_as_a_classifier_that_pads_with_eos(
    family: str, base_folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, tokenizer = load_classifier(base_folders[family], 3, ["a", "b", "c"])
    pad_id = tokenizer.pad_token_id
    assert tokenizer.pad_token == ("<|endoftext|>" if family == "qwen2" else "<eos>"), "EOS pads without a pad token"
    assert f"config.pad_token_id 0 is not the tokenizer's pad token id {pad_id}" in capsys.readouterr().err
    assert model.config.pad_token_id == pad_id
    check_padding_invariance(model, tokenizer)


def test_an_encoder_keeps_its_own_pad_id() -> None:
    model = build_model("roberta")
    assert not pools_last_token(model) and model.config.pad_token_id == 1


# ---------------------------------------------------------------------------------------------------- finetune


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_finetune_saves_a_decoder_classifier_that_reloads_and_ignores_padding(
    family: str, finetuned: dict[str, Path]
) -> None:
    folder = finetuned[family]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification")
    assert "quantization_config" not in config
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["train_examples"] == 40 and metrics["results"]["validation"]["examples"] == 16
    assert metrics["results"]["validation"] == metrics["history"][-1]["validation"], "evaluated once, at the end"
    model, tokenizer = load_classifier(folder)
    assert tokenizer.pad_token_id not in (None, 0) and config["pad_token_id"] == tokenizer.pad_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    check_padding_invariance(model, tokenizer)


# ---------------------------------------------------------------------------------------------------- prune


@pytest.mark.parametrize(
    ("family", "method", "settings"),
    [
        ("llama", "cahp", ["--method-setting", "tsne_iterations=250"]),
        ("mistral", "cahp", ["--method-setting", "tsne_iterations=250", "--keep", "8"]),
        ("qwen2", "fisher", ["--keep", "8"]),
        ("llama", "random", ["--keep", "6", "--uniform-layers"]),
    ],
)
def test_prune_a_decoder_classifier_in_groups_mode(
    family: str,
    method: str,
    settings: list[str],
    finetuned: dict[str, Path],
    base_folders: dict[str, Path],
    tmp_path: Path,
) -> None:
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(finetuned[family]), "--task", str(base_folders["task"]), "--method", method]
    argv += ["--gqa-mode", "groups", "--max-length", str(MAX_LENGTH), "--eval-splits", "validation"]
    argv += ["--recovery-epochs", "1"]
    argv += ["--recovery-learning-rate", "1e-3", "--batch-size", "8", "--calibration-batch-size", "8"]
    argv += ["--latency-batch-size", "2", "--latency-seq-len", "8", "--latency-repeats", "1", "--out", str(out)]
    assert main([*argv, *settings]) == 0
    report = json.loads((out / "report.json").read_text())
    kept = {int(layer): heads for layer, heads in report["kept_heads_by_layer"].items()}
    assert all(heads in ([0, 1], [2, 3], [0, 1, 2, 3]) for heads in kept.values()), "whole key-value groups"
    assert sum(map(len, kept.values())) == report["heads"]["kept"] < LAYERS * HEADS
    if "--keep" in settings:  # plus whole groups the guardrail adds so that every layer keeps one
        requested = int(settings[settings.index("--keep") + 1])
        assert report["heads"]["requested"] == requested
        assert report["heads"]["kept"] == requested + len(report["plan"]["guardrail_heads"])
    if "--uniform-layers" in settings:
        assert len({len(heads) for heads in kept.values()}) == 1

    model, tokenizer = load_classifier(out / "model")
    assert kept_heads_by_layer(model) == kept
    assert {layer: len(heads) for layer, heads in kept_kv_heads_by_layer(model).items()} == {
        layer: len(heads) // 2 for layer, heads in kept.items()
    }
    assert model.config.pad_token_id == tokenizer.pad_token_id not in (None, 0)
    check_padding_invariance(model, tokenizer)
    accuracy = report["accuracy"]["after_recovery"]["validation"]["accuracy"]
    batch = tokenizer(
        [json.loads(line)["text"] for line in (base_folders["task"] / "validation.jsonl").read_text().splitlines()],
        padding=True,
        return_tensors="pt",
    )
    labels = torch.tensor(
        [json.loads(line)["label"] for line in (base_folders["task"] / "validation.jsonl").read_text().splitlines()]
    )
    with torch.no_grad():
        reloaded_accuracy = float((model(**batch).logits.argmax(-1) == labels).float().mean())
    assert reloaded_accuracy == pytest.approx(accuracy), "the saved model is the one the report measured"


# ---------------------------------------------------------------------------------------------------- bench


def test_bench_compares_methods_on_a_decoder_classifier_in_groups_mode(
    finetuned: dict[str, Path], base_folders: dict[str, Path], tmp_path: Path
) -> None:
    """``cahp bench`` on a fine-tuned Llama classifier: CAHP at its knee and random at the same budget keep whole
    key-value groups, and every cell's accuracy is measured after recovery."""
    from cahp.bench import BenchConfig, run_bench
    from cahp.train.finetune import TaskOptions
    from cahp.train.loop import TrainingConfig

    config = BenchConfig(
        model=str(finetuned["llama"]),
        out=str(tmp_path / "bench"),
        task=TaskOptions(str(base_folders["task"]), max_length=MAX_LENGTH),
        methods=["cahp", "random"],
        budgets=["knee"],
        seeds=[0],
        calibration_size=None,
        method_settings={"cahp": {"tsne_iterations": 250}},
        resample_calibration=False,
        recovery=TrainingConfig(epochs=1, learning_rate=1e-3, batch_size=8),
        recovery_max_examples=24,
        gqa_mode="groups",
    )
    assert run_bench(config, progress=False)["computed"] == 2
    cells = {
        path.stem.split("__")[0]: json.loads(path.read_text()) for path in (tmp_path / "bench" / "cells").glob("*")
    }
    assert set(cells) == {"cahp", "random"}
    for cell in cells.values():
        assert all(heads in ([0, 1], [2, 3], [0, 1, 2, 3]) for heads in cell["kept_heads_by_layer"].values())
        assert 0.0 <= next(iter(cell["accuracy"]["after_recovery"].values()))["accuracy"] <= 1.0
    assert cells["random"]["keep"] == cells["cahp"]["keep"], "random runs at CAHP's head count"
    assert (tmp_path / "bench" / "summary.md").is_file() and (tmp_path / "bench" / "report.html").is_file()
